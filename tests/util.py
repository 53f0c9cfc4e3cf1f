"""Shared test helpers: every test builds from a shrunk real config."""

import importlib
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax import config_lib
from retnet_jax import decay
from retnet_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(name='retnet_tiny', arg=None, **overrides):
  """configs/<name>.py:test (with its :arg), then `overrides` ('a__b' for 'a.b')."""
  path = os.path.join(ROOT, 'configs', f'{name}.py')
  c = config_lib.load(f"{path}:{','.join(filter(None, (arg, 'test')))}")
  return config_lib.update(c, {k.replace('__', '.'): v for k, v in overrides.items()})


def train_losses(workdir):
  """The training losses a run wrote to <workdir>/metrics.jsonl, in order."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r['loss'] for r in map(json.loads, f) if r['split'] == 'train']


def trained_losses(config, workdir):
  """Trains `config` into `workdir`; its training losses."""
  train.train_and_evaluate(config, str(workdir))
  return train_losses(str(workdir))


def model_config(name='retnet_tiny', arg=None, **overrides):
  return config_lib.model_config(config(name, arg, **overrides))


def rel_err(x, ref):
  """max |x − ref| / max |ref| over the whole array."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def rel_err_rows(x, ref, axes=(-1,)):
  """The largest rel_err of any row: each slice over `axes` is scaled by its own max |ref|, so an
  error in a small-valued head or row cannot hide behind a large one."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  axes = tuple(a % ref.ndim for a in axes)
  scale = np.max(np.abs(ref), axis=axes, keepdims=True)
  return float(np.max(np.max(np.abs(x - ref), axis=axes, keepdims=True) / np.maximum(scale, 1e-30)))


IN_CI = os.environ.get('CI', '').lower() in ('true', '1')


def require(module, reason=None):
  """Imports an optional extra: skips the test when it is missing, but fails it in CI (CI=true),
  where every extra is installed and a missing one is a broken install."""
  if IN_CI:
    return importlib.import_module(module)
  return pytest.importorskip(module, reason=reason)


# Retention inputs shared by the reference-form and kernel tests.
SCHEDULE_ARGS = {
    'retnet': {}, 'lm': {}, 'uniform': {}, 'none': {}, 'learnable': {'init': 'lm'},
    'custom': {'values': (0.5, 0.97, 1.0, 0.9, 0.999, 0.8, 0.99, 0.6)},
}


def gammas(schedule, num_heads):
  args = dict(SCHEDULE_ARGS[schedule])
  if schedule == 'custom':
    args['values'] = args['values'][:num_heads]
  return decay.gammas(schedule, num_heads, **args)


def retention_inputs(seed, B, T, H, K, V, dtype=jnp.float32, with_state=True):
  """Random q, k [B,T,H,K], v [B,T,H,V] in `dtype` and a float32 state [B,H,K,V] (or None)."""
  rng = np.random.default_rng(seed)
  q, k = rng.standard_normal((2, B, T, H, K))
  v = rng.standard_normal((B, T, H, V))
  state = rng.standard_normal((B, H, K, V)) if with_state else None
  cast = lambda x: jnp.asarray(x, dtype)
  return cast(q), cast(k), cast(v), (None if state is None else jnp.asarray(state, jnp.float32))
