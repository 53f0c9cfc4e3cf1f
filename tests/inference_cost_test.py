"""experiments/inference_cost.py: a tiny sweep writes its outputs; RetNet's state has no length."""

import json

import jax
import numpy as np
import pytest

from experiments import inference_cost
from retnet_jax import generate
from tests import util


@pytest.mark.slow
def test_tiny_sweep_writes_results(tmp_path):
  configs = {'retnet': util.config(),
             'transformer': util.config('transformer_tiny', model__value_dim=None)}
  inference_cost.run(configs, str(tmp_path), contexts=(32, 128), batches=(1, 2), decode_tokens=4,
                     repeats=2, log=lambda *_: None)
  with open(tmp_path / 'results.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 2 * 2 * 2
  for r in records:
    assert set(inference_cost.KEYS) <= set(r)
    assert r['ms_per_token'] > 0 and r['tokens_per_second'] > 0 and r['state_bytes'] > 0
    assert np.isclose(r['tokens_per_second'], r['batch'] * 1e3 / r['ms_per_token'])
  by = {(r['model'], r['context_len'], r['batch']): r for r in records}
  for b in (1, 2):
    assert by[('retnet', 32, b)]['state_bytes'] == by[('retnet', 128, b)]['state_bytes']
    assert by[('transformer', 128, b)]['state_bytes'] > 3 * by[('transformer', 32, b)]['state_bytes']
    assert by[('transformer', 128, b)]['peak_bytes'] > by[('transformer', 32, b)]['peak_bytes']
  assert by[('retnet', 32, 2)]['state_bytes'] == 2 * by[('retnet', 32, 1)]['state_bytes']
  table = (tmp_path / 'table.md').read_text()
  assert 'Transformer/RetNet latency' in table and '| 2 | 128 |' in table
  assert (tmp_path / 'inference_cost.png').stat().st_size > 10_000


def test_retnet_state_from_a_real_prefill_has_no_length():
  """What `generate` builds after a prompt: the same bytes at two prompt lengths (and the synthetic
  state the experiment times has the same shapes)."""
  config = util.config()
  setup, params = inference_cost.build(config)
  sizes = []
  for length in (20, 70):
    tokens, segments = generate.pad_prompts([[3] * length], setup.model_config.vocab_size, 0)
    _, state = generate.prefill(setup.graphdef, params, tokens, segments)
    sizes.append(inference_cost.tree_bytes(state))
    synthetic = inference_cost.context_state(setup, 1, length, 4, jax.random.key(0))
    assert jax.tree.map(np.shape, synthetic) == jax.tree.map(np.shape, state)
  assert sizes[0] == sizes[1]
