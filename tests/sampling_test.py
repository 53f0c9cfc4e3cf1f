"""Sampling penalties: repetition (Hugging Face), frequency and presence (OpenAI-style) against float64
NumPy references written from their definitions, inside the decode loop token for token, and traced
(no recompile per value)."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax import config_lib
from retnet_jax import generate
from retnet_jax import model as model_lib
from tests import util

PROMPTS = [[5, 17, 99, 17], list(range(40, 53)), [250, 2, 7, 7, 120, 64, 1]]  # Lengths 4, 13, 7.
NEW = 10


def penalized_reference(logits, prompt, generated, repetition, frequency, presence):
  """float64 logits [V] of one row after the penalties, from their definitions.

  Hugging Face: every token id in the prompt or generated so far gets logit / r if the logit is
  positive, logit * r otherwise. OpenAI: logit - frequency * (times generated) - presence * (generated
  at all).
  """
  out = np.asarray(logits, np.float64).copy()
  for t in set(prompt) | set(generated):
    out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
  for t in set(generated):
    n = generated.count(t)
    out[t] -= frequency * n + presence * (n > 0)
  return out


def dense(rows, vocab, dtype):
  """Token lists -> [B, V] counts."""
  out = np.zeros((len(rows), vocab), dtype)
  for i, row in enumerate(rows):
    for t in row:
      out[i, t] += 1
  return out


# Crafted: positive, negative and zero logits; tokens in the prompt only, generated only, in both,
# generated twice, and untouched.
LOGITS = np.array([[2.0, -1.5, 0.0, 3.25, -0.5, 1.0, -4.0, 0.75],
                   [-2.0, 1.5, 0.5, -3.0, 0.25, -1.0, 4.0, -0.75]], np.float32)
PROMPT = [[0, 1, 2], [3, 4]]
GENERATED = [[1, 3, 3, 4, 6], [4, 5, 5, 5]]


@pytest.mark.parametrize('repetition, frequency, presence',
                         [(1.3, 0.0, 0.0), (0.7, 0.0, 0.0), (1.0, 0.4, 0.0), (1.0, 0.0, 0.9),
                          (1.8, 0.25, -0.5)])
def test_penalize_follows_the_definitions(repetition, frequency, presence):
  V = LOGITS.shape[1]
  got = generate.penalize(jnp.asarray(LOGITS), jnp.asarray(dense(PROMPT, V, bool)),
                          jnp.asarray(dense(GENERATED, V, np.int32)), repetition, frequency, presence)
  for i in range(len(LOGITS)):
    ref = penalized_reference(LOGITS[i], PROMPT[i], GENERATED[i], repetition, frequency, presence)
    np.testing.assert_allclose(np.asarray(got[i], np.float64), ref, rtol=1e-6, atol=1e-6,
                               err_msg=f'row {i}')
  untouched = [t for t in range(V) if t not in PROMPT[0] + GENERATED[0]]
  np.testing.assert_array_equal(np.asarray(got)[0, untouched], LOGITS[0, untouched])


def test_repetition_penalty_matches_hugging_face():
  """The peer's own processor on the same scores and ids (prompt + generated, as HF sees them)."""
  torch = pytest.importorskip('torch')
  logits_process = pytest.importorskip('transformers.generation.logits_process')
  V = LOGITS.shape[1]
  got = generate.penalize(jnp.asarray(LOGITS), jnp.asarray(dense(PROMPT, V, bool)),
                          jnp.asarray(dense(GENERATED, V, np.int32)), 1.6, 0.0, 0.0)
  width = max(len(p + g) for p, g in zip(PROMPT, GENERATED))
  ids = [p + g + [p[0]] * (width - len(p + g)) for p, g in zip(PROMPT, GENERATED)]  # Pad: a repeat.
  hf = logits_process.RepetitionPenaltyLogitsProcessor(penalty=1.6)(
      torch.tensor(ids), torch.tensor(LOGITS, dtype=torch.float64))
  np.testing.assert_allclose(np.asarray(got, np.float64), hf.numpy(), rtol=1e-6, atol=1e-6)


def test_prompt_counts_skip_padding():
  tokens, segments = generate.pad_prompts(PROMPTS, 256, pad_id=0, min_bucket=8)
  counts = generate.prompt_counts(jnp.asarray(tokens), jnp.asarray(segments), 256)
  want = dense(PROMPTS + [[]], 256, bool)  # The batch bucket's filler row has no prompt.
  np.testing.assert_array_equal(np.asarray(counts['prompt_BV']), want)
  assert not np.asarray(counts['counts_BV']).any()


@pytest.fixture(scope='module')
def tiny():
  cfg = util.model_config(model__num_layers=1)
  return model_lib.make_setup(cfg), model_lib.init_params(cfg, jax.random.key(7))


@functools.partial(jax.jit, static_argnums=0)
def _parallel_logits(graphdef, params, toks_BT):
  return nnx.merge(graphdef, params)(toks_BT, form='parallel')[0]


def reference_greedy(setup, params, prompt, n, repetition=1.0, frequency=0.0, presence=0.0):
  """Greedy decoding in Python: each token the argmax of the penalized parallel-form logits (float64)
  of the prompt and the tokens before it."""
  out = []
  width = len(PROMPTS[1]) + NEW  # One shape for every call: one compile.
  for _ in range(n):
    seq = prompt + out
    toks = np.zeros((1, width), np.int32)
    toks[0, :len(seq)] = seq
    logits = np.asarray(_parallel_logits(setup.graphdef, params, toks))[0, len(seq) - 1]
    out.append(int(np.argmax(penalized_reference(logits, prompt, out, repetition, frequency,
                                                 presence))))
  return out


def test_neutral_penalties_leave_greedy_unchanged(tiny):
  setup, params = tiny
  got = generate.generate(setup, params, PROMPTS, max_new_tokens=NEW, repetition_penalty=1.0,
                          frequency_penalty=0.0, presence_penalty=0.0)
  assert got == generate.generate(setup, params, PROMPTS, max_new_tokens=NEW)
  for p, g in zip(PROMPTS, got):
    assert g == reference_greedy(setup, params, p, NEW)


@pytest.mark.parametrize('repetition, frequency, presence', [(1.5, 0.0, 0.0), (1.2, 0.3, 0.2)])
def test_penalized_greedy_follows_the_reference(tiny, repetition, frequency, presence):
  setup, params = tiny
  kw = dict(repetition_penalty=repetition, frequency_penalty=frequency, presence_penalty=presence)
  got = generate.generate(setup, params, PROMPTS, max_new_tokens=NEW, **kw)
  assert got != generate.generate(setup, params, PROMPTS, max_new_tokens=NEW)  # The test can fail.
  for p, g in zip(PROMPTS, got):
    assert g == reference_greedy(setup, params, p, NEW, repetition, frequency, presence)
  # Streaming in blocks of 4 carries the counts from block to block.
  blocks = list(generate.generate_stream(setup, params, PROMPTS, max_new_tokens=NEW, block_size=4,
                                         **kw))
  assert [sum((b[i] for b in blocks), []) for i in range(len(PROMPTS))] == got


def test_penalty_values_do_not_recompile(tiny):
  setup, params = tiny
  run = lambda **kw: generate.generate(setup, params, PROMPTS, max_new_tokens=NEW, temperature=0.8,
                                       **kw)
  run()
  before = generate.TRACES['decode']
  outs = [run(repetition_penalty=r, frequency_penalty=f, presence_penalty=p)
          for r, f, p in [(1.3, 0.0, 0.0), (2.0, 0.5, 0.1), (0.9, -0.2, 1.0)]]
  assert generate.TRACES['decode'] == before
  assert outs[0] != outs[1]


def test_bad_penalties_raise(tiny):
  setup, params = tiny
  for bad in [{'repetition_penalty': 0.0}, {'repetition_penalty': -1.0},
              {'repetition_penalty': float('nan')}, {'frequency_penalty': float('inf')},
              {'presence_penalty': float('nan')}]:
    with pytest.raises(ValueError, match='penalty'):
      generate.generate(setup, params, PROMPTS, max_new_tokens=2, **bad)
    with pytest.raises(ValueError, match='penalty'):
      config_lib.generate_settings(util.config(), **bad)
