"""Per-token log-probabilities of token sequences under a model: batched, bucketed, jitted.

  scorer = scoring.Scorer(setup, params, form='chunkwise', chunk=256, pad_id=tok.pad_id)
  [(logp, greedy), ...] = scorer.token_logprobs([tokens, ...], batch_size=16)

Rows are sorted by length, batched, right-padded to a power-of-two length bucket
(generate.next_power_of_two, at least MIN_BUCKET; batches to a power of two rows) and scored by
`score`, jitted once per (batch, length) bucket (`TRACES` counts its traces). Right padding needs no
masks: a causal model's padding comes after every scored position. A RetNet row longer than `chunk`
runs in chunks of `chunk` tokens with the state carried, so any length costs O(length); the
Transformer runs each row in one pass (its rotary positions extend past the training length).
What lm_eval.py (lm-evaluation-harness) and experiments/length_extrapolation.py score with.
"""

from __future__ import annotations

import collections
import functools
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax import generate
from retnet_jax import retention

F32 = jnp.float32
MIN_BUCKET = 16
TRACES: collections.Counter = collections.Counter()  # Traces of `score`, for tests.


def _call(model, tokens, state, form):
  return model(tokens, state, form=form)


@functools.partial(jax.jit, static_argnames=('graphdef', 'form'))
def score(graphdef, params, state, tokens_BC, targets_BC, *, form):
  """(log p(target) [B, C] f32, target == argmax [B, C], state after the chunk).

  state: the carried decoding state (RetNet), or None (one pass from an empty state; the returned
  state is then None).
  """
  TRACES['score'] += 1
  model = nnx.merge(graphdef, params)
  logits_BCV, new_state = _call(model, tokens_BC, state, form)
  logp_BCV = jax.nn.log_softmax(logits_BCV.astype(F32), axis=-1)
  logp_BC = jnp.take_along_axis(logp_BCV, targets_BC[..., None], axis=-1)[..., 0]
  greedy_BC = jnp.argmax(logits_BCV, axis=-1) == targets_BC
  return logp_BC, greedy_BC, (None if state is None else new_state)


class Scorer:
  """Per-token log-probabilities of token sequences under a model, in length buckets.

  chunk: the most tokens per forward pass. A model whose decoding state does not grow with length
  (retention, windowed attention) runs longer rows in chunks of `chunk` with the state carried;
  None runs every row in one pass (a model with a full KV cache always does).
  """

  def __init__(self, setup, params, *, form: str = 'chunkwise', chunk: int | None = None,
               pad_id: int = 0, min_bucket: int = MIN_BUCKET):
    cfg = setup.model_config
    if form not in retention.FORMS:
      raise ValueError(f'form must be one of {sorted(retention.FORMS)}; got {form!r}.')
    if chunk is not None and chunk < 1:
      raise ValueError(f'chunk must be positive; got {chunk}.')
    # On one device: a carried state then has the layout of the first chunk's (a checkpoint's
    # params restore onto its training mesh, whose sharding the outputs would inherit: a retrace).
    params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), params)
    self.setup, self.params, self.form, self.pad_id = setup, params, form, int(pad_id)
    self.carries = not cfg.state_grows
    self.chunk = chunk if self.carries else None
    self.min_bucket = min_bucket
    self._model = nnx.merge(setup.graphdef, params)

  def bucket(self, length: int) -> tuple[int, int]:
    """(padded length, chunk length) for rows of up to `length` inputs."""
    n = generate.next_power_of_two(length, self.min_bucket)
    if self.chunk is None or n <= self.chunk:
      return n, n
    return -(-length // self.chunk) * self.chunk, self.chunk

  def _run(self, inputs_BT, targets_BT):
    B, T = inputs_BT.shape
    _, C = self.bucket(T)
    state = self._model.init_state(B) if self.carries else None
    logps, greedys = [], []
    for start in range(0, T, C):
      logp, greedy, state = score(self.setup.graphdef, self.params, state,
                                  jnp.asarray(inputs_BT[:, start:start + C]),
                                  jnp.asarray(targets_BT[:, start:start + C]), form=self.form)
      logps.append(logp)
      greedys.append(greedy)
    return (np.concatenate([np.asarray(x) for x in logps], 1),
            np.concatenate([np.asarray(x) for x in greedys], 1))

  def token_logprobs(self, sequences: Sequence[Sequence[int]], batch_size: int = 16, *,
                     progress=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each sequence t_0 … t_{n−1} (n ≥ 2): (log p(t_i | t_<i) [n−1] float32,
    t_i == argmax [n−1] bool) for i = 1 … n−1, in the order given."""
    vocab = self.setup.model_config.vocab_size
    for i, s in enumerate(sequences):
      if len(s) < 2:
        raise ValueError(f'sequence {i} has {len(s)} tokens; scoring needs at least 2.')
      if min(s) < 0 or max(s) >= vocab:
        raise ValueError(f'sequence {i} has token ids outside [0, {vocab}).')
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out = [None] * len(sequences)
    for b in range(0, len(order), batch_size):
      rows = order[b:b + batch_size]
      T, _ = self.bucket(len(sequences[rows[0]]) - 1)
      B = generate.next_power_of_two(len(rows))
      inputs = np.full((B, T), self.pad_id, np.int32)
      targets = np.zeros((B, T), np.int32)
      for r, i in enumerate(rows):
        s = np.asarray(sequences[i], np.int32)
        inputs[r, :len(s) - 1], targets[r, :len(s) - 1] = s[:-1], s[1:]
      logp, greedy = self._run(inputs, targets)
      for r, i in enumerate(rows):
        n = len(sequences[i]) - 1
        out[i] = (logp[r, :n], greedy[r, :n])
      if progress is not None:
        progress.update(len(rows))
    return out
