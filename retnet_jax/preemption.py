"""Preemption: SIGTERM / SIGINT become a request to checkpoint and stop, and the exit status
tells a scheduler whether the run finished (0), was stopped and can resume (75), or failed (1)."""

from __future__ import annotations

import signal
import threading

from absl import logging

EXIT_DONE, EXIT_ERROR, EXIT_PREEMPTED = 0, 1, 75  # 75: EX_TEMPFAIL (sysexits.h), "try again".


class StopOnSignal:
  """Turns SIGTERM / SIGINT into a request to checkpoint and stop (a second SIGINT aborts)."""

  def __init__(self, enabled: bool = True):
    self.requested, self._previous, self.enabled = None, {}, enabled

  def __enter__(self):
    if self.enabled and threading_is_main():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name
    logging.warning('%s received: saving a checkpoint and stopping.', self.requested)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


def threading_is_main() -> bool:
  return threading.current_thread() is threading.main_thread()
