"""The chunked loss equals the whole-logits loss, in value, statistics and gradients, and never holds
the whole [B, T, vocab] logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax import loss
from retnet_jax import model as model_lib
from tests import util


def setup_and_batch(tied, B=3, T=37, seed=0, **overrides):
  cfg = util.model_config(model__tie_embeddings=tied, model__remat='none', **overrides)
  rng = np.random.default_rng(seed)
  token_bytes = rng.integers(0, 4, cfg.vocab_size)
  setup = model_lib.make_setup(cfg, token_bytes=token_bytes)
  params = model_lib.init_params(cfg, jax.random.key(seed))
  tokens = rng.integers(0, cfg.vocab_size, (B, T + 1))
  mask = (rng.random((B, T)) > 0.3).astype(np.float32)
  mask[0] = 0.0  # A row with no scored target.
  segments = np.cumsum(rng.random((B, T)) < 0.1, axis=1) + 1
  batch = {'inputs': jnp.asarray(tokens[:, :-1], jnp.int32), 'targets': jnp.asarray(tokens[:, 1:], jnp.int32),
           'loss_mask': jnp.asarray(mask), 'segment_ids': jnp.asarray(segments, jnp.int32)}
  return setup, params, batch


def mean_loss_and_grads(setup, params, batch, chunk):
  def f(p):
    stats = loss.statistics(setup, p, batch, chunk_size=chunk)
    return stats['loss_sum'] / stats['tokens'], stats
  return jax.jit(jax.value_and_grad(f, has_aux=True))(params)


# T = 37 in 8 chunks of 5 (3 padded positions), 5 of 8, 2 of 19 (1 padded).
@pytest.mark.parametrize('tied, chunk', [(False, 5), (True, 8), (False, 36)])
def test_chunked_loss_and_gradients_equal_the_whole_path(tied, chunk):
  setup, params, batch = setup_and_batch(tied)
  assert loss.num_chunks(37, chunk) > 1
  (whole, whole_stats), whole_grads = mean_loss_and_grads(setup, params, batch, 0)
  (chunked, chunked_stats), chunked_grads = mean_loss_and_grads(setup, params, batch, chunk)
  assert abs(float(chunked) - float(whole)) <= 1e-6 * abs(float(whole))
  for key in ('tokens', 'correct', 'bytes'):
    assert float(chunked_stats[key]) == float(whole_stats[key]), key
  for (path, g), c in zip(jax.tree_util.tree_flatten_with_path(whole_grads)[0],
                          jax.tree.leaves(chunked_grads)):
    scale = float(jnp.max(jnp.abs(g)))
    assert float(jnp.max(jnp.abs(c - g))) <= 1e-6 * scale, jax.tree_util.keystr(path)


def test_whole_path_is_the_reference_cross_entropy():
  """The whole path against float64 NumPy from the logits, so both paths are tied to the definition."""
  setup, params, batch = setup_and_batch(False, seed=1)
  logits = np.asarray(model_lib.apply_model(setup, params, batch['inputs'],
                                            segment_ids=batch['segment_ids'])[0], np.float64)
  top = logits.max(-1, keepdims=True)
  logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  targets, mask = np.asarray(batch['targets']), np.asarray(batch['loss_mask'], np.float64)
  nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  stats = jax.jit(lambda p: loss.statistics(setup, p, batch, chunk_size=8))(params)
  assert float(stats['loss_sum']) == pytest.approx((nll * mask).sum(), rel=1e-6)
  assert float(stats['correct']) == ((logits.argmax(-1) == targets) * mask).sum()
  assert float(stats['bytes']) == (setup.token_bytes[targets] * mask).sum()


def test_chunked_gradient_never_holds_the_whole_logits():
  """Vocabulary 8192, B·T = 2·256: the whole float32 logits are 16 MiB. In 8 chunks all the
  compiled gradient's temporaries together (a chunk's logits and their gradient, the head's
  gradient, the activations) take less than those logits alone."""
  setup, params, batch = setup_and_batch(False, B=2, T=256, model__vocab_size=8192)
  logits_bytes = 2 * 256 * 8192 * 4

  def temp_bytes(chunk):
    f = jax.jit(jax.grad(lambda p: loss.statistics(setup, p, batch, chunk_size=chunk)['loss_sum']))
    return f.lower(params).compile().memory_analysis().temp_size_in_bytes

  whole, chunked = temp_bytes(0), temp_bytes(32)
  assert whole > logits_bytes
  assert chunked < logits_bytes < whole - chunked, (whole, chunked)


@pytest.mark.slow
def test_sharded_training_losses_equal_with_the_chunked_loss(tmp_path):
  """Two steps on a (data 2, sequence 2, tensor 2) mesh: the same losses with 4 chunks as whole."""
  from retnet_jax import train  # pylint: disable=g-import-not-at-top
  common = dict(total_steps=2, log_every=1, eval_every=2, checkpoint_every=2, seq_len=32,
                model__num_heads=4, mesh__data=2, mesh__sequence=2, mesh__tensor=2)
  losses = {}
  for chunk in (0, 8):
    workdir = str(tmp_path / str(chunk))
    train.train_and_evaluate(util.config(loss_chunk_size=chunk, **common), workdir)
    losses[chunk] = util.train_losses(workdir)
  np.testing.assert_allclose(losses[8], losses[0], rtol=1e-6)
