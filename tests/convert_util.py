"""Helpers shared by the converter tests (tests/convert_*_test.py): our side of every comparison."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax import model as model_lib

T = 37  # The shrunk config's seq_len: no chunk size used here divides it.
TOL = 1e-4  # Relative error of logits, float32 (util.rel_err).


# How a model runs is not in a checkpoint: the importer leaves these at ModelConfig's defaults.
EXECUTION_DEFAULTS = {f'model__{k}': getattr(model_lib.ModelConfig, k)
                      for k in ('remat', 'scan_layers', 'retention_impl', 'dtype')}


def numpy_params(cfg, seed=0):
  """A model's parameters as a pure dict of NumPy arrays, with norms scales moved off 1."""
  params = model_lib.init_params(cfg, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  perturb = lambda path, a: (np.asarray(a) + 0.2 * rng.standard_normal(a.shape).astype(np.float32)
                             if 'scale' in jax.tree_util.keystr(path) else np.asarray(a))
  return jax.tree_util.tree_map_with_path(perturb, params)


def jitted(model, mode):
  """The model's forward in one retention form, jitted: (tokens, state) -> (logits, state)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda toks, carry: nnx.merge(graphdef, state)(toks, carry, form=mode))


def build(params, cfg):
  """Our Model holding `params` (a pure dict, e.g. a converter's output)."""
  graphdef, state = nnx.split(model_lib.abstract_model(cfg))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def our_logits(params, cfg, toks_BT, mode):
  """Our logits [B, T, vocab] as NumPy; mode 'decode' runs the recurrent form token by token."""
  model = build(params, cfg)
  toks_BT = jnp.asarray(toks_BT)
  if mode != 'decode':
    return np.asarray(jitted(model, mode)(toks_BT, None)[0])
  step, outs = jitted(model, 'recurrent'), []
  carry = model.init_state(toks_BT.shape[0], toks_BT.shape[1])  # A length for a full KV cache.
  for t in range(toks_BT.shape[1]):
    out, carry = step(toks_BT[:, t:t + 1], carry)
    outs.append(np.asarray(out))
  return np.concatenate(outs, axis=1)


def tokens(cfg, B=2, length=T, seed=0):
  """Random token ids [B, length] below the vocabulary size."""
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, length))
