r"""Long-context perplexity: RetNet and the Transformer trained at one length, evaluated far past it.

  python -m experiments.length_extrapolation --quick --output_dir=/tmp/length_quick  # < 10 min, 2 CPUs
  python -m experiments.length_extrapolation --output_dir=/tmp/length                # the tiny configs

Both models (configs/retnet_tiny.py and configs/transformer_tiny.py, parameter-matched) train at
seq_len 256 on the same data (the stdlib, same seed, same order) into `<workdir>/<model>`, resumable
like every runner here (experiments/common.py). Then the held-out documents of at least 16 × 256
tokens are scored from their start (after an eos, as documents follow one in training) to 16 × 256
tokens, with scoring.Scorer:
  retnet chunkwise  chunks of 256 tokens (the training length), the state carried between them
  retnet parallel   one pass over the whole length (the O(T²) form: the same numbers, a check)
  transformer       one pass over the whole length, rotary positions past the training length
Loss is the mean over documents of −log p per target position, bucketed by position. A causal model's
loss at position p does not depend on the tokens after it, so one pass at 16× gives the numbers of
each shorter evaluation length too: the table's "first L" columns are the mean loss of an evaluation
at length L = 1×, 2×, 4×, 8×, 16× the training length, the "L/2..L" columns that of its new positions.
`--seeds=0,1,2` trains each model once per seed and reports mean ± std over seeds.

Writes into --output_dir:
  table.md, results.csv  one row per model and form: loss (nats/token) over the first L positions
                         and over positions L/2..L, for each multiple L
  positions.csv          loss per 256-position bucket, per model and form (and seed)
  loss_vs_position.png   loss against position (log-spaced buckets), one line per model and form
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from experiments import common
from retnet_jax import checkpoint
from retnet_jax import data as data_lib
from retnet_jax import model as model_lib
from retnet_jax import scoring

MODELS = {'retnet': 'configs/retnet_tiny.py', 'transformer': 'configs/transformer_tiny.py'}
FORMS = {'retnet': ('chunkwise', 'parallel'), 'transformer': ('parallel',)}
MULTIPLES = (1, 2, 4, 8, 16)
TRAIN_LEN = 256
# --quick: the configs' `quick` argument (2 layers of width 128), still trained at 256, 300 steps.
QUICK = ('seq_len=256', 'total_steps=300', 'eval_every=300', 'checkpoint_every=300')
NUM_DOCS, QUICK_NUM_DOCS = 16, 4


def variants(seeds, overrides: Sequence[str] = (), quick: bool = False) -> list[common.Variant]:
  """RetNet, and the Transformer matched to its parameter count after `overrides`."""
  models = {k: common.config_with(v, 'quick' if quick else None) for k, v in MODELS.items()}
  retnet = common.build_config(common.Variant('retnet', models['retnet']), overrides)
  return common.with_seeds([
      common.Variant('retnet', models['retnet']),
      common.Variant('transformer', models['transformer'],
                     common.matched_transformer_overrides(retnet))], seeds)


def long_documents(config, num_docs: int, length: int) -> list[list[int]]:
  """The first `num_docs` held-out documents with at least `length` tokens, as [eos] + their
  first `length` tokens."""
  tok = data_lib.get_tokenizer(config.data)
  docs = []
  for text in data_lib.load_texts(config.data, 'validation'):
    ids = tok.encode(text)
    if len(ids) >= length:
      docs.append([tok.eos_id] + list(ids[:length]))
    if len(docs) == num_docs:
      break
  if not docs:
    raise ValueError(f'no held-out document has {length} tokens.')
  return docs


def position_losses(run_dir: str, docs, form: str, chunk: int | None, pad_id: int,
                    batch_size: int) -> np.ndarray:
  """−log p per target position, mean over documents [length] (float64)."""
  params, cfg, _ = checkpoint.load_params(run_dir)
  scorer = scoring.Scorer(model_lib.make_setup(cfg), params, form=form, chunk=chunk, pad_id=pad_id)
  out = scorer.token_logprobs(docs, batch_size)
  return -np.mean(np.stack([logp.astype(np.float64) for logp, _ in out]), axis=0)


def evaluate(run_dir: str, model: str, config, docs, train_len: int) -> dict[str, list[float]]:
  """{form: per-position loss}, cached in <run_dir>/length_eval.json (keyed by the documents)."""
  path = os.path.join(run_dir, 'length_eval.json')
  key = f'{len(docs)}x{len(docs[0])}:{sum(sum(d) for d in docs)}'
  cached = {}
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached.get('key') != key:
      cached = {}
  tok = data_lib.get_tokenizer(config.data)
  for form in FORMS[model]:
    if form in cached.get('forms', {}):
      continue
    chunk = train_len if form == 'chunkwise' else None
    logging.info('scoring %s (%s) on %d documents of %d tokens', run_dir, form, len(docs),
                 len(docs[0]) - 1)
    losses = position_losses(run_dir, docs, form, chunk, tok.pad_id,
                             batch_size=4 if chunk else 1)
    cached = {'key': key, 'forms': {**cached.get('forms', {}), form: losses.tolist()}}
    with open(path, 'w') as f:
      json.dump(cached, f)
  return cached['forms']


def summarize(losses: np.ndarray, train_len: int) -> dict:
  out = {}
  for m in MULTIPLES:
    end = m * train_len
    if end <= len(losses):
      out[f'first_{m}x'] = float(losses[:end].mean())
      out[f'new_{m}x'] = float(losses[end // 2 if m > 1 else 0:end].mean())
  return out


COLUMNS = ((common.Column('model', 'model'), common.Column('form', 'form'))
           + tuple(common.Column(f'first_{m}x', f'first {m}×', '{:.4f}') for m in MULTIPLES)
           + tuple(common.Column(f'new_{m}x', f'{m // 2 if m > 1 else 0}–{m}×', '{:.4f}')
                   for m in MULTIPLES)
           + (common.Column('seeds', 'seeds'),))


def run(output_dir: str, *, quick: bool = False, steps: int | None = None,
        workdir: str | None = None, only: Sequence[str] | None = None,
        overrides: Sequence[str] = (), seeds=None, num_docs: int | None = None,
        max_multiple: int = 16) -> list[dict]:
  """Trains both models (skipping finished runs), scores the long documents, writes table and plot."""
  overrides = ((QUICK if quick else ()) + ((f'total_steps={steps}',) if steps else ())
               + tuple(overrides))
  seeds = common.parse_seeds(seeds)
  runs = common.runs_dir(output_dir, workdir)
  todo = variants(seeds, overrides, quick)
  results = common.run_variants(todo, runs, overrides=overrides,
                                only=common.seeded_names(only, list(MODELS), seeds))
  config = common.build_config(todo[0], overrides)
  train_len = int(config.seq_len)
  length = max_multiple * train_len
  docs = long_documents(config, num_docs or (QUICK_NUM_DOCS if quick else NUM_DOCS), length)
  curves = {}  # (model, form) -> [per-position loss per seed]
  for v in todo:
    if v.name not in results:
      continue
    model = next(m for m in MODELS if v.name == m or v.name.startswith(m + '_seed'))
    for form, losses in evaluate(os.path.join(runs, v.name), model, config, docs,
                                 train_len).items():
      curves.setdefault((model, form), []).append(np.asarray(losses))
  rows, positions = [], []
  for (model, form), per_seed in curves.items():
    summaries = [summarize(c, train_len) for c in per_seed]
    row = {'model': model, 'form': form, 'seeds': len(per_seed)}
    for k in summaries[0]:
      mean, std = common.mean_std([s[k] for s in summaries])
      row[k], row[k + '_std'] = mean, std
    rows.append(row)
    for i, c in enumerate(per_seed):
      buckets = c[:len(c) // train_len * train_len].reshape(-1, train_len).mean(1)
      positions += [{'model': model, 'form': form, 'run': i, 'start': b * train_len,
                     'end': (b + 1) * train_len, 'loss': float(x)} for b, x in enumerate(buckets)]
  cols = [c for c in COLUMNS if c.key in ('model', 'form', 'seeds') or c.key in rows[0]]
  notes = [f'{"--quick: " if quick else ""}{config.model.num_layers} layers, width '
           f'{config.model.embed_dim}, trained {config.total_steps} steps of '
           f'{config.batch_size}×{train_len} tokens (stdlib); {len(docs)} held-out documents '
           f'scored to {length} tokens ({max_multiple}× the training length). Loss in nats per '
           'token: "first L×" is the mean over positions [0, L·256), "a–b×" over [a·256, b·256). '
           'retnet chunkwise carries the state across chunks of 256; parallel is one pass. '
           + ('Mean over seeds (std in results.csv).' if seeds else '')]
  text = common.write_table(output_dir, rows, cols, title='Length extrapolation', notes=notes)
  with open(os.path.join(output_dir, 'positions.csv'), 'w') as f:
    f.write('model,form,run,start,end,loss\n')
    f.writelines(f"{p['model']},{p['form']},{p['run']},{p['start']},{p['end']},{p['loss']}\n"
                 for p in positions)
  plot(curves, train_len, os.path.join(output_dir, 'loss_vs_position.png'))
  logging.info('\n%s', text)
  return rows


def plot(curves: dict, train_len: int, path: str) -> str:
  """Loss against position: 32 log-spaced buckets from 16 to the end, mean over seeds (band: std)."""
  fig, axes = common.new_figure(size=(7.5, 4.5))
  ax = axes[0, 0]
  for i, ((model, form), per_seed) in enumerate(curves.items()):
    n = len(per_seed[0])
    edges = np.unique(np.geomspace(16, n, 33).astype(int))
    edges = np.concatenate([[0], edges])
    values = np.asarray([[c[a:b].mean() for a, b in zip(edges[:-1], edges[1:])] for c in per_seed])
    centers = np.sqrt(np.maximum(edges[:-1], 1) * edges[1:])
    mean = values.mean(0)
    style = '-' if form != 'parallel' or model == 'transformer' else '--'
    ax.plot(centers, mean, style, color=f'C{i}', label=f'{model} {form}'
            + (f' ({len(per_seed)} seeds)' if len(per_seed) > 1 else ''))
    if len(per_seed) > 1:
      std = values.std(0, ddof=1)
      ax.fill_between(centers, mean - std, mean + std, color=f'C{i}', alpha=0.2)
  ax.axvline(train_len, color='gray', linestyle=':', label=f'training length {train_len}')
  ax.set(xscale='log', xlabel='position (tokens)', ylabel='loss (nats/token)',
         title='Loss against position, trained at 256')
  ax.set_xscale('log', base=2)
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
  return common.save_figure(fig, path)


def main() -> None:
  shared = common.define_flags()
  seeds = common.define_seeds_flag()
  num_docs = flags.DEFINE_integer('num_docs', None, 'Held-out documents to score (default by --quick).')
  app.run(lambda argv: common.main_from_flags(run, shared, seeds=seeds.value,
                                              num_docs=num_docs.value))


if __name__ == '__main__':
  main()
