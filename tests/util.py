"""Shared test helpers: every test builds from a shrunk real config."""

import os

import numpy as np

from retnet_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small, and on purpose uneven: 3 heads, a sequence length no chunk size divides.
SHRINK = {
    'model.num_layers': 2, 'model.embed_dim': 48, 'model.num_heads': 3, 'model.value_dim': 60,
    'model.ffn_dim': 80, 'model.chunk_size': 16, 'seq_len': 37, 'batch_size': 4,
    'total_steps': 6, 'log_every': 2, 'eval_every': 3, 'checkpoint_every': 3,
    'data.num_eval_batches': 2, 'mesh.data': 1,
}


def config(name='retnet_tiny', arg=None, **overrides):
  """configs/<name>.py (with its :arg), shrunk by SHRINK, then `overrides` ('a__b' for 'a.b')."""
  path = os.path.join(ROOT, 'configs', f'{name}.py') + (f':{arg}' if arg else '')
  c = config_lib.load(path)
  for key, value in {**SHRINK, **{k.replace('__', '.'): v for k, v in overrides.items()}}.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def model_config(name='retnet_tiny', arg=None, **overrides):
  return config_lib.model_config(config(name, arg, **overrides))


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))
