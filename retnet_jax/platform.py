"""Process set-up the entrypoints (main.py, the experiments) do before any training: XLA:CPU flags,
multi-process start-up, the host allocator; and the XLA options of the train and eval steps.

The reasons and the measurements behind each choice are in docs/performance.md.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys

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
  """What an entrypoint calls first: quiet start-up logs, the XLA:CPU flags, jax.distributed (from
  `mesh_config` or the environment), then the host allocator."""
  quiet_start_logs()
  tune_xla_cpu_flags()
  init_distributed(mesh_config)
  tune_host_allocator()


class _DropPrefixes(logging.Filter):
  def __init__(self, prefixes):
    super().__init__()
    self.prefixes = tuple(prefixes)

  def filter(self, record):
    return not record.getMessage().startswith(self.prefixes)


def on_tpu_host() -> bool:
  """Whether this host has TPU chips (their device files, or a TPU VM's environment)."""
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')
              or os.environ.get('TPU_ACCELERATOR_TYPE') or os.environ.get('TPU_NAME'))


def quiet_start_logs() -> None:
  """Drops start-up log lines that say nothing about the run: jax failing to start a TPU backend on
  a host without TPUs (libtpu is installed for ahead-of-time compiles) and orbax noting that a
  checkpoint folder opened read-only is read-only. Idempotent."""
  drops = [('absl', ('CheckpointManagerOptions.read_only=True', 'Given directory is read only'))]
  if not on_tpu_host():
    drops.append(('jax._src.xla_bridge', ("Unable to initialize backend 'tpu'",)))
  for name, prefixes in drops:
    logger = logging.getLogger(name)
    if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
      logger.addFilter(_DropPrefixes(prefixes))


def tune_xla_cpu_flags() -> bool:
  """Adds `_XLA_CPU_FLAGS` and `COLLECTIVE_WAIT_FLAGS` to XLA_FLAGS unless set there already.
  Returns whether it did.

  Only a backend started afterwards sees them, so entrypoints call this first; a no-op once JAX
  has started (a notebook that already ran JAX keeps the defaults). GPU/TPU ignore the flags.
  """
  if backends_started(default=True):
    return False
  current = os.environ.get('XLA_FLAGS', '')
  todo = [f for f in (*_XLA_CPU_FLAGS, *COLLECTIVE_WAIT_FLAGS) if f.split('=')[0] not in current]
  if todo:
    os.environ['XLA_FLAGS'] = ' '.join([current, *todo]).strip()
  return bool(todo)


def backends_started(default: bool) -> bool:
  """Whether jax has started a backend in this process; `default` where this jax cannot say (the
  check is private, `jax._src.xla_bridge.backends_are_initialized`, and may go)."""
  if 'jax' not in sys.modules:
    return False
  check = getattr(sys.modules.get('jax._src.xla_bridge'), 'backends_are_initialized', None)
  return default if check is None else bool(check())


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
