"""Training: exact resume, eval restores, metrics files, SIGTERM, and clear errors for bad inputs."""

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from retnet_jax import config_lib
from retnet_jax import model as model_lib
from retnet_jax import platform
from retnet_jax import sharding
from retnet_jax import train
from tests import util


def read_metrics(workdir, split):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['split'] == split]


def small(**overrides):
  # Dropout and gradient accumulation on: resuming must reproduce their randomness and order too.
  base = dict(total_steps=6, log_every=1, eval_every=6, checkpoint_every=3, model__dropout=0.1,
              optim__grad_accum_steps=2, optim__warmup_steps=2)
  return util.config(**{**base, **overrides})


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('straight'))
  result = train.train_and_evaluate(small(), workdir)
  return workdir, result


def test_resume_gives_identical_losses(straight_run, tmp_path):
  workdir, result = straight_run
  assert result['step'] == 6
  first = train.train_and_evaluate(small(), str(tmp_path), max_steps=3)
  assert first['step'] == 3 and first['stopped'] == ''
  second = train.train_and_evaluate(small(), str(tmp_path))
  assert second['step'] == 6
  straight = [(r['step'], r['loss'], r['grad_norm']) for r in read_metrics(workdir, 'train')]
  resumed = [(r['step'], r['loss'], r['grad_norm']) for r in read_metrics(str(tmp_path), 'train')]
  assert [s for s, _, _ in straight] == list(range(1, 7))
  assert resumed == straight  # Bit-identical, not approximately equal.
  assert read_metrics(str(tmp_path), 'eval')[-1]['loss'] == read_metrics(workdir, 'eval')[-1]['loss']


def test_metrics_and_event_files(straight_run):
  workdir, result = straight_run
  c = small()
  peak, warmup, total = c.optim.learning_rate, c.optim.warmup_steps, c.total_steps
  end = peak * c.optim.end_lr_fraction
  vocab = config_lib.model_config(c).vocab_size
  for record in read_metrics(workdir, 'train'):
    for key in ('step', 'split', 'loss', 'learning_rate', 'tokens_per_second', 'bits_per_byte'):
      assert key in record, key
    # The rate the record's step was taken at: step − 1 on the warm-up line, then the cosine.
    n = record['step'] - 1
    lr = peak * n / warmup if n < warmup else end + (peak - end) * 0.5 * (
        1 + np.cos(np.pi * (n - warmup) / (total - warmup)))
    assert record['learning_rate'] == pytest.approx(lr, rel=1e-5, abs=1e-12), record
    # Near-uniform predictions over the vocabulary after a few steps. Byte tokens are 1 byte and
    # the special ones 0, so bits per byte is loss / ln 2 times tokens / bytes: ≥ 1, and < 1.25
    # with a document separator every few hundred bytes.
    assert 0.5 * np.log(vocab) < record['loss'] < 1.5 * np.log(vocab), record
    assert 1.0 <= record['bits_per_byte'] / (record['loss'] / np.log(2)) < 1.25, record
    assert 0 < record['grad_norm'] < 1e3 and record['tokens_per_second'] > 0
    assert record['steps_per_second'] == pytest.approx(
        record['tokens_per_second'] / (c.batch_size * c.seq_len), rel=1e-6)
  evals = read_metrics(workdir, 'eval')
  assert evals and {'loss', 'bits_per_byte', 'perplexity'} <= set(evals[-1])
  ev = evals[-1]
  assert ev['perplexity'] == pytest.approx(np.exp(ev['loss']), rel=1e-6)
  assert 0 <= ev['accuracy'] <= 1
  assert 1.0 <= ev['bits_per_byte'] / (ev['loss'] / np.log(2)) < 1.25, ev
  assert result['eval']['loss'] == evals[-1]['loss']
  assert glob.glob(os.path.join(workdir, 'tb', 'events.out.tfevents.*'))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']


def test_eval_mode_restores_checkpoint(straight_run):
  workdir, result = straight_run
  out = train.evaluate(small(), workdir)
  assert out['step'] == 6
  assert out['eval']['loss'] == pytest.approx(result['eval']['loss'], rel=1e-6)


def test_eval_without_checkpoint_is_an_error(tmp_path):
  with pytest.raises(ValueError, match='no checkpoint to evaluate'):
    train.evaluate(small(), str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Bad inputs: one clear message, nothing written.


def test_unknown_config_key(tmp_path):
  c = small()
  c.lerning_rate = 1e-3
  with pytest.raises(ValueError, match=r"unknown config key\(s\) in config: \['lerning_rate'\]"):
    train.train_and_evaluate(c, str(tmp_path / 'w'))
  c = small()
  c.optim.warmup = 10
  with pytest.raises(ValueError, match='config.optim'):
    train.train_and_evaluate(c, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')


def test_impossible_shapes(tmp_path):
  with pytest.raises(ValueError, match=r'num_heads \(5\) must divide embed_dim \(48\)'):
    train.train_and_evaluate(small(model__num_heads=5), str(tmp_path / 'w'))
  with pytest.raises(ValueError, match='grad_accum_steps'):
    train.train_and_evaluate(small(optim__grad_accum_steps=3), str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')


def test_missing_and_empty_data(tmp_path):
  missing = small(data__source='files', data__files_glob=str(tmp_path / 'nothing' / '*.txt'))
  with pytest.raises(ValueError, match='nothing'):
    train.train_and_evaluate(missing, str(tmp_path / 'w'))
  (tmp_path / 'empty.txt').write_text('')
  empty = small(data__source='files', data__files_glob=str(tmp_path / 'empty.txt'))
  with pytest.raises(ValueError, match='empty'):
    train.train_and_evaluate(empty, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')


def test_workdir_that_cannot_be_written(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(ValueError, match='cannot be written'):
    train.train_and_evaluate(small(), str(blocker / 'workdir'))


def _tree_digest(directory):
  h = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(directory, '**'), recursive=True)):
    if os.path.isfile(path):
      h.update(path.encode())
      with open(path, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


def test_corrupt_checkpoint(straight_run, tmp_path):
  workdir = str(shutil.copytree(straight_run[0], tmp_path / 'w'))  # Checkpoints at steps 3 and 6.
  ckpts = os.path.join(workdir, 'checkpoints')
  earlier = _tree_digest(os.path.join(ckpts, '3'))
  for path in glob.glob(os.path.join(ckpts, '6', 'params', '**'), recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 0:
      with open(path, 'r+b') as f:
        f.truncate(max(os.path.getsize(path) // 3, 1))
  before = sorted(os.listdir(ckpts))
  with pytest.raises(ValueError, match='checkpoint step 6 in .* is damaged: params/.*truncated'):
    train.train_and_evaluate(small(total_steps=9), workdir)
  assert sorted(os.listdir(ckpts)) == before
  assert _tree_digest(os.path.join(ckpts, '3')) == earlier


# ------------------------------------------------------------------------------------------------
# The command line.


def _main_command(workdir, **overrides):
  flags = [f'--config.{k}={v}' for k, v in overrides.items()]
  return [sys.executable, '-m', 'retnet_jax.main',
          f'--config={os.path.join(util.ROOT, "configs", "retnet_tiny.py")}:test',
          f'--workdir={workdir}', *flags]


def test_command_line_error_is_one_clear_line(tmp_path):
  proc = subprocess.run(_main_command(str(tmp_path / 'w'), **{'model.num_heads': 5}),
                        capture_output=True, text=True, cwd=util.ROOT, timeout=300)
  assert proc.returncode == 1
  assert 'error: model config: num_heads (5) must divide embed_dim (48).' in proc.stderr
  assert 'Traceback' not in proc.stderr
  proc = subprocess.run(_main_command(str(tmp_path / 'w'), **{'model.num_expertz': 4}),
                        capture_output=True, text=True, cwd=util.ROOT, timeout=300)
  assert proc.returncode == 1 and "unknown config key 'model.num_expertz'" in proc.stderr
  assert 'Traceback' not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path):
  workdir = str(tmp_path / 'w')
  cmd = _main_command(workdir, total_steps=100000, log_every=1, checkpoint_every=100000,
                      eval_every=100000)
  proc = subprocess.Popen(cmd, cwd=util.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(open(metrics).readlines()) >= 2:
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  err, _ = proc.communicate(timeout=120)
  assert proc.returncode == 75, err[-2000:]  # Preempted, resumable (EX_TEMPFAIL).
  assert 'SIGTERM received' in err
  steps = [int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))]
  assert len(steps) == 1 and steps[0] >= 2
  assert steps[0] >= len(read_metrics(workdir, 'train'))


def test_xla_cpu_flags_are_added_before_jax_starts_and_only_then():
  script = '''
import os
from retnet_jax import platform
import jax
first = platform.tune_xla_cpu_flags()
flags_after = os.environ['XLA_FLAGS']
again = platform.tune_xla_cpu_flags()
jax.numpy.ones(2).block_until_ready()
os.environ['XLA_FLAGS'] = ''
late = platform.tune_xla_cpu_flags()
print(first, again, late, repr(flags_after))
'''
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  out = subprocess.run([sys.executable, '-c', script], cwd=util.ROOT, env=env, capture_output=True,
                       text=True, check=True).stdout.split(None, 3)
  assert out[:3] == ['True', 'False', 'False']  # Added once; never after JAX has started.
  assert out[3].strip() == repr('--xla_force_host_platform_device_count=1 '
                                '--xla_cpu_experimental_ynn_fusion_type=individual_dot '
                                '--xla_cpu_collective_call_terminate_timeout_seconds=600')
  # A user's own setting of the flag is kept as it is.
  env['XLA_FLAGS'] = '--xla_cpu_experimental_ynn_fusion_type='
  out = subprocess.run([sys.executable, '-c', script], cwd=util.ROOT, env=env, capture_output=True,
                       text=True, check=True).stdout.split(None, 3)
  assert out[0] == 'True'  # It added the flags the user did not set ...
  assert 'individual_dot' not in out[3] and out[3].count('ynn') == 1
  assert 'collective_call_terminate_timeout' in out[3]  # ... and only those.


def test_chunkwise_steps_compile_with_eigen_dots_on_cpu():
  config = small()
  setup = model_lib.make_setup(config_lib.model_config(config))
  cfg = setup.model_config
  assert cfg.form == 'chunkwise' and platform.step_compiler_options(cfg) == platform.EIGEN_DOTS
  for other in (dataclasses.replace(cfg, form='parallel'),
                dataclasses.replace(cfg, kind='transformer', value_dim=None)):
    assert platform.step_compiler_options(other) is None
    assert platform.step_compiler_options(other, 'cpu') is None
  # The option reaches XLA (no YNNPACK fusion left) and the gradient is the same function.
  params = model_lib.init_params(cfg, jax.random.key(0))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 45))
  batch = {'inputs': tokens, 'targets': np.roll(tokens, -1, axis=1),
           'segment_ids': np.ones_like(tokens), 'loss_mask': np.ones(tokens.shape, np.float32)}
  grad = jax.grad(lambda p: train.loss_fn(p, setup, batch, None)[0])
  default = jax.jit(grad).lower(params).compile()
  eigen = jax.jit(grad, compiler_options=platform.step_compiler_options(cfg, 'cpu')).lower(params).compile()
  assert 'ynn_fusion' in default.as_text() and 'ynn_fusion' not in eigen.as_text()
  for a, b in zip(jax.tree.leaves(default(params)), jax.tree.leaves(eigen(params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_abstract_run_compiles_the_loops_step_without_data(tmp_path):
  # A run over explicit devices that reads nothing: no workdir, data or checkpoints are made, and
  # its step lowers on the abstract state and batch to the same program the loop runs.
  config = small(mesh__data=2, mesh__fsdp=2)
  devices = jax.devices()[4:8]
  workdir = str(tmp_path / 'never_made')
  run = train.Run(config, workdir, read_data=False, devices=devices)
  assert run.train_iter is None and run.ckpt is None and not os.path.exists(workdir)
  assert set(run.mesh.devices.flat) == set(devices)
  batch = run.abstract_batch()
  assert sorted(batch) == sorted(train.BATCH_KEYS)
  assert all(b.shape == (config.batch_size, config.seq_len) and b.sharding == run.batch_sh
             for b in batch.values())
  abstract_text = train.make_train_step(run).lower(run.abstract_train_state(), batch).as_text()
  real = train.Run(config, str(tmp_path / 'real'), devices=devices)
  state = real.initial_state()
  real_batch = sharding.to_global(next(real.train_iter), real.batch_sh, train.BATCH_KEYS)
  assert {k: (v.shape, v.dtype) for k, v in real_batch.items()} == {
      k: (v.shape, v.dtype) for k, v in batch.items()}
  assert train.make_train_step(real).lower(state, real_batch).as_text() == abstract_text
  real.ckpt.close()
