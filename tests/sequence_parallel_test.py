"""Sequence parallelism on 8 virtual CPU devices (tests/conftest.py): one sequence split over the
`sequence` mesh axis gives one device's retention outputs, gradients and training losses."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax import generate
from retnet_jax import model as model_lib
from retnet_jax import retention
from retnet_jax import retention_ops
from retnet_jax import sharding
from retnet_jax import train
from tests import util

RULES = {'batch': ('data', 'fsdp'), 'length': 'sequence', 'embed': 'fsdp', 'heads': 'tensor',
         'kv': None, 'mlp': 'tensor', 'vocab': 'tensor', 'layers': None}
MESHES = {'data2_seq4': dict(data=2, sequence=4), 'seq8': dict(sequence=8),
          'fsdp2_seq2_tensor2': dict(fsdp=2, sequence=2, tensor=2)}


def _inputs(B=4, T=64, H=2, K=16, V=16, seed=0):
  rng = np.random.default_rng(seed)
  q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32) for _ in range(2))
  v = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.float32)
  state = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
  lg = jnp.log(jnp.asarray([0.9, 0.99], jnp.float32))
  reset = np.zeros((B, T), bool)
  reset[0, [8, 16]] = True  # On device boundaries of (sequence 8) and (sequence 4).
  reset[1, [5, 13, 14]] = True  # Inside blocks, twice in a row.
  reset[2, [0, 31, T - 1]] = True  # The first token, the last of a block, the last of all.
  return q, k, v, lg, state, jnp.asarray(reset)


def _loss_and_grads(fn, q, k, v, lg, state, reset):
  w_o = jnp.asarray(np.random.default_rng(1).standard_normal(v.shape), jnp.float32)
  w_s = jnp.asarray(np.random.default_rng(2).standard_normal(state.shape), jnp.float32)

  def loss(q, k, v, lg, state):
    o, s = fn(q, k, v, lg, state, reset=reset)
    return jnp.sum(o * w_o) + jnp.sum(s * w_s)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, lg, state)


def _assert_matches(got, ref, *context):
  """The losses and all five gradients of `_loss_and_grads` agree to 1e-5."""
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
  for name, x, r in zip('q k v log_gamma state'.split(), got[1], ref[1]):
    assert util.rel_err(x, r) <= 1e-5, (*context, name, util.rel_err(x, r))


@pytest.mark.parametrize('impl,exchange', [('xla', 'all_gather'), ('pallas', 'all_gather'),
                                           ('xla', 'scan')])
@pytest.mark.parametrize('mesh', sorted(MESHES))
def test_retention_over_the_sequence_axis_equals_one_device(mesh, impl, exchange):
  args = _inputs()
  ref = _loss_and_grads(functools.partial(retention.chunkwise, chunk_size=8), *args)
  fn = functools.partial(retention_ops.retention, form='chunkwise', chunk_size=8, impl=impl,
                         exchange=exchange)
  with sharding.use_rules(sharding.make_mesh(MESHES[mesh]), RULES):
    got = _loss_and_grads(fn, *args)
  _assert_matches(got, ref, mesh, impl, exchange)


@pytest.mark.parametrize('mesh,exchange,impl', [
    ('seq8', 'all_gather', 'xla'), ('seq8', 'scan', 'xla'), ('data2_seq4', 'all_gather', 'xla'),
    ('data2_seq4', 'scan', 'xla'), ('data2_seq4', 'scan', 'pallas')])
def test_per_token_decay_over_the_sequence_axis_equals_one_device(mesh, exchange, impl):
  """Gated retention: each block's decay is exp(Σ log γ_t over it); values and all gradients,
  d/d log γ [B, T, H] included, with resets on and inside block boundaries; the blocks run the
  XLA form or the (interpreted) kernel."""
  q, k, v, _, state, reset = _inputs()
  lg = -jnp.asarray(np.random.default_rng(4).exponential(0.1, q.shape[:3]), jnp.float32)
  args = q, k, v, lg, state, reset
  ref = _loss_and_grads(functools.partial(retention.chunkwise, chunk_size=8), *args)
  fn = functools.partial(retention_ops.retention, form='chunkwise', chunk_size=8,
                         exchange=exchange, impl=impl)
  with sharding.use_rules(sharding.make_mesh(MESHES[mesh]), RULES):
    got = _loss_and_grads(fn, *args)
  _assert_matches(got, ref, mesh, exchange, impl)


@pytest.mark.parametrize('n', [3, 5, 6])
def test_prefix_scan_on_axes_that_are_not_powers_of_two(n):
  """The ppermute scan's rounds stop at ⌈log2 n⌉; resets fall on and inside blocks."""
  q, k, v, lg, state, reset = _inputs(T=8 * n * 2, seed=n)
  reset = reset.at[3, 16].set(True)  # Block 1's first token (blocks of 16).
  args = q, k, v, lg, state, reset
  ref = _loss_and_grads(functools.partial(retention.chunkwise, chunk_size=8), *args)
  fn = functools.partial(retention_ops.retention, form='chunkwise', chunk_size=8, exchange='scan')
  with sharding.use_rules(sharding.make_mesh({'sequence': n}), RULES):
    got = _loss_and_grads(fn, *args)
  _assert_matches(got, ref, n)


def test_bad_inputs_under_the_sequence_axis():
  q, k, v, lg, state, reset = _inputs(T=40)
  with sharding.use_rules(sharding.make_mesh({'sequence': 8}), RULES):
    with pytest.raises(ValueError, match='not divisible by the sequence axis'):
      retention_ops.retention(q, k, v, lg, state, chunk_size=8)
    with pytest.raises(ValueError, match='needs form="chunkwise"'):
      retention_ops.retention(q, k, v, lg, state, form='parallel')
    with pytest.raises(ValueError, match='Unknown sequence exchange'):
      retention_ops.retention(q, k, v, lg, state, chunk_size=8, exchange='ring')


@pytest.mark.parametrize('exchange', ['all_gather', 'scan'])
def test_prefill_over_the_sequence_axis_then_decoding(exchange):
  """A long prompt's prefill split over the sequence axis gives one device's last logits and
  state (the left padding's reset inside the first block); decoding then continues on one device."""
  mcfg = util.model_config(model__num_heads=4, model__value_dim=64, model__chunk_size=8,
                           model__sequence_exchange=exchange)
  setup, params = model_lib.make_setup(mcfg), model_lib.init_params(mcfg, jax.random.key(1))
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, 256, 64).tolist(), rng.integers(0, 256, 45).tolist()]
  tokens, segments = generate.pad_prompts(prompts, mcfg.vocab_size, 0, min_bucket=64)
  run = lambda: generate.prefill(setup.graphdef, params, jnp.asarray(tokens), jnp.asarray(segments))
  logits_one, state_one = run()
  traces = generate.TRACES['prefill']
  with sharding.use_rules(sharding.make_mesh({'sequence': 4}), RULES):
    logits, state = run()
  assert generate.TRACES['prefill'] == traces + 1  # Traced again, under the mesh.
  assert util.rel_err(logits, logits_one) <= 1e-5
  for got, ref in zip(jax.tree.leaves(state), jax.tree.leaves(state_one)):
    assert util.rel_err(got, ref) <= 1e-5
  knobs = generate._knobs(0.0, 0, 1.0, 0, (), 0)  # pylint: disable=protected-access
  done = jnp.zeros((2,), bool)
  counts = generate.prompt_counts(jnp.asarray(tokens), jnp.asarray(segments), mcfg.vocab_size)
  step = lambda s, l: generate.decode(setup.graphdef, params, s, l, done, counts, jnp.asarray(0),
                                      jnp.asarray(8), knobs, out_len=8)[0]
  np.testing.assert_array_equal(step(state, logits), step(state_one, logits_one))


def cfg(mesh=None, **overrides):
  mesh = {'data': 1, **(mesh or {})}
  base = dict(model__num_heads=4, model__value_dim=64, model__chunk_size=8, seq_len=64,
              batch_size=8, total_steps=4, log_every=1, eval_every=4, checkpoint_every=100,
              reset_at_doc_boundaries=True, **{f'mesh__{a}': n for a, n in mesh.items()})
  return util.config(**{**base, **overrides})


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
  return util.trained_losses(cfg(), tmp_path_factory.mktemp('one_device'))


@pytest.mark.slow
@pytest.mark.parametrize('mesh,exchange', [('seq8', 'all_gather'),
                                           ('fsdp2_seq2_tensor2', 'all_gather'),
                                           ('data2_seq4', 'scan')])
def test_training_losses_match_one_device(mesh, exchange, one_device, tmp_path):
  train.train_and_evaluate(cfg(MESHES[mesh], model__sequence_exchange=exchange), str(tmp_path))
  got = util.train_losses(str(tmp_path))
  assert len(got) == len(one_device) == 4
  np.testing.assert_allclose(got, one_device, rtol=1e-5)


@pytest.mark.slow
def test_pallas_and_transformer_under_the_sequence_axis(one_device, tmp_path):
  """The kernel (interpreted) runs each device's block; the Transformer attends over the gathered
  sequence (the compiler's all-gather of k and v): both equal their one-device runs."""
  # Two of the four steps (the same schedule): the interpreted kernel is slow.
  train.train_and_evaluate(cfg(MESHES['data2_seq4'], model__retention_impl='pallas'),
                           str(tmp_path / 'pallas'), max_steps=2)
  np.testing.assert_allclose(util.train_losses(str(tmp_path / 'pallas')), one_device[:2], rtol=1e-5)
  extra = dict(model__kind='transformer', model__value_dim=None, total_steps=3, eval_every=3)
  train.train_and_evaluate(cfg(**extra), str(tmp_path / 'one'), max_steps=2)
  train.train_and_evaluate(cfg(MESHES['data2_seq4'], **extra), str(tmp_path / 'mesh'), max_steps=2)
  np.testing.assert_allclose(util.train_losses(str(tmp_path / 'mesh')), util.train_losses(str(tmp_path / 'one')),
                             rtol=1e-5)


@pytest.mark.slow
def test_command_line_with_data_2_sequence_4(one_device, tmp_path):
  overrides = {'model.num_heads': 4, 'model.value_dim': 64, 'model.chunk_size': 8,
               'seq_len': 64, 'batch_size': 8, 'total_steps': 4, 'log_every': 1,
               'eval_every': 4, 'checkpoint_every': 100, 'reset_at_doc_boundaries': True,
               'mesh.data': 2, 'mesh.sequence': 4}
  cmd = [sys.executable, '-m', 'retnet_jax.main',
         f'--config={os.path.join(util.ROOT, "configs", "retnet_tiny.py")}:test',
         f'--workdir={tmp_path}', *[f'--config.{k}={v}' for k, v in overrides.items()]]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=util.ROOT, env=env, timeout=900)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  assert "'sequence': 4" in out
  np.testing.assert_allclose(util.train_losses(str(tmp_path)), one_device, rtol=1e-5)


@pytest.mark.slow
def test_benchmark_quick_mode(tmp_path):
  """experiments/sequence_parallel.py --quick: one short length, sequence axes 1 and 2."""
  proc = subprocess.run([sys.executable, '-m', 'experiments.sequence_parallel', '--quick',
                         f'--output_dir={tmp_path}'], capture_output=True, text=True, cwd=util.ROOT,
                        timeout=900)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  with open(tmp_path / 'sequence_parallel.json') as f:
    result = json.load(f)
  peaks = {r['sequence']: r['peak_bytes_per_device'] for r in result['steps']}
  assert set(peaks) == {1, 2} and all(p > 0 for p in peaks.values())
  assert {e['exchange'] for e in result['exchange']} == {'all_gather', 'scan'}
  assert all(e['exchange_ms_fwd_bwd'] > 0 and e['peak_bytes_per_device'] > 0
             for e in result['exchange'])
