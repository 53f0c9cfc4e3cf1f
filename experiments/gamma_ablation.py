r"""Decay (γ) schedule ablation: one training per schedule of decay.SCHEDULES and gated retention
(decay.GATED, a γ per token from the input), one table.

  python -m experiments.gamma_ablation --quick --output_dir=/tmp/gamma_quick  # 4-9 min, 2 CPUs
  python -m experiments.gamma_ablation --output_dir=/tmp/gamma                # the full tiny config

Each schedule is the variant `configs/retnet_tiny.py:gamma=<schedule>`, trained into
`<workdir>/<schedule>` (workdir defaults to `<output_dir>/runs`); rerunning the command resumes an
interrupted run and skips finished ones (see experiments/common.py). `--only=lm,none` trains a
subset (e.g. one schedule per process or machine, into the same workdir); the tables use every
finished run.
`--quick` adds the config argument `quick` (configs/retnet_tiny.py); `--steps` sets total_steps.
`--seeds=0,1,2` trains every schedule once per seed (into `<workdir>/<schedule>_seed<s>`, resumable
the same way); the table then gives the mean ± std over seeds of each schedule's final loss and its
difference to `retnet` (paired by seed), results_seeds.csv every seed's value, and the plots the
spread (loss_curves.png: mean and ± std band; loss_by_schedule.png: mean ± std with the seeds).

Writes into --output_dir:
  table.md, results.csv   schedule, final eval loss (nats/token), bits per byte, steps; with `gated`,
                          also gate_spread: per head, the mean [5th, 95th percentile] of the learned
                          γ_t over every layer and real token of the held-out batches
  loss_curves.png         train (lines) and eval (dots) loss per schedule
  decay_per_head.png      γ per head and the effective memory 1/(1−γ) of each schedule
  learnable_gamma.png     for `learnable`: γ of every layer and head against steps (its checkpoints)
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from retnet_jax import checkpoint
from retnet_jax import config_lib
from retnet_jax import decay
from retnet_jax import train

CONFIG = 'configs/retnet_tiny.py'
SCHEDULES = decay.SCHEDULES + (decay.GATED,)  # retnet, lm, uniform, none, learnable, custom, gated
GATE_COLUMN = common.Column('gate_spread', 'gate γ_t per head: mean [p5, p95]')
GATE_BATCHES = 4  # Held-out batches the gate statistics read.
COLUMNS = (common.Column('schedule', 'schedule'),
           common.Column('final_eval_loss', 'final eval loss (nats)', '{:.4f}'),
           common.Column('bits_per_byte', 'bits/byte', '{:.4f}'),
           common.Column('steps', 'steps'))


def variants(schedules: Sequence[str], total_steps: int,
             config: str = CONFIG) -> list[common.Variant]:
  """One variant per schedule; the learnable one keeps ~8 checkpoints to show how γ moved."""
  out = []
  for s in schedules:
    if s not in SCHEDULES:
      raise ValueError(f'unknown schedule {s!r}; one of {SCHEDULES}.')
    own = ()
    if s == 'learnable':
      own = ('checkpoint.max_to_keep=None', f'checkpoint_every={max(1, total_steps // 8)}')
    out.append(common.Variant(s, common.config_with(config, f'gamma={s}'), own))
  return out


def shared_overrides(steps: int | None, overrides: Sequence[str] = ()) -> tuple:
  return ((f'total_steps={steps}',) if steps else ()) + tuple(overrides)


SEED_COLUMNS = (common.Column('schedule', 'schedule'),
                common.Column('loss_mean', 'final eval loss (nats)', '{:.4f}'),
                common.Column('loss_std', '± std', '{:.4f}'),
                common.Column('bpb_mean', 'bits/byte', '{:.4f}'),
                common.Column('bpb_std', '± std', '{:.4f}'),
                common.Column('delta_mean', 'Δ vs retnet', '{:+.4f}'),
                common.Column('delta_std', '± std', '{:.4f}'),
                common.Column('seeds', 'seeds'), common.Column('steps', 'steps'))


def run(output_dir: str, *, quick: bool = False, steps: int | None = None,
        workdir: str | None = None, only: Sequence[str] | None = None,
        overrides: Sequence[str] = (), schedules: Sequence[str] = SCHEDULES,
        config: str = CONFIG, seeds=None) -> list[dict]:
  """Trains the schedules (skipping finished runs), writes the table and plots; returns the rows."""
  overrides = shared_overrides(steps, overrides)
  config = common.config_with(config, 'quick' if quick else None)
  base = common.build_config(common.Variant('base', config), overrides)
  runs = common.runs_dir(output_dir, workdir)
  todo = variants(schedules, base.total_steps, config)
  seeds = common.parse_seeds(seeds)
  if seeds:
    return run_seeds(output_dir, todo, runs, base, seeds, overrides=overrides,
                     only=only, config=config)
  results = common.run_variants(todo, runs, overrides=overrides, only=only)
  rows = [{'schedule': name, 'final_eval_loss': r['eval']['loss'],
           'bits_per_byte': r['eval'].get('bits_per_byte'), 'steps': r['steps']}
          for name, r in results.items()]
  configs = {v.name: common.build_config(v, overrides) for v in todo if v.name in results}
  trajectory = (common.learned_gamma_trajectory(os.path.join(runs, 'learnable'))
                if 'learnable' in results else None)  # (steps, γ [steps, layers, heads])
  gammas, columns = {}, COLUMNS
  for name, c in configs.items():
    if name == 'learnable':
      gammas[name] = trajectory[1][-1]
    elif name == decay.GATED:
      gammas[name], spread = gate_spread(os.path.join(runs, name), c)
      columns = _with_gate_column(rows, columns, spread)
    else:
      gammas[name] = config_lib.model_config(c).gammas()[None, :]
  text = common.write_table(output_dir, rows, columns, title='Decay (γ) schedule ablation',
                            notes=[_setup_note(config, base)],
                            extra_markdown=gamma_table(gammas))
  common.plot_curves({n: common.read_metrics(os.path.join(runs, n)) for n in results},
                     os.path.join(output_dir, 'loss_curves.png'), title='Loss per γ schedule')
  return _finish(output_dir, rows, results, gammas, trajectory, base, text)


def run_seeds(output_dir, todo, runs, base, seeds, *, overrides, only, config) -> list[dict]:
  """`run` with --seeds: every schedule per seed; mean ± std tables and plots with the spread."""
  results = common.run_variants(common.with_seeds(todo, seeds), runs, overrides=overrides,
                                only=common.seeded_names(only, [v.name for v in todo], seeds))
  grouped = common.by_seed(results, [v.name for v in todo], seeds)
  baseline = 'retnet' if 'retnet' in grouped else None
  loss = common.seed_rows(grouped, lambda r: r['eval']['loss'], baseline)
  bpb = {r['name']: r for r in common.seed_rows(grouped, lambda r: r['eval']['bits_per_byte'])}
  rows = [{'schedule': r['name'], 'loss_mean': r['mean'], 'loss_std': r['std'],
           'bpb_mean': bpb[r['name']]['mean'], 'bpb_std': bpb[r['name']]['std'],
           'delta_mean': r['delta_mean'], 'delta_std': r['delta_std'], 'seeds': r['seeds'],
           'steps': max(x['steps'] for x in grouped[r['name']].values())} for r in loss]
  configs = {v.name: common.build_config(v, overrides) for v in todo if v.name in grouped}
  gammas, trajectory, columns = {}, None, SEED_COLUMNS
  for name, c in configs.items():
    if name == 'learnable':
      trajectory = common.learned_gamma_trajectory(
          os.path.join(runs, common.seed_run_name(name, min(grouped[name]))))
      gammas[name] = trajectory[1][-1]
    elif name == decay.GATED:
      lowest = min(grouped[name])
      gammas[name], spread = gate_spread(os.path.join(runs, common.seed_run_name(name, lowest)),
                                         common.build_config(common.with_seeds(
                                             [v for v in todo if v.name == name], [lowest])[0],
                                             overrides))
      columns = _with_gate_column(rows, columns, spread)
    else:
      gammas[name] = config_lib.model_config(c).gammas()[None, :]
  note = (f'{_setup_note(config, base)} Mean ± sample std over seeds '
          f'{",".join(map(str, seeds))}; Δ: the mean and std of the per-seed differences to retnet '
          '(same seed: same initialisation draw and data order). learnable and gated γ: the lowest '
          'seed.')
  text = common.write_table(output_dir, rows, columns,
                            title='Decay (γ) schedule ablation, over seeds', notes=[note],
                            extra_markdown=gamma_table(gammas))
  common.write_seed_csv(output_dir, loss)
  dirs = {n: [os.path.join(runs, common.seed_run_name(n, s)) for s in per] for n, per in grouped.items()}
  common.plot_seed_curves(dirs, os.path.join(output_dir, 'loss_curves.png'),
                          title='Loss per γ schedule (mean ± std over seeds)')
  common.plot_seed_bars(loss, os.path.join(output_dir, 'loss_by_schedule.png'),
                        ylabel='final eval loss (nats)')
  return _finish(output_dir, rows, results, gammas, trajectory, base, text)


def _setup_note(config, base) -> str:
  return (f'`{config}`: {base.model.num_layers} layers, width '
          f'{base.model.embed_dim}, {base.model.num_heads} heads, {base.total_steps} steps of '
          f'{base.batch_size}×{base.seq_len} tokens; loss on the held-out split ('
          f'{base.data.num_eval_batches} batches at most).')


def _finish(output_dir, rows, results, gammas, trajectory, base, text) -> list[dict]:
  """The plots both tables share, the table logged; raises if a run's loss is not finite."""
  plot_decay_per_head(gammas, base.seq_len, os.path.join(output_dir, 'decay_per_head.png'))
  if trajectory is not None:
    plot_learnable(*trajectory, os.path.join(output_dir, 'learnable_gamma.png'))
  logging.info('\n%s', text)
  common.check_finite(results)
  return rows


def _with_gate_column(rows, columns, spread: str):
  """Adds the gate-spread cell to every row (blank but for `gated`) and its column."""
  for row in rows:
    row['gate_spread'] = spread if row['schedule'] == decay.GATED else ''
  return tuple(columns) + (GATE_COLUMN,)


def learned_gates(setup, params, tokens, segment_ids):
  """γ_t of every layer on one batch, [L, B, T, H] float32: the model's layers applied one by one,
  each layer's gate read from its normalised input (the stacked blocks' own modules)."""
  model = nnx.merge(setup.graphdef, params)
  cfg = setup.model_config
  graphdef, stacked = nnx.split(model.blocks)
  B, T = tokens.shape
  x = jnp.take(model.embed[...], tokens, axis=0).astype(jnp.dtype(cfg.dtype))
  ctx = dict(positions=jnp.arange(T, dtype=jnp.int32), segment_ids=segment_ids,
             prev_segment=segment_ids[:, 0], form='chunkwise')
  out = []
  for i in range(cfg.num_layers):
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))
    out.append(jnp.exp(block.mixer.log_gamma(block.mixer_norm(x))))
    x, _ = block(x, None, ctx)
  return jnp.stack(out)


def gate_spread(run_dir: str, config) -> tuple[np.ndarray, str]:
  """(mean γ_t [L, H], 'h0 0.95 [0.90, 0.99] · h1 ...'): the learned gates of a gated run's final
  checkpoint on GATE_BATCHES held-out batches, over real tokens (segment id > 0)."""
  run = train.Run(config, run_dir, for_training=False)
  try:
    step = run.checkpoint_step()
    params = checkpoint.restore(
        run.ckpt, step, check=False,
        abstract_params=run.abstract(run.abstract_state['params'], run.state_sh['params']))['params']
    gates = jax.jit(lambda p, t, s: learned_gates(run.setup, p, t, s))
    per_batch = []
    for i, batch in enumerate(run.eval_batches()):
      if i == GATE_BATCHES:
        break
      segment_ids = jnp.asarray(batch['segment_ids'])
      g_LBTH = np.asarray(gates(params, jnp.asarray(batch['inputs']), segment_ids))
      per_batch.append(g_LBTH[:, np.asarray(segment_ids) > 0])  # [L, tokens, H]
  finally:
    run.ckpt.close()
  g_LNH = np.concatenate(per_batch, axis=1)
  g_NH = g_LNH.reshape(-1, g_LNH.shape[-1])
  p5, p95 = np.percentile(g_NH, [5, 95], axis=0)
  cells = [f'h{h} {m:.3f} [{a:.3f}, {b:.3f}]' for h, (m, a, b) in
           enumerate(zip(g_NH.mean(0), p5, p95))]
  return g_LNH.mean(axis=1), ' · '.join(cells)


def gamma_table(gammas: dict[str, np.ndarray]) -> str:
  """Markdown: γ and 1/(1−γ) per head of each schedule (learnable: learned, mean over layers)."""
  lines = ['### γ per head (effective memory 1/(1−γ) in tokens)', '',
           '| schedule | γ per head | 1/(1−γ) |', '|---|---|---|']
  for name, g_LH in gammas.items():
    g = g_LH.mean(axis=0)
    memory = ', '.join('∞' if not np.isfinite(m) else f'{m:.0f}' for m in decay.effective_memory(g))
    label = {'learnable': f'{name} (learned, mean of {g_LH.shape[0]} layers)',
             decay.GATED: f'{name} (mean γ_t on held-out data, mean of {g_LH.shape[0]} layers)'
             }.get(name, name)
    lines.append(f'| {label} | {", ".join(f"{x:.5f}" for x in g)} | {memory} |')
  return '\n'.join(lines) + '\n'


def plot_decay_per_head(gammas: dict[str, np.ndarray], seq_len: int, path: str) -> str:
  """γ per head (left) and effective memory 1/(1−γ) (right, log scale; γ = 1 drawn at the top).
  A schedule with one γ per layer (learnable) shows the mean and the range over layers."""
  fig, axes = common.new_figure(ncols=2, size=(6.0, 4.2))
  left, right = axes[0]
  memories = {name: decay.effective_memory(g) for name, g in gammas.items()}
  finite = [m[np.isfinite(m)].max() for m in memories.values() if np.isfinite(m).any()]
  top = 4.0 * max(finite + [float(seq_len)])
  for i, (name, g) in enumerate(gammas.items()):
    heads = np.arange(g.shape[-1])
    color = f'C{i % 10}'
    label = name + (' (learned; band: layers)' if name == 'learnable' else '')
    shown = np.where(np.isfinite(memories[name]), memories[name], top)
    for ax, values in ((left, g), (right, shown)):
      ax.plot(heads, values.mean(axis=0), 'o-', color=color, label=label)
      if values.shape[0] > 1:
        ax.fill_between(heads, values.min(axis=0), values.max(axis=0), color=color, alpha=0.2)
    if not np.isfinite(memories[name]).all():
      right.annotate(f'{name}: ∞ (γ = 1)', (heads[0], top), color=color, fontsize='small',
                     textcoords='offset points', xytext=(0, 6))
  right.axhline(seq_len, color='gray', linestyle=':', label=f'train seq_len {seq_len}')
  left.set(xlabel='head', ylabel='γ', title='decay γ per head')
  right.set(xlabel='head', ylabel='1 / (1 − γ)  [tokens]', yscale='log',
            title='effective memory per head')
  num_heads = max((g.shape[-1] for g in gammas.values()), default=1)
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.set_xticks(range(num_heads))
  right.legend(fontsize='small', loc='center left', bbox_to_anchor=(1.02, 0.5))
  return common.save_figure(fig, path)


def plot_learnable(steps: Sequence[int], gammas: np.ndarray, path: str) -> str:
  """Effective memory 1/(1−γ) of each head against steps (γ [steps, layers, heads]), one panel per
  layer; dashed: the initial values."""
  memory = decay.effective_memory(gammas)
  layers, heads = gammas.shape[1:]
  fig, axes = common.new_figure(ncols=layers, size=(4.5, 3.8))
  for layer in range(layers):
    ax = axes[0, layer]
    for h in range(heads):
      ax.plot(steps, memory[:, layer, h], 'o-', color=f'C{h % 10}', markersize=3, label=f'head {h}')
      ax.axhline(memory[0, layer, h], color=f'C{h % 10}', linestyle='--', alpha=0.4)
    ax.set(xlabel='step', yscale='log', title=f'layer {layer}')
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel('1 / (1 − γ)  [tokens]')
  axes[0, 0].legend(fontsize='small')
  fig.suptitle('learnable γ: effective memory per head during training (dashed: initial)')
  return common.save_figure(fig, path)


def main() -> None:
  shared = common.define_flags()
  schedules = flags.DEFINE_list('schedules', list(SCHEDULES), 'Schedules to compare.')
  config = flags.DEFINE_string('config', CONFIG, 'Config file whose `gamma=` argument is varied.')
  seeds = common.define_seeds_flag()
  app.run(lambda argv: common.main_from_flags(run, shared, schedules=schedules.value,
                                              config=config.value, seeds=seeds.value))


if __name__ == '__main__':
  main()
