r"""The TPU planning table of docs/planning.md: the paper sizes compiled for the slices a user
would rent.

  python -m experiments.tpu_plan --output_dir=/tmp/tpu_plan [--only=1.3b/v5e-32,...] [--kinds=retnet]

Each row is one `--mode=compile` of configs/retnet_paper.py:<size>,slice=<slice>[,kind=transformer]
(the settings in its SLICES) in a process of its own, one after another: a 1.3B-6.7B compile takes
minutes on 2 CPU cores. A row whose compile.json exists is not compiled again. Writes table.md (the
table in docs/planning.md) and table.json into --output_dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = (('1.3b', 'v5p-32'), ('1.3b', 'v5e-32'), ('1.3b', 'v4-32'), ('2.7b', 'v5p-64'),
        ('6.7b', 'v5p-128'), ('6.7b', 'v4-256'))
GIB = 2**30

_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where the compiles and the table go.')
_ONLY = flags.DEFINE_list('only', [], 'size/slice pairs to compile (default: all of PLAN).')
_KINDS = flags.DEFINE_list('kinds', ['retnet', 'transformer'], 'Model kinds.')


def row_name(size, slice_, kind):
  return f'{kind}_{size}_{slice_}'


def compile_row(size, slice_, kind, output_dir) -> dict | None:
  workdir = os.path.join(output_dir, row_name(size, slice_, kind))
  path = os.path.join(workdir, 'compile.json')
  if not os.path.exists(path):
    arg = f'{size},slice={slice_}' + (',kind=transformer' if kind == 'transformer' else '')
    cmd = [sys.executable, '-m', 'retnet_jax.main', f'--config=configs/retnet_paper.py:{arg}',
           '--mode=compile', f'--topology={slice_}', f'--workdir={workdir}']
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    with open(os.path.join(workdir, 'compile.log'), 'w') as log:
      rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    print(f'{row_name(size, slice_, kind)}: exit {rc} after {time.perf_counter() - t0:.0f} s',
          flush=True)
    if rc:
      return None
  with open(path) as f:
    return json.load(f)


def table(reports) -> str:
  head = ('| model | slice (chips) | mesh | sequences per micro-batch × steps (per chip) | arguments / temporaries / '
          'total per chip | HBM | fits | model FLOPs/step | step ≥ (at peak) | retention | '
          'compile |\n|' + '---|' * 11)
  lines = [head]
  for r in reports:
    mesh = ' '.join(f'{a}={s}' for a, s in r['mesh'].items() if s > 1) or 'one device'
    micro = r['batch_size'] // r['grad_accum_steps']
    per = r['per_device']
    fits = (f'yes ({per["headroom_gib"]:.1f} GiB free)' if per['fits'] else
            f'no ({-per["headroom_gib"]:.1f} GiB over)')
    impl = r['retention_impl_in_step']
    kernel = {'pallas': 'Pallas kernel', 'xla': 'XLA', 'none': '—'}.get(impl['impl'], impl['impl'])
    lines.append(
        f'| {r["model"]["name"]} ({r["model"]["parameters"] / 1e9:.2f}B) | {r["slice"]} '
        f'({r["num_devices"]}) | {mesh} | {micro} × {r["grad_accum_steps"]} '
        f'({micro / (r["mesh"].get("data", 1) * r["mesh"].get("fsdp", 1)):g}) | '
        f'{per["argument_bytes"] / GIB:.2f} / {per["temp_bytes"] / GIB:.2f} / '
        f'{per["total_bytes"] / GIB:.2f} GiB | {per["hbm_bytes"] / GIB:.0f} GiB | {fits} | '
        f'{r["flops_per_step"]["model"]:.2e} | {r["step_seconds_lower_bound"]:.2f} s | {kernel} | '
        f'{r["compile_seconds"]:.0f} s |')
  return '\n'.join(lines)


def main(argv):
  del argv
  out = _OUTPUT_DIR.value
  if not out:
    raise app.UsageError('--output_dir is required.')
  os.makedirs(out, exist_ok=True)
  plan = [tuple(x.split('/')) for x in _ONLY.value] or list(PLAN)
  reports = []
  for size, slice_ in plan:
    for kind in _KINDS.value:
      report = compile_row(size, slice_, kind, out)
      if report is not None:
        reports.append(report)
  with open(os.path.join(out, 'table.json'), 'w') as f:
    json.dump(reports, f, indent=2)
  text = table(reports)
  with open(os.path.join(out, 'table.md'), 'w') as f:
    f.write(text + '\n')
  print(text)


if __name__ == '__main__':
  app.run(main)
