r"""An lm-evaluation-harness model, `retnet_jax`, for any checkpoint this codebase writes or converts.

  python -m retnet_jax.lm_eval --model_args=workdir=DIR[,config=configs/retnet_tiny.py,batch_size=16,
      form=chunkwise,max_length=256,tokenizer=PATH] --tasks=hellaswag,piqa [--include_path=TASKDIR]
      [--num_fewshot=N] [--output_path=OUT] [any other lm-eval flag]

registers the model and runs lm-eval's own command line (`--model=retnet_jax` is added when absent).
From Python, `import retnet_jax.lm_eval` registers it for `lm_eval.simple_evaluate(model='retnet_jax')`.

Model arguments:
  workdir     a training workdir or a checkpoints / converted directory (checkpoint.load_params)
  config      the run's config file (path[:arg]); gives the tokenizer (config.data) and seq_len
  batch_size  rows per forward pass (default 16; `--batch_size=N` above 1 works too; model_args win)
  form        RetNet's retention form: 'chunkwise' (default), 'parallel' or 'recurrent'
  max_length  the training length: default config.seq_len, else <workdir>/config.json's (the
              experiment runners write one), else 2048 (what converted torchscale / fla models use)
  tokenizer   a tokenizer spec (byte, sentencepiece:PATH, hf:PATH) or a tokenizer.json / .model
              path, for checkpoints that record none
  step        a checkpoint step (default the latest)

The tokenizer, in this order: `tokenizer=`; the one a converted checkpoint records in its meta
(`convert` captures tokenizer.json); the config's (`data.get_tokenizer`, so a SentencePiece
model saved in the workdir); <workdir>/tokenizer.model; else UTF-8 bytes (ByteTokenizer).

How requests run:
  loglikelihood          context + continuation as one row; rows are sorted by length, batched,
                         right-padded to a power-of-two length bucket (generate.next_power_of_two,
                         as generation does; batches to a power of two rows) and scored in one
                         forward pass that returns log p of every target. `score` is jitted once per
                         (batch, length) bucket: `TRACES` counts its traces. Right padding needs no
                         masks: a causal model's padding comes after every scored position
                         (scoring.Scorer, also used by experiments/length_extrapolation). Rows
                         longer than max_length run in chunks of max_length with the RetNet state
                         carried (no truncation); the Transformer keeps the last max_length tokens
                         and logs how many rows it truncated.
  loglikelihood_rolling  RetNet: the whole document after the prefix token, chunked with the state
                         carried, no windows. Transformer: lm-eval's disjoint windows of max_length.
  generate_until         generate.generate_stream (prefill, then the jitted decode loop) in blocks of
                         32 tokens, batched by generation arguments; a batch stops when every row has
                         hit eos, one of the task's `until` strings or max_gen_toks, and each text is
                         cut at its first stop string. The Transformer's prompt keeps its last
                         max_length − max_gen_toks tokens.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
from typing import Sequence

from lm_eval import utils as lm_utils
from lm_eval.api import model as lm_model
from lm_eval.api import registry as lm_registry
import numpy as np
from tqdm import tqdm

from retnet_jax import checkpoint
from retnet_jax import config_lib
from retnet_jax import data as data_lib
from retnet_jax import generate
from retnet_jax import model as model_lib
from retnet_jax import scoring
from retnet_jax import tokenizer as tokenizer_lib

logger = logging.getLogger(__name__)
NAME = 'retnet_jax'
DEFAULT_MAX_LENGTH = 2048
GENERATE_BLOCK = 32


# ------------------------------------------------------------------------------------------------
# Tokenizers.


def load_tokenizer(workdir: str, meta: dict, config=None, spec: str | None = None):
  """The checkpoint's tokenizer, a `tokenizer` module one (see the module docstring for the order).

  spec: a tokenizer spec ('byte', 'sentencepiece:PATH', 'hf:PATH'; tokenizer.from_spec) or a bare
  path to a tokenizer.json or SentencePiece .model.
  """
  if spec:
    spec = str(spec)
    if ':' not in spec and spec != 'byte':
      spec = ('hf:' if spec.endswith('.json') else 'sentencepiece:') + spec
    return tokenizer_lib.from_spec(spec)
  info = meta.get('tokenizer')
  if info:
    return tokenizer_lib.from_checkpoint_meta(info)
  if config is not None:
    return data_lib.get_tokenizer(config.data, workdir)
  sp_model = os.path.join(workdir, 'tokenizer.model')
  if os.path.isfile(sp_model):
    return tokenizer_lib.SentencePieceTokenizer.load(sp_model)
  return tokenizer_lib.ByteTokenizer()


# ------------------------------------------------------------------------------------------------
# The lm-eval model.


def _max_length(workdir: str, config, value) -> int:
  if value is not None:
    return int(value)
  if config is not None:
    return int(config.seq_len)
  for path in (os.path.join(workdir, 'config.json'),
               os.path.join(os.path.dirname(os.path.abspath(workdir)), 'config.json')):
    if os.path.isfile(path):
      with open(path) as f:
        seq_len = json.load(f).get('seq_len')
      if seq_len:
        return int(seq_len)
  return DEFAULT_MAX_LENGTH


def _int_arg(name, value, default):
  if value is None or value == 'auto':
    return default
  try:
    value = int(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{name} must be an integer; got {value!r}.') from e
  if value < 1:
    raise ValueError(f'{name} must be positive; got {value}.')
  return value


@lm_registry.register_model(NAME)
class RetNetLM(lm_model.TemplateLM):
  """lm-eval's TemplateLM over a retnet_jax checkpoint (RetNet or the Transformer baseline)."""

  def __init__(self, workdir: str, config: str | None = None, batch_size=16, form: str | None = None,
               max_length=None, tokenizer: str | None = None, step=None, max_batch_size=None,
               device=None, **unused):
    super().__init__()
    del max_batch_size, device  # One process over jax's devices; no automatic batch sizing.
    if unused:
      logger.warning('retnet_jax ignores model_args %s.', sorted(unused))
    if not workdir:
      raise ValueError('model_args need workdir=DIR (a workdir or a checkpoint directory).')
    workdir = str(workdir)
    cfg_dict = config_lib.load(str(config)) if config else None
    self.params, self.model_config, meta = checkpoint.load_params(
        workdir, None if step is None else int(step))
    self.setup = model_lib.make_setup(self.model_config)
    self.tok = load_tokenizer(workdir, meta, cfg_dict, tokenizer)
    if self.tok.vocab_size > self.model_config.vocab_size:
      raise ValueError(f'the tokenizer has {self.tok.vocab_size} ids but the model only '
                       f'{self.model_config.vocab_size}; pass tokenizer=PATH.')
    self.batch_size = _int_arg('batch_size', batch_size, 16)
    self.max_length = _int_arg('max_length', _max_length(workdir, cfg_dict, max_length), 1)
    self.form = form or ('chunkwise' if self.model_config.form == 'parallel' else
                         self.model_config.form)
    self.scorer = scoring.Scorer(self.setup, self.params, form=self.form, chunk=self.max_length,
                         pad_id=self.tok.pad_id)
    # A state that does not grow with length (retention, windowed attention) carries a row longer
    # than max_length through; a growing one (a full KV cache) keeps the row's last tokens.
    self.carries = self.scorer.carries
    logger.info('retnet_jax: %s from %s (%s, form %s, max_length %d, batch %d, tokenizer %r).',
                self.model_config.kind, workdir, f'step {meta.get("step")}', self.form,
                self.max_length, self.batch_size, self.tok)

  @classmethod
  def create_from_arg_string(cls, arg_string, additional_config=None):
    return cls._create(lm_utils.simple_parse_args_string(arg_string), additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None):
    return cls._create(dict(arg_dict), additional_config)

  @classmethod
  def _create(cls, args: dict, additional_config: dict | None):
    """lm-eval's --batch_size etc. under model_args (so `model_args=batch_size=8` wins); its
    default of 1 (or 'auto') leaves this model's default of 16."""
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    if str(extra.get('batch_size', 1)) in ('1', 'auto'):
      extra.pop('batch_size', None)
    return cls(**{**extra, **args})

  # TemplateLM's interface.

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def tokenizer_name(self) -> str:
    return repr(self.tok)

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
    del add_special_tokens, kwargs  # The tokenizers here add no special tokens.
    return list(self.tok.encode(string))

  def tok_decode(self, tokens) -> str:
    return self.tok.decode(tokens)

  def _progress(self, total, desc, disable):
    return tqdm(total=total, desc=desc, disable=disable)

  def _scored_sums(self, rows, desc, disable_tqdm):
    """rows: (tokens, number of last targets to score). Returns [(sum log p, all greedy)]."""
    with self._progress(len(rows), desc, disable_tqdm) as bar:
      scored = self.scorer.token_logprobs([t for t, _ in rows], self.batch_size, progress=bar)
    return [(float(np.sum(logp[len(logp) - n:], dtype=np.float64)), bool(np.all(greedy[len(logp) - n:])))
            for (logp, greedy), (_, n) in zip(scored, rows)]

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    rows, truncated = [], 0
    for _, context_enc, continuation_enc in requests:
      tokens = list(context_enc) + list(continuation_enc)
      n = len(continuation_enc)
      if not self.carries and len(tokens) > self.max_length + 1:
        tokens, truncated = tokens[-(self.max_length + 1):], truncated + 1
        n = min(n, self.max_length)
      rows.append((tokens, n))
    if truncated:
      logger.warning('retnet_jax: kept the last %d tokens of %d of %d requests (left truncation: '
                     'the decoding state grows with length).', self.max_length + 1,
                     truncated, len(rows))
    results = self._scored_sums(rows, 'retnet_jax loglikelihood', disable_tqdm)
    for (pair, _, _), result in zip(requests, results):
      self.cache_hook.add_partial('loglikelihood', pair, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    rows, owner = [], []
    for index, request in enumerate(requests):
      tokens = self.tok_encode(request.args[0])
      if not tokens:
        rows.append(([self.prefix_token_id, self.prefix_token_id], 0))
        owner.append(index)
      elif self.carries:  # The whole document, state carried.
        rows.append(([self.prefix_token_id] + tokens, len(tokens)))
        owner.append(index)
      else:
        for context, predicted in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
            tokens, self.prefix_token_id, self.max_length, 1)):
          rows.append((list(context) + list(predicted), len(predicted)))
          owner.append(index)
    sums = [0.0] * len(requests)
    for index, (logp, _) in zip(owner, self._scored_sums(rows, 'retnet_jax rolling', disable_tqdm)):
      sums[index] += logp
    for request, value in zip(requests, sums):
      self.cache_hook.add_partial('loglikelihood_rolling', request.args, value)
    return sums

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    groups = collections.defaultdict(list)
    for index, request in enumerate(requests):
      context, gen_kwargs = request.args
      groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append((index, context))
    out = [''] * len(requests)
    with self._progress(len(requests), 'retnet_jax generate_until', disable_tqdm) as bar:
      for key, items in groups.items():
        gen_kwargs = json.loads(key)
        for b in range(0, len(items), self.batch_size):
          batch = items[b:b + self.batch_size]
          texts = self._generate([c for _, c in batch], gen_kwargs)
          for (index, context), text in zip(batch, texts):
            out[index] = text
            self.cache_hook.add_partial('generate_until', (context, gen_kwargs), text)
          bar.update(len(batch))
    return out

  def _generate(self, contexts: Sequence[str], gen_kwargs: dict) -> list[str]:
    gen_kwargs = dict(gen_kwargs)
    until = gen_kwargs.pop('until', None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(gen_kwargs.pop('max_gen_toks', 256))
    do_sample = bool(gen_kwargs.pop('do_sample', False))
    temperature = float(gen_kwargs.pop('temperature', 1.0 if do_sample else 0.0))
    temperature = temperature if do_sample or temperature > 0 else 0.0
    knobs = dict(temperature=temperature, top_k=int(gen_kwargs.pop('top_k', 0) or 0),
                 top_p=float(gen_kwargs.pop('top_p', 1.0) or 1.0),
                 seed=int(gen_kwargs.pop('seed', 0) or 0),
                 repetition_penalty=float(gen_kwargs.pop('repetition_penalty', 1.0) or 1.0),
                 frequency_penalty=float(gen_kwargs.pop('frequency_penalty', 0.0) or 0.0),
                 presence_penalty=float(gen_kwargs.pop('presence_penalty', 0.0) or 0.0))
    prompts = []
    for context in contexts:
      ids = self.tok_encode(context) or [self.prefix_token_id]
      if not self.carries:
        ids = ids[-max(1, self.max_length - max_new):]
      prompts.append(ids)
    produced, eos = [[] for _ in contexts], self.tok.eos_id
    texts = [''] * len(contexts)
    for block in generate.generate_stream(
        self.setup, self.params, prompts, max_new_tokens=max_new, stop_tokens=(self.tok.eos_id,),
        pad_id=self.tok.pad_id, prefill_form=self.form if self.carries else 'chunkwise',
        block_size=GENERATE_BLOCK, **knobs):
      for i, new in enumerate(block):
        produced[i].extend(new)
      # The text ends before eos: a tokenizer may spell eos out ('</s>').
      texts = [self.tok_decode(ids[:ids.index(eos)] if eos in ids else ids) for ids in produced]
      if until and all(any(u in t for u in until) or (ids and ids[-1] == self.tok.eos_id)
                       for t, ids in zip(texts, produced)):
        break
    cut = []
    for text in texts:
      for u in until:
        if u and u in text:
          text = text[:text.index(u)]
      cut.append(text)
    return cut


# ------------------------------------------------------------------------------------------------
# Command line.


def main(argv: Sequence[str] | None = None) -> None:
  """lm-eval's command line with `--model=retnet_jax` (unless another --model is given)."""
  from lm_eval._cli import HarnessCLI  # pylint: disable=g-import-not-at-top
  args = list(sys.argv[1:] if argv is None else argv)
  if not any(a in ('--model', '-M') or a.startswith('--model=') for a in args):
    args = ['--model', NAME] + args
  if args[0] not in ('run', 'ls', 'validate'):
    args = ['run'] + args
  lm_utils.setup_logging()
  logging.getLogger('absl').setLevel(logging.WARNING)
  saved = sys.argv
  sys.argv = ['lm-eval'] + args
  try:
    parser = HarnessCLI()
    parsed = parser.parse_args()
  finally:
    sys.argv = saved
  try:
    parser.execute(parsed)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  main()
