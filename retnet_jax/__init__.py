"""retnet_jax: Retentive Networks (Sun et al. 2023) in JAX and Flax NNX."""
