r"""The paper's Table 6 ablations, retrained at tiny scale, next to the paper's numbers.

  python -m experiments.table6 --quick --output_dir=/tmp/table6_quick   # 4-9 min, 2 CPUs
  python -m experiments.table6 --output_dir=/tmp/table6                 # the full tiny config

Variants are `configs/retnet_tiny.py:ablation=<name>` (the config's ABLATIONS): the full RetNet,
− swish gate, − GroupNorm, − γ decay (γ = 1), − multi-scale decay (one γ for all heads), and a
smaller head dimension (twice the heads). Runs go to `<workdir>/<name>` and resume / skip like every
runner here (experiments/common.py).

`--seeds=0,1,2` trains every ablation once per seed (`<workdir>/<name>_seed<s>`): the table then
has each variant's mean ± std loss, its difference to RetNet (paired by seed) ± std, our rank of the
means, and the Spearman correlation with the paper's ranking for every seed and as mean ± std;
results_seeds.csv holds every seed's loss; the plots show the spread.

Writes into --output_dir:
  table.md, results.csv  variant, eval loss, bits/byte, Δ vs RetNet, our rank, the paper's
                         perplexity and rank (Table 6, in-domain; 1.3B-scale models)
  loss_curves.png        train (lines) and eval (dots) loss per variant
  ranking.png            our eval loss against the paper's perplexity
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from experiments import common

CONFIG = 'configs/retnet_tiny.py'
# Table 6 of the paper (perplexity, lower is better): ablation name -> (label, perplexity).
PAPER = {
    'none': ('RetNet', 26.05),
    'no_gate': ('− swish gate', 27.84),
    'no_groupnorm': ('− GroupNorm', 27.54),
    'no_decay': ('− γ decay (γ = 1)', 27.86),
    'no_multiscale': ('− multi-scale decay', 27.02),
    'small_head': ('smaller head dim', 27.68),  # The paper: 256 -> 64.
}
ABLATIONS = tuple(PAPER)
COLUMNS = (common.Column('variant', 'variant'),
           common.Column('eval_loss', 'eval loss (nats)', '{:.4f}'),
           common.Column('bits_per_byte', 'bits/byte', '{:.4f}'),
           common.Column('delta_vs_retnet', 'Δ vs RetNet', '{:+.4f}'),
           common.Column('our_rank', 'our rank'),
           common.Column('paper_perplexity', 'paper ppl', '{:.2f}'),
           common.Column('paper_rank', 'paper rank'),
           common.Column('steps', 'steps'))


def run(output_dir: str, *, quick: bool = False, steps: int | None = None,
        workdir: str | None = None, only: Sequence[str] | None = None,
        overrides: Sequence[str] = (), ablations: Sequence[str] = ABLATIONS,
        config: str = CONFIG, seeds=None) -> list[dict]:
  """Trains the ablations (skipping finished runs), writes the table and plots; returns the rows."""
  unknown = sorted(set(ablations) - set(PAPER))
  if unknown:
    raise ValueError(f'unknown ablations {unknown}; one of {ABLATIONS}.')
  overrides = ((f'total_steps={steps}',) if steps else ()) + tuple(overrides)
  config = common.config_with(config, 'quick' if quick else None)
  runs = common.runs_dir(output_dir, workdir)
  variants = [common.Variant(a, common.config_with(config, f'ablation={a}')) for a in ablations]
  seeds = common.parse_seeds(seeds)
  if seeds:
    return run_seeds(output_dir, variants, runs, seeds, overrides=overrides,
                     only=only, config=config)
  results = common.run_variants(variants, runs, overrides=overrides, only=only)
  configs = {v.name: common.build_config(v, overrides) for v in variants}
  rows = table_rows(results, configs)
  base = configs[variants[0].name]
  rho = common.spearman([r['our_rank'] for r in rows], [r['paper_rank'] for r in rows])
  notes = [f'Ours: `{config}` ({base.model.num_layers} layers, '
           f'width {base.model.embed_dim}, {base.total_steps} steps of '
           f'{base.batch_size}×{base.seq_len} bytes), loss on the held-out split; Δ in nats per '
           'token. Paper: Table 6 (1.3B-scale, in-domain perplexity; the head dimension there '
           'goes 256 → 64). Ranks among the rows shown, 1 = best. Spearman rank correlation '
           f'with the paper: {rho:.2f}.']
  text = common.write_table(output_dir, rows, COLUMNS, title='Table 6 ablations', notes=notes)
  common.plot_curves({PAPER[n][0]: common.read_metrics(os.path.join(runs, n)) for n in results},
                     os.path.join(output_dir, 'loss_curves.png'), title='Loss per ablation')
  plot_ranking(rows, os.path.join(output_dir, 'ranking.png'))
  logging.info('\n%s', text)
  common.check_finite(results)
  return rows


SEED_COLUMNS = (common.Column('variant', 'variant'),
                common.Column('loss_mean', 'eval loss (nats)', '{:.4f}'),
                common.Column('loss_std', '± std', '{:.4f}'),
                common.Column('delta_mean', 'Δ vs RetNet', '{:+.4f}'),
                common.Column('delta_std', '± std', '{:.4f}'),
                common.Column('our_rank', 'our rank (of means)'),
                common.Column('paper_perplexity', 'paper ppl', '{:.2f}'),
                common.Column('paper_rank', 'paper rank'),
                common.Column('seeds', 'seeds'))


def run_seeds(output_dir, variants, runs, seeds, *, overrides, only, config) -> list[dict]:
  """`run` with --seeds: mean ± std per variant, Δ to RetNet, rank correlation per seed."""
  names = [v.name for v in variants]
  results = common.run_variants(common.with_seeds(variants, seeds), runs, overrides=overrides,
                                only=common.seeded_names(only, names, seeds))
  grouped = common.by_seed(results, names, seeds)
  configs = {v.name: common.build_config(v, overrides) for v in variants}
  loss = common.seed_rows(grouped, lambda r: r['eval']['loss'], 'none' if 'none' in grouped else None)
  labels = {r['name']: label_of(r['name'], configs) for r in loss}
  ours = common.ranks([r['mean'] for r in loss])
  paper = common.ranks([PAPER[r['name']][1] for r in loss])
  rows = [{'variant': labels[r['name']], 'ablation': r['name'], 'loss_mean': r['mean'],
           'loss_std': r['std'], 'delta_mean': r['delta_mean'], 'delta_std': r['delta_std'],
           'our_rank': ours[i], 'paper_perplexity': PAPER[r['name']][1], 'paper_rank': paper[i],
           'seeds': r['seeds']} for i, r in enumerate(loss)]
  rho = per_seed_spearman(grouped, seeds)
  rho_mean, rho_std = common.mean_std(list(rho.values())) if rho else (float('nan'), None)
  base = configs[names[0]]
  notes = [f'Ours: `{config}` ({base.model.num_layers} layers, '
           f'width {base.model.embed_dim}, {base.total_steps} steps of '
           f'{base.batch_size}×{base.seq_len} bytes), loss on the held-out split, mean ± sample '
           f'std over seeds {",".join(map(str, seeds))}; Δ in nats per token, the mean and std of '
           'the per-seed differences to RetNet. Paper: Table 6 (1.3B-scale, in-domain perplexity). '
           'Ranks among the rows shown, 1 = best.',
           'Spearman rank correlation with the paper: '
           + (', '.join(f'seed {s}: {v:.2f}' for s, v in rho.items()) or 'no seed has every variant')
           + (f'; mean ± std {common.fmt_mean_std(rho_mean, rho_std, "{:.2f}")}' if rho else '')
           + f'; of the mean losses: {common.spearman(ours, paper):.2f}.']
  text = common.write_table(output_dir, rows, SEED_COLUMNS, title='Table 6 ablations, over seeds',
                            notes=notes)
  common.write_seed_csv(output_dir, loss)
  dirs = {labels[n]: [os.path.join(runs, common.seed_run_name(n, s)) for s in per]
          for n, per in grouped.items()}
  common.plot_seed_curves(dirs, os.path.join(output_dir, 'loss_curves.png'),
                          title='Loss per ablation (mean ± std over seeds)')
  plot_ranking([{**r, 'eval_loss': r['loss_mean']} for r in rows],
               os.path.join(output_dir, 'ranking.png'), errors=[r['loss_std'] for r in rows])
  logging.info('\n%s', text)
  common.check_finite(results)
  return rows


def per_seed_spearman(grouped: dict, seeds) -> dict[int, float]:
  """{seed: Spearman correlation of our ranking with the paper's} for seeds with every variant."""
  out = {}
  for s in seeds:
    names = [n for n in grouped if s in grouped[n]]
    if len(names) == len(grouped) and len(names) > 1:
      ours = common.ranks([float(grouped[n][s]['eval']['loss']) for n in names])
      out[s] = common.spearman(ours, common.ranks([PAPER[n][1] for n in names]))
  return out


def label_of(name: str, configs: dict) -> str:
  if name != 'small_head':
    return PAPER[name][0]
  before, after = configs.get('none'), configs[name]
  k = after.model.embed_dim // after.model.num_heads
  return f'head dim {before.model.embed_dim // before.model.num_heads} → {k}' if before else \
      f'head dim {k}'


def table_rows(results: dict, configs: dict) -> list[dict]:
  """One row per finished ablation, with Δ vs RetNet ('none') and both rankings."""
  names = list(results)
  losses = [float(results[n]['eval']['loss']) for n in names]
  base = results.get('none')
  ours = common.ranks(losses)
  paper = common.ranks([PAPER[n][1] for n in names])
  rows = []
  for i, n in enumerate(names):
    label = PAPER[n][0]
    if n == 'small_head':
      before, after = configs['none'] if 'none' in configs else None, configs[n]
      k = after.model.embed_dim // after.model.num_heads
      k0 = before.model.embed_dim // before.model.num_heads if before else None
      label = f'head dim {k0} → {k}' if k0 else f'head dim {k}'
    rows.append({'variant': label, 'ablation': n, 'eval_loss': losses[i],
                 'bits_per_byte': results[n]['eval'].get('bits_per_byte'),
                 'delta_vs_retnet': losses[i] - float(base['eval']['loss']) if base else None,
                 'our_rank': ours[i], 'paper_perplexity': PAPER[n][1], 'paper_rank': paper[i],
                 'steps': results[n]['steps']})
  return rows


def plot_ranking(rows: Sequence[dict], path: str, errors: Sequence[float | None] | None = None) -> str:
  """Our eval loss (y) against the paper's perplexity (x), one labelled point per variant
  (± errors as bars: the std over seeds)."""
  fig, axes = common.new_figure(size=(6.5, 4.5))
  ax = axes[0, 0]
  for i, r in enumerate(rows):
    ax.scatter(r['paper_perplexity'], r['eval_loss'], color=f'C{i % 10}')
    if errors is not None and errors[i]:
      ax.errorbar(r['paper_perplexity'], r['eval_loss'], yerr=errors[i], color=f'C{i % 10}',
                  capsize=4)
    ax.annotate(r['variant'], (r['paper_perplexity'], r['eval_loss']), fontsize='small',
                textcoords='offset points', xytext=(4, 4))
  ax.set(xlabel="paper's perplexity (Table 6)", ylabel='our eval loss (nats)',
         title='Table 6 ablations: ours against the paper')
  ax.margins(x=0.15, y=0.1)
  ax.grid(alpha=0.3)
  return common.save_figure(fig, path)


def main() -> None:
  shared = common.define_flags()
  ablations = flags.DEFINE_list('ablations', list(ABLATIONS), 'Ablations to run.')
  seeds = common.define_seeds_flag()
  app.run(lambda argv: common.main_from_flags(run, shared, ablations=ablations.value,
                                              seeds=seeds.value))


if __name__ == '__main__':
  main()
