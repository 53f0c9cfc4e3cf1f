r"""Multi-query associative recall: RetNet against the Transformer, accuracy against the number of
key-value pairs and the model width (the Zoology setting, shrunk to CPU scale).

  python -m experiments.mqar --quick --output_dir=/tmp/mqar_quick  # 6 runs, 3-4 min
  python -m experiments.mqar --output_dir=/tmp/mqar                 # kv 4,8,16,32 × width 64,128

Each point is `configs/mqar.py:kind=<kind>,kv=<pairs>,width=<width>`, trained into
`<workdir>/<kind>_w<width>_kv<pairs>`; runs resume / skip like every runner here
(experiments/common.py). Accuracy is the eval 'accuracy': the share of queried keys whose value the
model predicts (argmax), on a fixed held-out set of MQAR rows.

`--seeds=0,1,2` trains every point once per seed (`<workdir>/<point>_seed<s>`): the table then has
the mean ± std accuracy per point and RetNet's difference to the Transformer at the same width and
kv pairs (paired by seed) ± std; results_seeds.csv holds every seed; the plot draws ± std bars.

Writes into --output_dir:
  table.md, results.csv  one row per run (model, width, kv pairs, accuracy, eval loss, steps);
                         table.md also has accuracy as a grid (a row per model and width, a
                         column per number of pairs)
  accuracy_vs_kv.png     accuracy against kv pairs, one panel per width, one line per model
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from experiments import common

CONFIG = 'configs/mqar.py'
KINDS = ('retnet', 'transformer')
KV_PAIRS = (4, 8, 16, 32)
WIDTHS = (64, 128)
# --quick: 3 × 1 × 2 = 6 runs of the config's `quick` argument (300 steps at seq_len 64; kv ≤ 16).
QUICK_KV_PAIRS = (4, 8, 16)
QUICK_WIDTHS = (64,)
COLUMNS = (common.Column('model', 'model'), common.Column('width', 'width'),
           common.Column('kv_pairs', 'kv pairs'),
           common.Column('accuracy', 'accuracy', '{:.3f}'),
           common.Column('eval_loss', 'eval loss', '{:.4f}'), common.Column('steps', 'steps'))


def run_name(kind: str, width: int, kv: int) -> str:
  return f'{kind}_w{width}_kv{kv}'


def run(output_dir: str, *, quick: bool = False, steps: int | None = None,
        workdir: str | None = None, only: Sequence[str] | None = None,
        overrides: Sequence[str] = (), kv_pairs: Sequence[int] | None = None,
        widths: Sequence[int] | None = None, kinds: Sequence[str] = KINDS,
        config: str = CONFIG, seeds=None) -> list[dict]:
  """Trains every (kind, width, kv) point (skipping finished runs); writes table and plot."""
  kv_pairs = [int(k) for k in (kv_pairs or (QUICK_KV_PAIRS if quick else KV_PAIRS))]
  widths = [int(w) for w in (widths or (QUICK_WIDTHS if quick else WIDTHS))]
  overrides = ((f'total_steps={steps}',) if steps else ()) + tuple(overrides)
  config = common.config_with(config, 'quick' if quick else None)
  runs = common.runs_dir(output_dir, workdir)
  points = {run_name(k, w, n): (k, w, n) for w in widths for n in kv_pairs for k in kinds}
  variants = [common.Variant(name, common.config_with(config, f'kind={k},kv={n},width={w}'))
              for name, (k, w, n) in points.items()]
  seeds = common.parse_seeds(seeds)
  if seeds:
    return run_seeds(output_dir, variants, points, runs, seeds, kv_pairs,
                     overrides=overrides, only=only, config=config)
  results = common.run_variants(variants, runs, overrides=overrides, only=only)
  rows = [{'model': points[name][0], 'width': points[name][1], 'kv_pairs': points[name][2],
           'accuracy': r['eval']['accuracy'], 'eval_loss': r['eval']['loss'], 'steps': r['steps']}
          for name, r in results.items()]
  base = common.build_config(variants[0], overrides)
  notes = [f'`{config}`: {base.model.num_layers} layers, '
           f'{base.model.num_heads} heads, seq_len {base.seq_len}, vocab '
           f'{base.data.mqar_vocab_size}, {base.total_steps} steps of batch {base.batch_size}; '
           f'accuracy over the queried values of {base.data.num_eval_batches * base.batch_size} '
           'held-out rows.']
  text = common.write_table(output_dir, rows, COLUMNS, title='MQAR accuracy', notes=notes,
                            extra_markdown=grid(rows, kv_pairs))
  plot_accuracy(rows, os.path.join(output_dir, 'accuracy_vs_kv.png'))
  logging.info('\n%s', text)
  common.check_finite(results, key='accuracy')
  return rows


SEED_COLUMNS = (common.Column('model', 'model'), common.Column('width', 'width'),
                common.Column('kv_pairs', 'kv pairs'),
                common.Column('accuracy', 'accuracy', '{:.3f}'),
                common.Column('accuracy_std', '± std', '{:.3f}'),
                common.Column('delta_vs_transformer', 'Δ vs Transformer', '{:+.3f}'),
                common.Column('delta_std', '± std', '{:.3f}'),
                common.Column('eval_loss', 'eval loss', '{:.4f}'), common.Column('seeds', 'seeds'))


def run_seeds(output_dir, variants, points, runs, seeds, kv_pairs, *, overrides, only,
              config) -> list[dict]:
  """`run` with --seeds: mean ± std accuracy per point, RetNet − Transformer paired by seed."""
  names = [v.name for v in variants]
  results = common.run_variants(common.with_seeds(variants, seeds), runs, overrides=overrides,
                                only=common.seeded_names(only, names, seeds))
  grouped = common.by_seed(results, names, seeds)
  acc = {r['name']: r for r in common.seed_rows(grouped, lambda r: r['eval']['accuracy'])}
  loss = {r['name']: r for r in common.seed_rows(grouped, lambda r: r['eval']['loss'])}
  rows = []
  for name in grouped:
    kind, width, kv = points[name]
    row = {'model': kind, 'width': width, 'kv_pairs': kv, 'accuracy': acc[name]['mean'],
           'accuracy_std': acc[name]['std'], 'eval_loss': loss[name]['mean'],
           'seeds': acc[name]['seeds'], 'delta_vs_transformer': None, 'delta_std': None,
           'values': acc[name]['values']}
    other = run_name('transformer', width, kv)
    if kind != 'transformer' and other in grouped:
      paired = [v - float(grouped[other][s]['eval']['accuracy'])
                for s, v in acc[name]['values'].items() if s in grouped[other]]
      if paired:
        row['delta_vs_transformer'], row['delta_std'] = common.mean_std(paired)
    rows.append(row)
  base = common.build_config(variants[0], overrides)
  notes = [f'`{config}`: {base.model.num_layers} layers, '
           f'{base.model.num_heads} heads, seq_len {base.seq_len}, vocab '
           f'{base.data.mqar_vocab_size}, {base.total_steps} steps of batch {base.batch_size}; '
           f'accuracy over the queried values of {base.data.num_eval_batches * base.batch_size} '
           f'held-out rows; mean ± sample std over seeds {",".join(map(str, seeds))}.']
  text = common.write_table(output_dir, rows, SEED_COLUMNS, title='MQAR accuracy, over seeds',
                            notes=notes, extra_markdown=grid(rows, kv_pairs))
  common.write_seed_csv(output_dir, list(acc.values()))
  plot_accuracy(rows, os.path.join(output_dir, 'accuracy_vs_kv.png'))
  logging.info('\n%s', text)
  common.check_finite(results, key='accuracy')
  return rows


def grid(rows: Sequence[dict], kv_pairs: Sequence[int]) -> str:
  """Markdown: accuracy with a row per (model, width) and a column per number of kv pairs."""
  cells = {(r['model'], r['width'], r['kv_pairs']):
           common.fmt_mean_std(r['accuracy'], r.get('accuracy_std'), '{:.3f}') for r in rows}
  keys = sorted({(r['model'], r['width']) for r in rows}, key=lambda mw: (mw[1], mw[0]))
  lines = ['### Accuracy by number of key-value pairs', '',
           '| model | width | ' + ' | '.join(f'kv {n}' for n in kv_pairs) + ' |',
           '|---|---:|' + '---:|' * len(kv_pairs)]
  for model, width in keys:
    values = [cells.get((model, width, n)) for n in kv_pairs]
    lines.append(f'| {model} | {width} | ' + ' | '.join(
        '–' if v is None else v for v in values) + ' |')
  return '\n'.join(lines) + '\n'


def plot_accuracy(rows: Sequence[dict], path: str) -> str:
  """Accuracy against kv pairs (log2 axis), one panel per width, one line per model."""
  widths = sorted({r['width'] for r in rows}) or [0]
  fig, axes = common.new_figure(ncols=len(widths), size=(4.8, 3.8))
  for ax, width in zip(axes[0], widths):
    for i, kind in enumerate(KINDS):
      points = sorted((r['kv_pairs'], r['accuracy'], r.get('accuracy_std') or 0.0,
                       list(r.get('values', {}).values())) for r in rows
                      if r['width'] == width and r['model'] == kind)
      if points:
        kv, mean, std, seeds = zip(*points)
        ax.errorbar(kv, mean, yerr=std, fmt='o-', color=f'C{i}', capsize=4, label=kind)
        for x, values in zip(kv, seeds):
          ax.plot([x] * len(values), values, '.', color=f'C{i}', alpha=0.5)
    ax.set(xlabel='key-value pairs', xscale='log', ylim=(-0.02, 1.02), title=f'width {width}')
    ax.set_xscale('log', base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
  axes[0, 0].set_ylabel('accuracy')
  fig.suptitle('MQAR accuracy')
  return common.save_figure(fig, path)


def main() -> None:
  shared = common.define_flags()
  kv_pairs = flags.DEFINE_list('kv_pairs', None, 'Numbers of key-value pairs (default by --quick).')
  widths = flags.DEFINE_list('widths', None, 'Model widths (default by --quick).')
  kinds = flags.DEFINE_list('kinds', list(KINDS), 'Models to compare.')
  seeds = common.define_seeds_flag()
  app.run(lambda argv: common.main_from_flags(run, shared, kv_pairs=kv_pairs.value,
                                              widths=widths.value, kinds=kinds.value,
                                              seeds=seeds.value))


if __name__ == '__main__':
  main()
