"""Writing, loading and checking experiment configs (Python files in configs/ with
`get_config(arg=None)`; docs/configs.md).

`load('configs/retnet_tiny.py:gamma=lm,quick', ['total_steps=100', 'model.num_layers=2'])` does
what `--config=configs/retnet_tiny.py:gamma=lm,quick --config.total_steps=100 ...` does on the
command line. `update` is the one walker of dotted keys ('model.num_layers') for both.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import runpy
import sys
import typing

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
# flags override them). repetition_penalty 1.3: without it a small byte model that enters an
# indentation run often keeps predicting spaces.
GENERATE = dict(max_new_tokens=256, temperature=0.7, top_k=0, top_p=0.9, seed=0, stop_at_eos=True,
                prefill_form='chunkwise', block_size=16, repetition_penalty=1.3,
                frequency_penalty=0.0, presence_penalty=0.0)


def parse_config_arg(arg: str | None, keys: tuple[str, ...] = (),
                     flags: tuple[str, ...] = ()) -> dict[str, str | bool]:
  """A config file's argument 'a=1,quick,b=x' -> {'a': '1', 'quick': True, 'b': 'x'}: `keys` take
  a value, `flags` stand alone; anything else is an error naming it."""
  out = {}
  for item in filter(None, (s.strip() for s in (arg or '').split(','))):
    key, sep, value = item.partition('=')
    key = key.strip()
    if key in flags and not sep:
      out[key] = True
    elif key in keys and sep:
      out[key] = value.strip()
    else:
      expected = ', '.join([f'{k}=...' for k in keys] + list(flags)) or 'none'
      raise ValueError(f'unknown config argument {item!r}; this config takes: {expected}.')
  return out


def model_defaults(**changes) -> ml_collections.ConfigDict:
  """config.model: every ModelConfig field at its default, then `changes` (each a known field)."""
  hints = typing.get_type_hints(model_lib.ModelConfig)
  values = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(model_lib.ModelConfig)}
  for name, value in values.items():
    if value is None:  # A typed placeholder, so that the command line can set it.
      kinds = [t for t in typing.get_args(hints[name]) if t is not type(None)]
      values[name] = ml_collections.config_dict.placeholder(kinds[0])
  unknown = sorted(set(changes) - set(values))
  if unknown:
    raise ValueError(f'unknown model field(s) {unknown}; ModelConfig has {sorted(values)}.')
  return ml_collections.ConfigDict({**values, **changes})


def load(path_and_arg: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Runs a config file, calls get_config(arg) and applies 'a.b=value' overrides."""
  path, _, arg = path_and_arg.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'config file {path!r} does not exist.')
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isfile(os.path.join(folder, '__init__.py')) and os.path.dirname(folder) not in sys.path:
    sys.path.append(os.path.dirname(folder))  # Configs import their package (`from configs ...`).
  get_config = runpy.run_path(path)['get_config']  # Like --config=: the file, not a module name.
  config = get_config(arg) if arg else get_config()
  for item in overrides:
    key, _, value = item.partition('=')
    set_value(config, key, value)
  return config


def _node(config, dotted_key: str):
  """(the ConfigDict holding config.<dotted_key>, its last key); ValueError naming the first
  missing part and the keys that exist there."""
  parts = dotted_key.split('.')
  node = config
  for i, part in enumerate(parts):
    if not hasattr(node, 'keys') or part not in node:
      where = 'config' + ''.join(f'.{p}' for p in parts[:i])
      known = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else 'none'
      raise ValueError(f'unknown config key {dotted_key!r}: {where} has no {part!r} '
                       f'(its keys: {known}).')
    if i < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


def lookup(config, dotted_key: str):
  """config.<dotted_key>; ValueError for a key the config lacks."""
  node, leaf = _node(config, dotted_key)
  return node[leaf]


def update(config, values: dict):
  """Sets config.<key> = value for each dotted key of `values` (each one the config has)."""
  for key, value in values.items():
    node, leaf = _node(config, key)
    node[leaf] = value
  return config


def set_value(config, dotted_key: str, text: str):
  """Sets config.<dotted_key> from a command-line string (parsed as a Python literal if it is one)."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  update(config, {dotted_key: value})


def generate_settings(config, **given) -> dict:
  """GENERATE, then config.generate, then the `given` values that are not None, checked:
  ValueError naming the first impossible value (before any checkpoint is read)."""
  section = dict(config.get('generate') or {})
  _check_keys(section, GENERATE, 'config.generate')
  out = {**GENERATE, **section, **{k: v for k, v in given.items() if v is not None}}
  try:
    temperature, top_p = float(out['temperature']), float(out['top_p'])
    top_k, max_new, block = int(out['top_k']), int(out['max_new_tokens']), int(out['block_size'])
    penalties = {k: float(out[k]) for k in ('repetition_penalty', 'frequency_penalty',
                                            'presence_penalty')}
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
  if not 0 < penalties['repetition_penalty'] < math.inf:
    raise ValueError('repetition_penalty must be a finite number > 0 (1: off); got '
                     f"{penalties['repetition_penalty']}.")
  for key in ('frequency_penalty', 'presence_penalty'):
    if not math.isfinite(penalties[key]):
      raise ValueError(f'{key} must be a finite number (0: off); got {penalties[key]}.')
  return {**out, 'temperature': temperature, 'top_p': top_p, 'top_k': top_k,
          'max_new_tokens': max_new, 'block_size': block, 'seed': int(out['seed']), **penalties}


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
