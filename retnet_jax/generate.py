"""Generation: prefill the prompts in the chunkwise (or parallel) form, which returns the state, then
decode token by token with the recurrent form (RetNet: O(1) work and memory per token) or the KV cache
(Transformer), the decode loop running inside one jitted `lax.while_loop`.

  params, cfg, _ = checkpoint.load_params(workdir)
  setup = model.make_setup(cfg)
  out = generate.generate(setup, params, [tok.encode('def '), tok.encode('import os\\n')],
                          max_new_tokens=64, temperature=0.7, top_p=0.9, stop_tokens=(tok.eos_id,))

Mixed prompt lengths: the batch is left-padded to one length with segment ids 0 for the padding and 1
for the prompt; the model resets the retention state (masks attention) where the id changes, so no
padding leaks into a prompt. Positions count from the start of the padding, which changes nothing:
rotary angles are relative and the state before a prompt's first token is empty. (The one exception is
`decay_row_norm`: decoding counts its normaliser from the start of the padding; under `group_norm` it
cancels.)

Compiled once per shape bucket. The prompt length is rounded up to a power of two (at least
`min_bucket`), the batch to a power of two, the output buffer (max_new_tokens) to a power of two of at
least 16 (a streaming block to a power of two), and the Transformer's KV cache holds bucketed prompt +
bucketed max_new_tokens.
max_new_tokens itself, temperature, top_k, top_p, the three penalties, the seed and the stop tokens
(up to MAX_STOP) are traced values: changing them never recompiles. RetNet's decode state does not
depend on the prompt length, so its decode loop compiles once per batch bucket. `TRACES` counts the
traces of each jitted function.

Penalties (`penalize`), applied to the logits before sampling, from per-row token counts carried in
the decode loop (`prompt_counts` starts them): `repetition_penalty` (Hugging Face's definition)
divides a positive logit and multiplies a negative one for every token in the prompt or generated so
far; then the OpenAI-style additive ones subtract frequency_penalty * count + presence_penalty *
(count > 0), counting the generated tokens only. 1, 0 and 0 leave the logits unchanged.

Sampling: temperature 0 is greedy (argmax). Otherwise the logits divided by the temperature are cut to
the top_k most likely tokens (0: no cut), then to the smallest set whose probability reaches top_p
(nucleus; 1: no cut), and sampled with the key fold_in(fold_in(PRNGKey(seed), step), row): a row's
tokens depend on the seed, its index in the batch and the step, never on the other rows.

A row stops after it produces a stop token (which is kept in its output); its later slots are pad_id.
"""

from __future__ import annotations

import codecs
import collections
import functools
import json
import os
import sys
from typing import Iterator, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax import checkpoint
from retnet_jax import config_lib
from retnet_jax import data as data_lib
from retnet_jax import metrics as metrics_lib
from retnet_jax import model as model_lib
from retnet_jax import tokenizer as tokenizer_lib

F32 = jnp.float32
MAX_STOP = 8  # Stop tokens are a traced [MAX_STOP] array (padded with -1): no recompiles.
MIN_NEW_BUCKET = 16
TRACES: collections.Counter = collections.Counter()  # Traces per jitted function, for tests.


def next_power_of_two(n: int, minimum: int = 1) -> int:
  n = max(int(n), int(minimum), 1)
  return 1 << (n - 1).bit_length()


# ------------------------------------------------------------------------------------------------
# Penalties and sampling.


def prompt_counts(tokens_BP, segments_BP, vocab_size: int) -> dict:
  """The decode loop's per-row token counts at the start: {'prompt_BV': bool [B, V], the tokens of
  each prompt (segment id != 0); 'counts_BV': int32 [B, V], how often each token was generated (0)}."""
  B = tokens_BP.shape[0]
  rows_BP = jnp.broadcast_to(jnp.arange(B)[:, None], tokens_BP.shape)
  prompt_BV = jnp.zeros((B, vocab_size), jnp.bool_).at[rows_BP, tokens_BP].max(segments_BP != 0)
  return {'prompt_BV': prompt_BV, 'counts_BV': jnp.zeros((B, vocab_size), jnp.int32)}


def penalize(logits_BV, prompt_BV, counts_BV, repetition_penalty, frequency_penalty, presence_penalty):
  """Logits [B, V] after the penalties (traced scalars), from the prompt tokens [B, V] bool and the
  generated counts [B, V].

  repetition_penalty r (HF): a token in the prompt or generated gets logit / r if positive, logit * r
  otherwise. Then frequency f and presence p (OpenAI), on generated tokens only: logit - f * count -
  p * (count > 0).
  """
  logits_BV = logits_BV.astype(F32)
  seen_BV = prompt_BV | (counts_BV > 0)
  scaled_BV = jnp.where(logits_BV > 0, logits_BV / repetition_penalty, logits_BV * repetition_penalty)
  logits_BV = jnp.where(seen_BV, scaled_BV, logits_BV)
  return (logits_BV - frequency_penalty * counts_BV.astype(F32)
          - presence_penalty * (counts_BV > 0).astype(F32))


def sample(logits_BV, key, temperature, top_k, top_p):
  """Next token ids [B] int32 from logits [B, V]; temperature, top_k, top_p may be traced scalars."""
  B, V = logits_BV.shape
  logits_BV = logits_BV.astype(F32)
  greedy_B = jnp.argmax(logits_BV, axis=-1)
  x_BV = logits_BV / jnp.maximum(temperature, 1e-6)
  sorted_BV = -jnp.sort(-x_BV, axis=-1)  # Descending.
  rank_V = jnp.arange(V)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
  in_k_BV = rank_V[None, :] < k
  probs_BV = jax.nn.softmax(jnp.where(in_k_BV, sorted_BV, -jnp.inf), axis=-1)
  before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # Mass of the more likely tokens.
  keep_BV = in_k_BV & ((before_BV < top_p) | (top_p >= 1.0) | (rank_V[None, :] == 0))
  n_keep_B = jnp.sum(keep_BV, axis=-1)  # keep is a prefix of the ranks.
  cutoff_B1 = jnp.take_along_axis(sorted_BV, n_keep_B[:, None] - 1, axis=-1)
  x_BV = jnp.where(x_BV >= cutoff_B1, x_BV, -jnp.inf)
  keys_B = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(B))
  sampled_B = jax.vmap(jax.random.categorical)(keys_B, x_BV)
  return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------
# The jitted pieces.


@functools.partial(jax.jit, static_argnames=('graphdef', 'form', 'max_len'))
def prefill(graphdef, params, tokens_BP, segments_BP, *, form='chunkwise', max_len=None):
  """Runs the left-padded prompts [B, P] from an empty state: (last logits [B, V], state).

  max_len: the positions a growing state holds (a full KV cache); None when it does not grow.
  """
  TRACES['prefill'] += 1
  model = nnx.merge(graphdef, params)
  # From no state, so that attention runs within the prompt by the dispatcher's choice (a kernel on
  # GPU / TPU) instead of over a [P, max_len] score matrix; then placed in the decoding shapes.
  logits_BPV, own = model(tokens_BP, form=form, segment_ids=segments_BP, last_only=True)
  return logits_BPV[:, -1], model.carried(own, max_len)


@functools.partial(jax.jit, static_argnames=('graphdef', 'out_len'), donate_argnames=('state',))
def decode(graphdef, params, state, logits_BV, done_B, counts, step0, num_steps, knobs, *, out_len):
  """Up to min(num_steps, out_len) tokens, as one `lax.while_loop` that stops early once every row is done.

  Each step penalizes `logits_BV` (the next-token logits) by the counts, samples a token [B], counts
  it, then runs it through the model in the recurrent form to get the next logits and state. Done
  rows emit pad_id and count nothing.
  counts: `prompt_counts(...)` at the start, the returned one when continuing.
  knobs: {'key', 'temperature', 'top_k', 'top_p', 'repetition_penalty', 'frequency_penalty',
  'presence_penalty', 'stop_S' [MAX_STOP], 'pad_id'}, all traced.
  step0: the index of the first step (keys fold in step0 + i, so blocks continue one another).
  Returns (tokens [B, out_len] int32, lengths [B] (tokens before and including a stop),
  state, logits_BV, done_B, counts, steps taken).
  """
  TRACES['decode'] += 1
  model = nnx.merge(graphdef, params)
  B = logits_BV.shape[0]
  stop_S = knobs['stop_S']
  limit = jnp.minimum(num_steps, out_len)

  prompt_BV = counts['prompt_BV']

  def cond(carry):
    i, _, _, done_B, _, _, _ = carry
    return (i < limit) & ~jnp.all(done_B)

  def body(carry):
    i, state, logits_BV, done_B, counts_BV, out_BN, length_B = carry
    key = jax.random.fold_in(knobs['key'], step0 + i)
    scores_BV = penalize(logits_BV, prompt_BV, counts_BV, knobs['repetition_penalty'],
                         knobs['frequency_penalty'], knobs['presence_penalty'])
    token_B = sample(scores_BV, key, knobs['temperature'], knobs['top_k'], knobs['top_p'])
    token_B = jnp.where(done_B, knobs['pad_id'], token_B)
    counts_BV = counts_BV.at[jnp.arange(B), token_B].add((~done_B).astype(jnp.int32))
    out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, token_B[:, None], i, axis=1)
    length_B = length_B + (~done_B).astype(jnp.int32)
    done_B = done_B | jnp.any(token_B[:, None] == stop_S[None, :], axis=-1)
    logits_B1V, state = model(token_B[:, None], state, form='recurrent')
    return i + 1, state, logits_B1V[:, 0], done_B, counts_BV, out_BN, length_B

  out_BN = jnp.full((B, out_len), knobs['pad_id'], jnp.int32)
  carry = (jnp.zeros((), jnp.int32), state, logits_BV.astype(F32), done_B, counts['counts_BV'],
           out_BN, jnp.zeros((B,), jnp.int32))
  steps, state, logits_BV, done_B, counts_BV, out_BN, length_B = jax.lax.while_loop(cond, body, carry)
  counts = {'prompt_BV': prompt_BV, 'counts_BV': counts_BV}
  return out_BN, length_B, state, logits_BV, done_B, counts, steps


# ------------------------------------------------------------------------------------------------
# Host side.


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, pad_id: int, min_bucket: int = 16):
  """Left-pads prompts to a power-of-two length and batch: (tokens [B', P], segments [B', P]).

  Segment ids: 1 for prompt tokens, 0 for padding (and for the extra rows that fill the batch bucket).
  """
  if not prompts:
    raise ValueError('no prompts to generate from.')
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f'prompt {i} is empty: give at least one token to start from.')
    bad = [t for t in p if not 0 <= int(t) < vocab_size]
    if bad:
      raise ValueError(f'prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}.')
  if not 0 <= pad_id < vocab_size:
    raise ValueError(f'pad_id {pad_id} is outside [0, {vocab_size}).')
  P = next_power_of_two(max(len(p) for p in prompts), min_bucket)
  B = next_power_of_two(len(prompts))
  tokens = np.full((B, P), pad_id, np.int32)
  segments = np.zeros((B, P), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, P - len(p):] = np.asarray(p, np.int32)
    segments[i, P - len(p):] = 1
  return tokens, segments


def _knobs(temperature, top_k, top_p, seed, stop_tokens, pad_id, repetition_penalty=1.0,
           frequency_penalty=0.0, presence_penalty=0.0):
  stop_tokens = tuple(int(t) for t in stop_tokens)
  if len(stop_tokens) > MAX_STOP:
    raise ValueError(f'at most {MAX_STOP} stop tokens; got {len(stop_tokens)}.')
  if not temperature >= 0 or top_k < 0 or not 0.0 < top_p <= 1.0:  # NaN fails too.
    raise ValueError(f'need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {temperature}, '
                     f'{top_k}, {top_p}.')
  if not 0 < repetition_penalty < np.inf or not np.isfinite([frequency_penalty, presence_penalty]).all():
    raise ValueError(f'need a finite repetition_penalty > 0 and finite frequency and presence '
                     f'penalties; got {repetition_penalty}, {frequency_penalty}, {presence_penalty}.')
  stop = np.full((MAX_STOP,), -1, np.int32)
  stop[:len(stop_tokens)] = stop_tokens
  return {'key': jax.random.key(seed), 'temperature': jnp.asarray(temperature, F32),
          'top_k': jnp.asarray(top_k, jnp.int32), 'top_p': jnp.asarray(top_p, F32),
          'repetition_penalty': jnp.asarray(repetition_penalty, F32),
          'frequency_penalty': jnp.asarray(frequency_penalty, F32),
          'presence_penalty': jnp.asarray(presence_penalty, F32),
          'stop_S': jnp.asarray(stop), 'pad_id': jnp.asarray(pad_id, jnp.int32)}


def _start(setup, params, prompts, *, max_new_tokens, pad_id, prefill_form, min_bucket):
  """Pads and prefills: (state, logits [B', V], done [B'], prompt_counts, real batch size)."""
  cfg = setup.model_config
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be positive; got {max_new_tokens}.')
  tokens, segments = pad_prompts(prompts, cfg.vocab_size, pad_id, min_bucket)
  max_len = None
  if cfg.state_grows:
    max_len = tokens.shape[1] + next_power_of_two(max_new_tokens, MIN_NEW_BUCKET)
  logits_BV, state = prefill(setup.graphdef, params, jnp.asarray(tokens), jnp.asarray(segments),
                             form=prefill_form, max_len=max_len)
  done_B = jnp.asarray(np.arange(tokens.shape[0]) >= len(prompts))  # Filler rows start done.
  counts = prompt_counts(jnp.asarray(tokens), jnp.asarray(segments), cfg.vocab_size)
  return state, logits_BV, done_B, counts, len(prompts)


def generate_arrays(setup, params, prompts_tokens, *, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_tokens=(),
                    pad_id: int = 0, prefill_form: str = 'chunkwise', min_bucket: int = 16,
                    repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                    presence_penalty: float = 0.0):
  """Like `generate`, as arrays: tokens [B, max_new_tokens] (pad_id after a stop) and lengths [B]."""
  knobs = _knobs(temperature, top_k, top_p, seed, stop_tokens, pad_id, repetition_penalty,
                 frequency_penalty, presence_penalty)
  state, logits_BV, done_B, counts, n = _start(
      setup, params, prompts_tokens, max_new_tokens=max_new_tokens, pad_id=pad_id,
      prefill_form=prefill_form, min_bucket=min_bucket)
  out_len = next_power_of_two(max_new_tokens, MIN_NEW_BUCKET)
  out_BN, length_B, *_ = decode(setup.graphdef, params, state, logits_BV, done_B, counts,
                                jnp.asarray(0, jnp.int32), jnp.asarray(max_new_tokens, jnp.int32),
                                knobs, out_len=out_len)
  return np.asarray(out_BN)[:n, :max_new_tokens], np.asarray(length_B)[:n]


def generate(setup, params, prompts_tokens: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_tokens: Sequence[int] = (), pad_id: int = 0, prefill_form: str = 'chunkwise',
             min_bucket: int = 16, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0) -> list[list[int]]:
  """The new tokens of each prompt (a stop token, when one ends the row, is the last one kept).

  setup: anything with .graphdef and .model_config (a model.Setup: `make_setup(cfg)`).
  params: the pure dict of parameters (train state['params'] or checkpoint.load_params).
  prefill_form: the retention form of the prompt pass ('chunkwise' | 'parallel' | 'recurrent').
  repetition_penalty, frequency_penalty, presence_penalty: see `penalize` (1, 0, 0: off).
  """
  out_BN, length_B = generate_arrays(
      setup, params, prompts_tokens, max_new_tokens=max_new_tokens, temperature=temperature,
      top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens, pad_id=pad_id,
      prefill_form=prefill_form, min_bucket=min_bucket, repetition_penalty=repetition_penalty,
      frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)
  return [row[:n].tolist() for row, n in zip(out_BN, length_B)]


def generate_stream(setup, params, prompts_tokens: Sequence[Sequence[int]], *, max_new_tokens: int,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    stop_tokens: Sequence[int] = (), pad_id: int = 0,
                    prefill_form: str = 'chunkwise', min_bucket: int = 16,
                    block_size: int = 16, repetition_penalty: float = 1.0,
                    frequency_penalty: float = 0.0,
                    presence_penalty: float = 0.0) -> Iterator[list[list[int]]]:
  """`generate` in blocks: yields, every `block_size` tokens, each prompt's new tokens of that block.

  Each block is one call of the jitted `decode` loop (compiled once); the tokens are those `generate`
  gives for the same arguments. Stops when every row is done or max_new_tokens are out.
  """
  knobs = _knobs(temperature, top_k, top_p, seed, stop_tokens, pad_id, repetition_penalty,
                 frequency_penalty, presence_penalty)
  state, logits_BV, done_B, counts, n = _start(
      setup, params, prompts_tokens, max_new_tokens=max_new_tokens, pad_id=pad_id,
      prefill_form=prefill_form, min_bucket=min_bucket)
  block = next_power_of_two(block_size)
  produced = 0
  while produced < max_new_tokens:
    out_BN, length_B, state, logits_BV, done_B, counts, steps = decode(
        setup.graphdef, params, state, logits_BV, done_B, counts, jnp.asarray(produced, jnp.int32),
        jnp.asarray(min(block, max_new_tokens - produced), jnp.int32), knobs, out_len=block)
    out_BN, length_B = np.asarray(out_BN), np.asarray(length_B)
    yield [row[:k].tolist() for row, k in zip(out_BN[:n], length_B[:n])]
    produced += int(steps)
    if bool(np.all(np.asarray(done_B)[:n])):
      return


# ------------------------------------------------------------------------------------------------
# Text: prompts in, streamed text out (what `main --mode=generate` runs).


class TextStream:
  """Turns token ids into text as they arrive, holding back an incomplete UTF-8 character.

  The byte tokenizer decodes with an incremental UTF-8 decoder; other tokenizers decode the whole
  sequence each time and emit the new suffix (their trailing U+FFFD held back until more arrives).
  """

  def __init__(self, tok):
    self.tok, self.ids, self.emitted = tok, [], ''
    self._bytes = (codecs.getincrementaldecoder('utf-8')(errors='replace')
                   if isinstance(tok, tokenizer_lib.ByteTokenizer) else None)

  def feed(self, ids) -> str:
    if self._bytes is not None:
      return self._bytes.decode(bytes(int(i) for i in ids if 0 <= int(i) < 256))
    self.ids.extend(int(i) for i in ids)
    text = self.tok.decode(self.ids).rstrip('\ufffd')
    new = text[len(self.emitted):] if text.startswith(self.emitted) else ''
    self.emitted += new
    return new

  def flush(self) -> str:
    if self._bytes is not None:
      return self._bytes.decode(b'', final=True)
    text = self.tok.decode(self.ids)
    return text[len(self.emitted):] if text.startswith(self.emitted) else ''


def read_prompts(prompts: Sequence[str] | None, prompt_file: str | None) -> list[str]:
  """--prompt values, then those of --prompt_file: a .jsonl file (each line a JSON string or an object
  with 'prompt' or 'text') or a text file with one prompt per line."""
  out = list(prompts or ())
  if prompt_file:
    if not os.path.isfile(prompt_file):
      raise ValueError(f'prompt file {prompt_file!r} does not exist.')
    with open(prompt_file, encoding='utf-8') as f:
      lines = [line.rstrip('\n') for line in f]
    for n, line in enumerate(lines, 1):
      if not line.strip():
        continue
      if prompt_file.endswith('.jsonl'):
        try:
          item = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f'{prompt_file}:{n} is not JSON: {e}.') from e
        if isinstance(item, dict):
          item = item.get('prompt', item.get('text'))
        if not isinstance(item, str):
          raise ValueError(f"{prompt_file}:{n}: expected a string or an object with 'prompt'/'text'.")
        out.append(item)
      else:
        out.append(line)
  if not out:
    raise ValueError('no prompt: pass --prompt=TEXT or --prompt_file=FILE.')
  for i, p in enumerate(out):
    if not p:
      raise ValueError(f'prompt {i} is empty.')
  return out


def generate_text(config, workdir: str, prompts: Sequence[str], *, max_new_tokens: int | None = None,
                  temperature: float | None = None, top_k: int | None = None,
                  top_p: float | None = None, seed: int | None = None, out=None,
                  step: int | None = None, fallback: bool | None = None,
                  repetition_penalty: float | None = None, frequency_penalty: float | None = None,
                  presence_penalty: float | None = None) -> list[str]:
  """Restores the latest checkpoint of `workdir` and streams each prompt's continuation to `out`.

  Defaults come from `config.generate` (config_lib.GENERATE); step: the checkpoint step (default
  the latest); fallback: the newest intact step when that one is damaged (default
  config.checkpoint.fallback_to_intact). The model is the checkpoint's own ModelConfig; the tokenizer
  is the one the checkpoint carries (a converted or warm-started model's) unless `config.data` names
  one other than 'byte', else `config.data`'s. Prompts run one after another (each streamed as it
  is produced). Returns the texts.
  """
  metrics_lib.quiet_library_logs()
  out = sys.stdout if out is None else out
  g = config_lib.generate_settings(config, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=seed,
                                   repetition_penalty=repetition_penalty,
                                   frequency_penalty=frequency_penalty,
                                   presence_penalty=presence_penalty)
  max_new_tokens = g['max_new_tokens']
  knobs = {k: g[k] for k in ('temperature', 'top_k', 'top_p', 'seed', 'repetition_penalty',
                             'frequency_penalty', 'presence_penalty')}
  if not prompts or any(not p for p in prompts):
    raise ValueError('empty prompt: give some text to continue.')
  if fallback is None:
    fallback = bool(config.checkpoint.get('fallback_to_intact', False))
  params, cfg, meta = checkpoint.load_params(workdir, step=step, fallback=fallback)
  tok = data_lib.carried_tokenizer(config.data, meta) or data_lib.get_tokenizer(config.data, workdir)
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f'the tokenizer has {tok.vocab_size} ids but the checkpoint\'s model only '
                     f'{cfg.vocab_size}.')
  setup = model_lib.make_setup(cfg)
  stop = (tok.eos_id,) if g['stop_at_eos'] else ()
  texts = []
  for i, prompt in enumerate(prompts):
    if len(prompts) > 1:
      out.write(f'{"" if i == 0 else chr(10)}=== prompt {i + 1}/{len(prompts)} ===\n')
    out.write(prompt)
    out.flush()
    stream, text = TextStream(tok), []
    for block in generate_stream(setup, params, [tok.encode(prompt)], max_new_tokens=max_new_tokens,
                                 stop_tokens=stop, pad_id=tok.pad_id,
                                 prefill_form=g['prefill_form'],
                                 block_size=g['block_size'], **knobs):
      text.append(stream.feed(block[0]))
      out.write(text[-1])
      out.flush()
    text.append(stream.flush())
    out.write(text[-1] + '\n')
    out.flush()
    texts.append(''.join(text))
  return texts
