"""Process set-up that leans on jax internals degrades to a default where they are gone."""

import sys
import types

from retnet_jax import platform


def test_backends_started_asks_jax_and_falls_back_to_the_default(monkeypatch):
  import jax
  jax.devices()  # A backend has started in this process.
  assert platform.backends_started(default=False) is True
  monkeypatch.setitem(sys.modules, 'jax._src.xla_bridge', types.ModuleType('xla_bridge'))
  assert platform.backends_started(default=False) is False
  assert platform.backends_started(default=True) is True
  assert platform.tune_xla_cpu_flags() is False  # Unknown: treated as started, flags untouched.
