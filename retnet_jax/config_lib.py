"""Loading and checking experiment configs (Python files in configs/ with `get_config(arg=None)`).

`load('configs/retnet_tiny.py:gamma=lm', ['total_steps=100', 'model.num_layers=2'])` does what
`--config=configs/retnet_tiny.py:gamma=lm --config.total_steps=100 ...` does on the command line.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import os

import ml_collections

from retnet_jax import model as model_lib
from retnet_jax import sharding

# Keys every config has, so that any run can be shortened or reseeded from the command line.
REQUIRED = ('seed', 'total_steps', 'batch_size', 'seq_len', 'log_every', 'eval_every',
            'checkpoint_every', 'model', 'data', 'optim', 'mesh', 'checkpoint')
TOP_LEVEL = REQUIRED + ('reset_at_doc_boundaries', 'generate', 'name', 'init_from', 'init_from_step',
                        'init_from_strict', 'loss_chunk_size')
OPTIM = ('learning_rate', 'warmup_steps', 'schedule', 'end_lr_fraction', 'b1', 'b2', 'eps',
         'weight_decay', 'grad_clip', 'grad_accum_steps', 'trainable')
MESH = ('data', 'fsdp', 'sequence', 'tensor', 'rules', 'coordinator_address', 'num_processes', 'process_id')
CHECKPOINT = ('max_to_keep', 'save_on_sigterm', 'fallback_to_intact', 'on_nonfinite')
# `--mode=generate` settings: the defaults here are the only ones (configs copy them; the main
# flags override them).
GENERATE = dict(max_new_tokens=256, temperature=0.7, top_k=0, top_p=0.9, seed=0, stop_at_eos=True,
                prefill_form='chunkwise', block_size=16)


def parse_config_arg(arg: str | None, allowed: tuple[str, ...]) -> dict[str, str]:
  """A config file's argument 'a=1,b=x' -> {'a': '1', 'b': 'x'}; unknown keys are an error."""
  out = {}
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'config argument {item!r} is not key=value.')
    out[key.strip()] = value.strip()
  unknown = sorted(set(out) - set(allowed))
  if unknown:
    raise ValueError(f'unknown config argument(s) {unknown}; use {", ".join(allowed)}.')
  return out


def load(path_and_arg: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Imports a config file, calls get_config(arg) and applies 'a.b=value' overrides."""
  path, _, arg = path_and_arg.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'config file {path!r} does not exist.')
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None) if arg else module.get_config()
  for item in overrides:
    key, _, value = item.partition('=')
    set_value(config, key, value)
  return config


def set_value(config, dotted_key: str, text: str):
  """Sets config.<dotted_key> from a command-line string (parsed as a Python literal if it is one)."""
  *parents, leaf = dotted_key.split('.')
  node = config
  for p in parents:
    if p not in node:
      raise ValueError(f'unknown config key {dotted_key!r}.')
    node = node[p]
  if leaf not in node:
    raise ValueError(f'unknown config key {dotted_key!r}.')
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  node[leaf] = value


def generate_settings(config, **given) -> dict:
  """GENERATE, then config.generate, then the `given` values that are not None, checked:
  ValueError naming the first impossible value (before any checkpoint is read)."""
  section = dict(config.get('generate') or {})
  _check_keys(section, GENERATE, 'config.generate')
  out = {**GENERATE, **section, **{k: v for k, v in given.items() if v is not None}}
  try:
    temperature, top_p = float(out['temperature']), float(out['top_p'])
    top_k, max_new, block = int(out['top_k']), int(out['max_new_tokens']), int(out['block_size'])
  except (TypeError, ValueError) as e:
    raise ValueError(f'generation settings must be numbers: {e}.') from e
  if not math.isfinite(temperature) or temperature < 0:
    raise ValueError(f'temperature must be a finite number >= 0 (0: greedy); got {temperature}.')
  if not 0.0 < top_p <= 1.0:  # Also false for NaN.
    raise ValueError(f'top_p must be in (0, 1]; got {top_p}.')
  if top_k < 0:
    raise ValueError(f'top_k must be >= 0 (0: no cut); got {top_k}.')
  if max_new < 1 or block < 1:
    raise ValueError(f'max_new_tokens and block_size must be positive; got {max_new}, {block}.')
  return {**out, 'temperature': temperature, 'top_p': top_p, 'top_k': top_k,
          'max_new_tokens': max_new, 'block_size': block, 'seed': int(out['seed'])}


def _check_keys(section, allowed, where):
  unknown = sorted(set(section.keys()) - set(allowed))
  if unknown:
    raise ValueError(f'unknown config key(s) in {where}: {unknown}; allowed: {sorted(allowed)}.')


def validate(config) -> None:
  """Raises ValueError naming the problem for unknown keys, missing keys or impossible values."""
  missing = [k for k in REQUIRED if k not in config]
  if missing:
    raise ValueError(f'config is missing required key(s): {missing}.')
  _check_keys(config, TOP_LEVEL, 'config')
  _check_keys(config.optim, OPTIM, 'config.optim')
  _check_keys(config.mesh, MESH, 'config.mesh')
  _check_keys(config.checkpoint, CHECKPOINT, 'config.checkpoint')
  for key in ('total_steps', 'batch_size', 'seq_len', 'log_every', 'eval_every', 'checkpoint_every'):
    if not isinstance(config[key], int) or config[key] <= 0:
      raise ValueError(f'config.{key} must be a positive integer; got {config[key]!r}.')
  for key in ('learning_rate', 'warmup_steps', 'weight_decay', 'grad_clip', 'eps'):
    value = config.optim.get(key)
    if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)
                              or value < 0):
      raise ValueError(f'config.optim.{key} must be a finite number >= 0; got {value!r}.')
  checkpoint = config.checkpoint
  if checkpoint.get('on_nonfinite', 'stop') not in ('stop', 'skip'):
    raise ValueError("config.checkpoint.on_nonfinite must be 'stop' or 'skip'; got "
                     f"{checkpoint.get('on_nonfinite')!r}.")
  accum = config.optim.get('grad_accum_steps', 1)
  if not isinstance(accum, int) or accum < 1 or config.batch_size % accum:
    raise ValueError(f'config.optim.grad_accum_steps ({accum}) must be a positive divisor of '
                     f'config.batch_size ({config.batch_size}).')
  model_config(config)  # Raises on impossible model shapes.


def model_config(config) -> model_lib.ModelConfig:
  """The frozen ModelConfig the model code receives (never the ConfigDict)."""
  fields = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  values = config.model.to_dict() if hasattr(config.model, 'to_dict') else dict(config.model)
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f'unknown config key(s) in config.model: {unknown}; allowed: {sorted(fields)}.')
  if 'gamma_values' in values:
    values['gamma_values'] = tuple(values['gamma_values'] or ())
  return model_lib.ModelConfig(**values)


def mesh_rules(config) -> dict:
  """config.mesh.rules checked against the logical and mesh axes, one entry per logical axis."""
  rules = config.mesh.rules
  rules = rules.to_dict() if hasattr(rules, 'to_dict') else dict(rules)
  unknown = sorted(set(rules) - set(sharding.LOGICAL_AXES))
  if unknown:
    raise ValueError(f'unknown logical axes in config.mesh.rules: {unknown}; '
                     f'known: {sharding.LOGICAL_AXES}.')
  for name, axes in rules.items():
    bad = [a for a in sharding._as_tuple(axes) if a not in sharding.AXES]
    if bad:
      raise ValueError(f'config.mesh.rules.{name} names unknown mesh axes {bad}; '
                       f'mesh axes are {sharding.AXES}.')
  return {a: rules.get(a) for a in sharding.LOGICAL_AXES}
