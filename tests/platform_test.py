"""Process set-up that leans on jax internals degrades to a default where they are gone."""

import importlib.util
import logging
import os
import subprocess
import sys
import types

import pytest

from retnet_jax import platform
from tests import util


def test_backends_started_asks_jax_and_falls_back_to_the_default(monkeypatch):
  import jax
  jax.devices()  # A backend has started in this process.
  assert platform.backends_started(default=False) is True
  monkeypatch.setitem(sys.modules, 'jax._src.xla_bridge', types.ModuleType('xla_bridge'))
  assert platform.backends_started(default=False) is False
  assert platform.backends_started(default=True) is True
  assert platform.tune_xla_cpu_flags() is False  # Unknown: treated as started, flags untouched.


def test_quiet_start_logs_drops_the_tpu_probe_and_orbax_read_only_lines(caplog, monkeypatch):
  monkeypatch.setattr(platform, 'on_tpu_host', lambda: False)
  platform.quiet_start_logs()
  platform.quiet_start_logs()  # Idempotent: one filter each.
  assert len(logging.getLogger('absl').filters) == 1
  with caplog.at_level(logging.INFO):
    logging.getLogger('jax._src.xla_bridge').info("Unable to initialize backend 'tpu': NOT_FOUND")
    logging.getLogger('absl').warning('Given directory is read only=/tmp/x')
    logging.getLogger('absl').warning('CheckpointManagerOptions.read_only=True, setting ...')
    logging.getLogger('absl').warning('kept')
  assert [r.getMessage() for r in caplog.records] == ['kept']


def test_a_cpu_start_logs_no_tpu_probe():
  """With libtpu installed and no TPU here, jax's TPU attempt is logged at INFO unless quietened."""
  if platform.on_tpu_host() or importlib.util.find_spec('libtpu') is None:
    pytest.skip('needs libtpu installed on a host without TPUs')
  code = ('import logging, sys; logging.basicConfig(level=logging.INFO); '
          'from retnet_jax import platform; quiet = sys.argv[1] == "1"; '
          'quiet and platform.quiet_start_logs(); import jax; jax.devices()')
  env = {**os.environ, 'PYTHONPATH': util.ROOT}
  env.pop('JAX_PLATFORMS', None)
  run = lambda quiet: subprocess.run([sys.executable, '-c', code, quiet], env=env, cwd=util.ROOT,
                                     capture_output=True, text=True, timeout=120)
  loud, quiet = run('0'), run('1')
  assert loud.returncode == 0 and quiet.returncode == 0, quiet.stderr[-2000:]
  assert "Unable to initialize backend 'tpu'" in loud.stderr
  assert "Unable to initialize backend 'tpu'" not in quiet.stderr, quiet.stderr[-2000:]
