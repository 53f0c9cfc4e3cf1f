"""Orbax checkpoints. One directory per step under `<workdir>/checkpoints`, with the items

    params     the model parameters (a pure dict of arrays)
    opt_state  the optax state (training checkpoints only)
    data       each process's data-iterator state (grain's handler: one JSON file per process;
               training checkpoints only)
    meta       JSON: {'step', 'model_config': ModelConfig as a dict, 'tokenizer'?: ...}

Converted weights (`python -m retnet_jax.convert`) are the same layout without opt_state and data,
so eval and generate restore either. Saves are atomic (orbax writes to a temporary directory and
renames it), so an interrupted save never damages an earlier checkpoint.
"""

from __future__ import annotations

import dataclasses
import os

import grain
import jax
import orbax.checkpoint as ocp

from retnet_jax import model as model_lib


def manager(directory: str, max_to_keep: int | None = 3, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def model_config_to_dict(cfg: model_lib.ModelConfig) -> dict:
  d = dataclasses.asdict(cfg)
  d['gamma_values'] = list(d['gamma_values'])
  return d


def model_config_from_dict(d: dict) -> model_lib.ModelConfig:
  d = dict(d)
  d['gamma_values'] = tuple(d.get('gamma_values') or ())
  return model_lib.ModelConfig(**d)


def save(mgr: ocp.CheckpointManager, step: int, *, params, model_config, opt_state=None,
         data_iterator=None, extra_meta: dict | None = None) -> None:
  """Saves one step (blocking) and waits until it is final on disk."""
  meta = {'step': int(step), 'model_config': model_config_to_dict(model_config), **(extra_meta or {})}
  items = {'params': ocp.args.StandardSave(params), 'meta': ocp.args.JsonSave(meta)}
  if opt_state is not None:
    items['opt_state'] = ocp.args.StandardSave(opt_state)
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  mgr.save(int(step), args=ocp.args.Composite(**items), force=True)
  mgr.wait_until_finished()


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
  return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def restore(mgr: ocp.CheckpointManager, step: int | None = None, *, abstract_params=None,
            abstract_opt_state=None, data_iterator=None) -> dict:
  """Restores a step (default: the latest) into the given abstract trees (with their shardings),
  and this process's position into `data_iterator` when given.

  Returns a dict with 'params', 'meta', and 'opt_state' when asked for. Raises ValueError naming the
  directory when there is no checkpoint or it cannot be read.
  """
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise ValueError(f'no checkpoint in {mgr.directory}.')
  items = {'params': ocp.args.StandardRestore(abstract_params), 'meta': ocp.args.JsonRestore()}
  if abstract_opt_state is not None:
    items['opt_state'] = ocp.args.StandardRestore(abstract_opt_state)
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    restored = mgr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax raises many types for damaged or mismatched files.
    raise ValueError(f'cannot restore checkpoint step {step} from {mgr.directory}: '
                     f'{type(e).__name__}: {e}') from e
  return {k: restored[k] for k in items if k != 'data'}


def save_params(directory: str, params, model_config, step: int = 0, extra_meta=None) -> None:
  """Writes a params-only checkpoint (what `convert` produces)."""
  mgr = manager(directory, max_to_keep=None)
  save(mgr, step, params=params, model_config=model_config, extra_meta=extra_meta)
  mgr.close()


def load_params(directory: str, step: int | None = None, shardings=None):
  """(params, ModelConfig, meta) from a checkpoint directory (training or converted).

  `directory` may be a workdir (its `checkpoints/` is used) or a checkpoints directory.
  """
  if os.path.isdir(os.path.join(directory, 'checkpoints')):
    directory = os.path.join(directory, 'checkpoints')
  if not os.path.isdir(directory):
    raise ValueError(f'checkpoint directory {directory!r} does not exist.')
  mgr = manager(directory, max_to_keep=None, read_only=True)
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise ValueError(f'no checkpoint in {directory}.')
  meta = read_meta(mgr, step)
  cfg = model_config_from_dict(meta['model_config'])
  abstract = model_lib.abstract_params(cfg)
  if shardings is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
  restored = restore(mgr, step, abstract_params=abstract)
  mgr.close()
  return restored['params'], cfg, restored['meta']
