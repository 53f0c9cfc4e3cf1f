"""The experiment runners on a tiny budget: tables, CSVs and plots; finished runs are skipped,
interrupted ones resume, and a changed config is an error."""

import csv
import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import common
from experiments import gamma_ablation
from experiments import length_extrapolation
from experiments import mqar
from experiments import scaling
from experiments import table6
from retnet_jax import config_lib
from retnet_jax import train
from tests import util

# Shrinks any runner's config further (after its `quick` config argument): a few seconds a run.
TINY = ('model.num_layers=1', 'model.embed_dim=32', 'model.value_dim=64', 'model.ffn_dim=64',
        'seq_len=32', 'batch_size=4', 'data.num_eval_batches=1', 'log_every=1', 'mesh.data=1')


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.reader(f))


@pytest.fixture(scope='module')
def gamma_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('gamma'))
  rows = gamma_ablation.run(out, quick=True, steps=2, schedules=('retnet', 'learnable'),
                            overrides=TINY)
  return out, rows


def test_gamma_ablation_writes_table_csv_and_plots(gamma_run):
  out, rows = gamma_run
  table = read_csv(os.path.join(out, 'results.csv'))
  assert table[0] == ['schedule', 'final_eval_loss', 'bits_per_byte', 'steps']
  assert [r[0] for r in table[1:]] == ['retnet', 'learnable']
  for r in table[1:]:
    assert math.isfinite(float(r[1])) and math.isfinite(float(r[2])) and r[3] == '2'
  with open(os.path.join(out, 'table.md')) as f:
    md = f.read()
  assert '| retnet |' in md and '| learnable |' in md and 'γ per head' in md
  for name in ('loss_curves.png', 'decay_per_head.png', 'learnable_gamma.png'):
    with open(os.path.join(out, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', name
  # The learnable run kept a checkpoint per step: its trajectory has the initial γ and steps 1, 2.
  steps, gammas = common.learned_gamma_trajectory(os.path.join(out, 'runs', 'learnable'))
  assert steps == [0, 1, 2] and gammas.shape == (3, 1, 4)
  assert [r['schedule'] for r in rows] == ['retnet', 'learnable']


def test_rerun_skips_finished_runs(gamma_run, monkeypatch):
  out, rows = gamma_run

  def must_not_train(*args, **kwargs):
    raise AssertionError('a finished run was trained again')

  monkeypatch.setattr(train, 'train_and_evaluate', must_not_train)
  again = gamma_ablation.run(out, quick=True, steps=2, schedules=('retnet', 'learnable'),
                             overrides=TINY)
  assert again == rows


def test_changed_config_is_an_error(gamma_run):
  out, _ = gamma_run
  with pytest.raises(ValueError, match='different config.*total_steps: 2 -> 3'):
    gamma_ablation.run(out, quick=True, steps=3, schedules=('retnet',), overrides=TINY)


def test_interrupted_run_resumes(tmp_path):
  variant = common.Variant('lm', 'configs/retnet_tiny.py:gamma=lm,quick')
  overrides = ('total_steps=3',) + TINY
  run_dir = str(tmp_path / 'lm')
  # A run stopped after 2 of its 3 steps: a checkpoint, no result.json.
  assert train.train_and_evaluate(common.build_config(variant, overrides), run_dir,
                                  max_steps=2)['step'] == 2
  results = common.run_variants([variant], str(tmp_path), overrides=overrides)
  assert results['lm']['steps'] == 3
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    train_steps = [r['step'] for r in map(json.loads, f) if r['split'] == 'train']
  assert train_steps == [1, 2, 3]  # Resumed at step 3, not retrained from the start.


@pytest.mark.slow
def test_table6(tmp_path):
  rows = table6.run(str(tmp_path), quick=True, steps=2, ablations=('none', 'no_gate', 'small_head'),
                    overrides=TINY)
  table = read_csv(os.path.join(tmp_path, 'results.csv'))
  assert table[0] == ['variant', 'eval_loss', 'bits_per_byte', 'delta_vs_retnet', 'our_rank',
                      'paper_perplexity', 'paper_rank', 'steps']
  assert [r['paper_perplexity'] for r in rows] == [26.05, 27.84, 27.68]
  assert [r['paper_rank'] for r in rows] == [1, 3, 2]
  assert sorted(r['our_rank'] for r in rows) == [1, 2, 3]
  assert rows[0]['delta_vs_retnet'] == 0.0 and rows[2]['variant'] == 'head dim 8 → 4'
  for name in ('table.md', 'loss_curves.png', 'ranking.png'):
    assert os.path.exists(os.path.join(tmp_path, name)), name


@pytest.mark.slow
def test_mqar(tmp_path):
  rows = mqar.run(str(tmp_path), quick=True, steps=2, kv_pairs=(4, 8), widths=(32,),
                  overrides=('batch_size=4', 'data.num_eval_batches=1', 'mesh.data=1'))
  table = read_csv(os.path.join(tmp_path, 'results.csv'))
  assert table[0] == ['model', 'width', 'kv_pairs', 'accuracy', 'eval_loss', 'steps']
  assert {(r['model'], r['kv_pairs']) for r in rows} == {
      (k, n) for k in ('retnet', 'transformer') for n in (4, 8)}
  assert all(0.0 <= r['accuracy'] <= 1.0 for r in rows)
  with open(os.path.join(tmp_path, 'table.md')) as f:
    assert '| transformer | 32 |' in f.read()
  assert os.path.exists(os.path.join(tmp_path, 'accuracy_vs_kv.png'))


def test_seed_rows_mean_std_and_paired_difference():
  runs = {'base': {0: {'v': 1.0}, 1: {'v': 2.0}, 2: {'v': 4.0}},
          'other': {0: {'v': 1.5}, 1: {'v': 2.0}, 2: {'v': 5.0}}}
  rows = {r['name']: r for r in common.seed_rows(runs, lambda r: r['v'], 'base')}
  assert rows['base']['mean'] == pytest.approx(7 / 3)
  assert rows['base']['std'] == pytest.approx(math.sqrt(((1 - 7 / 3)**2 + (2 - 7 / 3)**2
                                                         + (4 - 7 / 3)**2) / 2))
  assert rows['base']['delta_mean'] == 0.0
  # Paired by seed: differences 0.5, 0, 1.
  assert rows['other']['delta_mean'] == pytest.approx(0.5)
  assert rows['other']['delta_std'] == pytest.approx(0.5)
  assert common.mean_std([3.0]) == (3.0, None)
  assert common.parse_seeds('0, 1,2') == (0, 1, 2) and common.parse_seeds(None) is None
  with pytest.raises(ValueError, match='duplicates'):
    common.parse_seeds('1,1')
  assert common.seeded_names(['a', 'x_seed3'], ['a'], (0, 1)) == ['a_seed0', 'a_seed1', 'x_seed3']


@pytest.mark.slow
def test_table6_and_gamma_with_seeds(tmp_path):
  seeds = '0,1'
  rows = table6.run(str(tmp_path / 't6'), quick=True, steps=2, ablations=('none', 'no_gate'),
                    overrides=TINY, seeds=seeds)
  assert [r['ablation'] for r in rows] == ['none', 'no_gate']
  for r in rows:
    assert r['seeds'] == '0,1' and r['loss_std'] is not None and math.isfinite(r['loss_mean'])
  assert rows[0]['delta_mean'] == 0.0 and rows[0]['delta_std'] == 0.0
  per_seed = read_csv(os.path.join(tmp_path, 't6', 'results_seeds.csv'))
  assert len(per_seed) == 1 + 4
  losses = {(r[0], r[1]): float(r[2]) for r in per_seed[1:]}
  assert losses[('none', '0')] != losses[('none', '1')]  # Two seeds, two runs.
  diffs = [losses[('no_gate', s)] - losses[('none', s)] for s in '01']
  assert rows[1]['delta_mean'] == pytest.approx(np.mean(diffs))
  assert rows[1]['delta_std'] == pytest.approx(np.std(diffs, ddof=1))
  with open(os.path.join(tmp_path, 't6', 'table.md')) as f:
    md = f.read()
  assert 'seed 0:' in md and 'seed 1:' in md and 'mean ± std' in md
  for name in ('loss_curves.png', 'ranking.png'):
    assert os.path.exists(os.path.join(tmp_path, 't6', name))
  # The runs are resumable per seed: rerunning trains nothing and gives the same rows.
  assert table6.run(str(tmp_path / 't6'), quick=True, steps=2, ablations=('none', 'no_gate'),
                    overrides=TINY, seeds=seeds) == rows
  rows = gamma_ablation.run(str(tmp_path / 'g'), quick=True, steps=2, schedules=('retnet',),
                            overrides=TINY, seeds='0,1')
  assert rows[0]['schedule'] == 'retnet' and rows[0]['loss_std'] is not None
  assert os.path.exists(os.path.join(tmp_path, 'g', 'loss_by_schedule.png'))


@pytest.mark.slow
def test_scaling_and_length_extrapolation(tmp_path):
  rows = scaling.run(str(tmp_path / 's'), quick=True, steps=2, sizes=('q64',), seeds='0',
                     overrides=TINY[4:])
  by_model = {r['model']: r for r in rows}
  assert set(by_model) == {'retnet', 'transformer'}
  # Parameter-matched within 5%, the same tokens.
  assert abs(by_model['transformer']['params'] / by_model['retnet']['params'] - 1) < 0.05
  assert by_model['retnet']['delta_mean'] == pytest.approx(
      by_model['retnet']['loss_mean'] - by_model['transformer']['loss_mean'])
  assert os.path.exists(os.path.join(tmp_path, 's', 'loss_vs_params.png'))
  rows = length_extrapolation.run(str(tmp_path / 'l'), quick=True, steps=2, overrides=TINY,
                                  num_docs=1, max_multiple=2)
  assert [(r['model'], r['form']) for r in rows] == [
      ('retnet', 'chunkwise'), ('retnet', 'parallel'), ('transformer', 'parallel')]
  # Carrying the state across chunks of 256 gives the one-pass parallel form's losses.
  for key in ('first_1x', 'first_2x', 'new_2x'):
    assert rows[0][key] == pytest.approx(rows[1][key], rel=1e-5)
  assert os.path.exists(os.path.join(tmp_path, 'l', 'loss_vs_position.png'))
  with open(os.path.join(tmp_path, 'l', 'positions.csv')) as f:
    assert len(f.readlines()) == 1 + 3 * 2  # Two buckets of 256 per model and form.


def test_config_with_adds_to_the_argument():
  assert common.config_with('configs/x.py', None) == 'configs/x.py'
  assert common.config_with('configs/x.py', 'quick') == 'configs/x.py:quick'
  assert common.config_with('configs/x.py:a=1', 'b=2', None, 'quick') == 'configs/x.py:a=1,b=2,quick'


def test_quick_is_the_config_argument(monkeypatch, tmp_path):
  """A runner's --quick trains `<config>:quick` (plus its own overrides)."""
  built = []
  monkeypatch.setattr(common, 'run_variants', lambda variants, *a, **k: built.extend(variants) or {})
  table6.run(str(tmp_path), quick=True, ablations=('none',))  # Nothing trained: an empty table.
  assert built[0].config == 'configs/retnet_tiny.py:quick,ablation=none'
  config = common.build_config(built[0])
  quick = config_lib.load(os.path.join(util.ROOT, 'configs', 'retnet_tiny.py:quick'))
  assert config.to_dict() == quick.to_dict()


RUNNERS = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(util.ROOT, 'experiments', '*.py'))
                 if not os.path.basename(p).startswith(('_', 'common', 'gpu_check')))


@pytest.mark.parametrize('name', RUNNERS)
def test_every_runner_takes_absl_flags_and_output_dir(name):
  proc = subprocess.run([sys.executable, '-m', f'experiments.{name}', '--helpfull'],
                        capture_output=True, text=True, cwd=util.ROOT, timeout=300)
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]  # A required flag makes the status 1.
  assert '  --output_dir:' in proc.stdout
