"""Run logs: `<workdir>/metrics.jsonl` (one JSON object a line) and TensorBoard (`<workdir>/tb`),
a filter for library chatter in the absl log, and one way to print a duration."""

from __future__ import annotations

import json
import os

from absl import logging
import jax


class MetricWriter:
  """metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    if self.active:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, 'tb'))
      except ImportError:
        logging.warning('tensorboardX is not installed: no TensorBoard event files.')

  def write(self, step: int, split: str, metrics: dict):
    if not self.active:
      return
    record = {'step': int(step), 'split': split, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(f'{split}/{k}', float(v), int(step))
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


class _QuietLibraries:
  """Drops the INFO chatter of orbax and grain from the absl log; keeps their warnings."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(f'{os.sep}{lib}{os.sep}' in record.pathname
                                           for lib in ('orbax', 'grain'))


def quiet_library_logs() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def duration(seconds: float) -> str:
  """'4m05s', or '1h02m03s' from an hour on."""
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'
