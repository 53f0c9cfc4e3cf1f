"""What the experiment runners share: named config variants trained into one experiment directory,
their curves, and the tables and plots written from them.

Layout of an experiment's runs directory (`--workdir`, default `<output_dir>/runs`):

    <runs>/<name>/config.json    the run's full config, written before it trains
    <runs>/<name>/metrics.jsonl  train.py's metrics; checkpoints/ and tb/ beside it
    <runs>/<name>/result.json    written when the run has finished: steps, final metrics

A run with result.json is skipped; one without it is (re)started by `train.train_and_evaluate`,
which resumes from its latest checkpoint. A run directory whose config.json differs from the config
asked for now is an error (no mixing of results from two configs).
Plots use matplotlib's Agg canvas through `Figure` (no pyplot, no global backend change).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from typing import Callable, Sequence

from absl import flags
from absl import logging
import numpy as np

from configs import transformer_tiny
from retnet_jax import checkpoint
from retnet_jax import config_lib
from retnet_jax import metrics as metrics_lib
from retnet_jax import model as model_lib
from retnet_jax import platform
from retnet_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

class Interrupted(RuntimeError):
  """A run stopped early (SIGTERM / Ctrl-C) with a checkpoint: rerun the same command to resume."""


@dataclasses.dataclass(frozen=True)
class Variant:
  """One run of an experiment: a name, a config (path[:arg], relative to the repository root or
  absolute) and config overrides of its own ('a.b=value')."""
  name: str
  config: str
  overrides: tuple[str, ...] = ()


def config_with(config: str, *items: str | None) -> str:
  """'path[:arg]' with `items` (None dropped) added to its argument: ('configs/x.py:a=1',
  'quick') -> 'configs/x.py:a=1,quick'."""
  path, _, arg = config.partition(':')
  items = [i for i in (arg, *items) if i]
  return f"{path}:{','.join(items)}" if items else path


def param_count(config) -> int:
  """The parameters of a built config's model (abstract: nothing is allocated)."""
  return model_lib.count_params(model_lib.abstract_params(config_lib.model_config(config)))


def build_config(variant: Variant, overrides: Sequence[str] = ()):
  """The variant's validated ConfigDict: the file, then `overrides`, then the variant's own."""
  path, sep, arg = variant.config.partition(':')
  if not os.path.isabs(path) and not os.path.isfile(path):
    path = os.path.join(ROOT, path)
  config = config_lib.load(path + sep + arg, [*overrides, *variant.overrides])
  config_lib.validate(config)
  return config


def _plain(config) -> dict:
  """A config as JSON would store it (tuples as lists)."""
  return json.loads(json.dumps(config.to_dict() if hasattr(config, 'to_dict') else config))


def config_differences(old: dict, new: dict, prefix: str = '') -> list[str]:
  """'key: old -> new' for every leaf that differs between two plain config dicts."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, '<missing>'), new.get(key, '<missing>')
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_differences(a, b, f'{prefix}{key}.')
    elif a != b:
      out.append(f'{prefix}{key}: {a!r} -> {b!r}')
  return out


def check_config(run_dir: str, config) -> None:
  """Writes <run_dir>/config.json, or raises ValueError if the one there differs from `config`."""
  path = os.path.join(run_dir, 'config.json')
  new = _plain(config)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diffs = config_differences(old, new)
    if diffs:
      raise ValueError(
          f'the run in {run_dir} was made with a different config ({"; ".join(diffs[:8])}'
          f'{"; ..." if len(diffs) > 8 else ""}). Use a new --workdir / --output_dir, or delete '
          f'{run_dir} to retrain it.')
    return
  os.makedirs(run_dir, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(new, f, indent=1, sort_keys=True)


def read_result(run_dir: str) -> dict | None:
  path = os.path.join(run_dir, 'result.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def peak_bytes(compiled) -> int | None:
  """XLA's buffer assignment for a compiled executable: arguments + outputs + temporaries −
  donated aliases (the same on every machine); None where the backend gives no analysis."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)


def train_one(variant: Variant, config, run_dir: str) -> dict:
  """Trains (or resumes) one run to its end and writes its result.json. Returns the result."""
  t0 = time.perf_counter()
  out = train.train_and_evaluate(config, run_dir)
  if out.get('stopped') or out['step'] < config.total_steps:
    raise Interrupted(f'run {variant.name!r} stopped at step {out["step"]} of '
                      f'{config.total_steps}; rerun the same command to resume it.')
  if 'eval' not in out:  # Already at its last step (killed before result.json): evaluate it.
    out = {**out, 'eval': train.evaluate(config, run_dir)['eval']}
  result = {'name': variant.name, 'config': variant.config, 'overrides': list(variant.overrides),
            'steps': int(out['step']), 'eval': out['eval'], 'train': out.get('train', {}),
            'wall_seconds': time.perf_counter() - t0}
  with open(os.path.join(run_dir, 'result.json'), 'w') as f:
    json.dump(result, f, indent=1)
  return result


def run_variants(variants: Sequence[Variant], workdir: str, *, overrides: Sequence[str] = (),
                 only: Sequence[str] | None = None, processes: int = 1,
                 after: Callable[[str], object] | None = None) -> dict[str, dict]:
  """Trains each variant into <workdir>/<name>, skipping finished runs.

  only: train just these names (others are read if finished). processes: how many runs train at
  once, each in a process of its own. after(run_dir): called on each run this call trains, in the
  process that trained it (a runner's evaluation, so that it is shared out too). Returns {name:
  result} for every finished run, in the order of `variants`. Logs which run of how many, elapsed
  time and an ETA.
  """
  names = [v.name for v in variants]
  if len(set(names)) != len(names):
    raise ValueError(f'variant names must be unique; got {names}.')
  unknown = sorted(set(only or ()) - set(names))
  if unknown:
    raise ValueError(f'--only names unknown runs {unknown}; runs are {names}.')
  if processes < 1:
    raise ValueError(f'processes must be >= 1; got {processes}.')
  configs = {v.name: build_config(v, overrides) for v in variants}  # All config errors up front.
  for v in variants:
    run_dir = os.path.join(workdir, v.name)
    if os.path.exists(os.path.join(run_dir, 'config.json')):
      check_config(run_dir, configs[v.name])
  todo = [v for v in variants if (only is None or v.name in only)
          and read_result(os.path.join(workdir, v.name)) is None]
  logging.info('%d runs in %s: %d finished, %d to train%s.', len(variants), workdir,
               sum(read_result(os.path.join(workdir, n)) is not None for n in names), len(todo),
               f' ({", ".join(v.name for v in todo)})' if todo else '')
  jobs = []
  for v in todo:
    run_dir = os.path.join(workdir, v.name)
    check_config(run_dir, configs[v.name])
    jobs.append((v, configs[v.name], run_dir, after))
  t_start = time.perf_counter()

  def progress(i, name, what):
    elapsed = time.perf_counter() - t_start
    eta = metrics_lib.duration(elapsed / i * (len(jobs) - i)) if i else 'unknown'
    logging.info('=== run %d/%d: %s %s | elapsed %s | ETA %s', i, len(jobs), name, what,
                 metrics_lib.duration(elapsed), eta)

  if processes > 1 and len(jobs) > 1:
    context = multiprocessing.get_context('spawn')  # A fresh jax in each worker, never a fork.
    with concurrent.futures.ProcessPoolExecutor(min(processes, len(jobs)), mp_context=context,
                                                initializer=_start_worker) as pool:
      logging.info('=== training %d runs, %d at a time, one process each', len(jobs),
                   min(processes, len(jobs)))
      futures = {pool.submit(_train_and_after, *job): job[0].name for job in jobs}
      for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
        result = future.result()  # A worker's error (Interrupted included) stops the experiment.
        progress(i, futures[future], f'done: eval loss {result["eval"]["loss"]:.4f}')
  else:
    for i, job in enumerate(jobs):
      progress(i, job[0].name, f'({job[0].config})')
      result = _train_and_after(*job)
      progress(i + 1, job[0].name, f'done: eval loss {result["eval"]["loss"]:.4f}')
  results = {}
  for v in variants:
    result = read_result(os.path.join(workdir, v.name))
    if result is not None:
      results[v.name] = result
    else:
      logging.warning('run %s has not finished: left out of the tables.', v.name)
  return results


def _train_and_after(variant: Variant, config, run_dir: str, after) -> dict:
  result = train_one(variant, config, run_dir)
  if after is not None:
    after(run_dir)
  return result


def _start_worker() -> None:
  platform.start()
  setup_logging()


def check_finite(results: dict[str, dict], key: str = 'loss') -> None:
  """Raises ValueError naming the runs whose final eval `key` is not finite."""
  bad = [n for n, r in results.items() if not math.isfinite(float(r['eval'].get(key, math.nan)))]
  if bad:
    raise ValueError(f'final eval {key} is not finite for {bad}.')


# ------------------------------------------------------------------------------------------------
# Curves.


def read_metrics(run_dir: str) -> dict[str, list[dict]]:
  """{'train': records, 'eval': records} from metrics.jsonl, by step; a step logged twice (a run
  resumed from an earlier checkpoint) keeps its last record."""
  by_split: dict[str, dict[int, dict]] = {'train': {}, 'eval': {}}
  path = os.path.join(run_dir, 'metrics.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          record = json.loads(line)
          by_split.setdefault(record['split'], {})[record['step']] = record
  return {split: [r[s] for s in sorted(r)] for split, r in by_split.items()}


# ------------------------------------------------------------------------------------------------
# Tables.


@dataclasses.dataclass(frozen=True)
class Column:
  key: str  # Key in the row dicts and the CSV header.
  header: str  # Markdown header.
  fmt: str = '{}'  # Markdown format of a value (the CSV gets the full value).


def _cell(value, fmt: str) -> str:
  if value is None:
    return '–'
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return fmt.format(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
  lines = ['| ' + ' | '.join(c.header for c in columns) + ' |',
           '|' + '|'.join('---' if i == 0 else '---:' for i in range(len(columns))) + '|']
  for row in rows:
    lines.append('| ' + ' | '.join(_cell(row.get(c.key), c.fmt) for c in columns) + ' |')
  return '\n'.join(lines) + '\n'


def write_table(output_dir: str, rows: Sequence[dict], columns: Sequence[Column], *, title: str,
                notes: Sequence[str] = (), extra_markdown: str = '') -> str:
  """Writes <output_dir>/table.md (title, table, notes) and results.csv (same rows and columns).
  Returns the markdown."""
  os.makedirs(output_dir, exist_ok=True)
  text = f'## {title}\n\n' + markdown_table(rows, columns)
  if notes:
    text += '\n' + '\n'.join(notes) + '\n'
  if extra_markdown:
    text += '\n' + extra_markdown
  with open(os.path.join(output_dir, 'table.md'), 'w') as f:
    f.write(text)
  with open(os.path.join(output_dir, 'results.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow([c.key for c in columns])
    for row in rows:
      writer.writerow(['' if row.get(c.key) is None else row.get(c.key) for c in columns])
  return text


def ranks(values: Sequence[float]) -> list[int]:
  """1 for the smallest value (non-finite values rank last)."""
  order = sorted(range(len(values)), key=lambda i: (not math.isfinite(values[i]), values[i]))
  out = [0] * len(values)
  for rank, i in enumerate(order, 1):
    out[i] = rank
  return out


def spearman(a: Sequence[int], b: Sequence[int]) -> float:
  """Spearman's rank correlation of two rankings without ties."""
  n = len(a)
  if n < 2:
    return math.nan
  return 1.0 - 6.0 * sum((x - y) ** 2 for x, y in zip(a, b)) / (n * (n * n - 1))


# ------------------------------------------------------------------------------------------------
# Plots.


def new_figure(ncols: int = 1, nrows: int = 1, size=(6.0, 4.0)):
  """(Figure, axes array) on the Agg canvas, without pyplot."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout='constrained')
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes


def save_figure(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  return path


def plot_curves(curves: dict[str, dict[str, list[dict]]], path: str, *, metric: str = 'loss',
                title: str = '', ylabel: str | None = None) -> str:
  """Train `metric` (lines) and eval `metric` (markers) against step, one color per run."""
  fig, axes = new_figure(size=(7.0, 4.5))
  ax = axes[0, 0]
  for i, (name, splits) in enumerate(curves.items()):
    color = f'C{i % 10}'
    train_ = [r for r in splits.get('train', []) if metric in r]
    evals = [r for r in splits.get('eval', []) if metric in r]
    if train_:
      ax.plot([r['step'] for r in train_], [r[metric] for r in train_], color=color, label=name)
    if evals:
      ax.plot([r['step'] for r in evals], [r[metric] for r in evals], 'o--', color=color,
              markersize=4, alpha=0.8, label=None if train_ else name)
  ax.set_xlabel('step')
  ax.set_ylabel(ylabel or metric)
  ax.set_title(title or f'{metric}: train (lines), eval (dots)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
  return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------
# Decay (γ).


def decay_rates(params) -> np.ndarray | None:
  """The learnable θ (log γ = −exp θ) of a params tree, [layers, heads] (None if there is none)."""
  import jax  # pylint: disable=g-import-not-at-top
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if getattr(path[-1], 'key', None) == 'decay_log_rate':
      found.append(np.asarray(leaf, np.float64).reshape(-1, np.shape(leaf)[-1]))
  return np.concatenate(found, axis=0) if found else None


def gammas_from_rates(theta: np.ndarray) -> np.ndarray:
  return np.exp(-np.exp(np.asarray(theta, np.float64)))


def learned_gamma_trajectory(run_dir: str) -> tuple[list[int], np.ndarray]:
  """(steps, γ [steps, layers, heads]) of a learnable-γ run, from its kept checkpoints and, at
  step 0, its initial schedule."""
  from retnet_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  ckpt_dir = os.path.join(run_dir, 'checkpoints')
  mgr = checkpoint.manager(ckpt_dir, max_to_keep=None, read_only=True)
  try:
    steps = sorted(mgr.all_steps())
    if not steps:
      raise ValueError(f'no checkpoints in {ckpt_dir}.')
    cfg = checkpoint.model_config_from_dict(checkpoint.read_meta(mgr, steps[-1])['model_config'])
    abstract = model_lib.abstract_params(cfg)
    gammas = [gammas_from_rates(decay_rates(checkpoint.restore(
        mgr, step, abstract_params=abstract)['params'])) for step in steps]
  finally:
    mgr.close()
  initial = np.broadcast_to(cfg.gammas(), gammas[0].shape)
  return [0] + steps, np.stack([initial] + gammas)


# ------------------------------------------------------------------------------------------------
# Entry points.


def setup_logging() -> None:
  """absl INFO to stdout (the runners' progress), orbax / grain chatter filtered (as in train).
  Also for notebooks, where absl's handler is not installed until this asks for it."""
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().python_handler.stream = sys.stdout
  metrics_lib.quiet_library_logs()


def runs_dir(output_dir: str, workdir: str | None) -> str:
  return workdir or os.path.join(output_dir, 'runs')


def define_flags() -> dict:
  """The runners' shared flags. Called from a runner's `__main__` only, so that importing the
  runners (tests, notebooks) next to other experiment modules never defines a flag twice."""
  return dict(
      output_dir=flags.DEFINE_string('output_dir', None, 'Where table.md, results.csv, PNGs go.'),
      workdir=flags.DEFINE_string('workdir', None, "Runs' directory; default <output_dir>/runs."),
      quick=flags.DEFINE_bool('quick', False, 'A few-minute CPU version of the experiment.'),
      steps=flags.DEFINE_integer('steps', None, 'Override total_steps of every run.'),
      only=flags.DEFINE_list('only', None, 'Train only these runs (by name); tables use all '
                             'finished ones. Lets several processes share one experiment.'),
      overrides=flags.DEFINE_multi_string('override', [], "Config override 'a.b=value' for every "
                                          'run, e.g. --override=mesh.data=1.'))


def main_from_flags(run: Callable[..., object], shared: dict, **kwargs) -> None:
  """Calls run(output_dir, quick=, steps=, workdir=, only=, overrides=, **kwargs) from the flags of
  `define_flags`; bad configs or mismatched run directories exit with one clear line."""
  platform.start()
  setup_logging()
  output_dir = shared['output_dir'].value
  if not output_dir:
    raise SystemExit('error: --output_dir is required.')
  t0 = time.perf_counter()
  try:
    run(output_dir, quick=shared['quick'].value, steps=shared['steps'].value,
        workdir=shared['workdir'].value, only=shared['only'].value,
        overrides=tuple(shared['overrides'].value), **kwargs)
  except (ValueError, Interrupted) as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  logging.info('Done in %s: see %s', metrics_lib.duration(time.perf_counter() - t0),
               os.path.join(output_dir, 'table.md'))


# ------------------------------------------------------------------------------------------------
# Seeds: each variant trained once per seed, reported as mean ± standard deviation.


def define_seeds_flag():
  """`--seeds=0,1,2`: train every variant once per seed (config.seed); tables give mean ± std."""
  return flags.DEFINE_list('seeds', None, 'Seeds (config.seed) to train every variant with; the '
                           'tables then report mean ± std over them. Default: one run, the '
                           "config's seed.")


def parse_seeds(seeds) -> tuple[int, ...] | None:
  """None, or the distinct integer seeds of a list / comma-separated string, in order."""
  if seeds is None or seeds == '' or seeds == []:
    return None
  items = seeds.split(',') if isinstance(seeds, str) else list(seeds)
  try:
    out = tuple(int(str(s).strip()) for s in items if str(s).strip())
  except ValueError as e:
    raise ValueError(f'--seeds must be comma-separated integers; got {seeds!r}.') from e
  if len(set(out)) != len(out):
    raise ValueError(f'--seeds has duplicates: {seeds!r}.')
  return out or None


def seed_run_name(name: str, seed: int) -> str:
  return f'{name}_seed{seed}'


def with_seeds(variants: Sequence[Variant], seeds: Sequence[int] | None) -> list[Variant]:
  """One variant per (variant, seed), named `<name>_seed<s>` with `seed=<s>` among its overrides;
  the variants themselves when seeds is None (their run directories stay those of one-seed runs)."""
  if not seeds:
    return list(variants)
  return [Variant(seed_run_name(v.name, s), v.config, (*v.overrides, f'seed={s}'))
          for v in variants for s in seeds]


def seeded_names(only: Sequence[str] | None, names: Sequence[str],
                 seeds: Sequence[int] | None) -> list[str] | None:
  """--only under --seeds: a variant's name stands for all its seeds' runs."""
  if only is None or not seeds:
    return only
  return [m for n in only for m in ([seed_run_name(n, s) for s in seeds] if n in names else [n])]


def by_seed(results: dict[str, dict], names: Sequence[str],
            seeds: Sequence[int] | None) -> dict[str, dict[int | None, dict]]:
  """{variant: {seed: result}} of the finished runs (seed None for one-seed runs)."""
  out = {}
  for name in names:
    runs = ({None: results[name]} if name in results else {}) if not seeds else {
        s: results[seed_run_name(name, s)] for s in seeds if seed_run_name(name, s) in results}
    if runs:
      out[name] = runs
  return out


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
  """(mean, sample standard deviation (ddof 1); None for a single value)."""
  x = np.asarray([float(v) for v in values], np.float64)
  if x.size == 0:
    return math.nan, None
  return float(x.mean()), (float(x.std(ddof=1)) if x.size > 1 else None)


def fmt_mean_std(mean: float | None, std: float | None, fmt: str = '{:.4f}') -> str:
  if mean is None:
    return '–'
  return fmt.format(mean) + ('' if std is None else ' ± ' + fmt.format(std))


def seed_rows(runs: dict[str, dict[int | None, dict]], value: Callable[[dict], float],
              baseline: str | None = None) -> list[dict]:
  """Per variant: mean and std of `value(result)` over its seeds, the seeds, and against
  `baseline` the mean and std of the per-seed differences (paired by seed; seeds the baseline
  lacks are left out of the difference)."""
  rows = []
  base = runs.get(baseline, {}) if baseline else {}
  for name, per_seed in runs.items():
    values = {s: float(value(r)) for s, r in per_seed.items()}
    mean, std = mean_std(list(values.values()))
    row = {'name': name, 'mean': mean, 'std': std, 'n': len(values),
           'seeds': ','.join('–' if s is None else str(s) for s in values), 'values': values}
    paired = [values[s] - float(value(base[s])) for s in values if s in base]
    if baseline and paired:
      row['delta_mean'], row['delta_std'] = mean_std(paired)
    else:
      row['delta_mean'] = row['delta_std'] = None
    rows.append(row)
  return rows


def write_seed_csv(output_dir: str, rows: Sequence[dict], name: str = 'results_seeds.csv') -> str:
  """One line per (variant, seed): variant, seed, value; then the variant's mean, std, Δ."""
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, name)
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['variant', 'seed', 'value', 'mean', 'std', 'delta_mean', 'delta_std'])
    for r in rows:
      for s, v in r['values'].items():
        writer.writerow([r['name'], '' if s is None else s, v, r['mean'],
                         '' if r['std'] is None else r['std'],
                         '' if r['delta_mean'] is None else r['delta_mean'],
                         '' if r['delta_std'] is None else r['delta_std']])
  return path


def plot_seed_curves(runs_dirs: dict[str, Sequence[str]], path: str, *, metric: str = 'loss',
                     title: str = '') -> str:
  """Eval `metric` against step, one color per variant: the mean over seeds (line), the band of
  ± one std (shaded) and each seed's points (dots); train `metric` mean as a thin line."""
  fig, axes = new_figure(size=(7.0, 4.5))
  ax = axes[0, 0]
  for i, (name, dirs) in enumerate(runs_dirs.items()):
    color = f'C{i % 10}'
    for split, style in (('train', dict(lw=0.8, alpha=0.5)), ('eval', dict(lw=1.8))):
      per_seed = [{r['step']: r[metric] for r in read_metrics(d).get(split, []) if metric in r}
                  for d in dirs]
      steps = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
      if not steps:
        continue
      values = np.asarray([[p[s] for s in steps] for p in per_seed], np.float64)
      mean = values.mean(0)
      ax.plot(steps, mean, color=color, label=f'{name} ({len(dirs)} seeds)' if split == 'eval'
              else None, **style)
      if split == 'eval':
        if len(dirs) > 1:
          std = values.std(0, ddof=1)
          ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
        for row in values:
          ax.plot(steps, row, 'o', color=color, markersize=2.5, alpha=0.6)
  ax.set_xlabel('step')
  ax.set_ylabel(metric)
  ax.set_title(title or f'{metric}: eval mean ± std over seeds (band), seeds (dots), train (thin)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
  return save_figure(fig, path)


def plot_seed_bars(rows: Sequence[dict], path: str, *, ylabel: str, title: str = '',
                   labels: dict[str, str] | None = None) -> str:
  """Mean ± std per variant (error bars) with every seed's value as a dot."""
  fig, axes = new_figure(size=(max(5.0, 1.1 * len(rows) + 2), 4.2))
  ax = axes[0, 0]
  for i, r in enumerate(rows):
    color = f'C{i % 10}'
    ax.errorbar([i], [r['mean']], yerr=[[r['std'] or 0.0], [r['std'] or 0.0]], fmt='s',
                color=color, capsize=5, markersize=7)
    values = list(r['values'].values())
    ax.plot([i + 0.12] * len(values), values, 'o', color=color, markersize=3.5, alpha=0.7)
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels([(labels or {}).get(r['name'], r['name']) for r in rows], rotation=20,
                     ha='right', fontsize='small')
  ax.set_ylabel(ylabel)
  ax.set_title(title or f'{ylabel}: mean ± std over seeds (dots: seeds)')
  ax.grid(alpha=0.3, axis='y')
  return save_figure(fig, path)


def matched_transformer_overrides(retnet_config) -> tuple[str, ...]:
  """Overrides that make configs/transformer_tiny.py (after the same overrides as `retnet_config`)
  the Transformer with retnet_config's parameter count: value_dim = embed_dim and the FFN width
  of transformer_tiny.matched_ffn_dim."""
  ffn = transformer_tiny.matched_ffn_dim(retnet_config.model.to_dict())
  return ('model.value_dim=None', f'model.ffn_dim={ffn}')
