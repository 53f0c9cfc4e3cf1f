"""Every test process sees 8 virtual CPU devices (sharding tests build meshes over them; the others
use a one-device mesh, see tests/util.py), and runs on the CPU: with the TPU library installed jax
would otherwise try to open a TPU first (noise, and libtpu's one-process lock, which makes another
process's TPU compile fail). Set JAX_PLATFORMS to test on an accelerator.

The test processes (xdist workers and the command-line runs they start) share one persistent
compilation cache: most tests compile the same shrunk configs, and compiling is most of their time.
XLA_FLAGS are part of the cache key, so the tests set the entrypoints' flags (platform.py) too: a
command-line run then reuses what an in-process test compiled, and the other way round.

In CI (CI=true) a missing optional extra fails the tests that need it (util.require).
"""

import os
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'retnet_jax_tests_compilation_cache'))

os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')  # Small compiles add up.

from retnet_jax import platform  # After the JAX_ variables: importing jax reads them.

os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''),
                                    '--xla_force_host_platform_device_count=8']).strip()
platform.tune_xla_cpu_flags()  # What main.py and the experiments add (subprocesses inherit them).
