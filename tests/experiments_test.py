"""The experiment runners on a tiny budget: tables, CSVs and plots; finished runs are skipped,
interrupted ones resume, and a changed config is an error."""

import csv
import json
import math
import os

import pytest

from experiments import common
from experiments import gamma_ablation
from experiments import mqar
from experiments import table6
from retnet_jax import train

# Shrinks any runner's config further (after its --quick overrides): a few seconds a run.
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
  variant = common.Variant('lm', 'configs/retnet_tiny.py:gamma=lm')
  overrides = common.TINY_QUICK + ('total_steps=3',) + TINY
  run_dir = str(tmp_path / 'lm')
  # A run stopped after 2 of its 3 steps: a checkpoint, no result.json.
  assert train.train_and_evaluate(common.build_config(variant, overrides), run_dir,
                                  max_steps=2)['step'] == 2
  results = common.run_variants([variant], str(tmp_path), overrides=overrides)
  assert results['lm']['steps'] == 3
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    train_steps = [r['step'] for r in map(json.loads, f) if r['split'] == 'train']
  assert train_steps == [1, 2, 3]  # Resumed at step 3, not retrained from the start.


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
