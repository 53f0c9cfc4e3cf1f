"""experiments/training_cost.py on a tiny sweep: outputs, keys, FLOP accounting, torchscale path."""

import json
import os

import pytest

import configs
from experiments import training_cost
from retnet_jax import config_lib
from tests import util

KEYS = ('model', 'form', 'seq_len', 'batch', 'tokens_per_second', 'peak_bytes', 'mfu')


@pytest.mark.slow
def test_tiny_sweep_writes_results(tmp_path):
  config = util.config()
  rows = training_cost.run(config, str(tmp_path), seq_lens=(32, 64), forms=('chunkwise', 'parallel',
                           'transformer'), tokens_per_step=128, steps=1, max_quadratic_len=32,
                           compare_len=64, compile_layers=(1, 2))
  with open(tmp_path / 'results.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert records == json.loads(json.dumps(rows))
  part = [r for r in records if r.get('dense_part')]
  records = [r for r in records if not r.get('dense_part')]
  assert {(r['model'], r['form'], r['seq_len']) for r in records} == {
      ('retnet', 'chunkwise', 32), ('retnet', 'chunkwise', 64), ('retnet', 'parallel', 32),
      ('transformer', 'attention', 32)}  # The quadratic forms stop at max_quadratic_len.
  # The step without the retention operator, timed at compare_len (no timing is compared here).
  assert len(part) == 1 and part[0]['seq_len'] == 64 and part[0]['tokens_per_second'] > 0
  assert part[0]['mfu'] == part[0]['dense_mfu'] > 0
  for r in records:
    assert set(KEYS) <= set(r)
    assert r['tokens_per_second'] > 0 and r['peak_bytes'] > 0 and 0 < r['mfu'] < 1
    assert r['batch'] * r['seq_len'] == 128
  table = (tmp_path / 'table.md').read_text()
  assert 'chunkwise tokens/s at T=64 / at T=32' in table and 'compile time by depth' in table
  assert 'dense part of the step (retention operator removed) at T=64' in table
  assert os.path.getsize(tmp_path / 'training_cost.png') > 0


def test_model_flops_count_the_form():
  cfg = config_lib.model_config(util.config())
  chunk_short, dense = training_cost.model_flops_per_token(cfg, 'chunkwise', 512)
  chunk_long, _ = training_cost.model_flops_per_token(cfg, 'chunkwise', 16384)
  par_short, _ = training_cost.model_flops_per_token(cfg, 'parallel', 512)
  par_long, _ = training_cost.model_flops_per_token(cfg, 'parallel', 16384)
  assert chunk_short == chunk_long > dense  # Linear: the same FLOPs per token at any length.
  assert par_long - dense == pytest.approx(32 * (par_short - dense))  # Quadratic mixer.


@pytest.mark.slow
def test_torchscale_comparison_runs(tmp_path):
  util.require('torch')
  util.require('torchscale')
  config = util.config(model__value_dim=96)
  rows = training_cost.run(config, str(tmp_path), seq_lens=(32,), forms=('chunkwise',),
                           tokens_per_step=64, steps=1, max_quadratic_len=32, vs_torchscale=True,
                           compare_len=32, compare_pairs=3, compile_layers=())
  ts = [r for r in rows if r['model'] == 'torchscale']
  assert [r['form'] for r in ts] == ['chunkwise', 'chunkwise, alternating steps']
  assert all(r['tokens_per_second'] > 0 and r['ratio'] > 0 for r in ts)
  assert ts[0]['best_chunk_size'] and ts[0]['chunk_size'] == 32  # Chunks longer than T are skipped.
  assert len(ts[1]['pair_ratios']) == 3 and ts[1]['ratio'] == sorted(ts[1]['pair_ratios'])[1]
  table = (tmp_path / 'table.md').read_text()
  assert 'vs torchscale chunkwise' in table and 'C=32 ' in table and 'MFU' in table


@pytest.mark.slow
def test_gated_cost_times_both_decays_and_checks_the_targets(tmp_path):
  """experiments/gated_cost.py at two tiny lengths: a row per (decay, T), the same tokens a step,
  and the linear-in-length target read from those rows (2,048 was not measured: no ratio)."""
  from experiments import gated_cost  # pylint: disable=g-import-not-at-top
  shrink = [f'{k}={v}' for k, v in configs.PRESETS['test'].items()]
  rows = gated_cost.measure((32, 64), tokens_per_step=128, repeats=2, overrides=shrink)
  assert {(r['gamma'], r['seq_len']) for r in rows} == {
      (g, T) for g in ('retnet', 'gated') for T in (32, 64)}
  for r in rows:
    assert r['batch'] * r['seq_len'] == 128 and len(r['seconds']) == 2 and r['tokens_per_second'] > 0
  lines = gated_cost.targets(rows)
  assert len(lines) == 1 and lines[0].startswith('- gated at T = 64 / at T = 32: ')
