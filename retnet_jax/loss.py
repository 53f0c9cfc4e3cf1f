"""The language-model loss and its batch statistics, whole or over chunks of positions.

Whole: the logits [B, T, vocab] in float32 exist at once (metrics.batch_statistics). Chunked: the
head matmul, the log-sum-exp and the target's logit run per chunk of positions inside a scan whose
body is rematerialised, so the forward keeps only the sums and the backward recomputes each chunk's
logits: at most [B, c, vocab] float32 exist at once, c ≤ chunk_size. The sums (loss, tokens, correct
predictions, UTF-8 bytes) are the same quantities as the whole path's, so loss, accuracy and bits per
byte stay exact.

Chunk i holds positions i, i + n, i + 2n, ... (n chunks): with the sequence sharded in contiguous
blocks, every chunk then spreads over all sequence shards. T is padded to a multiple of n with
masked positions.
"""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp

from retnet_jax import metrics as metrics_lib
from retnet_jax import model as model_lib
from retnet_jax import sharding


def num_chunks(seq_len: int, chunk_size: int) -> int:
  """Chunks of at most `chunk_size` positions per sequence; 1 (the whole path) for chunk_size 0."""
  return 1 if chunk_size <= 0 else math.ceil(seq_len / chunk_size)


def statistics(setup: model_lib.Setup, params, batch, *, chunk_size: int = 0, rng=None) -> dict:
  """Sums over the scored targets of `batch` under `params`: loss_sum (nats), tokens, correct,
  bytes. chunk_size: positions per sequence per chunk (0, or ≥ T: the whole logits at once)."""
  model = nnx.merge(setup.graphdef, params)
  segments = batch['segment_ids'] if setup.use_segments else None
  T = batch['inputs'].shape[1]
  n = num_chunks(T, chunk_size)
  if n == 1:
    logits_BTV, _ = model(batch['inputs'], segment_ids=segments, rng=rng)
    return metrics_lib.batch_statistics(setup, logits_BTV, batch)
  x_BTD, _ = model(batch['inputs'], segment_ids=segments, rng=rng, head=False)
  return chunked_statistics(x_BTD, model.head_weights(), batch, setup.token_bytes, n)


def chunked_statistics(x_BTD, head_DV, batch, token_bytes, n: int) -> dict:
  """batch_statistics of the logits x_BTD · head_DV, computed over `n` strided chunks of positions."""
  B, T, D = x_BTD.shape
  c = math.ceil(T / n)
  pad = c * n - T
  mask_BT = batch['loss_mask'].astype(jnp.float32)
  targets_BT = batch['targets']
  if pad:
    x_BTD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    mask_BT = jnp.pad(mask_BT, ((0, 0), (0, pad)))
  # [B, c·n, ...] -> [n, B, c, ...]: chunk i takes positions i, i + n, ...
  strided = lambda a: jnp.moveaxis(a.reshape(B, c, n, *a.shape[2:]), 2, 0)
  xs = (strided(x_BTD), strided(targets_BT), strided(mask_BT))

  @jax.checkpoint  # Keep nothing of a chunk: the backward recomputes its logits.
  def body(carry, chunk):
    x_BcD, targets_Bc, mask_Bc = chunk
    logits_BcV = model_lib.dense(x_BcD, head_DV, x_BcD.dtype, out_dtype=jnp.float32)
    logits_BcV = sharding.constrain(logits_BcV, ('batch', 'length', 'vocab'))
    logz_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
    target_Bc = jnp.take_along_axis(logits_BcV, targets_Bc[..., None], axis=-1)[..., 0]
    correct_Bc = (jnp.argmax(logits_BcV, axis=-1) == targets_Bc).astype(jnp.float32)
    loss_sum, correct = carry
    return (loss_sum + jnp.sum((logz_Bc - target_Bc) * mask_Bc),
            correct + jnp.sum(correct_Bc * mask_Bc)), None

  (loss_sum, correct), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), xs)
  mask = batch['loss_mask'].astype(jnp.float32)
  nbytes = jnp.asarray(token_bytes)[batch['targets']].astype(jnp.float32)
  return {'loss_sum': loss_sum, 'tokens': jnp.sum(mask), 'correct': correct,
          'bytes': jnp.sum(nbytes * mask)}
