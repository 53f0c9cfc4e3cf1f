"""Layout changes between torch Linear weights [out, in] and our kernels (L layers on axis 0)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from retnet_jax import decay
from retnet_jax import model as model_lib

NP_DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}


def xp(a):
  """The array module for `a`: NumPy for arrays, jax.numpy under tracing (shape-only checks of
  published configs run the importers inside jax.eval_shape, with no weights)."""
  return jnp if isinstance(a, (jax.Array, jax.core.Tracer)) else np


def _contiguous(a):
  return a if xp(a) is jnp else np.ascontiguousarray(a)


def in_heads(w_out_in, heads):
  """torch Linear weight [H·X, D] -> kernel [D, H, X]."""
  d = w_out_in.shape[1]
  return _contiguous(w_out_in.T.reshape(d, heads, -1))


def out_heads(w_out_in, heads):
  """torch Linear weight [D, H·X] -> kernel [H, X, D]."""
  d = w_out_in.shape[0]
  return _contiguous(w_out_in.T.reshape(heads, -1, d))


def dense(w_out_in):
  """torch Linear weight [out, in] <-> kernel [in, out]."""
  return _contiguous(w_out_in.T)


def from_in_heads(w_DHX):
  """kernel [D, H, X] -> torch Linear weight [H·X, D]."""
  return np.ascontiguousarray(np.asarray(w_DHX).reshape(w_DHX.shape[0], -1).T)


def from_out_heads(w_HXD):
  """kernel [H, X, D] -> torch Linear weight [D, H·X]."""
  return np.ascontiguousarray(np.asarray(w_HXD).reshape(-1, w_HXD.shape[-1]).T)


def stack(state_dict, template, num_layers, fn=lambda a: a):
  """[L, ...]: fn of each layer's tensor `template.format(i)`."""
  layers = [fn(state_dict[template.format(i)]) for i in range(num_layers)]
  return xp(layers[0]).stack(layers)


def cast(params, dtype: str):
  np_dtype = NP_DTYPES[dtype]
  def one(a):
    if xp(a) is jnp:
      return a.astype(jnp.float32).astype(np_dtype)
    return np.asarray(a, np.float32).astype(np_dtype)
  return jax.tree.map(one, params)


def rtol(array) -> float:
  """Relative tolerance for comparing a stored buffer with a formula: float32, or the buffer's own."""
  return max(1e-5, 2.0 * float(ml_dtypes.finfo(array.dtype).eps))


def gamma_fields(log_gamma_H) -> dict:
  """ModelConfig gamma fields for these decays: 'retnet' when they are its schedule (to the
  buffer's precision: a bf16 checkpoint rounds it), else 'custom' with the stored values."""
  tol = rtol(np.asarray(log_gamma_H))
  log_gamma_H = np.asarray(log_gamma_H, np.float64)
  retnet = np.log(decay.gammas('retnet', len(log_gamma_H)))
  if np.allclose(log_gamma_H, retnet, rtol=tol, atol=0):
    return {'gamma': 'retnet'}
  return {'gamma': 'custom', 'gamma_values': tuple(float(g) for g in np.exp(log_gamma_H))}


def inv_freq(cfg: model_lib.ModelConfig) -> np.ndarray:
  """Rotary frequencies θ [K/2] of a config (float64)."""
  K = cfg.head_dim
  if cfg.rotary_freqs == 'torchscale':
    return cfg.rotary_base ** -np.linspace(0.0, 1.0, K // 2)
  return cfg.rotary_base ** -(np.arange(0, K, 2) / K)
