"""Synthetic long-context recall: passkey retrieval and multi-query associative recall in filler text.

  ex = passkey(seed=3, length=512, depth=0.25)      # ex.text: exactly 512 characters (= byte tokens)
  ex = associative_recall(seed=3, length=512, num_pairs=4)

Every example is plain ASCII text, so with the byte tokenizer its length in tokens is exact; it is a
pure function of its arguments (np.random.default_rng(seed)).

passkey      filler sentences with one needle " The pass key is:48213." at character
             round(depth · F) of the F filler characters (depth 0: the start of the context, 1: just
             before the question), then the question " The pass key is:" (the needle's words again)
             and the answer "48213" and ".". The digits occur nowhere else in the text.
associative  `num_pairs` key-value pairs " K37." (K an upper-case letter absent from the filler,
recall       a two-digit value) spread over the whole filler (pair i at a random depth inside
             [i/n, (i+1)/n)), then " Recall." and every key queried once in a random order,
             " K37.", each value an answer.
The token before each answer (':' of the passkey, the key letter) occurs once before it, in its
needle: one induction step (find the earlier copy, read what follows) answers, as in Zoology's MQAR.

`Example.spans` are the answers' character ranges; `Example.depths` their needles' depths.

The data source `recall` (data.py) trains on a mix: with probability `recall_fraction` a row is a
synthetic example of exactly seq_len + 1 tokens (a task of `recall_tasks` chosen at random, a depth
drawn uniformly), scored on every token (the repeated filler teaches copying, the answers
recall), or with recall_loss='answers' on its answer tokens only; otherwise it is a row of the
stdlib text (as source='stdlib' cuts it). Row i is drawn from np.random.default_rng((seed, split,
i)).
"""

from __future__ import annotations

import dataclasses

import numpy as np

FILLER = ('The grass is green. The sky is blue. The sun is yellow. Here we go. '
          'There and back again. ')
PASSKEY_QUESTION = ' The pass key is:'
RECALL_HEADER = ' Recall.'
# Keys: upper-case letters in none of the fixed texts, so that a key occurs only in its pair.
KEYS = ''.join(c for c in 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'
               if c not in FILLER + PASSKEY_QUESTION + RECALL_HEADER)
TASKS = ('passkey', 'associative')
DATA_DEFAULTS = dict(recall_fraction=0.75, recall_tasks='passkey,associative',
                     recall_num_pairs=4, recall_passkey_digits=5, recall_loss='all')
RECALL_LOSSES = ('all', 'answers')
_EVAL_SEED = 0  # The held-out rows do not depend on the run's seed, so runs compare.


@dataclasses.dataclass(frozen=True)
class Example:
  """text; spans: the answers' [start, end) character ranges; depths: each needle's depth in [0, 1];
  needles: each needle's start character."""
  text: str
  spans: tuple[tuple[int, int], ...]
  depths: tuple[float, ...]
  needles: tuple[int, ...]

  def prompt(self, i: int = 0) -> str:
    """The text before answer i (what a generate_until request sends)."""
    return self.text[:self.spans[i][0]]

  def answer(self, i: int = 0) -> str:
    return self.text[slice(*self.spans[i])]


def filler(rng: np.random.Generator, n: int) -> str:
  """n characters of the repeated filler sentences, starting at a random offset."""
  start = int(rng.integers(len(FILLER)))
  reps = -(-(start + n) // len(FILLER))
  return (FILLER * reps)[start:start + n]


def passkey(seed, length: int, depth: float, digits: int = 5) -> Example:
  """A passkey example of exactly `length` characters with its needle at `depth` (see module doc)."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f'depth must be in [0, 1]; got {depth}.')
  if digits < 1:
    raise ValueError(f'digits must be >= 1; got {digits}.')
  rng = np.random.default_rng(seed)
  key = str(int(rng.integers(1, 10))) + ''.join(str(d) for d in rng.integers(0, 10, digits - 1))
  needle = f' The pass key is:{key}.'
  fixed = len(needle) + len(PASSKEY_QUESTION) + digits + 1
  if length < fixed:
    raise ValueError(f'a passkey example of {digits} digits needs length >= {fixed}; got {length}.')
  hay = filler(rng, length - fixed)
  at = int(round(depth * len(hay)))
  text = hay[:at] + needle + hay[at:] + PASSKEY_QUESTION + key + '.'
  start = len(text) - digits - 1
  return Example(text, ((start, start + digits),), (depth,), (at,))


def associative_recall(seed, length: int, num_pairs: int = 4) -> Example:
  """Associative recall of exactly `length` characters: `num_pairs` pairs spread over the filler,
  all queried at the end (see the module docstring)."""
  if not 1 <= num_pairs <= len(KEYS):
    raise ValueError(f'num_pairs must be in [1, {len(KEYS)}]; got {num_pairs}.')
  rng = np.random.default_rng(seed)
  keys = [KEYS[i] for i in rng.permutation(len(KEYS))[:num_pairs]]
  values = [f'{v:02d}' for v in rng.integers(0, 100, num_pairs)]
  pairs = [f' {k}{v}.' for k, v in zip(keys, values)]
  queries = rng.permutation(num_pairs)
  fixed = 2 * sum(map(len, pairs)) + len(RECALL_HEADER)
  if length < fixed:
    raise ValueError(f'associative recall with {num_pairs} pairs needs length >= {fixed}; '
                     f'got {length}.')
  hay = filler(rng, length - fixed)
  depths = (np.arange(num_pairs) + rng.random(num_pairs)) / num_pairs
  cuts = np.round(depths * len(hay)).astype(int)
  parts, needles, prev, pos = [], [], 0, 0
  for cut, pair in zip(cuts, pairs):
    parts += [hay[prev:cut], pair]
    pos += cut - prev
    needles.append(pos)
    pos += len(pair)
    prev = cut
  text = ''.join(parts) + hay[prev:] + RECALL_HEADER
  spans = []
  for q in queries:
    spans.append((len(text) + 2, len(text) + 4))  # ' K' then the two digits.
    text += pairs[q]
  return Example(text, tuple(spans), tuple(float(depths[q]) for q in queries),
                 tuple(needles[q] for q in queries))


def make(task: str, seed, length: int, depth: float | None = None, *, num_pairs: int = 4,
         digits: int = 5) -> Example:
  """An example of `task` ('passkey' needs `depth`; 'associative' spreads its pairs)."""
  if task == 'passkey':
    return passkey(seed, length, 0.5 if depth is None else depth, digits)
  if task == 'associative':
    return associative_recall(seed, length, num_pairs)
  raise ValueError(f'unknown recall task {task!r}; one of {TASKS}.')


def encode(example: Example, tokenizer) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """(token ids [N] int32, the answers' [start, end) token ranges): the text is encoded piece by
  piece around the answers, so the ranges are exact for any tokenizer."""
  cuts = sorted({0, len(example.text), *(i for s in example.spans for i in s)})
  pieces = [np.asarray(tokenizer.encode(example.text[a:b]), np.int32)
            for a, b in zip(cuts[:-1], cuts[1:])]
  starts = dict(zip(cuts, np.cumsum([0] + [len(p) for p in pieces]).tolist()))
  return np.concatenate(pieces), [(starts[a], starts[b]) for a, b in example.spans]


# ------------------------------------------------------------------------------------------------
# The `recall` data source: stdlib text mixed with synthetic examples at the training length.


def validate(cfg: dict) -> None:
  tasks = parse_tasks(cfg['recall_tasks'])
  if not 0.0 <= float(cfg['recall_fraction']) <= 1.0:
    raise ValueError(f"recall_fraction must be in [0, 1]; got {cfg['recall_fraction']!r}.")
  if cfg['recall_loss'] not in RECALL_LOSSES:
    raise ValueError(f"recall_loss must be one of {RECALL_LOSSES}; got {cfg['recall_loss']!r}.")
  for key in ('recall_num_pairs', 'recall_passkey_digits'):
    if not isinstance(cfg[key], int) or cfg[key] < 1:
      raise ValueError(f'{key} must be an int >= 1; got {cfg[key]!r}.')
  del tasks


def parse_tasks(tasks) -> tuple[str, ...]:
  out = tuple(t.strip() for t in (tasks.split(',') if isinstance(tasks, str) else tasks)
              if t.strip())
  bad = [t for t in out if t not in TASKS]
  if bad or not out:
    raise ValueError(f'recall_tasks must name some of {TASKS}; got {tasks!r}.')
  return out


class MixedRows:
  """Row index -> example dict (data.py's layout): a synthetic recall row with probability
  `fraction`, else a random row of `text_rows`. Module-level, so that grain can pickle it."""

  def __init__(self, text_rows, tokenizer, seq_len: int, cfg: dict, seed: int, split: int):
    self.text_rows, self.tokenizer, self.seq_len = text_rows, tokenizer, seq_len
    self.fraction, self.tasks = float(cfg['recall_fraction']), parse_tasks(cfg['recall_tasks'])
    self.num_pairs, self.digits = cfg['recall_num_pairs'], cfg['recall_passkey_digits']
    self.answers_only = cfg['recall_loss'] == 'answers'
    self.seed, self.split = seed, split

  def __call__(self, index) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((self.seed, self.split, int(index)))
    if rng.random() >= self.fraction:
      return self.text_rows(int(rng.integers(self.text_rows.num_rows)))
    task = self.tasks[int(rng.integers(len(self.tasks)))]
    ex = make(task, rng.integers(2**63), self.seq_len + 1, float(rng.random()),
              num_pairs=self.num_pairs, digits=self.digits)
    tokens, spans = encode(ex, self.tokenizer)
    row = np.full(self.seq_len + 1, self.tokenizer.pad_id, np.int32)
    n = min(len(tokens), self.seq_len + 1)
    row[:n] = tokens[:n]
    position = np.arange(self.seq_len)
    loss_mask = (position < n - 1).astype(np.float32)
    if self.answers_only:  # Position p predicts token p + 1: an answer [a, b) is targets a−1..b−2.
      answer = np.zeros(self.seq_len, bool)
      for a, b in spans:
        answer[max(a - 1, 0):b - 1] = True
      loss_mask *= answer
    return dict(inputs=row[:-1], targets=row[1:], segment_ids=(position < n).astype(np.int32),
                loss_mask=loss_mask)


def mixed_rows(cfg: dict, tokenizer, seq_len: int, seed: int, text_rows_fn):
  """(train rows, eval rows) of the `recall` source; text_rows_fn(split) gives the text rows."""
  validate(cfg)
  for task in parse_tasks(cfg['recall_tasks']):  # A training length too short: one clear error.
    try:
      make(task, 0, seq_len + 1, num_pairs=cfg['recall_num_pairs'],
           digits=cfg['recall_passkey_digits'])
    except ValueError as e:
      raise ValueError(f'seq_len={seq_len} is too short for recall_tasks={task!r}: {e}') from e
  return (MixedRows(text_rows_fn('train'), tokenizer, seq_len, cfg, seed, 0),
          MixedRows(text_rows_fn('validation'), tokenizer, seq_len, cfg, _EVAL_SEED, 1))
