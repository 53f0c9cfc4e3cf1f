"""Every test process sees 8 virtual CPU devices (sharding tests build meshes over them; the others
use a one-device mesh, see tests/util.py)."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
