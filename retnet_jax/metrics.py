"""Metrics of a batch (loss, bits per byte, accuracy) and run logs: `<workdir>/metrics.jsonl` (one JSON object a line) and TensorBoard (`<workdir>/tb`),
a filter for library chatter in the absl log, and one way to print a duration."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import optax

LN2 = math.log(2.0)


class MetricWriter:
  """metrics.jsonl and TensorBoard (process 0 only).

  Each record is one os.write of a whole line to a file opened for appending, so a record is on
  disk whole or not at all; a partial last line left by an earlier crash is cut off on opening.
  A write that fails (a full disk) raises ValueError with one line.
  """

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    if self.active:
      repair_partial_line(self.path)
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, 'tb'))
      except ImportError:
        logging.warning('tensorboardX is not installed: no TensorBoard event files.')

  def write(self, step: int, split: str, metrics: dict):
    if not self.active:
      return
    record = {'step': int(step), 'split': split, **{k: float(v) for k, v in metrics.items()}}
    line = (json.dumps(record) + '\n').encode()
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      try:
        written = os.write(fd, line)
      finally:
        os.close(fd)
      if written != len(line):
        raise OSError(28, 'short write (disk full?)')
    except OSError as e:
      repair_partial_line(self.path)
      raise ValueError(f'cannot write {self.path}: {e.strerror or e}.') from e
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(f'{split}/{k}', float(v), int(step))
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def repair_partial_line(path: str) -> bool:
  """Cuts a trailing partial line (no newline at the end) off `path`. Returns whether it did."""
  try:
    with open(path, 'rb+') as f:
      f.seek(0, os.SEEK_END)
      size = f.tell()
      if size == 0:
        return False
      f.seek(max(size - (1 << 16), 0))
      tail = f.read()
      if tail.endswith(b'\n'):
        return False
      cut = tail.rfind(b'\n')
      keep = size - len(tail) + cut + 1 if cut >= 0 else 0
      f.truncate(keep)
  except FileNotFoundError:
    return False
  except OSError as e:
    logging.warning('cannot repair %s: %s', path, e)
    return False
  logging.warning('%s ended in a partial record (%d bytes): cut off.', path, size - keep)
  return True


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
  """'4m05s', or '1h02m03s' from an hour on; '?' for an unknown (infinite or NaN) time."""
  if not math.isfinite(seconds):
    return '?'
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def batch_statistics(setup, logits, batch) -> dict:
  """Sums over the scored targets: loss (nats), tokens, correct predictions, UTF-8 bytes."""
  mask = batch['loss_mask'].astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
  correct = (jnp.argmax(logits, axis=-1) == batch['targets']).astype(jnp.float32)
  nbytes = jnp.asarray(setup.token_bytes)[batch['targets']].astype(jnp.float32)
  return {'loss_sum': jnp.sum(loss * mask), 'tokens': jnp.sum(mask),
          'correct': jnp.sum(correct * mask), 'bytes': jnp.sum(nbytes * mask)}


def summarize(sums: dict) -> dict:
  """Per-token loss (nats), bits per byte, perplexity and accuracy from summed statistics."""
  tokens = max(float(sums['tokens']), 1.0)
  loss = float(sums['loss_sum']) / tokens
  out = {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)),
         'accuracy': float(sums['correct']) / tokens}
  if float(sums['bytes']) > 0:
    out['bits_per_byte'] = float(sums['loss_sum']) / LN2 / float(sums['bytes'])
  return out


def train_line(step: int, total: int, metrics: dict, eta_seconds: float) -> str:
  bpb = f" | {metrics['bits_per_byte']:.3f} bits/byte" if 'bits_per_byte' in metrics else ''
  mfu = f" | MFU {metrics['mfu']:.1%}" if 'mfu' in metrics else ''
  good = f" | goodput {metrics['goodput']:.1%}" if 'goodput' in metrics else ''
  return (f"step {step}/{total} | loss {metrics['loss']:.4f}{bpb} | lr {metrics['learning_rate']:.2e}"
          f" | {metrics['tokens_per_second']:.0f} tok/s{mfu}{good} | ETA {duration(eta_seconds)}")


class Goodput:
  """Where a run's wall time goes since its start: the compile of the first step, waiting for
  data, evaluation, checkpoints; the rest is training steps. `fractions()` gives goodput (the
  steps' fraction) and one `<part>_fraction` per part; together they sum to 1."""

  PARTS = ('compile', 'data', 'eval', 'checkpoint')

  def __init__(self):
    self.start = time.perf_counter()
    self.seconds = dict.fromkeys(self.PARTS, 0.0)

  @contextlib.contextmanager
  def timing(self, part: str):
    t = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[part] += time.perf_counter() - t

  def fractions(self) -> dict:
    wall = max(time.perf_counter() - self.start, 1e-9)
    out = {f'{p}_fraction': s / wall for p, s in self.seconds.items()}
    out['goodput'] = max(0.0, 1.0 - sum(out.values()))
    return out


def eval_line(step: int, metrics: dict, seconds: float) -> str:
  bpb = f"{metrics['bits_per_byte']:.3f} bits/byte | " if 'bits_per_byte' in metrics else ''
  return (f"eval at step {step} | loss {metrics['loss']:.4f} | {bpb}perplexity "
          f"{metrics['perplexity']:.3f} | accuracy {metrics['accuracy']:.4f} ({seconds:.1f}s)")
