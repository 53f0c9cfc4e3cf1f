"""Documents of the recall tasks, generated from a seed (retnet_jax/recall.py), nothing downloaded.

Settings through lm-eval's `--metadata` JSON (each optional):
  lengths      context lengths in characters (= tokens for byte-level models), default [256, 512,
               1024, 2048, 4096]
  depths       passkey needle depths, default [0, 0.25, 0.5, 0.75, 1]
  num_examples examples per (length, depth) for the passkey, per length for associative recall
               (default 10)
  seed         default 0
  digits       passkey digits (default 5); num_pairs: associative key-value pairs (default 4)
"""

import datasets

from retnet_jax import recall

DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096)


def _list(value, cast):
  if isinstance(value, str):
    value = value.split(',')
  return [cast(v) for v in value]


def _settings(kwargs):
  return dict(lengths=_list(kwargs.get('lengths', DEFAULT_LENGTHS), int),
              depths=_list(kwargs.get('depths', (0.0, 0.25, 0.5, 0.75, 1.0)), float),
              n=int(kwargs.get('num_examples', 10)), seed=int(kwargs.get('seed', 0)),
              digits=int(kwargs.get('digits', 5)), num_pairs=int(kwargs.get('num_pairs', 4)))


def _dataset(rows):
  return {'test': datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


def passkey(**kwargs):
  """One document per (length, depth, example): prompt, answer (the digits), length, depth."""
  s = _settings(kwargs)
  rows = []
  for length in s['lengths']:
    for d, depth in enumerate(s['depths']):
      for j in range(s['n']):
        ex = recall.passkey((s['seed'], length, d, j), length, depth, s['digits'])
        rows.append(dict(prompt=ex.prompt(), answer=ex.answer(), length=length, depth=depth))
  return _dataset(rows)


def associative(**kwargs):
  """One document per (length, example), asking for the last queried key's value (the prompt
  holds the earlier queries with their answers)."""
  s = _settings(kwargs)
  rows = []
  for length in s['lengths']:
    for j in range(s['n']):
      ex = recall.associative_recall((s['seed'], length, j), length, s['num_pairs'])
      last = len(ex.spans) - 1
      rows.append(dict(prompt=ex.prompt(last), answer=ex.answer(last), length=length,
                       depth=ex.depths[last]))
  return _dataset(rows)
