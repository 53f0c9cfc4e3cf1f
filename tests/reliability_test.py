"""What a run promises when a cluster interrupts it, its disk fills or its checkpoint is damaged:
exit codes, checksums and fallback, the NaN guard, and one-line errors (docs/training.md, "What a
run promises")."""

import errno
import glob
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from unittest import mock

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from retnet_jax import checkpoint
from retnet_jax import config_lib
from retnet_jax import generate
from retnet_jax import metrics as metrics_lib
from retnet_jax import train
from tests import util

# The set-up: the tiny config shrunk to one layer, batch 4, seq_len 64.
TINY = {'model.num_layers': 1, 'batch_size': 4, 'seq_len': 64}


def tiny(**overrides):
  base = dict(model__num_layers=1, batch_size=4, seq_len=64, total_steps=4, log_every=1,
              eval_every=100, checkpoint_every=2, optim__warmup_steps=1)
  return util.config(**{**base, **overrides})


def steps_on_disk(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())


def train_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r['loss']) for r in map(json.loads, f) if r['split'] == 'train']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A run with checkpoints at steps 2 and 4; tests copy it before damaging it."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  train.train_and_evaluate(tiny(), workdir)
  return workdir


def copy_of(workdir, tmp_path):
  import shutil
  target = str(tmp_path / 'w')
  shutil.copytree(workdir, target)
  return target


def largest_params_file(workdir, step):
  files = [p for p in glob.glob(os.path.join(workdir, 'checkpoints', str(step), 'params', '**'),
                                recursive=True) if os.path.isfile(p)]
  return max(files, key=os.path.getsize)


# ------------------------------------------------------------------------------------------------
# Defect 2: silent corruption; defect 4: damaged files give one line.


@pytest.mark.slow
def test_flipped_bytes_are_reported_by_step_and_the_fallback_uses_the_newest_intact_step(
    trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  path = largest_params_file(workdir, 4)
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:  # 400 bytes flipped in the middle, size unchanged.
    f.seek(size // 2 - 200)
    chunk = bytearray(f.read(400))
    f.seek(size // 2 - 200)
    f.write(bytes(b ^ 0xFF for b in chunk))
  assert os.path.getsize(path) == size
  with pytest.raises(checkpoint.Damaged, match=r'checkpoint step 4 in .* is damaged: params/.* '
                     r'does not match its checksum .*--step=N.*fallback_to_intact'):
    train.evaluate(tiny(), workdir)
  with pytest.raises(checkpoint.Damaged, match='step 4'):
    train.train_and_evaluate(tiny(total_steps=6), workdir)
  with pytest.raises(checkpoint.Damaged, match='step 4'):
    checkpoint.load_params(workdir)
  out = train.evaluate(tiny(checkpoint__fallback_to_intact=True), workdir)
  assert out['step'] == 2 and math.isfinite(out['eval']['loss'])
  assert train.evaluate(tiny(), workdir, step=2)['eval'] == out['eval']
  params, _, meta = checkpoint.load_params(workdir, step=2)
  assert meta['step'] == 2
  with pytest.raises(ValueError, match=r'no checkpoint step 3 .* steps there: \[2, 4\]'):
    train.evaluate(tiny(), workdir, step=3)
  # Resuming with the fallback trains on from step 2 and replaces the damaged step 4.
  result = train.train_and_evaluate(tiny(checkpoint__fallback_to_intact=True), workdir)
  assert result['step'] == 4 and steps_on_disk(workdir) == [2, 4]
  checkpoint.load_params(workdir)  # Intact again.
  assert train_losses(workdir)[-2:] == train_losses(trained)[-2:]


@pytest.mark.parametrize('damage', ['truncate', 'empty_manifest', 'truncate_meta'])
def test_damaged_files_are_one_line_errors_naming_the_file_and_step(trained, tmp_path, damage):
  workdir = copy_of(trained, tmp_path)
  step_dir = os.path.join(workdir, 'checkpoints', '4')
  if damage == 'truncate':
    path, expect = largest_params_file(workdir, 4), 'truncated or emptied'
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 3)
  elif damage == 'empty_manifest':
    path, expect = os.path.join(step_dir, 'params', 'manifest.ocdbt'), 'manifest.ocdbt has 0 bytes'
    open(path, 'w').close()
  else:
    path, expect = os.path.join(step_dir, 'meta', 'metadata'), 'meta/metadata has'
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(checkpoint.Damaged, match=f'checkpoint step 4 .*{expect}'):
    train.evaluate(tiny(), workdir)
  if damage == 'truncate_meta':
    # A step without checksums (written before they existed) still names the file and step.
    os.remove(os.path.join(step_dir, checkpoint.CHECKSUMS))
    with pytest.raises(checkpoint.Damaged, match=r'checkpoint step 4: .*meta/metadata cannot be read'):
      train.evaluate(tiny(), workdir)


@pytest.mark.slow
def test_command_line_reports_a_damaged_checkpoint_in_one_line(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  open(os.path.join(workdir, 'checkpoints', '4', 'params', 'manifest.ocdbt'), 'w').close()
  for mode in ('eval', 'generate'):
    proc = subprocess.run(main_command(workdir, mode=mode, prompt='ab', max_new_tokens=2),
                          capture_output=True, text=True, cwd=util.ROOT, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
    assert len(errors) == 1 and 'checkpoint step 4' in errors[0] and 'damaged' in errors[0]
    assert 'Traceback' not in proc.stderr and 'Task exception' not in proc.stderr


# ------------------------------------------------------------------------------------------------
# Defect 3: NaN.


@pytest.mark.slow
def test_non_finite_loss_stops_without_saving_it_or_is_skipped(tmp_path):
  # A huge learning rate makes the parameters overflow after the first update.
  blowup = dict(optim__learning_rate=1e12, optim__warmup_steps=0, checkpoint_every=1)
  with pytest.raises(train.NonFinite, match=r'NaN/Inf at step 2 .*last checkpoint: step 1'):
    train.train_and_evaluate(tiny(**blowup), str(tmp_path / 'stop'))
  assert steps_on_disk(str(tmp_path / 'stop')) == [1]
  result = train.train_and_evaluate(tiny(checkpoint__on_nonfinite='skip', **blowup),
                                    str(tmp_path / 'skip'))
  assert result['step'] == 4 and result['train']['skipped_updates'] == 3
  for step in steps_on_disk(str(tmp_path / 'skip')):
    params, _, _ = checkpoint.load_params(str(tmp_path / 'skip'), step=step)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


# ------------------------------------------------------------------------------------------------
# Defect 4: a different model; a full disk.


@pytest.mark.slow
def test_resume_with_a_different_model_names_the_fields_before_restoring(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  with mock.patch.object(checkpoint, 'restore', side_effect=AssertionError('restored')):
    with pytest.raises(ValueError, match=r'\(step 4\) is of a different model: num_layers 1 -> 2; '
                       r'ffn_dim 80 -> 96\. Use'):
      train.train_and_evaluate(tiny(model__num_layers=2, model__ffn_dim=96, total_steps=6), workdir)
  # Fields that leave the parameters unchanged do not block a resume.
  result = train.train_and_evaluate(
      tiny(total_steps=5, model__form='parallel', model__chunk_size=8, model__remat='full',
           model__retention_impl='xla'), workdir)
  assert result['step'] == 5


@pytest.mark.slow
def test_full_disk_during_a_save_is_one_line_and_keeps_the_earlier_steps(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  real_save = ocp.CheckpointManager.save

  def full(self, step, *args, **kwargs):
    os.makedirs(os.path.join(os.fspath(self.directory), f'{step}.orbax-checkpoint-tmp-1'))
    raise RuntimeError('write failed') from OSError(errno.ENOSPC, 'No space left on device')

  with mock.patch.object(ocp.CheckpointManager, 'save', full):
    with pytest.raises(ValueError, match=r'cannot save checkpoint step 6 to .*: No space left on '
                       r'device \(the earlier steps are intact\)'):
      train.train_and_evaluate(tiny(total_steps=6), workdir)
  assert ocp.CheckpointManager.save is real_save
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  assert train.train_and_evaluate(tiny(total_steps=6), workdir)['step'] == 6


# ------------------------------------------------------------------------------------------------
# Defect 5: metrics.jsonl.


def test_metrics_records_are_whole_and_a_partial_line_is_repaired(tmp_path):
  workdir = str(tmp_path)
  writer = metrics_lib.MetricWriter(workdir)
  writer.write(1, 'train', {'loss': 1.5})
  with open(writer.path, 'a') as f:
    f.write('{"step": 2, "split": "tr')  # A crash (or a full disk) mid-record.
  writer.close()
  writer = metrics_lib.MetricWriter(workdir)
  writer.write(2, 'train', {'loss': 1.25})
  with mock.patch.object(os, 'write', side_effect=OSError(errno.ENOSPC, 'No space left on device')):
    with pytest.raises(ValueError, match=r'cannot write .*metrics.jsonl: No space left on device'):
      writer.write(3, 'train', {'loss': 1.0})
  writer.close()
  with open(writer.path) as f:
    assert [json.loads(line)['step'] for line in f] == [1, 2]


# ------------------------------------------------------------------------------------------------
# Defect 7: early checks.


def test_bad_values_are_refused_before_any_work():
  for key, value, message in (('temperature', math.nan, 'temperature must be a finite'),
                              ('top_p', math.nan, 'top_p must be in'),
                              ('temperature', -1.0, 'temperature must be a finite')):
    with pytest.raises(ValueError, match=message):  # Before the (absent) checkpoint is read.
      generate.generate_text(util.config(), '/nonexistent/workdir', ['hi'], **{key: value})
  with pytest.raises(ValueError, match=r'config.optim.learning_rate must be a finite number >= 0'):
    config_lib.validate(util.config(optim__learning_rate=-1))
  with pytest.raises(ValueError, match=r"on_nonfinite must be 'stop' or 'skip'"):
    config_lib.validate(util.config(checkpoint__on_nonfinite='ignore'))
  assert config_lib.generate_settings(util.config())['temperature'] == config_lib.GENERATE['temperature']


# ------------------------------------------------------------------------------------------------
# Defect 1 and the fault injection: exit codes, signals on any step, SIGKILL during saves.


def main_command(workdir, mode='train', **flags):
  overrides = {**TINY, 'optim.warmup_steps': 1, 'eval_every': 1000}
  config_flags = [f'--config.{k}={v}' for k, v in overrides.items() if k not in flags]
  config_flags += [f'--config.{k}={v}' for k, v in flags.items() if '.' in k or k in (
      'total_steps', 'checkpoint_every', 'log_every')]
  other = [f'--{k}={v}' for k, v in flags.items() if '.' not in k and k not in (
      'total_steps', 'checkpoint_every', 'log_every')]
  return [sys.executable, '-m', 'retnet_jax.main',
          f'--config={os.path.join(util.ROOT, "configs", "retnet_tiny.py")}:test',
          f'--workdir={workdir}', f'--mode={mode}', *config_flags, *other]


@pytest.mark.slow
def test_a_signal_on_a_just_saved_step_saves_nothing_more_and_reports_preemption(tmp_path):
  workdir = str(tmp_path)
  real_save = train.Run.save
  saves = []

  def save_then_signal(run, state):
    real_save(run, state)
    saves.append(int(state['step']))
    if saves == [2]:
      os.kill(os.getpid(), signal.SIGTERM)  # Arrives during the step that was just saved.

  with mock.patch.object(train.Run, 'save', save_then_signal):
    result = train.train_and_evaluate(tiny(total_steps=6), workdir)
  assert result['stopped'] == 'SIGTERM' and result['step'] == 2 and saves == [2]
  assert train.train_and_evaluate(tiny(total_steps=6), workdir)['stopped'] == ''


def _run_until(cmd, workdir, kill_after_lines, sig):
  """Starts `cmd`, sends `sig` once metrics.jsonl has `kill_after_lines` more train lines (or at
  once for 0 after the first), returns the exit status."""
  path = os.path.join(workdir, 'metrics.jsonl')
  count = lambda: len(open(path).readlines()) if os.path.exists(path) else 0
  start = count()
  proc = subprocess.Popen(cmd, cwd=util.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 240
  while proc.poll() is None and time.time() < deadline and count() < start + kill_after_lines:
    time.sleep(0.01)
  if proc.poll() is None:
    proc.send_signal(sig)
  _, err = proc.communicate(timeout=240)
  return proc.returncode, err


@pytest.mark.slow
def test_fault_injection_kills_and_terms_at_random_steps_and_saves_resume_identically(tmp_path):
  total = 12
  flags = dict(total_steps=total, checkpoint_every=1, log_every=1)
  reference = str(tmp_path / 'reference')
  rc, err = _run_until(main_command(reference, **flags), reference, 10**9, None)
  assert rc == 0, err[-2000:]
  rng = random.Random(0)
  workdir, codes = str(tmp_path / 'interrupted'), []
  for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
    rc, err = _run_until(main_command(workdir, **flags), workdir, rng.randint(1, 3), sig)
    codes.append(rc)
    assert rc in (-signal.SIGKILL, 75, 0), err[-2000:]
    if sig == signal.SIGTERM and rc != 0:
      assert rc == 75 and 'error:' not in err
  rc, err = _run_until(main_command(workdir, **flags), workdir, 10**9, None)
  assert rc == 0, err[-2000:]
  expected = dict(train_losses(reference))
  got = train_losses(workdir)
  assert {s for s, _ in got} == set(range(1, total + 1))
  assert all(loss == expected[s] for s, loss in got), (got, expected)  # Bit-identical.
  assert -signal.SIGKILL in codes and 75 in codes
