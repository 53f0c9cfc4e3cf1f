r"""RetNet against the Transformer at equal parameters and tokens: final validation loss against model
size (the paper's Figure 5 in shape, at CPU scale), over seeds.

  python -m experiments.scaling --quick --output_dir=/tmp/scaling_quick   # 3 small sizes, 3 seeds
  python -m experiments.scaling --output_dir=/tmp/scaling                  # ~1M, 4M, 12M, 3 seeds

Each size is retnet_tiny's shape (value dim 2·D, FFN 2·D, head dim 64 where D allows) at a width D
and depth L; its Transformer (configs/transformer_tiny.py) gets value dim D and the FFN width that
matches the RetNet's parameter count (transformer_tiny.matched_ffn_dim). Every run trains the same
steps × batch × seq_len tokens of the stdlib data. Runs go to `<workdir>/<kind>_<size>_seed<s>` and
resume / skip like every runner here (experiments/common.py); `--seeds` (default 0,1,2) picks the
seeds, `--sizes` a subset of the sizes.

Writes into --output_dir:
  table.md, results.csv  size, model, parameters, final eval loss mean ± std, bits/byte, RetNet −
                         Transformer at the same size (paired by seed) ± std
  results_seeds.csv      every seed's loss
  loss_vs_params.png     final eval loss against parameters (log), one line per model, ± std bars
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from experiments import common

CONFIGS = {'retnet': 'configs/retnet_tiny.py', 'transformer': 'configs/transformer_tiny.py'}
# size name -> (embed_dim D, num_layers L, num_heads H): about 1M, 4M and 12M RetNet parameters.
SIZES = {'1m': (128, 4, 2), '4m': (256, 4, 4), '12m': (384, 6, 6)}
QUICK_SIZES = {'q64': (64, 2, 1), 'q96': (96, 2, 1), 'q128': (128, 2, 2)}
# --quick: the configs' `quick` argument (8 × 128 tokens a step), then 150 steps per run.
QUICK = ('total_steps=150', 'eval_every=150', 'checkpoint_every=150', 'optim.warmup_steps=15')
DEFAULT_SEEDS = (0, 1, 2)
COLUMNS = (common.Column('size', 'size'), common.Column('model', 'model'),
           common.Column('params', 'parameters', '{:,}'),
           common.Column('loss_mean', 'final eval loss (nats)', '{:.4f}'),
           common.Column('loss_std', '± std', '{:.4f}'),
           common.Column('bpb_mean', 'bits/byte', '{:.4f}'),
           common.Column('delta_mean', 'RetNet − Transformer', '{:+.4f}'),
           common.Column('delta_std', '± std', '{:.4f}'),
           common.Column('seeds', 'seeds'))


def size_overrides(dims) -> tuple[str, ...]:
  D, L, H = dims
  return (f'model.embed_dim={D}', f'model.num_layers={L}', f'model.num_heads={H}',
          f'model.value_dim={2 * D}', f'model.ffn_dim={2 * D}')


def variants(sizes: dict, overrides: Sequence[str], quick: bool = False) -> list[common.Variant]:
  """Per size: the RetNet, and the Transformer matched to its parameter count."""
  configs = {k: common.config_with(v, 'quick' if quick else None) for k, v in CONFIGS.items()}
  out = []
  for size, dims in sizes.items():
    own = size_overrides(dims)
    retnet = common.Variant(f'retnet_{size}', configs['retnet'], own)
    matched = common.matched_transformer_overrides(common.build_config(retnet, overrides))
    out += [retnet, common.Variant(f'transformer_{size}', configs['transformer'], own + matched)]
  return out


def run(output_dir: str, *, quick: bool = False, steps: int | None = None,
        workdir: str | None = None, only: Sequence[str] | None = None,
        overrides: Sequence[str] = (), seeds=None, sizes: Sequence[str] | None = None) -> list[dict]:
  """Trains every (model, size, seed) (skipping finished runs); writes the table and plot."""
  table = QUICK_SIZES if quick else SIZES
  unknown = sorted(set(sizes or ()) - set(table))
  if unknown:
    raise ValueError(f'unknown sizes {unknown}; one of {sorted(table)}.')
  chosen = {k: v for k, v in table.items() if not sizes or k in sizes}
  overrides = ((QUICK if quick else ()) + ((f'total_steps={steps}',) if steps else ())
               + tuple(overrides))
  seeds = common.parse_seeds(seeds) or DEFAULT_SEEDS
  runs = common.runs_dir(output_dir, workdir)
  todo = variants(chosen, overrides, quick)
  names = [v.name for v in todo]
  results = common.run_variants(common.with_seeds(todo, seeds), runs, overrides=overrides,
                                only=common.seeded_names(only, names, seeds))
  grouped = common.by_seed(results, names, seeds)
  configs = {v.name: common.build_config(v, overrides) for v in todo}
  loss = {r['name']: r for r in common.seed_rows(grouped, lambda r: r['eval']['loss'])}
  bpb = {r['name']: r for r in common.seed_rows(grouped, lambda r: r['eval']['bits_per_byte'])}
  rows = []
  for name in grouped:
    kind, size = name.split('_', 1)
    row = {'size': size, 'model': kind, 'params': common.param_count(configs[name]),
           'loss_mean': loss[name]['mean'], 'loss_std': loss[name]['std'],
           'bpb_mean': bpb[name]['mean'], 'seeds': loss[name]['seeds'],
           'values': loss[name]['values'], 'delta_mean': None, 'delta_std': None}
    other = f'transformer_{size}'
    if kind == 'retnet' and other in grouped:
      paired = [v - float(grouped[other][s]['eval']['loss'])
                for s, v in loss[name]['values'].items() if s in grouped[other]]
      if paired:
        row['delta_mean'], row['delta_std'] = common.mean_std(paired)
    rows.append(row)
  base = configs[names[0]]
  notes = [f'{"--quick: " if quick else ""}every run {base.total_steps} steps of '
           f'{base.batch_size}×{base.seq_len} tokens ({base.total_steps * base.batch_size * base.seq_len:,}'
           f' tokens) of the stdlib; loss on the held-out split ({base.data.num_eval_batches} '
           f'batches at most); mean ± sample std over seeds {",".join(map(str, seeds))}; the '
           'difference is paired by seed. Sizes (D, layers, heads): '
           + ', '.join(f'{k} {v}' for k, v in chosen.items()) + '.']
  text = common.write_table(output_dir, rows, COLUMNS, title='RetNet vs Transformer scaling',
                            notes=notes)
  common.write_seed_csv(output_dir, list(loss.values()))
  plot(rows, os.path.join(output_dir, 'loss_vs_params.png'))
  logging.info('\n%s', text)
  common.check_finite(results)
  return rows


def plot(rows: Sequence[dict], path: str) -> str:
  fig, axes = common.new_figure(size=(6.5, 4.5))
  ax = axes[0, 0]
  for i, kind in enumerate(CONFIGS):
    points = sorted((r['params'], r['loss_mean'], r['loss_std'] or 0.0, list(r['values'].values()))
                    for r in rows if r['model'] == kind)
    if not points:
      continue
    params, mean, std, seeds = zip(*points)
    ax.errorbar(params, mean, yerr=std, fmt='o-', color=f'C{i}', capsize=4, label=kind)
    for x, values in zip(params, seeds):
      ax.plot([x] * len(values), values, '.', color=f'C{i}', alpha=0.5)
  ax.set(xscale='log', xlabel='parameters', ylabel='final eval loss (nats)',
         title='Loss against size at equal tokens (mean ± std over seeds)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
  return common.save_figure(fig, path)


def main() -> None:
  shared = common.define_flags()
  seeds = common.define_seeds_flag()
  sizes = flags.DEFINE_list('sizes', None, 'Sizes to train (default: all of --quick or the full).')
  app.run(lambda argv: common.main_from_flags(run, shared, seeds=seeds.value, sizes=sizes.value))


if __name__ == '__main__':
  main()
