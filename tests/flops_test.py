"""Model FLOPs against a hand count, the peak table, and MFU and goodput in the training metrics."""

import dataclasses
import json
import os

import jax
import pytest

from retnet_jax import flops
from retnet_jax import model as model_lib
from retnet_jax import train
from tests import util


def test_flops_of_the_shrunk_config_by_hand():
  cfg = util.model_config()  # D 48, H 3, K 16, value dim 60 (V 20), F 80, 2 layers, vocab 384.
  assert (cfg.embed_dim, cfg.num_heads, cfg.values, cfg.ffn_dim, cfg.num_layers, cfg.vocab_size,
          cfg.chunk_size) == (48, 3, 60, 80, 2, 384, 16)
  # Multiply-adds per token: q, k 48·48 each; v, gate 48·60 each; out 60·48; FFN 3·48·80; head 48·384.
  macs = 2 * (2 * 48 * 48 + 3 * 48 * 60 + 3 * 48 * 80) + 48 * 384
  assert flops.dense_flops_per_token(cfg) == 2 * macs == 135936
  # Chunkwise, C = 16: per head 2·16·(16 + 20) inside the chunk + 4·16·20 across; 3 heads, 2 layers.
  assert flops.mixer_flops_per_token(cfg, 37) == 2 * 3 * (2 * 16 * 36 + 4 * 16 * 20) == 14592
  assert flops.mixer_flops_per_token(cfg, 37, 'parallel') == 2 * 3 * 2 * 37 * 36
  assert flops.mixer_flops_per_token(cfg, 37, 'recurrent') == 2 * 3 * 4 * 16 * 20
  assert flops.mixer_flops_per_token(cfg, 8) == 2 * 3 * (2 * 8 * 36 + 4 * 16 * 20)  # C = min(C, T).
  assert flops.train_flops_per_token(cfg, 37) == 3 * (135936 + 14592)
  assert flops.train_flops_per_step(cfg, 4, 37) == 4 * 37 * 3 * (135936 + 14592)
  attention = dataclasses.replace(cfg, kind='transformer', value_dim=None, gamma='none')
  # q, k, v, out 48·48 each, the same FFN and head; scores and values 2·37·(16 + 16) per head.
  assert flops.dense_flops_per_token(attention) == 2 * (2 * (4 * 48 * 48 + 3 * 48 * 80) + 48 * 384)
  assert flops.mixer_flops_per_token(attention, 37) == 2 * 3 * 2 * 37 * 32


@pytest.mark.parametrize('tied', [False, True])
def test_dense_flops_are_twice_the_matmul_parameters(tied):
  cfg = util.model_config(model__tie_embeddings=tied, model__swish_gate=not tied)
  params = model_lib.abstract_params(cfg)
  matmul = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if path[-1].key.startswith('w') or path[-1].key == 'head')
  head = cfg.embed_dim * cfg.vocab_size  # The tied head is the embedding, used as a matmul.
  assert flops.dense_flops_per_token(cfg) == 2 * (matmul + (head if tied else 0))


def test_peak_table_and_measured_fallback():
  for kind, gen in (('TPU v4', 'v4'), ('TPU v5 lite', 'v5e'), ('TPU v5e', 'v5e'), ('TPU v5', 'v5p'),
                    ('TPU v5p', 'v5p'), ('TPU v6 lite', 'v6e'), ('NVIDIA H100 80GB HBM3', 'h100'),
                    ('NVIDIA H200', 'h200'), ('NVIDIA A100-SXM4-40GB', 'a100'), ('cpu', None)):
    assert flops.chip_generation(kind) == gen, kind
  peak, source = flops.peak_flops(jax.devices()[:4])  # 4 virtual CPU devices of one host.
  assert 1e8 < peak < 1e14 and 'measured at start-up' in source and 'x 1 hosts' in source


def test_every_train_row_carries_mfu_and_goodput(tmp_path):
  config = util.config(total_steps=4, log_every=1, eval_every=2, checkpoint_every=2)
  train.train_and_evaluate(config, str(tmp_path))
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    rows = [r for r in map(json.loads, f) if r['split'] == 'train']
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  per_token = flops.train_flops_per_token(util.model_config(), config.seq_len)
  for r in rows:
    assert r['model_flops_per_second'] == pytest.approx(per_token * r['tokens_per_second'])
    assert 0 < r['mfu'] < 1
    parts = [r[f'{p}_fraction'] for p in ('compile', 'data', 'eval', 'checkpoint')]
    assert all(0 <= p < 1 for p in parts) and 0 < r['goodput'] <= 1
    assert sum(parts) + r['goodput'] == pytest.approx(1.0)
  assert rows[0]['compile_fraction'] > 0.5  # The first step compiles.
  assert rows[-1]['eval_fraction'] > 0 and rows[-1]['checkpoint_fraction'] > 0
  # The MFU's peak is the same for every row: model FLOP/s / MFU.
  peaks = [r['model_flops_per_second'] / r['mfu'] for r in rows]
  assert max(peaks) == pytest.approx(min(peaks))
