"""The trainer's arithmetic against hand computations: gradient accumulation, the batch metrics (loss
in nats per token, bits per byte, accuracy), the learning-rate schedule and the weight-decay mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from retnet_jax import config_lib
from retnet_jax import metrics as metrics_lib
from retnet_jax import model as model_lib
from retnet_jax import optim
from retnet_jax import train
from tests import util

B, T = 4, 37


def crafted_batch(vocab, seed=0):
  """Random tokens; rows score different numbers of targets, so averaging per micro-batch and
  averaging per token differ."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, vocab, (B, T)).astype(np.int32)
  mask = np.ones((B, T), np.float32)
  mask[0, :30] = 0.0  # 7 scored targets in row 0, all 37 in row 1, ...
  mask[2, 5:9] = 0.0
  mask[3, ::3] = 0.0
  segments = np.ones((B, T), np.int32)
  segments[1, 20:] = 2
  return {'inputs': inputs, 'targets': np.roll(inputs, -1, 1), 'segment_ids': segments,
          'loss_mask': mask}


@pytest.fixture(scope='module')
def setup_and_params():
  cfg = util.model_config()
  return model_lib.make_setup(cfg), model_lib.init_params(cfg, jax.random.key(0))


def sgd_step(setup, params, batch, accum_steps):
  """One train_step with plain SGD at rate 1: the returned parameters are params − gradient."""
  sgd = optax.sgd(1.0)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': sgd.init(params)}
  step = jax.jit(lambda s, b: train.train_step(
      s, b, setup=setup, tx=sgd, schedule=optax.constant_schedule(1.0), accum_steps=accum_steps,
      base_key=jax.random.key(0)))
  new, stats = step(state, batch)
  grads = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                       params, new['params'])
  return grads, jax.device_get(stats)


@pytest.mark.parametrize('accum_steps', [2, 4])
def test_gradient_accumulation_equals_one_batch(setup_and_params, accum_steps):
  """A micro-batches give the gradient (and statistics) of one batch of the same size."""
  setup, params = setup_and_params
  batch = crafted_batch(setup.model_config.vocab_size)
  whole, whole_stats = sgd_step(setup, params, batch, 1)
  accumulated, stats = sgd_step(setup, params, batch, accum_steps)
  for path, g in jax.tree_util.tree_leaves_with_path(accumulated):
    ref = whole
    for p in path:
      ref = ref[p.key]
    assert util.rel_err(g, ref) <= 1e-5, jax.tree_util.keystr(path)
  for key in ('loss_sum', 'tokens', 'correct', 'bytes', 'grad_norm'):
    np.testing.assert_allclose(stats[key], whole_stats[key], rtol=1e-5, err_msg=key)
  assert stats['tokens'] == batch['loss_mask'].sum()


# ------------------------------------------------------------------------------------------------
# Metrics.


def test_batch_metrics_against_a_hand_computation():
  """Masked targets, special tokens (0 bytes) and multi-byte tokens, summed by hand in float64."""
  vocab = 11
  token_bytes = np.array([0, 1, 1, 2, 3, 4, 1, 2, 1, 3, 0], np.int32)  # 0 and 10: special.
  setup = model_lib.make_setup(util.model_config(model__vocab_size=vocab), token_bytes=token_bytes)
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((2, 5, vocab)) * 3.0
  targets = np.array([[3, 5, 1, 9, 10], [4, 4, 0, 7, 2]], np.int32)
  mask = np.array([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1]], np.float32)
  logits[0, 0, 3] = 50.0  # Two predictions made right on purpose.
  logits[1, 3, 7] = 50.0
  batch = {'targets': targets, 'loss_mask': mask}
  sums = jax.device_get(metrics_lib.batch_statistics(setup, jnp.asarray(logits, jnp.float32), batch))
  out = metrics_lib.summarize(sums)

  nats, n, correct, nbytes = 0.0, 0, 0, 0
  for b in range(2):
    for t in range(5):
      if not mask[b, t]:
        continue
      z = logits[b, t]
      nats += math.log(sum(math.exp(v) for v in z)) - z[targets[b, t]]
      n += 1
      correct += int(np.argmax(z) == targets[b, t])
      nbytes += int(token_bytes[targets[b, t]])
  assert (n, nbytes) == (8, 15) and correct >= 2  # 15 bytes over 8 tokens: 2 bytes/token, not 1.
  assert sums['tokens'] == n and sums['correct'] == correct and sums['bytes'] == nbytes
  assert out['loss'] == pytest.approx(nats / n, rel=1e-6)
  assert out['bits_per_byte'] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-6)
  assert out['accuracy'] == pytest.approx(correct / n)
  assert out['perplexity'] == pytest.approx(math.exp(nats / n), rel=1e-6)


def test_eval_step_metrics_are_the_models_cross_entropy(setup_and_params):
  """train.eval_step on a masked, packed batch: the float64 cross-entropy of the model's logits."""
  setup, params = setup_and_params
  batch = crafted_batch(setup.model_config.vocab_size, seed=2)
  sums = jax.device_get(jax.jit(lambda p, b: train.eval_step(p, b, setup=setup))(params, batch))
  logits, _ = model_lib.apply_model(setup, params, batch['inputs'],
                                    segment_ids=batch['segment_ids'])
  z = np.asarray(logits, np.float64)
  lse = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
  ce = lse - np.take_along_axis(z, batch['targets'][..., None], -1)[..., 0]
  m = batch['loss_mask']
  assert sums['loss_sum'] == pytest.approx(np.sum(ce * m), rel=1e-5)
  assert sums['tokens'] == m.sum() and sums['bytes'] == m.sum()  # One byte a token by default.
  assert sums['correct'] == np.sum((z.argmax(-1) == batch['targets']) * m)


# ------------------------------------------------------------------------------------------------
# The optimiser.


def optim_config(**overrides):
  c = util.config(**{f'optim__{k}': v for k, v in overrides.items()})
  return c.optim


@pytest.mark.parametrize('kind', ['cosine', 'linear', 'constant'])
def test_learning_rate_schedule(kind):
  peak, warmup, total, end_fraction = 3e-3, 7, 50, 0.2
  sched = optim.learning_rate_schedule(
      optim_config(learning_rate=peak, warmup_steps=warmup, schedule=kind,
                   end_lr_fraction=end_fraction), total)
  end = peak * end_fraction
  for s in range(total + 1):
    if s < warmup:
      want = peak * s / warmup
    elif kind == 'cosine':
      want = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
    elif kind == 'linear':
      want = peak + (end - peak) * (s - warmup) / (total - warmup)
    else:
      want = peak
    assert float(sched(s)) == pytest.approx(want, rel=1e-5, abs=1e-12), s
  assert float(sched(0)) == 0.0 and float(sched(warmup)) == pytest.approx(peak)


def test_weight_decay_skips_norm_scales_and_decay_rates():
  """After one update with zero gradients only decoupled weight decay moves a parameter: exactly
  the matrices (and embeddings) move, by lr · wd · w; norm scales and learnable γ do not."""
  c = util.config(arg='gamma=learnable', model__group_norm_affine=True,
                  optim__learning_rate=0.1, optim__warmup_steps=0, optim__weight_decay=0.5,
                  optim__schedule='constant')
  cfg = config_lib.model_config(c)
  params = model_lib.init_params(cfg, jax.random.key(0))
  tx, _ = optim.make_optimizer(c.optim, 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  names = set()
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    w = params
    for p in path:
      w = w[p.key]
    name = jax.tree_util.keystr(path)
    names.add(name)
    if path[-1].key in ('scale', 'decay_log_rate'):
      np.testing.assert_array_equal(u, 0.0, err_msg=name)
    else:
      np.testing.assert_allclose(u, -0.1 * 0.5 * np.asarray(w), rtol=1e-5, err_msg=name)
  assert {"['blocks']['retention']['decay_log_rate']", "['blocks']['retention']['norm']['scale']",
          "['final_norm']['scale']", "['embed']"} <= names
