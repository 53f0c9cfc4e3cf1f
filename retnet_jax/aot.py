r"""Ahead-of-time compiles for a TPU slice from any host: memory per chip, FLOPs, the retention path.

  python -m retnet_jax.main --config=configs/retnet_paper.py:1.3b --mode=compile --topology=v5p-32 \
      --workdir=/tmp/aot_1_3b
  python -m retnet_jax.main --config=configs/retnet_paper.py:1.3b --mode=compile_generate \
      --topology=v5e-16 --workdir=/tmp/aot_1_3b_decode [--decode_batch=64,256 --prompt_len=2048]

The TPU compiler (libtpu, `pip install -e '.[tpu]'`) runs on the host: no TPU is needed or touched.
`jax.experimental.topologies` describes the slice's devices; the run is built exactly as training
builds it (`train.Run` with those devices and no data, `train.make_train_step`), lowered with
abstract arguments in their shardings and compiled by the real TPU compiler, Mosaic kernels
included. The compiler's `memory_analysis` gives the bytes per chip; `compile.json` and
`compile_summary.txt` in the workdir record them with the model FLOPs per step, the bound on the
step time at the chip's peak, and whether the step runs the Pallas retention kernel and why.

Topology names as TPU users write them ('v5p-128', 'v5e-16', 'v4-32', 'v6e-8': for v4 and v5p the
number counts TensorCores, two per chip; for v5e and v6e it counts chips) or as libtpu takes them
('v5p:4x4x4', 'v5e:4x4').
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import re
import time
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from retnet_jax import flops

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: HBM per chip, peak dense bf16 FLOP/s per chip, TensorCores counted per
  chip in slice names (`v4-32` is 16 chips), the rank of its torus (2-D or 3-D), and libtpu's
  chip configuration ('megacore': the chip's two TensorCores are one device, as on a v4 or v5p VM).
  """
  generation: str
  hbm_bytes: int
  peak_flops: float
  cores_per_chip_in_name: int
  torus_rank: int
  chip_config: str | None = None
  platform: str = 'tpu'


CHIPS = {
    'v4': Chip('v4', 32 * GIB, flops.PEAK_FLOPS['v4'], 2, 3, 'megacore'),
    'v5e': Chip('v5e', 16 * GIB, flops.PEAK_FLOPS['v5e'], 1, 2),
    'v5p': Chip('v5p', 95 * GIB, flops.PEAK_FLOPS['v5p'], 2, 3, 'megacore'),
    'v6e': Chip('v6e', 32 * GIB, flops.PEAK_FLOPS['v6e'], 1, 2),
}
ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v6litepod': 'v6e', 'v6lite': 'v6e'}

# GPUs through jax's CUDA plugin, which compiles without a GPU given a target description
# (XLA's GpuTargetConfigProto): 'h100-8' is one host of 8 H100 SXM (80 GB, 989 TFLOP/s dense bf16).
GPUS = {'h100': Chip('h100', 79 * GIB, flops.PEAK_FLOPS['h100'], 1, 1, platform='gpu')}
GPUS_PER_HOST = 8
_H100_TARGET = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84942979072 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 1 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
GPU_TARGETS = {'h100': _H100_TARGET}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # As given.
  chip: Chip
  shape: tuple[int, ...]  # Chips along each torus axis.

  @property
  def num_chips(self) -> int:
    return int(np.prod(self.shape))

  @property
  def libtpu_name(self) -> str:
    """libtpu's name of the slice; for GPUs the CUDA plugin's 'slices x hosts x GPUs per host'."""
    return f'{self.chip.generation}:{"x".join(map(str, self.shape))}'

  @property
  def slice_name(self) -> str:
    return f'{self.chip.generation}-{self.num_chips * self.chip.cores_per_chip_in_name}'


def standard_shape(num_chips: int, torus_rank: int) -> tuple[int, ...]:
  """The torus shape Cloud TPU gives a slice of `num_chips` (a power of two): 2x2x1, 2x2x2, 2x2x4,
  2x4x4, 4x4x4, 4x4x8 ... for 3-D tori; 1x1, 1x2, 2x2, 2x4, 4x4, 4x8, 8x8 ... for 2-D ones."""
  shape = [2, 2, 1] if torus_rank == 3 else [1, 1]
  if torus_rank == 3 and num_chips < 4:
    raise ValueError(f'the smallest 3-D slice has 4 chips; got {num_chips}.')
  while int(np.prod(shape)) < num_chips:
    smallest = min(shape)
    shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
  return tuple(shape)


def parse_topology(name: str) -> Topology:
  """'v5p-32' / 'v5e-16' / 'v4-32' / 'v6e-8' (slice names) or 'v5p:2x2x4' (libtpu's) -> Topology."""
  known = sorted(CHIPS)
  text = (name or '').strip().lower()
  gpu = re.fullmatch(r'([a-z]\d+)-(\d+)', text)
  if gpu and gpu.group(1) in GPUS:
    n = int(gpu.group(2))
    if n < 1 or (n > GPUS_PER_HOST and n % GPUS_PER_HOST):
      raise ValueError(f'unknown GPU topology {name!r}: up to {GPUS_PER_HOST} GPUs or a multiple.')
    hosts = max(1, n // GPUS_PER_HOST)
    return Topology(name, GPUS[gpu.group(1)], (1, hosts, n // hosts))
  m = re.fullmatch(r'([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)*))', text)
  generation = ALIASES.get(m.group(1), m.group(1)) if m else None
  if generation not in CHIPS:
    raise ValueError(f'unknown TPU topology {name!r}: write it as a slice name such as v5p-32, '
                     f'v5e-16, v4-32 or v6e-8, or as libtpu does (v5p:2x2x4); generations: {known} '
                     f'(GPUs: {", ".join(f"{g}-8" for g in GPUS)}).')
  chip = CHIPS[generation]
  if m.group(2):
    count = int(m.group(2))
    chips, rest = divmod(count, chip.cores_per_chip_in_name)
    if rest or chips < 1 or chips & (chips - 1):
      raise ValueError(f'unknown TPU topology {name!r}: {generation}-N needs N = '
                       f'{chip.cores_per_chip_in_name} × a power of two chips; for another shape '
                       f'give the torus as libtpu does ({generation}:AxBxC).')
    return Topology(name, chip, standard_shape(chips, chip.torus_rank))
  shape = tuple(int(s) for s in m.group(3).split('x'))
  if len(shape) not in (2, 3) or min(shape) < 1:
    raise ValueError(f'unknown TPU topology {name!r}: the torus needs 2 or 3 positive sizes.')
  return Topology(name, chip, shape)


def require_libtpu() -> None:
  if importlib.util.find_spec('libtpu') is None:
    raise ValueError("the TPU compiler is not installed (no libtpu): pip install -e '.[tpu]' "
                     '(jax[tpu] at the pinned jax version).')


def host_backend_only() -> None:
  """Keeps jax's own backend on the host CPU (unless JAX_PLATFORMS says otherwise) and lets libtpu
  load without its one-process lock: compiling for a topology never opens a TPU, so several
  compiles (and a training process on a real TPU) may run side by side."""
  from retnet_jax import platform  # pylint: disable=g-import-not-at-top
  if not os.environ.get('JAX_PLATFORMS') and not platform.backends_started(default=False):
    jax.config.update('jax_platforms', 'cpu')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


CUDA_PLUGINS = ('jax_plugins.xla_cuda13', 'jax_plugins.xla_cuda12')


def cuda_plugin() -> str | None:
  """The CUDA plugin module on the path (CUDA 13 or 12), or None."""
  for name in CUDA_PLUGINS:
    try:
      if importlib.util.find_spec(name) is not None:
        return name
    except ImportError:  # No jax_plugins package at all.
      return None
  return None


def require_cuda_plugin() -> None:
  if cuda_plugin() is None:
    raise ValueError('the CUDA compiler plugin is not installed: pip install --no-deps --target DIR '
                     f'jax-cuda12-plugin=={jax.__version__} jax-cuda12-pjrt=={jax.__version__} (or '
                     'cuda13) and put DIR on PYTHONPATH (installed into the environment, every jax '
                     'start would try CUDA).')


@functools.cache
def _describe(**kwargs):
  """One description per slice and process: another's devices are new objects with the same ids,
  which jit's caches mix with the first's ("incompatible devices" on a second compile)."""
  from jax.experimental import topologies
  return topologies.get_topology_desc(**kwargs)


def topology_devices(topology: Topology) -> list:
  """The devices of the slice, from libtpu's (or the CUDA plugin's) description of it; no TPU or
  GPU needed."""
  if topology.chip.platform == 'gpu':
    require_cuda_plugin()
    host_backend_only()
    try:
      desc = _describe(
          topology_name='', platform='cuda', topology='x'.join(map(str, topology.shape)),
          target_config=GPU_TARGETS[topology.chip.generation])
    except Exception as e:
      raise ValueError(f'the CUDA plugin cannot describe {topology.name!r}: '
                       f'{str(e).strip().splitlines()[0]}') from e
    return list(desc.devices)
  require_libtpu()
  host_backend_only()
  # A slice smaller than one host (2x2 chips) names its own host bounds.
  kwargs = {} if topology.chip.chip_config is None else {'chip_config_name': topology.chip.chip_config}
  if topology.num_chips < 4:
    kwargs['chips_per_host_bounds'] = tuple(topology.shape) + (1,) * (3 - len(topology.shape))
  try:
    desc = _describe(topology_name=topology.libtpu_name, platform='tpu', **kwargs)
  except Exception as e:  # JaxRuntimeError from libtpu: a shape it does not know.
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'libtpu cannot describe topology {topology.name!r} '
                     f'({topology.libtpu_name}): {message}') from e
  return list(desc.devices)


def check_mesh(mesh_config, num_devices: int, topology_name: str) -> dict[str, int]:
  """The mesh sizes of `config.mesh` on `num_devices`; they must use every device of the slice."""
  from retnet_jax import sharding
  sizes = {a: int(mesh_config.get(a, 1)) for a in sharding.AXES}
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f'mesh sizes must be positive, with at most one -1; got {sizes}.')
  if free:
    if num_devices % fixed:
      raise ValueError(f'mesh {sizes} does not fit the {num_devices} chips of {topology_name}: '
                       f'{fixed} does not divide {num_devices}.')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f'mesh {sizes} has {fixed} devices but {topology_name} has {num_devices} '
                     'chips: make the sizes multiply to that (or set one of them to -1).')
  return sizes


# ------------------------------------------------------------------------------------------------
# What the compiler reports.


def attention_in_step(run, batch_rows: int) -> dict[str, Any]:
  """What the attention layers' dispatcher (`attention.choose`) decides for the step's shapes on
  this mesh, before compiling; 'none' when no layer attends."""
  cfg = run.setup.model_config
  if 'attention' not in cfg.pattern:
    return {'impl': 'none', 'kernel': 'none (no attention layer)',
            'reason': f'layer pattern {",".join(cfg.pattern)!r} has no attention'}
  from retnet_jax import attention
  from retnet_jax import sharding
  q_shape = (batch_rows, run.config.seq_len, cfg.num_heads, cfg.head_dim)
  with sharding.use_rules(run.mesh, run.rules):
    choice = attention.choose(q_shape, jnp.dtype(cfg.dtype), impl=cfg.attention_impl)
  kernel = {'splash': 'splash attention (Pallas Mosaic)', 'cudnn': 'cuDNN fused attention',
            'xla': 'none: einsum + softmax (XLA)'}[choice.impl]
  return {'impl': choice.impl, 'reason': choice.reason, 'kernel': kernel,
          'window': cfg.attention_window}


def memory_per_device(compiled, hbm_bytes: int) -> dict[str, Any]:
  """Bytes per device from `compiled.memory_analysis()`; total = arguments + outputs − aliased
  (donated) + temporaries + generated code; fits: total ≤ HBM."""
  m = compiled.memory_analysis()
  out = {'argument_bytes': int(m.argument_size_in_bytes), 'output_bytes': int(m.output_size_in_bytes),
         'alias_bytes': int(m.alias_size_in_bytes), 'temp_bytes': int(m.temp_size_in_bytes),
         'generated_code_bytes': int(m.generated_code_size_in_bytes)}
  out['total_bytes'] = (out['argument_bytes'] + out['output_bytes'] - out['alias_bytes']
                        + out['temp_bytes'] + out['generated_code_bytes'])
  out['hbm_bytes'] = int(hbm_bytes)
  out['fits'] = out['total_bytes'] <= hbm_bytes
  out['headroom_gib'] = round((hbm_bytes - out['total_bytes']) / GIB, 3)
  return out


def compiler_flops(compiled) -> float | None:
  """FLOPs per device that `cost_analysis` reports. It counts a loop body once (the layer scan,
  the accumulation scan), so it is not the step's total: see `flops.train_flops_per_step`."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # Some backends do not report costs.
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  value = (cost or {}).get('flops')
  return None if value is None else float(value)


_KERNEL_OP = re.compile(r'op_name="[^"]*?(retention_[a-z_]+?)_?\)*/pallas_call"')
_KERNEL_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?(splash_[a-z_]+?)(?:\.\d+)? = ')  # Named by the kernel.


_KERNEL_TARGETS = ('custom_call_target="tpu_custom_call"', 'custom_call_target="__gpu$xla.gpu.triton"',
                   'custom_call_target="__cudnn$fmha')
_CUDNN_TARGET = re.compile(r'custom_call_target="__(cudnn\$fmha[A-Za-z]*)"')  # cuDNN attention.


def kernels_in(compiled) -> dict[str, int]:
  """The kernels of the compiled program, Pallas (Mosaic or Triton) and cuDNN's fused attention:
  {kernel name: custom calls}."""
  counts: dict[str, int] = {}
  for line in compiled.as_text().splitlines():
    if not any(t in line for t in _KERNEL_TARGETS):
      continue
    m = _CUDNN_TARGET.search(line) or _KERNEL_OP.search(line) or _KERNEL_INSTRUCTION.search(line)
    name = m.group(1) if m else 'other'
    counts[name] = counts.get(name, 0) + 1
  return counts


def retention_in_step(run, batch_rows: int) -> dict[str, Any]:
  """What the layer's one retention call decides for these shapes on this mesh (the same
  `retention_ops.choose` the layer calls, under the same mesh), before compiling."""
  cfg = run.setup.model_config
  if 'retention' not in cfg.pattern:
    return {'impl': 'none', 'kernel': 'none (softmax attention)',
            'reason': f'layer pattern {",".join(cfg.pattern)!r} has no retention'}
  try:
    from retnet_jax import retention_ops
  except ImportError:  # Before the one dispatcher lands: the compiled program says what ran.
    return {'impl': 'xla', 'reason': 'no retention dispatcher (retention_ops) in this version',
            'kernel': f'none: retention.{cfg.form} (XLA)'}
  from retnet_jax import sharding
  T = run.config.seq_len
  q_shape = (batch_rows, T, cfg.num_heads, cfg.head_dim)
  v_shape = (batch_rows, T, cfg.num_heads, cfg.value_head_dim)
  with sharding.use_rules(run.mesh, run.rules):
    choice = retention_ops.choose(q_shape, v_shape, jnp.dtype(cfg.dtype), form=cfg.form,
                                  chunk_size=cfg.chunk_size, impl=cfg.retention_impl)
  out = {'impl': choice.impl, 'reason': choice.reason}
  if choice.impl == 'pallas':
    out['kernel'] = f'retention_pallas.chunkwise (Pallas {"Mosaic" if choice.target == "tpu" else "Triton"}, ' \
                    f'target {choice.target})'
  else:
    out['kernel'] = f'none: retention.{cfg.form} (XLA)'
  return out


# ------------------------------------------------------------------------------------------------
# The compile modes.


def _mesh_sizes(mesh) -> dict[str, int]:
  return {name: int(size) for name, size in mesh.shape.items()}


def _slice(topology: Topology, devices) -> dict[str, Any]:
  key = 'libtpu_topology' if topology.chip.platform == 'tpu' else 'cuda_topology'
  return {'topology': topology.name, 'slice': topology.slice_name, 'platform': topology.chip.platform,
          key: topology.libtpu_name, 'device_kind': devices[0].device_kind,
          'num_devices': len(devices)}


def _prepare(config, topology_name: str):
  topology = parse_topology(topology_name)
  devices = topology_devices(topology)
  sizes = check_mesh(config.mesh, len(devices), topology.name)
  for axis, size in sizes.items():
    config.mesh[axis] = size
  return topology, devices


def _write(workdir: str, name: str, report: dict, summary: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, f'{name}.json'), 'w') as f:
    json.dump(report, f, indent=2)
    f.write('\n')
  with open(os.path.join(workdir, f'{name}_summary.txt'), 'w') as f:
    f.write(summary + '\n')


def _gib(n: int) -> str:
  return f'{n / GIB:.2f} GiB'


def _fits_line(mem: dict) -> str:
  verdict = (f'fits ({mem["headroom_gib"]:.2f} GiB headroom)' if mem['fits'] else
             f'does NOT fit (over by {-mem["headroom_gib"]:.2f} GiB)')
  return (f'arguments {_gib(mem["argument_bytes"])}, outputs {_gib(mem["output_bytes"])} '
          f'({_gib(mem["alias_bytes"])} of them donated), temporaries {_gib(mem["temp_bytes"])}, '
          f'total {_gib(mem["total_bytes"])} of {_gib(mem["hbm_bytes"])} HBM: {verdict}')


def compile_train(config, workdir: str, topology: str) -> dict[str, Any]:
  """Compiles `config`'s train step for the TPU slice `topology`; writes compile.json and
  compile_summary.txt to `workdir` and returns the report."""
  from retnet_jax import train
  t_build = time.perf_counter()
  topology_, devices = _prepare(config, topology)
  run = train.Run(config, workdir, devices=devices, read_data=False)
  cfg = run.setup.model_config
  step = train.make_train_step(run)
  accum = int(config.optim.get('grad_accum_steps', 1))
  retention = retention_in_step(run, config.batch_size // accum)
  attention = attention_in_step(run, config.batch_size // accum)
  logging.info('Compiling the %s train step for %s (%s, %d chips), mesh %s ...', config.get('name'),
               topology_.name, topology_.libtpu_name, len(devices), _mesh_sizes(run.mesh))
  from retnet_jax import sharding
  with sharding.use_rules(run.mesh, run.rules):
    t0 = time.perf_counter()
    lowered = step.lower(run.abstract_train_state(), run.abstract_batch())
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  mem = memory_per_device(compiled, topology_.chip.hbm_bytes)
  kernels = kernels_in(compiled)
  retention['kernel_calls_in_step'] = kernels
  attention['kernel_calls_in_step'] = {k: n for k, n in kernels.items()
                                       if k.startswith(('splash_', 'cudnn'))}
  ran_kernel = any(k.startswith('retention_') for k in kernels)
  if retention['impl'] == 'pallas' and not ran_kernel:
    retention['impl'] = 'xla'
    retention['reason'] += '; but the compiled step has no retention kernel call'
  elif retention['impl'] != 'pallas' and ran_kernel:
    retention['impl'] = 'pallas'
    retention['reason'] += '; but the compiled step calls the retention kernel'
  tokens = config.batch_size * config.seq_len
  model_flops = flops.train_flops_per_step(cfg, config.batch_size, config.seq_len)
  peak = topology_.chip.peak_flops * len(devices)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.abstract_state['params']))
  report = {
      **_slice(topology_, devices),
      'mesh': _mesh_sizes(run.mesh),
      'model': {'name': config.get('name'), 'kind': cfg.kind, 'layer_pattern': ','.join(cfg.pattern),
                'attention_window': cfg.attention_window, 'parameters': params,
                'dtype': cfg.dtype, 'param_dtype': cfg.param_dtype, 'remat': cfg.remat,
                'form': cfg.form, 'chunk_size': cfg.chunk_size},
      'batch_size': config.batch_size, 'seq_len': config.seq_len, 'grad_accum_steps': accum,
      'tokens_per_step': tokens,
      'per_device': mem,
      **{k: mem[k] for k in ('argument_bytes', 'output_bytes', 'temp_bytes', 'total_bytes',
                             'hbm_bytes', 'fits', 'headroom_gib')},
      'flops_per_step': {
          'compiler_per_device': compiler_flops(compiled),
          'compiler_note': 'cost_analysis counts each loop body once (layer scan, accumulation)',
          'model': model_flops,
          'model_formula': 'flops.train_flops_per_step: 3 x forward matmul FLOPs, remat not counted',
      },
      'peak_flops_per_chip': topology_.chip.peak_flops,
      'step_seconds_lower_bound': model_flops / peak,
      'tokens_per_second_upper_bound': tokens / (model_flops / peak),
      'retention_impl_in_step': retention,
      'attention_impl_in_step': attention,
      'lower_seconds': round(t1 - t0, 2),
      'compile_seconds': round(t2 - t1, 2),
      'build_seconds': round(t0 - t_build, 2),
  }
  summary = '\n'.join([
      f'{config.get("name")} train step ({params / 1e9:.2f}B parameters, {",".join(cfg.pattern)}) on '
      f'{topology_.name} ({devices[0].device_kind}, {len(devices)} chips, topology '
      f'{topology_.libtpu_name}); mesh {report["mesh"]}',
      f'  batch {config.batch_size} x {config.seq_len} = {tokens:,} tokens per step, '
      f'{accum} accumulation step(s), remat {cfg.remat!r}',
      f'  per chip: {_fits_line(mem)}',
      f'  model FLOPs per step {model_flops:.3e}; at the peak of {len(devices)} chips '
      f'({topology_.chip.peak_flops / 1e12:.0f} TFLOP/s each) a step takes at least '
      f'{report["step_seconds_lower_bound"]:.2f} s (a bound, not a measurement)',
      f'  retention: {retention["kernel"]}: {retention["reason"]}',
      f'  attention: {attention["kernel"]}: {attention["reason"]}',
      f'  kernel calls in the step: {kernels or "none"}',
      f'  lowered in {t1 - t0:.1f} s, compiled in {t2 - t1:.1f} s',
  ])
  _write(workdir, 'compile', report, summary)
  logging.info('%s', summary)
  print(summary, flush=True)
  return report


def compile_generate(config, workdir: str, topology: str, *, batch_sizes: Sequence[int] = (64, 256),
                     prompt_len: int | None = None, max_new_tokens: int | None = None
                     ) -> dict[str, Any]:
  """Compiles decoding (`generate.prefill` of a prompt, then the `generate.decode` loop) for the
  TPU slice at each batch size; writes generate_compile.json and its summary to `workdir`.

  Parameters are laid out as training lays them out (config.mesh); prompts are sharded by batch.
  prompt_len: the prompt bucket (default config.seq_len); max_new_tokens: the decode loop's
  output buffer (default config.generate.max_new_tokens).
  """
  from retnet_jax import generate
  from retnet_jax import sharding
  from retnet_jax import train
  topology_, devices = _prepare(config, topology)
  run = train.Run(config, workdir, for_training=False, devices=devices, read_data=False)
  cfg, mesh = run.setup.model_config, run.mesh
  P_len = generate.next_power_of_two(prompt_len or config.seq_len)
  new = int(max_new_tokens or (config.get('generate') or {}).get('max_new_tokens', 256))
  out_len = generate.next_power_of_two(new, generate.MIN_NEW_BUCKET)
  form = (config.get('generate') or {}).get('prefill_form', 'chunkwise')
  params = run.abstract(run.abstract_state['params'], run.state_sh['params'])
  replicated = NamedSharding(mesh, P())
  max_len = P_len + out_len if cfg.state_grows else None
  rows = []
  for B in batch_sizes:
    dp = mesh.shape['data'] * mesh.shape['fsdp']
    batch_spec = sharding.logical_to_spec(('batch', None), run.rules, mesh, (B, P_len))
    tokens_sh = NamedSharding(mesh, batch_spec)
    tokens = jax.ShapeDtypeStruct((B, P_len), jnp.int32, sharding=tokens_sh)
    with sharding.use_rules(mesh, run.rules):
      t0 = time.perf_counter()
      pre = generate.prefill.lower(run.setup.graphdef, params, tokens, tokens, form=form,
                                   max_len=max_len).compile()
      t1 = time.perf_counter()
      logits_sh, state_sh = pre.output_shardings
      logits_shape, state_shape = jax.eval_shape(
          lambda p, t: generate.prefill(run.setup.graphdef, p, t, t, form=form, max_len=max_len),
          params, tokens)
      state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           state_shape, state_sh)
      logits = jax.ShapeDtypeStruct(logits_shape.shape, jnp.float32, sharding=logits_sh)
      done = jax.ShapeDtypeStruct((B,), jnp.bool_, sharding=NamedSharding(
          mesh, sharding.logical_to_spec(('batch',), run.rules, mesh, (B,))))
      scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
      knobs = jax.eval_shape(lambda: generate._knobs(0.7, 0, 0.9, 0, (0,), 0))
      knobs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                           knobs)
      counts = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=logits_sh),
          jax.eval_shape(lambda t: generate.prompt_counts(t, t, logits_shape.shape[-1]), tokens))
      t2 = time.perf_counter()
      dec = generate.decode.lower(run.setup.graphdef, params, state, logits, done, counts, scalar,
                                  scalar, knobs, out_len=out_len).compile()
      t3 = time.perf_counter()
    state_bytes = sum(
        int(np.prod(s.sharding.shard_shape(s.shape))) * jnp.dtype(s.dtype).itemsize
        for s in jax.tree.leaves(state))
    rows.append({
        'batch_size': B, 'data_parallel': dp, 'prompt_len': P_len, 'decode_out_len': out_len,
        'decode_state_bytes_per_device': state_bytes,
        'prefill': memory_per_device(pre, topology_.chip.hbm_bytes),
        'decode': memory_per_device(dec, topology_.chip.hbm_bytes),
        'prefill_retention_kernels': kernels_in(pre),
        'prefill_compile_seconds': round(t1 - t0, 2), 'decode_compile_seconds': round(t3 - t2, 2),
    })
    logging.info('batch %d: prefill %s, decode %s', B, _gib(rows[-1]['prefill']['total_bytes']),
                 _gib(rows[-1]['decode']['total_bytes']))
  params_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.abstract_state['params']))
  report = {**_slice(topology_, devices), 'mesh': _mesh_sizes(mesh),
            'model': {'name': config.get('name'), 'kind': cfg.kind, 'parameters': params_count,
                      'param_dtype': cfg.param_dtype, 'dtype': cfg.dtype},
            'prefill_form': form, 'runs': rows}
  lines = [f'{config.get("name")} decoding ({",".join(cfg.pattern)}, {params_count / 1e9:.2f}B parameters) on '
           f'{topology_.name} ({devices[0].device_kind}, {len(devices)} chips); mesh '
           f'{report["mesh"]}; prompt {P_len} tokens, {out_len} new']
  for r in rows:
    lines.append(f'  batch {r["batch_size"]}: decode state {_gib(r["decode_state_bytes_per_device"])} '
                 f'per chip; prefill total {_gib(r["prefill"]["total_bytes"])}, decode loop total '
                 f'{_gib(r["decode"]["total_bytes"])} of {_gib(r["decode"]["hbm_bytes"])} '
                 f'({"fits" if r["prefill"]["fits"] and r["decode"]["fits"] else "does NOT fit"}); '
                 f'compiled in {r["prefill_compile_seconds"]:.1f} + {r["decode_compile_seconds"]:.1f} s')
  summary = '\n'.join(lines)
  _write(workdir, 'generate_compile', report, summary)
  logging.info('%s', summary)
  print(summary, flush=True)
  return report
