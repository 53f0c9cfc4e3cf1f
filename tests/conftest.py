"""Every test process sees 8 virtual CPU devices (sharding tests build meshes over them; the others
use a one-device mesh, see tests/util.py), and runs on the CPU: with the TPU library installed jax
would otherwise try to open a TPU first (noise, and libtpu's one-process lock, which makes another
process's TPU compile fail). Set JAX_PLATFORMS to test on an accelerator.

The test processes (xdist workers and the command-line runs they start) share one persistent
compilation cache: most tests compile the same shrunk configs, and compiling is most of their time.
The in-process tests set only the collective wait of the entrypoints' XLA flags (platform.py), not
their dot-fusion flag; command-line runs add the full set themselves. XLA:CPU sizes its thread
pools to the larger of the core count and the device count, so on two cores the 8 virtual devices
get 8 threads. With 8 threads the sharded training tests (tests/loss_test.py and
sharding_test.py::test_losses_match_one_device, run together) stall in a collective until XLA
ends the process after the 600-s wait: devices blocked in a collective hold the threads that the
last device needs to arrive. PJRT_NPROC gives every pool twice the devices, and they pass. A
worker that dies ends the run at once (`--max-worker-restart=0` in pyproject.toml: xdist's file
scheduling can wait forever for a replaced worker).

In CI (CI=true) a missing optional extra fails the tests that need it (util.require).
"""

import os
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'retnet_jax_tests_compilation_cache'))

os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')  # Small compiles add up.

os.environ.setdefault('PJRT_NPROC', '16')  # Read when the CPU client starts; see above.

from retnet_jax import platform  # After the JAX_ variables: importing jax reads them.

os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''),
                                    '--xla_force_host_platform_device_count=8',
                                    *platform.COLLECTIVE_WAIT_FLAGS]).strip()

# The files that take longest on 2 CPU cores (a cold run's --durations), longest first: those of
# the default suite, then those of `-m slow`. They are collected first, so that `--dist loadfile`
# hands them out early and the two workers finish together instead of one of them starting a long
# file near the end.
LONG_FILES = ('retention_pallas_test.py', 'sharding_test.py', 'hybrid_test.py', 'gpu_check_test.py',
              'yoco_test.py', 'gated_test.py', 'aot_test.py', 'sequence_parallel_test.py',
              'recall_test.py', 'reliability_test.py', 'experiments_test.py',
              'training_cost_test.py', 'lm_eval_test.py', 'notebooks_test.py')


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(LONG_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: the rest keep order.
