"""Orbax checkpoints. One directory per step under `<workdir>/checkpoints`, with the items

    params     the model parameters (a pure dict of arrays)
    opt_state  the optax state (training checkpoints only)
    data       each process's data-iterator state (grain's handler: one JSON file per process;
               training checkpoints only)
    meta       JSON: {'step', 'model_config': ModelConfig as a dict, 'tokenizer'?: ...}

Converted weights (`python -m retnet_jax.convert`) are the same layout without opt_state and data,
so eval and generate restore either. Saves are atomic (orbax writes to a temporary directory and
renames it), so an interrupted save never damages an earlier checkpoint. After a save, process 0
writes `checksums.json` into the step (size and CRC-32 of every file); restores verify it first, so
a damaged step is reported by name (`Damaged`) instead of loading garbage, and `choose_step` can
fall back to the newest intact step. Steps written before checksums existed restore unverified.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import zlib

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp

from retnet_jax import model as model_lib


def check_workdir(workdir: str) -> None:
  """Creates `workdir` if needed and checks that it can be written: a one-line ValueError if not."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ValueError(f'workdir {workdir!r} cannot be written: {e.strerror or e}.') from e


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


CHECKSUMS = 'checksums.json'


class Damaged(ValueError):
  """A checkpoint step whose files do not match the checksums written when it was saved."""


def step_dir(mgr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(mgr.directory), str(int(step)))


def _crc32(path: str) -> int:
  crc = 0
  with open(path, 'rb') as f:
    while block := f.read(1 << 22):
      crc = zlib.crc32(block, crc)
  return crc


def _files(directory: str) -> list[str]:
  out = []
  for root, _, names in os.walk(directory):
    out += [os.path.relpath(os.path.join(root, n), directory) for n in names if n != CHECKSUMS]
  return sorted(out)


def write_checksums(directory: str) -> None:
  """<directory>/checksums.json: {relative path: [size, crc32]} for every file, written atomically."""
  table = {p: [os.path.getsize(os.path.join(directory, p)), _crc32(os.path.join(directory, p))]
           for p in _files(directory)}
  tmp = os.path.join(directory, CHECKSUMS + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(table, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(directory, CHECKSUMS))


def verify(mgr: ocp.CheckpointManager, step: int) -> bool:
  """Checks step `step` against its checksums: True if it has them and they match, False if it has
  none (an older step); raises Damaged naming the step and the first bad file."""
  directory = step_dir(mgr, step)
  where = f'checkpoint step {step} in {mgr.directory}'
  path = os.path.join(directory, CHECKSUMS)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      table = json.load(f)
  except (OSError, ValueError) as e:
    raise Damaged(f'{where} is damaged: its {CHECKSUMS} cannot be read ({e}).') from e
  for rel, (size, crc) in sorted(table.items()):
    file = os.path.join(directory, rel)
    if not os.path.exists(file):
      raise Damaged(f'{where} is damaged: {rel} is missing.')
    actual = os.path.getsize(file)
    if actual != size:
      raise Damaged(f'{where} is damaged: {rel} has {actual} bytes, {size} when saved '
                    f'(truncated or emptied).')
    if _crc32(file) != crc:
      raise Damaged(f'{where} is damaged: {rel} does not match its checksum (corrupted).')
  return True


def choose_step(mgr: ocp.CheckpointManager, step: int | None = None, *,
                fallback: bool = False) -> int | None:
  """The step to restore: `step` (checked to exist and be intact) or the latest; with `fallback`,
  the newest intact step when the latest is damaged (a warning names the damaged ones). None when
  there is no checkpoint. Raises Damaged or ValueError with one line."""
  steps = sorted(mgr.all_steps())
  if step is not None:
    if int(step) not in steps:
      raise ValueError(f'no checkpoint step {step} in {mgr.directory}; steps there: {steps}.')
    verify(mgr, int(step))
    return int(step)
  damaged = []
  for s in reversed(steps):
    try:
      verify(mgr, s)
    except Damaged as e:
      if not fallback:
        raise Damaged(f'{e} Pass --step=N for another step, or set '
                      'config.checkpoint.fallback_to_intact=True to use the newest intact one.') from e
      damaged.append(s)
      logging.warning('%s', e)
      continue
    if damaged:
      logging.warning('Using step %d, the newest intact checkpoint (damaged: %s).', s, damaged)
    return s
  if damaged:
    raise Damaged(f'every checkpoint in {mgr.directory} is damaged (steps {damaged}).')
  return None


def _disk_error(e: BaseException) -> OSError | None:
  while e is not None:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
      return e
    e = e.__cause__ or e.__context__
  return None


# ModelConfig fields that leave the parameters as they are: changing them never blocks a resume.
PARAMETER_FREE = ('form', 'chunk_size', 'remat', 'retention_impl', 'scan_layers', 'dropout', 'dtype',
                  'attention_window', 'attention_impl')


def model_differences(saved: model_lib.ModelConfig, current: model_lib.ModelConfig) -> list[str]:
  """'field: saved -> current' for each field that changes the parameters."""
  return [f'{f.name} {getattr(saved, f.name)!r} -> {getattr(current, f.name)!r}'
          for f in dataclasses.fields(model_lib.ModelConfig)
          if f.name not in PARAMETER_FREE and getattr(saved, f.name) != getattr(current, f.name)]


def save(mgr: ocp.CheckpointManager, step: int, *, params, model_config, opt_state=None,
         data_iterator=None, extra_meta: dict | None = None) -> None:
  """Saves one step (blocking), waits until it is final on disk and writes its checksums.

  A full (or read-only) disk raises ValueError with one line; the partial save is removed and the
  earlier steps stay as they were."""
  meta = {'step': int(step), 'model_config': model_config_to_dict(model_config), **(extra_meta or {})}
  items = {'params': ocp.args.StandardSave(params), 'meta': ocp.args.JsonSave(meta)}
  if opt_state is not None:
    items['opt_state'] = ocp.args.StandardSave(opt_state)
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  try:
    mgr.save(int(step), args=ocp.args.Composite(**items), force=True)
    mgr.wait_until_finished()
  except Exception as e:  # orbax wraps OSErrors from its writer threads in many types.
    disk = _disk_error(e)
    if disk is None:
      raise
    _remove_partial(mgr, step)
    raise ValueError(f'cannot save checkpoint step {step} to {mgr.directory}: '
                     f'{disk.strerror or disk} (the earlier steps are intact).') from e
  if jax.process_index() == 0:
    try:
      write_checksums(step_dir(mgr, step))
    except OSError as e:
      raise ValueError(f'cannot write the checksums of checkpoint step {step} in {mgr.directory}: '
                       f'{e.strerror or e}.') from e


def _is_partial(directory, name, step) -> bool:
  """Whether `name` in `directory` is step `step` left unfinished: orbax's temporary folder (rename
  atomicity), or the step's folder with neither our checksums nor orbax's `commit_success.txt`
  (commit-file atomicity, as on object stores, writes into the step's folder and that file last)."""
  if name.startswith(f'{int(step)}.orbax-checkpoint-tmp'):
    return True
  done = lambda f: os.path.exists(os.path.join(directory, name, f))
  return name == str(int(step)) and not (done(CHECKSUMS) or done('commit_success.txt'))


def _remove_partial(mgr, step) -> None:
  directory = os.fspath(mgr.directory)
  for name in os.listdir(directory) if os.path.isdir(directory) else ():
    if _is_partial(directory, name, step):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  try:
    mgr.reload()
  except Exception:  # pylint: disable=broad-except
    pass


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
  """The step's meta item; ValueError naming the file and step when it is unreadable."""
  path = os.path.join(step_dir(mgr, step), 'meta', 'metadata')
  try:
    with open(path) as f:
      meta = json.load(f)
  except FileNotFoundError:
    meta = None  # Another layout of orbax's: ask orbax.
  except (OSError, ValueError) as e:
    raise Damaged(f'checkpoint step {step}: {path} cannot be read ({e}).') from e
  if meta is None:
    try:
      meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # pylint: disable=broad-except
      raise Damaged(f'checkpoint step {step} in {mgr.directory}: its meta item cannot be read '
                    f'({type(e).__name__}).') from e
  if not isinstance(meta, dict) or 'model_config' not in meta:
    raise Damaged(f'checkpoint step {step}: {path} has no model_config.')
  return meta


def restore(mgr: ocp.CheckpointManager, step: int | None = None, *, abstract_params=None,
            abstract_opt_state=None, data_iterator=None, check: bool = True) -> dict:
  """Restores a step (default: the latest) into the given abstract trees (with their shardings),
  and this process's position into `data_iterator` when given.

  Returns a dict with 'params', 'meta', and 'opt_state' when asked for. Raises ValueError naming the
  directory when there is no checkpoint or it cannot be read.
  """
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise ValueError(f'no checkpoint in {mgr.directory}.')
  if check:  # False when choose_step verified it already.
    verify(mgr, step)
  items = {'params': ocp.args.StandardRestore(abstract_params), 'meta': ocp.args.JsonRestore()}
  if abstract_opt_state is not None:
    items['opt_state'] = ocp.args.StandardRestore(abstract_opt_state)
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    restored = mgr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax raises many types for damaged or mismatched files.
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ''
    raise ValueError(f'cannot restore checkpoint step {step} from {mgr.directory}: '
                     f'{type(e).__name__}: {first}') from e
  return {k: restored[k] for k in items if k != 'data'}


def save_params(directory: str, params, model_config, step: int = 0, extra_meta=None) -> None:
  """Writes a params-only checkpoint (what `convert` produces)."""
  mgr = manager(directory, max_to_keep=None)
  save(mgr, step, params=params, model_config=model_config, extra_meta=extra_meta)
  mgr.close()


def open_read_only(directory: str) -> ocp.CheckpointManager:
  """A read-only manager of a workdir (its `checkpoints/`) or of a checkpoints directory."""
  if os.path.isdir(os.path.join(directory, 'checkpoints')):
    directory = os.path.join(directory, 'checkpoints')
  if not os.path.isdir(directory):
    raise ValueError(f'checkpoint directory {directory!r} does not exist.')
  return manager(directory, max_to_keep=None, read_only=True)


def load_params(directory: str, step: int | None = None, shardings=None, *,
                fallback: bool = False):
  """(params, ModelConfig, meta) from a checkpoint directory (training or converted).

  `directory` may be a workdir (its `checkpoints/` is used) or a checkpoints directory. step: the
  step (default the latest); fallback: the newest intact step when the latest is damaged.
  """
  mgr = open_read_only(directory)
  step = choose_step(mgr, step, fallback=fallback)
  if step is None:
    raise ValueError(f'no checkpoint in {mgr.directory}.')
  meta = read_meta(mgr, step)
  cfg = model_config_from_dict(meta['model_config'])
  abstract = model_lib.abstract_params(cfg)
  if shardings is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
  restored = restore(mgr, step, abstract_params=abstract, check=False)
  mgr.close()
  return restored['params'], cfg, restored['meta']


def path_name(keys) -> str:
  """A tree path as text: 'blocks/retention/wq'."""
  return '/'.join(str(getattr(k, 'key', k)) for k in keys)


def flat_paths(tree) -> dict:
  """{'blocks/retention/wq': leaf, ...} of a pure-dict tree."""
  return {path_name(keys): leaf for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def match_params(saved: dict, target: dict) -> tuple[list[str], list[str]]:
  """Compares two parameter trees (ShapeDtypeStructs) by path and shape.

  Returns (loadable paths, problems): a problem is a target path missing from `saved`, a path of
  `saved` the target lacks, or a shape that differs ('path [saved] -> [target]')."""
  saved, target = flat_paths(saved), flat_paths(target)
  loadable, problems = [], []
  for path, t in target.items():
    if path not in saved:
      problems.append(f'{path} missing')
    elif tuple(saved[path].shape) != tuple(t.shape):
      problems.append(f'{path} {list(saved[path].shape)} -> {list(t.shape)}')
    else:
      loadable.append(path)
  problems += [f'{path} unexpected' for path in saved if path not in target]
  return loadable, problems


def restore_matching(mgr: ocp.CheckpointManager, step: int, saved_abstract: dict, target: dict,
                     paths) -> dict:
  """Restores the leaves at `paths` of step `step` straight into `target`'s shapes, dtypes (cast)
  and shardings; other saved leaves are skipped. Returns {path: array}."""
  wanted = flat_paths(target)
  chosen = set(paths)

  def spec(keys, leaf):
    path = path_name(keys)
    if path not in chosen:
      return ocp.PLACEHOLDER
    t = wanted[path]
    return jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=getattr(t, 'sharding', None))

  abstract = jax.tree_util.tree_map_with_path(spec, saved_abstract)
  restored = restore(mgr, step, abstract_params=abstract, check=False)['params']
  return {p: leaf for p, leaf in flat_paths(restored).items() if p in chosen}
