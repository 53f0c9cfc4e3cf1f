"""Process set-up the entrypoints (main.py, the experiments) do before any training: XLA:CPU flags,
multi-process start-up, the host allocator; and the XLA options of the train and eval steps.

The reasons and the measurements behind each choice are in docs/performance.md.
"""

from __future__ import annotations

import ctypes
import os

import jax

# YNNPACK (XLA:CPU's library for dots, reductions and elementwise fusions) for dots only: its
# reductions are slow on long single sequences.
_XLA_CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=individual_dot',)

# Virtual CPU devices share the host's cores: on a busy machine one can reach a collective long
# after the others, and XLA's default wait then ends the process.
COLLECTIVE_WAIT_FLAGS = ('--xla_cpu_collective_call_terminate_timeout_seconds=600',)

# XLA:CPU options that leave YNNPACK out of one executable, so that Eigen runs its dots.
EIGEN_DOTS = {'xla_cpu_experimental_ynn_fusion_type': ''}


def start(mesh_config=None) -> None:
  """What an entrypoint calls first: the XLA:CPU flags, jax.distributed (from `mesh_config` or the
  environment), then the host allocator."""
  tune_xla_cpu_flags()
  init_distributed(mesh_config)
  tune_host_allocator()


def tune_xla_cpu_flags() -> bool:
  """Adds `_XLA_CPU_FLAGS` and `COLLECTIVE_WAIT_FLAGS` to XLA_FLAGS unless set there already.
  Returns whether it did.

  Only a backend started afterwards sees them, so entrypoints call this first; a no-op once JAX
  has started (a notebook that already ran JAX keeps the defaults). GPU/TPU ignore the flags.
  """
  from jax._src import xla_bridge  # backends_are_initialized has no public spelling.
  if xla_bridge.backends_are_initialized():
    return False
  current = os.environ.get('XLA_FLAGS', '')
  todo = [f for f in (*_XLA_CPU_FLAGS, *COLLECTIVE_WAIT_FLAGS) if f.split('=')[0] not in current]
  if todo:
    os.environ['XLA_FLAGS'] = ' '.join([current, *todo]).strip()
  return bool(todo)


def step_compiler_options(model_cfg, platform: str | None = None) -> dict | None:
  """XLA options for jitting the train and eval steps of `model_cfg` on `platform` (default: the
  default backend's), or None.

  On CPU a model whose mixers form no [T, T] products (chunkwise retention) compiles without
  YNNPACK, so its small batched dots run in Eigen; attention's and the parallel form's [T, T]
  products keep YNNPACK's.
  """
  platform = jax.default_backend() if platform is None else platform
  if platform != 'cpu' or model_cfg.quadratic(model_cfg.form):
    return None
  return dict(EIGEN_DOTS)


def tune_host_allocator() -> bool:
  """On CPU, keep freed buffers in the process for reuse (glibc mallopt). Returns whether it did.

  XLA:CPU allocates every step's activations afresh; glibc serves large blocks with mmap and gives
  them back on free, so each step would pay a page fault per 4 KiB touched. Raising the mmap and
  trim thresholds keeps freed memory in the heap (resident size stays near its peak).
  """
  if jax.default_backend() != 'cpu':
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:  # Not glibc (macOS, musl): nothing to tune.
    return False
  m_trim_threshold, m_top_pad, m_mmap_threshold, m_arena_max = -1, -2, -3, -8
  # One arena: XLA's worker threads would otherwise allocate from per-thread arenas, whose heaps
  # cannot hold blocks over 64 MiB and are trimmed on their own.
  return all(libc.mallopt(option, value) for option, value in (
      (m_arena_max, 1), (m_mmap_threshold, 1 << 30), (m_trim_threshold, 2**31 - 1),
      (m_top_pad, 64 << 20)))


_distributed = {'initialized': False}


def init_distributed(mesh_config=None) -> None:
  """jax.distributed from config.mesh, else from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID in the environment; nothing for a single process."""
  get = (lambda k: None) if mesh_config is None else mesh_config.get
  address = get('coordinator_address') or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not address or _distributed['initialized']:
    return
  num = get('num_processes') or int(os.environ.get('JAX_NUM_PROCESSES', '0')) or None
  pid = get('process_id')
  if pid is None and 'JAX_PROCESS_ID' in os.environ:
    pid = int(os.environ['JAX_PROCESS_ID'])
  jax.distributed.initialize(address, num_processes=num, process_id=pid)
  _distributed['initialized'] = True
