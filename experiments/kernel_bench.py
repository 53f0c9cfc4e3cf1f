r"""Retention kernel timing: our Pallas kernel, our XLA chunkwise form, fla's Triton kernels and
jax's dot_product_attention, forward and forward+backward, on the platform at hand.

  python -m experiments.kernel_bench --output_dir=/tmp/kernel_bench          # fla's setting
  python -m experiments.kernel_bench --output_dir=/tmp/kernel_bench --quick  # tiny, any platform

The full setting is fla's benchmark (B = 8, H = 32, K = V = 128, bfloat16, T = 2k–16k, chunk 64).
On a GPU the kernel is Triton's and attention is cuDNN's; on a TPU the kernel is Mosaic's and
attention is XLA's; on a CPU (--quick) the kernel runs in the Pallas interpreter and fla's torch
reference stands in for its kernels: that checks the plumbing, not the speed. Each setting is
warmed up, then the median of repeats is taken; results.json and table.md go to --output_dir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax import flops as flops_lib

F32 = jnp.float32
FLA_A100_MS = {2048: 6.06, 8192: 23.95, 16384: 48.75}  # fla's README, chunk retention fwd+bwd.
AGREEMENT_TOLERANCE = 3e-2  # bfloat16 outputs, max |x − y| / max |y|.


@dataclasses.dataclass(frozen=True)
class Setting:
  B: int
  H: int
  D: int  # K = V
  chunk: int
  lengths: tuple
  modes: tuple  # of 'fwd', 'fwd+bwd'
  warmup: int
  repeats: int


FULL = Setting(B=8, H=32, D=128, chunk=64, lengths=(2048, 4096, 8192, 16384),
               modes=('fwd', 'fwd+bwd'), warmup=2, repeats=10)
QUICK = Setting(B=1, H=2, D=16, chunk=16, lengths=(64,), modes=('fwd+bwd',), warmup=1, repeats=2)


def timing_flops(impl: str, mode: str, B, H, T, D, C) -> float:
  """Matmul FLOPs: retention's chunkwise form B·H·T·(2C(K+V) + 4KV) forward (eq. 7), backward
  twice that; causal attention 2·B·H·T²·D forward (half of 4·B·H·T²·D), backward 2.5× that
  (FlashAttention's count, which recomputes the scores)."""
  if 'attention' in impl:
    fwd = 2.0 * B * H * T * T * D
    return fwd if mode == 'fwd' else 3.5 * fwd
  fwd = B * H * T * (2.0 * C * (D + D) + 4.0 * D * D)
  return fwd if mode == 'fwd' else 3.0 * fwd


def peak_flops(device_kind) -> float | None:
  """The chip's dense bfloat16 peak from the one table (retnet_jax.flops); None where it has none.
  Large GEMMs reach about 0.8 of it on an H200."""
  gen = flops_lib.chip_generation(device_kind)
  return None if gen is None else flops_lib.PEAK_FLOPS[gen]


def time_calls(run: Callable[[], object], warmup: int, repeats: int) -> dict:
  """Warm-up calls, then the median (and min, max) of `repeats` timed calls; run() must sync."""
  for _ in range(warmup):
    run()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return {'median_s': statistics.median(times), 'min_s': min(times), 'max_s': max(times),
          'repeats': repeats}


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def jax_impls(setting: Setting, backend: str) -> dict:
  """{name: fn(q, k, v) -> o} of our implementations on `backend` ([B, T, H, D] layout)."""
  from retnet_jax import retention  # pylint: disable=g-import-not-at-top
  from retnet_jax import retention_pallas  # pylint: disable=g-import-not-at-top
  log_gamma = jnp.asarray(np.log(1 - 2.0 ** (-5.0 - np.arange(setting.H))), F32)  # fla's γ_h.
  accelerator = backend in retention_pallas.TARGETS
  target = backend if accelerator else 'gpu'
  impls = {'xla': lambda q, k, v: retention.chunkwise(q, k, v, log_gamma,
                                                      chunk_size=setting.chunk)[0]}
  if not accelerator or not retention_pallas.backend_unavailable(target):
    impls['pallas'] = lambda q, k, v: retention_pallas.chunkwise(
        q, k, v, log_gamma, chunk_size=setting.chunk, target=target,
        interpret=not accelerator)[0]
  attention = {'gpu': 'cudnn'}.get(backend)
  impls[f'{attention or "xla"}_attention'] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=attention)
  return impls


def fla_impls(gpu: bool):
  """{name: fn(q, k, v) -> o} of fla's retention (torch, [B, T, H, D]), or why there are none.

  On a GPU: fla's Triton chunk_retention and fused_chunk_retention; elsewhere its torch reference
  (fla.ops.retention.naive), so the same code path runs."""
  try:
    if not gpu:
      from fla.ops.retention.naive import naive_retention  # pylint: disable=g-import-not-at-top
      t = lambda x: x.transpose(1, 2)
      return {'fla_naive': lambda q, k, v: t(naive_retention(t(q), t(k), t(v)))}
    from fla.ops.retention import chunk_retention  # pylint: disable=g-import-not-at-top
    from fla.ops.retention import fused_chunk_retention  # pylint: disable=g-import-not-at-top
    return {'fla_chunk': lambda q, k, v: chunk_retention(q, k, v)[0],
            'fla_fused_chunk': lambda q, k, v: fused_chunk_retention(q, k, v)[0]}
  except Exception as e:  # pylint: disable=broad-except
    return f'fla not importable: {type(e).__name__}: {e}'


def _time_jax(fn, mode, q, k, v, do, setting) -> tuple[dict, np.ndarray]:
  if mode == 'fwd':
    jitted = jax.jit(fn)
    call = lambda: jitted(q, k, v)
  else:
    def fwd_bwd(q, k, v, do):
      out, vjp = jax.vjp(fn, q, k, v)
      return out, vjp(do)
    jitted = jax.jit(fwd_bwd)
    call = lambda: jitted(q, k, v, do)[0]
  t0 = time.perf_counter()
  out = jax.block_until_ready(call())
  item = {'first_call_s': time.perf_counter() - t0}
  item.update(time_calls(lambda: jax.block_until_ready(call()), setting.warmup, setting.repeats))
  return item, np.asarray(out[:, :512], np.float32)


def _time_torch(fn, mode, host, setting, gpu) -> tuple[dict, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top
  device = 'cuda' if gpu else 'cpu'
  sync = torch.cuda.synchronize if gpu else (lambda: None)
  q, k, v, do = (torch.tensor(x, dtype=torch.bfloat16, device=device) for x in host)
  if mode == 'fwd':
    def run():
      with torch.no_grad():
        out = fn(q, k, v)
      sync()
      return out
  else:
    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))

    def run():
      for x in (qg, kg, vg):
        x.grad = None
      out = fn(qg, kg, vg)
      out.backward(do)
      sync()
      return out.detach()
  t0 = time.perf_counter()
  out = run()
  item = {'first_call_s': time.perf_counter() - t0}
  item.update(time_calls(run, setting.warmup, setting.repeats))
  return item, out[:, :512].float().cpu().numpy()


def run(setting: Setting, *, impls=None, with_fla=True, deadline=float('inf'),
        log=print) -> dict:
  """Times every implementation at every length and mode; returns the results (items, goal)."""
  backend = jax.default_backend()
  device_kind = jax.devices()[0].device_kind
  peak = peak_flops(device_kind) if backend != 'cpu' else None
  ours = jax_impls(setting, backend)
  if impls:
    ours = {n: f for n, f in ours.items() if n in impls}
  fla = fla_impls(backend == 'gpu') if with_fla else 'not asked for'
  results = {'setting': dataclasses.asdict(setting), 'backend': backend, 'device_kind': device_kind,
             'peak_flops': peak, 'fla': sorted(fla) if isinstance(fla, dict) else fla,
             'items': [], 'skipped': []}
  B, H, D, C = setting.B, setting.H, setting.D, setting.chunk
  for T in setting.lengths:
    rng = np.random.default_rng(T)
    host = [rng.standard_normal((B, T, H, D)).astype(np.float32) for _ in range(4)]
    q, k, v, do = (jnp.asarray(x, jnp.bfloat16) for x in host)
    q_scaled = (q * D**-0.5).astype(jnp.bfloat16)  # Retention takes q scaled (fla scales inside).
    outputs = {}
    todo = [(n, m, 'jax') for n in ours for m in setting.modes]
    todo += [(n, m, 'torch') for n in (fla if isinstance(fla, dict) else ()) for m in setting.modes]
    for name, mode, kind in todo:
      if time.perf_counter() > deadline:
        results['skipped'].append(f'T={T} {name} {mode}')
        continue
      item = {'name': f'T={T} {name} {mode}', 'T': T, 'impl': name, 'mode': mode}
      try:
        if kind == 'jax':
          qi = q if 'attention' in name else q_scaled
          timing, out = _time_jax(ours[name], mode, qi, k, v, do, setting)
        else:
          timing, out = _time_torch(fla[name], mode, host, setting, backend == 'gpu')
        outputs.setdefault(name, out)
        flops = timing_flops(name, mode, B, H, T, D, C)
        item.update(timing, ok=True, ms=1e3 * timing['median_s'], flops=flops,
                    tflops=flops / timing['median_s'] / 1e12,
                    peak_fraction=None if peak is None else flops / timing['median_s'] / peak)
        log(f'  T={T:6d} {name:18s} {mode:8s} {item["ms"]:9.3f} ms {item["tflops"]:7.2f} TFLOP/s')
      except Exception as e:  # pylint: disable=broad-except
        item.update(ok=False, error=f'{type(e).__name__}: {str(e)[:2000]}')
        log(f'  T={T:6d} {name:18s} {mode:8s} failed: {item["error"][:300]}')
      results['items'].append(item)
    if 'pallas' in outputs:
      for other in [n for n in outputs if n != 'pallas' and 'attention' not in n]:
        err = rel_err(outputs['pallas'], outputs[other])
        results['items'].append({'name': f'T={T} pallas vs {other}', 'kind': 'agreement', 'T': T,
                                 'other': other, 'err': err, 'ok': err <= AGREEMENT_TOLERANCE})
  results['goal'] = goal(results['items'])
  return results


def goal(items) -> dict:
  """Per length: our kernel's fwd+bwd time over fla's chunk kernel's; met at every length?"""
  ms = {(it['T'], it['impl'], it['mode']): it.get('ms') for it in items if 'impl' in it}
  rows, met = {}, True
  lengths = sorted({it['T'] for it in items if 'impl' in it})
  for T in lengths:
    ours = ms.get((T, 'pallas', 'fwd+bwd'))
    fla = ms.get((T, 'fla_chunk', 'fwd+bwd'))
    rows[T] = None if ours is None or fla is None else ours / fla
    met = met and rows[T] is not None and rows[T] <= 1.0
  return {'pallas_over_fla_chunk_fwd_bwd': rows, 'met': bool(met and lengths)}


def table(results: dict) -> str:
  """Markdown: one table per mode, ms (TFLOP/s, fraction of peak) per length and implementation."""
  s = results['setting']
  timed = [it for it in results['items'] if 'impl' in it]
  lines = [f'Kernel time on {results["device_kind"]} ({results["backend"]}): B = {s["B"]}, '
           f'H = {s["H"]}, K = V = {s["D"]}, bf16, chunk {s["chunk"]}; median of {s["repeats"]} '
           f'after {s["warmup"]} warm-up calls.', '']
  impls = list(dict.fromkeys(it['impl'] for it in timed))
  for mode in [m for m in ('fwd', 'fwd+bwd') if any(it['mode'] == m for it in timed)]:
    lines += [f'{mode}: ms (TFLOP/s, fraction of peak)', '',
              '| T | ' + ' | '.join(impls) + ' |', '|---:|' + '---:|' * len(impls)]
    for T in sorted({it['T'] for it in timed}):
      cells = []
      for impl in impls:
        it = next((x for x in timed if (x['T'], x['impl'], x['mode']) == (T, impl, mode)), None)
        if it is None:
          cells.append('–')
        elif not it['ok']:
          cells.append('failed')
        else:
          frac = '' if it['peak_fraction'] is None else f', {it["peak_fraction"]:.2f}'
          cells.append(f'{it["ms"]:.3f} ({it["tflops"]:.1f}{frac})')
      lines.append(f'| {T} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  agree = [it for it in results['items'] if it.get('kind') == 'agreement']
  if agree:
    lines.append('Outputs agree (first 512 positions, rel err): ' + '; '.join(
        f'T={it["T"]} pallas vs {it["other"]} {it["err"]:.1e}' for it in agree))
  g = results['goal']
  lines.append(f'Our kernel at or below fla\'s chunk kernel (fwd+bwd) at every length: {g["met"]}; '
               f'ratio per length {g["pallas_over_fla_chunk_fwd_bwd"]}. fla\'s README (A100, chunk '
               f'retention fwd+bwd): {FLA_A100_MS} ms.')
  return '\n'.join(lines) + '\n'


def write(results: dict, output_dir: str) -> None:
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(output_dir, 'table.md'), 'w') as f:
    f.write(table(results))


def define_flags() -> dict:
  return dict(
      output_dir=flags.DEFINE_string('output_dir', None, 'Where results.json and table.md go.',
                                     required=True),
      quick=flags.DEFINE_bool('quick', False, 'Tiny shapes (any platform; interpreted on CPU).'),
      lengths=flags.DEFINE_list('lengths', None, 'Sequence lengths (default: by --quick).'),
      impls=flags.DEFINE_list('impls', None, 'Only these of our implementations (default: all).'),
      no_fla=flags.DEFINE_bool('no_fla', False, 'Leave fla out.'),
      budget_s=flags.DEFINE_float('budget_s', None,
                                  'Skip what would start after this many seconds.'))


def main(argv, fl):
  del argv
  from retnet_jax import platform  # pylint: disable=g-import-not-at-top
  platform.start()
  setting = QUICK if fl['quick'].value else FULL
  if fl['lengths'].value:
    setting = dataclasses.replace(setting, lengths=tuple(int(t) for t in fl['lengths'].value))
  if jax.default_backend() == 'cpu' and not fl['quick'].value:
    raise app.UsageError('no GPU or TPU here: the full setting needs one (use --quick on a CPU).')
  deadline = time.perf_counter() + (fl['budget_s'].value or float('inf'))
  results = run(setting, impls=fl['impls'].value, with_fla=not fl['no_fla'].value,
                deadline=deadline)
  write(results, fl['output_dir'].value)
  print(table(results))


if __name__ == '__main__':
  _flags = define_flags()
  app.run(lambda argv: main(argv, _flags))
