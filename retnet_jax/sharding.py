"""Sharding as data: logical axis names on parameters and activations, mapped to mesh axes by rules.

Parameters carry their logical axes as variable metadata (`nnx.Param(..., logical_axes=(...))`);
activations are constrained with `constrain(x, ('batch', 'length', 'embed'))`. The rules, a mapping
from a logical name to a mesh axis, a tuple of mesh axes or None, live in the config. A mesh axis is
used at most once per array: a later logical axis that maps to an axis already taken is replicated
(so 'batch' -> ('data', 'fsdp') and 'embed' -> 'fsdp' shard activations by batch and parameters
by embed). A dimension that a mesh axis does not divide is replicated too.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Mapping, Sequence

from flax import nnx
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

AXES = ('data', 'fsdp', 'sequence', 'tensor')
LOGICAL_AXES = ('batch', 'length', 'embed', 'heads', 'kv', 'mlp', 'vocab', 'layers')

_active: dict[str, Any] = {'mesh': None, 'rules': None}


def _as_tuple(x):
  if x is None:
    return ()
  return (x,) if isinstance(x, str) else tuple(x)


def logical_to_spec(axes: Sequence[str | None], rules: Mapping[str, Any], mesh=None,
                    shape: Sequence[int] | None = None) -> P:
  """PartitionSpec for an array with these logical axes under `rules` (see the module docstring)."""
  used, spec = set(), []
  for i, name in enumerate(axes):
    if name is not None and name not in rules:
      raise ValueError(f'No sharding rule for logical axis {name!r}; rules cover {sorted(rules)}.')
    mesh_axes = [a for a in _as_tuple(rules.get(name) if name else None) if a not in used]
    if mesh is not None and shape is not None:
      # Keep the longest prefix of mesh axes whose product divides the dimension.
      kept, size = [], 1
      for a in mesh_axes:
        if shape[i] % (size * mesh.shape[a]):
          break
        kept.append(a)
        size *= mesh.shape[a]
      mesh_axes = kept
    used.update(mesh_axes)
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
  return P(*spec)


def logical_axes(tree) -> Any:
  """The `logical_axes` metadata of every variable of an nnx module or state, as a pure-dict tree."""
  state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
  is_var = lambda x: isinstance(x, nnx.Variable)
  axes = jax.tree.map(lambda v: v.get_metadata()['logical_axes'], state, is_leaf=is_var)
  return nnx.to_pure_dict(axes) if isinstance(axes, nnx.State) else axes


def tree_shardings(axes_tree, shapes_tree, mesh, rules) -> Any:
  """NamedShardings for a tree of arrays (or ShapeDtypeStructs) given their logical axes."""
  is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
  return jax.tree.map(
      lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, rules, mesh, x.shape)),
      axes_tree, shapes_tree, is_leaf=is_axes)


@contextlib.contextmanager
def use_rules(mesh, rules: Mapping[str, Any]):
  """Makes `mesh` the current mesh and `rules` the rules `constrain` applies."""
  previous = dict(_active)
  _active.update(mesh=mesh, rules=dict(rules))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _active.update(previous)


def constrain(x, axes: Sequence[str | None]):
  """with_sharding_constraint by logical axes; the identity outside `use_rules`."""
  mesh, rules = _active['mesh'], _active['rules']
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_to_spec(axes, rules, mesh, x.shape)))


def active_mesh():
  """The mesh of `use_rules` (None outside it)."""
  return _active['mesh']


def active_rules():
  """The rules of `use_rules` (None outside it)."""
  return _active['rules']


def sequence_axis() -> tuple[str | None, int]:
  """(mesh axis, its size) that the active rules split the 'length' dimension over; (None, 1)
  when none does. Only one mesh axis may split it."""
  mesh, rules = _active['mesh'], _active['rules']
  if mesh is None or not rules:
    return None, 1
  axes = [a for a in _as_tuple(rules.get('length')) if mesh.shape.get(a, 1) > 1]
  if len(axes) > 1:
    raise ValueError(f"the 'length' rule splits over more than one mesh axis: {axes}.")
  return (axes[0], mesh.shape[axes[0]]) if axes else (None, 1)


def platform() -> str:
  """The platform ('cpu', 'gpu', 'tpu') of the devices the computation is placed on: those of the
  active mesh (`use_rules`, else jax's current or abstract mesh, which a `jit` traced under a mesh
  of, say, TPU topology devices sees on a CPU host), else the default device's."""
  mesh = _active['mesh']
  if mesh is not None:
    return _platform_name(mesh.devices.flat[0].platform)
  abstract = jax.sharding.get_abstract_mesh()
  device = None if abstract.empty else getattr(abstract, 'abstract_device', None)
  if device is not None and getattr(device, 'platform', None):
    return _platform_name(device.platform)
  return _platform_name(jax.devices()[0].platform)


def _platform_name(name: str) -> str:
  return 'gpu' if name in ('cuda', 'rocm') else name


def per_shard(f, in_axes: Sequence[Sequence[str | None]], out_axes: Sequence[Sequence[str | None]]):
  """`f` run on each device's shard (`shard_map`) under the active rules; `f` itself outside them.

  For ops the compiler cannot partition, such as a Pallas kernel, which GSPMD would otherwise feed
  gathered operands. in_axes / out_axes: the logical axes of each positional argument / output.
  Every dimension that a rule shards must be independent inside `f` (batch and heads for retention).
  """
  mesh, rules = _active['mesh'], _active['rules']
  if mesh is None or mesh.size == 1:
    return f

  def wrapped(*args):
    spec = lambda axes, x: logical_to_spec(axes, rules, mesh, x.shape)
    outs = jax.eval_shape(f, *args)
    in_specs = tuple(spec(a, x) for a, x in zip(in_axes, args, strict=True))
    out_specs = tuple(spec(a, x) for a, x in zip(out_axes, outs, strict=True))
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)
  return wrapped


def state_shardings(abstract_state, params_axes, mesh, rules):
  """Shardings of the train state: parameters by their logical axes; optimiser moments like the
  parameter they belong to (matched by the trailing dict keys of their path); the rest replicated."""
  param_sh = tree_shardings(params_axes, abstract_state['params'], mesh, rules)
  by_path = {tuple(k.key for k in path): s for path, s in
             jax.tree_util.tree_flatten_with_path(param_sh)[0]}
  replicated = NamedSharding(mesh, P())

  def for_opt(path, leaf):
    keys = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.insert(0, k.key)
    s = by_path.get(tuple(keys))
    return s if s is not None and s.shard_shape(leaf.shape) is not None and len(
        s.spec) <= len(leaf.shape) else replicated

  opt_sh = jax.tree_util.tree_map_with_path(for_opt, abstract_state['opt_state'])
  return {'step': replicated, 'params': param_sh, 'opt_state': opt_sh}


def batch_sharding(mesh, rules):
  return NamedSharding(mesh, logical_to_spec(('batch', 'length'), rules))


def to_global(batch: dict, sh, keys: Sequence[str]) -> dict:
  """Per-host numpy batch[keys] -> global jax arrays laid out by `sh` (dim 0 split across hosts)."""
  out = {}
  for k in keys:
    local = np.asarray(batch[k])
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    out[k] = jax.make_array_from_process_local_data(sh, local, global_shape)
  return out


def make_mesh(shape: Mapping[str, int], devices=None) -> jax.sharding.Mesh:
  """A mesh with axes ('data', 'fsdp', 'sequence', 'tensor'); one size may be −1 (all remaining
  devices).

  Without −1 the mesh may use the first devices only (a one-device mesh on a multi-device host).
  Axis types are Auto (the compiler propagates shardings from the in/out shardings and the
  constraints), not the Explicit default of recent jax.
  """
  devices = jax.devices() if devices is None else devices
  sizes = [int(shape.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh sizes must be positive, with at most one −1; got {dict(zip(AXES, sizes))}.')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'{len(devices)} devices cannot fill mesh {dict(zip(AXES, sizes))}.')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) > len(devices):
    raise ValueError(f'mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices; '
                     f'{len(devices)} are available.')
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  return jax.make_mesh(tuple(sizes), AXES, axis_types=auto, devices=devices[:int(np.prod(sizes))])


def describe(params_axes, params_shapes, mesh, rules) -> str:
  """One line per parameter: path, shape, logical axes and the mesh spec they resolve to."""
  lines = []
  flat_axes = jax.tree_util.tree_flatten_with_path(
      params_axes, is_leaf=lambda x: isinstance(x, tuple))[0]
  flat_shapes = jax.tree.leaves(params_shapes)
  for (path, axes), x in zip(flat_axes, flat_shapes):
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    spec = logical_to_spec(axes, rules, mesh, x.shape)
    lines.append(f'  {name:48s} {str(tuple(x.shape)):22s} {str(axes):40s} {spec}')
  return '\n'.join(lines)


def log_summary(mesh, params_axes, params_shapes, rules):
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params_shapes))
  logging.info('Mesh %s over %d devices (%d processes); %s parameters.', dict(mesh.shape),
               mesh.size, jax.process_count(), f'{count:,}')
  logging.info('Parameter shardings:\n%s', describe(params_axes, params_shapes, mesh, rules))
