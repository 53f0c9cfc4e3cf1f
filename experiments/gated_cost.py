r"""What the gated (per-token) decay costs the train step: tokens/s of `configs/retnet_tiny.py`'s
full chunkwise train step (forward, backward, AdamW) with a fixed and a gated γ, in one run.

  python -m experiments.gated_cost --output_dir=/tmp/gated_cost
  python -m experiments.gated_cost --output_dir=/tmp/gated_cost --seq_lens=512,2048 --repeats=3

Every case runs the same tokens a step (`--tokens_per_step`, batch = tokens / length). All cases
are compiled first, then timed round-robin, one step each per round, `--repeats` rounds: load on a
shared machine then hits every case alike, and the table gives each case's median. The targets:
gated ≥ 0.8× fixed at T = 2,048, and gated at the longest length ≥ 0.85× gated at the shortest
(linear in length). Writes table.md, results.csv and results.json into --output_dir.
"""

from __future__ import annotations

import json
import os
import statistics

from absl import app
from absl import flags
from absl import logging

from experiments import common
from experiments import training_cost
from retnet_jax import platform

CONFIG = 'configs/retnet_tiny.py'
GAMMAS = ('retnet', 'gated')
COLUMNS = (common.Column('gamma', 'decay'), common.Column('seq_len', 'T'),
           common.Column('batch', 'batch'),
           common.Column('seconds_per_step', 's/step (median)', '{:.3f}'),
           common.Column('tokens_per_second', 'tokens/s', '{:.0f}'))


def define_flags() -> dict:
  return dict(
      output_dir=flags.DEFINE_string('output_dir', None, 'Where results go.', required=True),
      seq_lens=flags.DEFINE_list('seq_lens', ['512', '2048', '16384'], 'Sequence lengths.'),
      tokens_per_step=flags.DEFINE_integer('tokens_per_step', 16384, 'Tokens in every step.'),
      repeats=flags.DEFINE_integer('repeats', 5, 'Timed rounds (one step of every case each).'),
  )


def measure(seq_lens, tokens_per_step: int, repeats: int, overrides=()) -> list[dict]:
  """One row per (γ, T): the median seconds of `repeats` round-robin steps, and tokens/s."""
  steppers, batches = {}, {T: max(1, tokens_per_step // T) for T in seq_lens}
  for gamma in GAMMAS:
    config = common.build_config(common.Variant(gamma, f'{CONFIG}:gamma={gamma}'),
                                 ('model.form=chunkwise', *overrides))
    for T in seq_lens:
      logging.info('compiling %s at T=%d', gamma, T)
      steppers[gamma, T] = training_cost.stepper(config, batches[T], T)
  times = {case: [] for case in steppers}
  for r in range(repeats):
    for case, step in steppers.items():
      times[case].append(step())
    logging.info('round %d/%d done', r + 1, repeats)
  rows = []
  for (gamma, T), seconds in times.items():
    median = statistics.median(seconds)
    rows.append(dict(gamma=gamma, seq_len=T, batch=batches[T], seconds_per_step=median,
                     tokens_per_second=batches[T] * T / median, seconds=seconds))
  return rows


def targets(rows) -> list[str]:
  """The two targets, checked on these rows (where their lengths were measured)."""
  tps = {(r['gamma'], r['seq_len']): r['tokens_per_second'] for r in rows}
  lines = []
  if ('gated', 2048) in tps and ('retnet', 2048) in tps:
    ratio = tps['gated', 2048] / tps['retnet', 2048]
    lines.append(f'- gated / fixed at T = 2,048: {ratio:.2f} (target ≥ 0.8: '
                 f'{"met" if ratio >= 0.8 else "NOT met"})')
  lengths = sorted(T for g, T in tps if g == 'gated')
  if len(lengths) > 1:
    ratio = tps['gated', lengths[-1]] / tps['gated', lengths[0]]
    lines.append(f'- gated at T = {lengths[-1]:,} / at T = {lengths[0]:,}: {ratio:.2f} '
                 f'(target ≥ 0.85: {"met" if ratio >= 0.85 else "NOT met"})')
  return lines


def main(argv, fl) -> None:
  del argv
  platform.tune_xla_cpu_flags()
  platform.tune_host_allocator()
  seq_lens = [int(x) for x in fl['seq_lens'].value]
  rows = measure(seq_lens, fl['tokens_per_step'].value, fl['repeats'].value)
  notes = targets(rows)
  text = common.write_table(fl['output_dir'].value, rows, COLUMNS,
                            title='Train step, fixed vs gated decay (retnet_tiny, chunkwise)',
                            notes=notes)
  with open(os.path.join(fl['output_dir'].value, 'results.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  print(text)


if __name__ == '__main__':
  _flags = define_flags()
  app.run(lambda argv: main(argv, _flags))
