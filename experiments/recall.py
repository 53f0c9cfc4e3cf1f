r"""Long-context recall: how far back each architecture reads, by context length and needle depth.

  python -m experiments.recall --quick --seeds=0,1,2 --output_dir=/tmp/recall_quick
  python -m experiments.recall --seeds=0,1,2 --output_dir=/tmp/recall

Every architecture of `ARCHITECTURES` (plain config overrides of configs/retnet_tiny.py) is trained
on the `recall` data source (retnet_jax/recall.py: stdlib text mixed with synthetic passkey and
associative-recall rows at the training length T), then evaluated at 1×, 2×, 4×, 8×, 16× T on
  passkey      a number (data.recall_passkey_digits: 3 digits quick, 5 full) stated once in
               filler text at depth 0, ¼, ½, ¾, 1, asked for at the end; exact match of all digits
               (chance 1/900 for 3 digits)
  associative  4 key-value pairs spread over the whole context, every key queried at the end;
               exact match of each 2-digit value (chance 0.01), binned by the pair's depth.
Every run trains on 95% recall rows scored on their answers (data.recall_loss='answers') and 5%
stdlib text.
Exact match is the greedy answer: every answer token is the argmax given the prompt and the answer's
earlier tokens (one teacher-forced pass, scoring.Scorer; the same as greedy decoding's exact match).
An entry whose fields the installed model lacks (`model.layer_pattern` for the hybrid) or whose
config does not validate (`model.gamma=gated` before gated retention exists) is skipped with its
reason printed.

Runs resume and skip like every runner here (experiments/common.py); --processes (default 2) train
that many at once, one process each, and each run is evaluated in the process that trained it. Its
evaluation is kept in `<run>/recall_eval.json` (keyed by the evaluation settings), so a rerun only
evaluates what is new.

Writes into --output_dir:
  table.md, results.csv    accuracy per (architecture, task, length), mean ± std over seeds; the
                           depth × length grid of passkey accuracy; each RetNet head's effective
                           memory 1/(1 − γ) beside the distance where the model's passkey recall
                           falls below half; for gated retention, the gate on needles vs filler
  results_seeds.csv        every (architecture, task, length, seed) accuracy
  heatmap_passkey.png, heatmap_associative.png   depth × length accuracy, one panel per model
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from experiments import common
from retnet_jax import decay
from retnet_jax import recall

CONFIG = 'configs/retnet_tiny.py'
HYBRID_PATTERN = 'retention,retention,retention,attention'
# Each architecture: config overrides (model.kind='transformer' is also parameter-matched).
ARCHITECTURES = {
    'retnet': {'model.gamma': 'retnet'},
    'retnet_lm': {'model.gamma': 'lm'},
    'gated': {'model.gamma': 'gated'},
    'hybrid': {'model.layer_pattern': HYBRID_PATTERN},
    'transformer': {'model.kind': 'transformer'},
}
MULTIPLES = (1, 2, 4, 8, 16)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
TASKS = recall.TASKS
# The config's `quick` preset (2 layers of width 128), then T = 64, batch 32, 750 steps, 95% recall
# rows scored on their answers, 3-digit passkeys and 4 key-value pairs: short rows with the answers
# dense among them are what these small models learn recall from within minutes (docs/recall.md).
QUICK = (
    'seq_len=64', 'batch_size=32', 'total_steps=750', 'eval_every=750', 'checkpoint_every=250',
    'optim.learning_rate=3e-3', 'data.recall_num_pairs=4', 'data.recall_passkey_digits=3')
# The quick models have 2 layers: their hybrid is one attention layer in two.
QUICK_ARCHITECTURES = {'hybrid': {'model.layer_pattern': 'retention,attention'}}
FULL = ('seq_len=256', 'total_steps=2000', 'eval_every=500', 'checkpoint_every=500')
SHARED = ('data.source=recall', 'data.recall_fraction=0.95', 'data.recall_loss=answers')
QUICK_EXAMPLES, FULL_EXAMPLES = 8, 32  # Passkey examples per (length, depth); recall per length.


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  multiples: tuple[int, ...] = MULTIPLES
  depths: tuple[float, ...] = DEPTHS
  examples: int = QUICK_EXAMPLES
  num_pairs: int = 4
  digits: int = 5
  seed: int = 1234  # Evaluation examples are the same for every run and seed.

  def key(self) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(self)).encode()).hexdigest()[:12]


def available(name: str, overrides: Sequence[str],
              quick: bool = False) -> tuple[common.Variant | None, str]:
  """(the architecture's variant, '') or (None, why it is skipped)."""
  from retnet_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  arch = {**ARCHITECTURES[name], **(QUICK_ARCHITECTURES.get(name, {}) if quick else {})}
  config = common.config_with(CONFIG, 'quick' if quick else None)
  fields = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  missing = [k for k in arch if k.startswith('model.') and k.split('.', 1)[1] not in fields]
  if missing:
    return None, f'the installed ModelConfig has no field {", ".join(missing)}'
  own = tuple(f'{k}={v}' for k, v in arch.items())
  try:
    if arch.get('model.kind') == 'transformer':
      base = common.build_config(common.Variant(name, config), overrides)
      own += common.matched_transformer_overrides(base)
    variant = common.Variant(name, config, own)
    common.build_config(variant, overrides)
  except (ValueError, KeyError) as e:
    return None, f'its config does not validate: {e}'
  return variant, ''


def run(output_dir: str, *, quick: bool = False, steps: int | None = None,
        workdir: str | None = None, only: Sequence[str] | None = None,
        overrides: Sequence[str] = (), architectures: Sequence[str] = tuple(ARCHITECTURES),
        seeds=None, examples: int | None = None, processes: int = 1) -> list[dict]:
  """Trains every available architecture (per seed), evaluates recall, writes tables and plots.
  processes: runs trained (and evaluated) at once, one process each."""
  overrides = (SHARED + (QUICK if quick else FULL) + ((f'total_steps={steps}',) if steps else ())
               + tuple(overrides))
  variants, skipped = [], {}
  for name in architectures:
    if name not in ARCHITECTURES:
      raise ValueError(f'unknown architecture {name!r}; one of {sorted(ARCHITECTURES)}.')
    variant, why = available(name, overrides, quick)
    if variant is None:
      skipped[name] = why
      print(f'recall: skipping {name}: {why}.')
    else:
      variants.append(variant)
  if not variants:
    raise ValueError('no architecture is available.')
  seeds = common.parse_seeds(seeds) or (0,)
  runs = common.runs_dir(output_dir, workdir)
  names = [v.name for v in variants]
  base = common.build_config(variants[0], overrides)
  settings = EvalSettings(examples=examples or (QUICK_EXAMPLES if quick else FULL_EXAMPLES),
                          num_pairs=base.data.recall_num_pairs,
                          digits=base.data.recall_passkey_digits)
  results = common.run_variants(
      common.with_seeds(variants, seeds), runs, overrides=overrides,
      only=common.seeded_names(only, names, seeds), processes=processes,
      after=functools.partial(evaluate, seq_len=base.seq_len, settings=settings))
  records = {}  # (name, seed) -> per-example records
  for v in variants:
    for s in seeds:
      run_name = common.seed_run_name(v.name, s)
      if run_name in results:
        records[v.name, s] = evaluate(os.path.join(runs, run_name), base.seq_len, settings)
  rows = aggregate(records, settings, seeds)
  write_outputs(output_dir, rows, records, settings, seeds, runs, variants, base, skipped,
                overrides, quick=quick)
  return rows


# ------------------------------------------------------------------------------------------------
# Evaluation.


def examples_for(seq_len: int, settings: EvalSettings):
  """[(task, multiple, depth or None, Example)], the same for every run."""
  out = []
  for m in settings.multiples:
    for j in range(settings.examples):
      for d, depth in enumerate(settings.depths):
        ex = recall.passkey((settings.seed, 0, m, d, j), m * seq_len, depth, settings.digits)
        out.append(('passkey', m, depth, ex))
      ex = recall.associative_recall((settings.seed, 1, m, j), m * seq_len, settings.num_pairs)
      out.append(('associative', m, None, ex))
  return out


def evaluate(run_dir: str, seq_len: int, settings: EvalSettings) -> list[dict]:
  """Per answer: task, multiple, depth, distance (tokens from needle to answer), correct. Cached in
  <run_dir>/recall_eval.json under the settings' key."""
  path = os.path.join(run_dir, 'recall_eval.json')
  cache = {}
  if os.path.exists(path):
    with open(path) as f:
      cache = json.load(f)
  key = settings.key()
  if key in cache:
    return cache[key]['records']
  from retnet_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from retnet_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from retnet_jax import scoring  # pylint: disable=g-import-not-at-top
  from retnet_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  params, cfg, _ = checkpoint.load_params(run_dir)
  tok = tokenizer_lib.ByteTokenizer()
  scorer = scoring.Scorer(model_lib.make_setup(cfg), params, form='chunkwise', pad_id=tok.pad_id)
  items = examples_for(seq_len, settings)
  encoded = [recall.encode(ex, tok) for _, _, _, ex in items]
  scored = scorer.token_logprobs([t for t, _ in encoded], batch_size=8)
  records = []
  for (task, m, depth, ex), (tokens, spans), (_, greedy) in zip(items, encoded, scored):
    for i, (a, b) in enumerate(spans):
      records.append(dict(
          task=task, multiple=m, depth=float(ex.depths[i]) if depth is None else depth,
          distance=int(a - ex.needles[i]), correct=bool(np.all(greedy[a - 1:b - 1]))))
  gates = gate_statistics(run_dir, cfg, params, [(ex, enc) for (_, _, _, ex), enc
                                                 in zip(items, encoded)][:16])
  cache[key] = {'settings': dataclasses.asdict(settings), 'records': records, 'gates': gates}
  with open(path, 'w') as f:
    json.dump(cache, f)
  return records


def gate_statistics(run_dir, cfg, params, examples) -> dict:
  """For gated retention: log γ_t on needle tokens vs filler tokens, every gated layer and head
  (`Model.log_gammas`). {'skipped': why} for a fixed decay."""
  del run_dir
  if cfg.gamma != 'gated':
    return {'skipped': f'model.gamma is {cfg.gamma!r}, not gated'}
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from retnet_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  model = nnx.merge(model_lib.make_setup(cfg).graphdef, params)
  needle, fill = [], []
  for ex, (tokens, _) in examples:
    is_needle = np.zeros(len(tokens), bool)
    for start in ex.needles:  # The needle runs to its closing '.'.
      is_needle[start:ex.text.index('.', start + 1) + 1] = True
    for g_BTH in model.log_gammas(np.asarray(tokens[None], np.int32)):
      g_TH = np.asarray(g_BTH[0], np.float64)
      needle.append(g_TH[is_needle].ravel())
      fill.append(g_TH[~is_needle].ravel())
  stats = {}
  for label, values in (('needle', np.concatenate(needle)), ('filler', np.concatenate(fill))):
    q = np.quantile(values, [0.1, 0.5, 0.9])
    stats[label] = dict(mean=float(values.mean()), p10=float(q[0]), p50=float(q[1]),
                        p90=float(q[2]), count=int(values.size))
  return stats


# ------------------------------------------------------------------------------------------------
# Aggregation and outputs.


def depth_bin(depth: float, depths: Sequence[float]) -> float:
  """The nearest of `depths` (associative pairs sit at any depth)."""
  return min(depths, key=lambda d: abs(d - depth))


def accuracy(records: Sequence[dict], **where) -> float:
  hits = [r['correct'] for r in records if all(r[k] == v for k, v in where.items())]
  return float(np.mean(hits)) if hits else math.nan


def chance(task: str, settings: EvalSettings) -> float:
  """A uniform guess's exact match: a passkey's first digit is never 0; a value has 2 digits."""
  return 1 / (9 * 10 ** (settings.digits - 1)) if task == 'passkey' else 0.01


def aggregate(records, settings: EvalSettings, seeds) -> list[dict]:
  """Rows (architecture, task, multiple): accuracy mean ± std over seeds, and per seed."""
  rows = []
  for name in dict.fromkeys(n for n, _ in records):
    for task in TASKS:
      for m in settings.multiples:
        values = {s: accuracy(records[name, s], task=task, multiple=m) for s in seeds
                  if (name, s) in records}
        mean, std = common.mean_std(list(values.values()))
        rows.append(dict(model=name, task=task, length_multiple=m, accuracy=mean,
                         accuracy_std=std, chance=chance(task, settings), values=values,
                         seeds=','.join(map(str, values))))
  return rows


def grid(records, name, task, settings, seeds) -> np.ndarray:
  """Accuracy [depth, multiple], mean over seeds."""
  out = np.full((len(settings.depths), len(settings.multiples)), np.nan)
  for i, d in enumerate(settings.depths):
    for j, m in enumerate(settings.multiples):
      per_seed = [accuracy([dict(r, depth=depth_bin(r['depth'], settings.depths))
                            for r in records[name, s]], task=task, multiple=m, depth=d)
                  for s in seeds if (name, s) in records]
      per_seed = [a for a in per_seed if math.isfinite(a)]
      out[i, j] = np.mean(per_seed) if per_seed else np.nan
  return out


def recall_distance(records: Sequence[dict], task: str = 'passkey') -> float:
  """The needle-to-answer distance (tokens, power-of-two bins) below which accuracy is at least
  half its value in the nearest bin: where recall fails (inf if it never falls that far; 0 if
  the nearest bin is already below 0.5: the model does not recall at all)."""
  bins = {}
  for r in records:
    if r['task'] == task:
      bins.setdefault(2 ** int(math.floor(math.log2(max(r['distance'], 1)))), []).append(
          r['correct'])
  edges = sorted(bins)
  if not edges:
    return math.nan
  top = np.mean(bins[edges[0]])
  if top < 0.5:
    return 0.0
  for e in edges:
    if np.mean(bins[e]) < 0.5 * top:
      return float(e)
  return math.inf


def memory_table(records, variants, cfgs, base, seeds) -> str:
  """Markdown: each fixed-decay head's γ and 1/(1 − γ) beside the model's passkey recall distance."""
  lines = ['### Effective memory 1/(1 − γ) per head and where passkey recall fails', '',
           '| model | γ per head | 1/(1 − γ) per head (tokens) | recall fails at distance ≥ |',
           '|---|---|---|---:|']
  for v in variants:
    cfg = cfgs[v.name]
    pooled = [r for s in seeds for r in records.get((v.name, s), [])]
    dist = recall_distance(pooled)
    fails = ('–' if math.isnan(dist) else 'not within 16×' if math.isinf(dist) else
             'no recall at any distance' if dist == 0 else f'{dist:.0f}')
    if cfg.kind != 'retnet' or cfg.gamma in ('gated', 'learnable'):
      lines.append(f'| {v.name} | – | – | {fails} |')
      continue
    g = cfg.gammas()
    mem = decay.effective_memory(g)
    lines.append(f'| {v.name} | {", ".join(f"{x:.5f}" for x in g)} | '
                 f'{", ".join("inf" if math.isinf(x) else f"{x:.0f}" for x in mem)} | {fails} |')
    print(f'recall: {v.name}: 1/(1-gamma) per head {np.round(mem).tolist()}; passkey recall '
          f'fails at distance >= {fails} tokens (training length {base.seq_len}).')
  return '\n'.join(lines) + '\n'


def grid_markdown(records, variants, settings, seeds, seq_len) -> str:
  lines = []
  for task in TASKS:
    lines += [f'### {task}: accuracy by depth (rows) and length (columns), mean over seeds', '',
              '| model | depth | ' + ' | '.join(f'{m}× ({m * seq_len})' for m in settings.multiples)
              + ' |', '|---|---:|' + '---:|' * len(settings.multiples)]
    for v in variants:
      g = grid(records, v.name, task, settings, seeds)
      for i, d in enumerate(settings.depths):
        lines.append(f'| {v.name} | {d:.2f} | ' + ' | '.join(
            '–' if math.isnan(x) else f'{x:.2f}' for x in g[i]) + ' |')
    lines.append('')
  return '\n'.join(lines) + '\n'


def gates_markdown(runs, variants, seeds, settings) -> str:
  lines = ['### Gated retention: log γ_t on needle tokens vs filler', '']
  for v in variants:
    for s in seeds:
      path = os.path.join(runs, common.seed_run_name(v.name, s), 'recall_eval.json')
      if not os.path.exists(path):
        continue
      with open(path) as f:
        gates = json.load(f).get(settings.key(), {}).get('gates', {})
      if 'skipped' in gates:
        continue
      for label in ('needle', 'filler'):
        st = gates[label]
        lines.append(f'- {v.name} seed {s}, {label}: mean {st["mean"]:.4f}, p10 {st["p10"]:.4f}, '
                     f'median {st["p50"]:.4f}, p90 {st["p90"]:.4f} ({st["count"]} values)')
  if len(lines) == 2:
    lines.append('No gated-retention run (the gate statistics need `model.gamma=gated`).')
  return '\n'.join(lines) + '\n'


def plot_heatmaps(records, variants, settings, seeds, seq_len, output_dir) -> list[str]:
  paths = []
  for task in TASKS:
    fig, axes = common.new_figure(ncols=len(variants), size=(3.6, 3.2))
    for ax, v in zip(axes[0], variants):
      g = grid(records, v.name, task, settings, seeds)
      im = ax.imshow(g, vmin=0.0, vmax=1.0, cmap='viridis', aspect='auto', origin='upper')
      ax.set_xticks(range(len(settings.multiples)))
      ax.set_xticklabels([str(m * seq_len) for m in settings.multiples], fontsize='small')
      ax.set_yticks(range(len(settings.depths)))
      ax.set_yticklabels([f'{d:.2f}' for d in settings.depths], fontsize='small')
      ax.set(xlabel='context length (tokens)', title=v.name)
      for (i, j), x in np.ndenumerate(g):
        if math.isfinite(x):
          ax.text(j, i, f'{x:.2f}', ha='center', va='center', fontsize=7,
                  color='black' if x > 0.5 else 'white')
    axes[0, 0].set_ylabel('needle depth')
    fig.colorbar(im, ax=axes[0, -1], label='accuracy')
    fig.suptitle(f'{task} accuracy (mean over seeds {",".join(map(str, seeds))})')
    paths.append(common.save_figure(fig, os.path.join(output_dir, f'heatmap_{task}.png')))
  return paths


COLUMNS = (common.Column('model', 'model'), common.Column('task', 'task'),
           common.Column('length_multiple', 'length (× T)'),
           common.Column('accuracy', 'accuracy', '{:.3f}'),
           common.Column('accuracy_std', '± std', '{:.3f}'),
           common.Column('chance', 'chance', '{:g}'), common.Column('seeds', 'seeds'))


def write_outputs(output_dir, rows, records, settings, seeds, runs, variants, base, skipped,
                  overrides, *, quick):
  from retnet_jax import config_lib  # pylint: disable=g-import-not-at-top
  built = {v.name: common.build_config(v, overrides) for v in variants}
  cfgs = {n: config_lib.model_config(c) for n, c in built.items()}
  m = base.model
  notes = [f'{CONFIG} with {"--quick" if quick else "the full settings"} on data.source=recall: '
           f'{m.num_layers} layers, width {m.embed_dim}, {m.num_heads} heads, training length '
           f'T = {base.seq_len}, {base.total_steps} steps of batch {base.batch_size}; '
           f'{settings.examples} passkey examples per (length, depth) and {settings.examples} '
           f'associative-recall examples ({settings.num_pairs} pairs) per length; '
           f'mean ± sample std over seeds {",".join(map(str, seeds))}.']
  notes += [f'Skipped {n}: {why}.' for n, why in skipped.items()]
  notes.append('Parameters: ' + ', '.join(
      f'{n} {common.param_count(c):,}' for n, c in built.items()) + '.')
  extra = grid_markdown(records, variants, settings, seeds, base.seq_len)
  extra += '\n' + memory_table(records, variants, cfgs, base, seeds)
  extra += '\n' + gates_markdown(runs, variants, seeds, settings)
  text = common.write_table(output_dir, rows, COLUMNS, title='Long-context recall accuracy',
                            notes=notes, extra_markdown=extra)
  with open(os.path.join(output_dir, 'results_seeds.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['model', 'task', 'length_multiple', 'seed', 'accuracy'])
    for r in rows:
      for s, value in r['values'].items():
        writer.writerow([r['model'], r['task'], r['length_multiple'], s, value])
  plot_heatmaps(records, variants, settings, seeds, base.seq_len, output_dir)
  logging.info('\n%s', text)
  print(text)


def main() -> None:
  shared = common.define_flags()
  architectures = flags.DEFINE_list('architectures', list(ARCHITECTURES), 'Entries of '
                                    'ARCHITECTURES to run (unavailable ones are skipped).')
  seeds = common.define_seeds_flag()
  examples = flags.DEFINE_integer('examples', None, 'Evaluation examples per (length, depth).')
  processes = flags.DEFINE_integer('processes', 2, 'Runs trained and evaluated at once, one '
                                   'process each (2 suits a 2-core CPU).')
  app.run(lambda argv: common.main_from_flags(run, shared, architectures=architectures.value,
                                              seeds=seeds.value, examples=examples.value,
                                              processes=processes.value))


if __name__ == '__main__':
  main()
