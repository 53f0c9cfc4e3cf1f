"""Model FLOPs by formula, and the peak FLOP/s of the chips: the one copy that the trainer's MFU,
the ahead-of-time compile (aot) and the benchmarks use.

Model FLOPs count matmuls only, 2 per multiply-add, for the model as the code computes it:

  dense (per token, forward): 2 × the matmul parameters a token passes through. Per layer its
    mixer's projections (each mixer reports them: `ModelConfig.mixer_matmul_params`; retention's
    q, k [D, D], v and the swish gate [D, H·V], out [H·V, D]; attention's q, k, v, out) and the gated
    FFN (3 × [D, F]); plus the LM head [D, vocab] (the embedding lookup, norms and the decay are not
    matmuls).
  mixer (per token, forward): each layer's mixing operator as its mixer reports it
    (`ModelConfig.mixing_flops`): chunkwise retention per head 2C(K + V) inside a chunk of
    C = min(chunk_size, T) and 4KV across chunks (Q·S and the state update); parallel retention
    2T(K + V); recurrent 4KV; attention 2T(K + K) per head over the whole T × T matrix (the causal
    half is computed, so it is counted).
  training: 3 × the forward (the backward costs twice the forward); remat's recomputation is not
    counted, as MFU's convention is.
"""

from __future__ import annotations

import itertools
import re
import time

import jax
import jax.numpy as jnp


def dense_flops_per_token(cfg) -> float:
  """Forward matmul FLOPs of one token through the mixers' projections (as each mixer reports them,
  `ModelConfig.mixer_matmul_params`), the FFNs and the head."""
  D, F, L = cfg.embed_dim, cfg.ffn_dim, cfg.num_layers
  return 2.0 * (cfg.mixer_matmul_params() + L * 3 * D * F + D * cfg.vocab_size)


def mixer_flops_per_token(cfg, seq_len: int, form: str | None = None) -> float:
  """Forward FLOPs of one token in the mixing operators of all layers, as each mixer reports them
  (`ModelConfig.mixing_flops`: retention by its form, attention over its [T, T] or window)."""
  return float(cfg.mixing_flops(seq_len, cfg.form if form is None else form))


def forward_flops_per_token(cfg, seq_len: int, form: str | None = None) -> float:
  return dense_flops_per_token(cfg) + mixer_flops_per_token(cfg, seq_len, form)


def train_flops_per_token(cfg, seq_len: int, form: str | None = None) -> float:
  """3 × the forward: what MFU divides by."""
  return 3.0 * forward_flops_per_token(cfg, seq_len, form)


def train_flops_per_step(cfg, batch_size: int, seq_len: int) -> float:
  return train_flops_per_token(cfg, seq_len) * batch_size * seq_len


# ------------------------------------------------------------------------------------------------
# Peak FLOP/s.

# Dense bfloat16 FLOP/s per chip (one jax device: v4 and v5p chips run as one megacore device), from
# the vendors' data sheets (GPUs: SXM parts, without sparsity).
PEAK_FLOPS = {
    'v4': 275e12, 'v5e': 197e12, 'v5p': 459e12, 'v6e': 918e12,
    'a100': 312e12, 'h100': 989e12, 'h200': 989e12, 'b200': 2250e12,
}

# jax's device_kind -> a PEAK_FLOPS key, first match wins.
_KINDS = (
    (r'tpu v4', 'v4'), (r'tpu v5 ?(lite|e)', 'v5e'), (r'tpu v5', 'v5p'), (r'tpu v6', 'v6e'),
    (r'a100', 'a100'), (r'h100', 'h100'), (r'h200', 'h200'), (r'b200', 'b200'),
)


def chip_generation(device_kind: str) -> str | None:
  """'TPU v5 lite' -> 'v5e', 'NVIDIA H100 80GB HBM3' -> 'h100'; None for kinds not in the table."""
  kind = (device_kind or '').lower()
  return next((gen for pattern, gen in _KINDS if re.search(pattern, kind)), None)


def measure_matmul_peak(sizes=(1024, 2048), repeats=5) -> float:
  """The best float32 matmul rate of the default device (FLOP/s), measured now. On CPU the best of
  both dot libraries that train steps use (YNNPACK and Eigen)."""
  from retnet_jax import platform  # pylint: disable=g-import-not-at-top
  best = 0.0
  options = (None, platform.EIGEN_DOTS) if jax.default_backend() == 'cpu' else (None,)
  for n, opts in itertools.product(sizes, options):
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul, compiler_options=opts)
    f(a, b).block_until_ready()
    for _ in range(repeats):
      t = time.perf_counter()
      f(a, b).block_until_ready()
      best = max(best, 2 * n**3 / (time.perf_counter() - t))
  return best


def peak_flops(devices) -> tuple[float, str]:
  """(peak FLOP/s of all `devices` together, where the figure comes from). From PEAK_FLOPS when
  their kind is there; else a float32 matmul rate measured once now: on CPU per host (its devices
  share the cores), on other chips per device."""
  devices = list(devices)
  kind = devices[0].device_kind
  gen = chip_generation(kind)
  if gen is not None:
    n = len(devices)
    return PEAK_FLOPS[gen] * n, f'{gen} table: {PEAK_FLOPS[gen] / 1e12:.0f} TFLOP/s x {n} chips'
  measured = measure_matmul_peak(sizes=(1024,), repeats=3)
  if devices[0].platform == 'cpu':
    n, unit = len({d.process_index for d in devices}), 'hosts'
  else:
    n, unit = len(devices), 'devices'
  return measured * n, (f'no table entry for {kind!r}: float32 matmul measured at start-up, '
                        f'{measured / 1e9:.1f} GFLOP/s x {n} {unit}')
