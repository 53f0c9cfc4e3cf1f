r"""Training cost: tokens/s, peak memory and model FLOPs utilisation of the full train step
(forward, backward, AdamW) against sequence length, for RetNet's parallel and chunkwise forms and the
Transformer baseline, all measured in one run.

  python -m experiments.training_cost --output_dir=/tmp/training_cost
  python -m experiments.training_cost --output_dir=/tmp/tc --quick --vs_torchscale
  python -m experiments.training_cost --output_dir=/tmp/tc --seq_lens=512,2048 \
      --config=configs/retnet_tiny.py --config.model.num_layers=2

Every length runs the same number of tokens a step (`--tokens_per_step`, batch = tokens / length).
Writes into --output_dir: results.jsonl (model, form, seq_len, batch, tokens_per_second, peak_bytes,
mfu, ...), table.md (with the performance targets below checked) and training_cost.png.

Definitions. peak_bytes: XLA's buffer assignment for the compiled step (arguments + outputs +
temporaries − donated aliases), the same on every machine. Model FLOPs per token: 6 × the matmul
parameters (LM head included, embedding lookup not) plus 3 × the mixer's forward FLOPs as the form
computes them (parallel and attention: the T × T products; chunkwise: C × C inside chunks plus the
state products). mfu = model FLOPs / s / peak, where peak is the best float32 matmul rate measured in
the same run; dense_mfu counts the matmul parameters' FLOPs only. The dense part's own efficiency is
measured on the same step with the retention operator removed (o = v; projections, gate, norms, FFN,
head, loss and AdamW kept): its matmul FLOPs / its step time / peak.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from experiments import common
from retnet_jax import config_lib
from retnet_jax import flops
from retnet_jax import model as model_lib
from retnet_jax import platform
from retnet_jax import sharding
from retnet_jax import train


def define_flags() -> dict:
  """Flags, defined from `__main__` only (importing this module next to other experiments is safe)."""
  return dict(
      config=config_flags.DEFINE_config_file('config', 'configs/retnet_tiny.py', 'Model config.',
                                             lock_config=False),
      output_dir=flags.DEFINE_string('output_dir', None, 'Where results go.', required=True),
      quick=flags.DEFINE_bool('quick', False, 'A short sweep (512, 2048, 8192; fewer steps).'),
      seq_lens=flags.DEFINE_list('seq_lens', None, 'Sequence lengths (default 512 … 16384).'),
      forms=flags.DEFINE_list('forms', ['chunkwise', 'parallel', 'transformer'], 'What to time.'),
      tokens_per_step=flags.DEFINE_integer('tokens_per_step', 16384, 'Tokens in every step.'),
      steps=flags.DEFINE_integer('steps', 3, 'Timed steps per point (after one warm-up step).'),
      max_quadratic_len=flags.DEFINE_integer(
          'max_quadratic_len', 8192, 'Longest T for the parallel form and attention (T² memory).'),
      vs_torchscale=flags.DEFINE_bool(
          'vs_torchscale', False, "Time torchscale's chunkwise RetNetDecoder (needs torch, torchscale)."),
      compare_len=flags.DEFINE_integer('compare_len', 2048, 'T of the torchscale comparison.'),
      compare_pairs=flags.DEFINE_integer(
          'compare_pairs', 9, "Alternating steps of ours and torchscale's fastest; the median "
          'ratio of the pairs counts.'),
      compile_layers=flags.DEFINE_list('compile_layers', ['2', '4', '8'],
                                       'Depths at which the train step compile time is measured.'))


DEFAULT_LENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_LENS = (512, 2048, 8192)


# Performance targets, checked in table.md: name -> (what, comparison, bound).
TARGETS = {
    'length_ratio': ('chunkwise tokens/s at the longest T / at the shortest', '≥', 0.85),
    'dense_mfu': ("the dense part's matmul FLOPs / s / peak (retention removed)", '≥', 0.60),
    'vs_torchscale': ('ours / torchscale chunkwise tokens/s', '≥', 1.5),
    'compile_seconds': ('train-step compile seconds at the deepest depth', '<', 30.0),
    'compile_growth': ('compile seconds deepest / shallowest', '<', 1.5),
}


def meets(name: str, value: float) -> bool:
  _, op, bound = TARGETS[name]
  return value >= bound if op == '≥' else value < bound


def target(name: str) -> str:
  _, op, bound = TARGETS[name]
  return f'target {op} {bound:g}'


def verdict(*checks) -> str:
  """'PASS' when every (name, value) meets its target, else 'FAIL'."""
  return 'PASS' if all(meets(n, v) for n, v in checks) else 'FAIL'


TABLE_COLUMNS = (common.Column('model', 'model'), common.Column('form', 'form'),
                 common.Column('seq_len', 'T'), common.Column('batch', 'batch'),
                 common.Column('tokens_per_second', 'tokens/s', '{:.0f}'),
                 common.Column('peak', 'peak memory'), common.Column('mfu', 'MFU', '{:.1%}'),
                 common.Column('dense_mfu', 'dense MFU', '{:.1%}'))


def model_flops_per_token(cfg: model_lib.ModelConfig, form: str, seq_len: int) -> tuple[float, float]:
  """(total, dense) training FLOPs per token (retnet_jax.flops); see the module docstring."""
  return flops.train_flops_per_token(cfg, seq_len, form), 3.0 * flops.dense_flops_per_token(cfg)


def _synthetic_batch(batch, seq_len, vocab, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq_len + 1))
  return {'inputs': jnp.asarray(tokens[:, :-1], jnp.int32),
          'targets': jnp.asarray(tokens[:, 1:], jnp.int32),
          'segment_ids': jnp.ones((batch, seq_len), jnp.int32),
          'loss_mask': jnp.ones((batch, seq_len), jnp.float32)}


def build_step(config, batch: int, seq_len: int):
  """(jitted train step, state, batch) for `config` on synthetic tokens."""
  config = config.copy_and_resolve_references()
  config.seq_len, config.batch_size = seq_len, batch
  for axis in sharding.AXES:
    config.mesh[axis] = 1
  config.optim.grad_accum_steps = 1
  run = train.Run(config, None, read_data=False, devices=jax.devices()[:1])
  with sharding.use_rules(run.mesh, run.rules):
    state = run.initial_state()
  data = jax.device_put(_synthetic_batch(batch, seq_len, run.setup.model_config.vocab_size),
                        run.batch_sh)
  return _InRules(train.make_train_step(run), run), state, data


class _InRules:
  """A jitted step that lowers under its run's mesh and sharding rules."""

  def __init__(self, jitted, run):
    self.jitted, self.run = jitted, run

  def lower(self, *args):
    with sharding.use_rules(self.run.mesh, self.run.rules):
      return self.jitted.lower(*args)


def time_train_step(config, batch, seq_len, steps) -> dict:
  """Compile time, peak bytes and the median step time of `steps` timed steps."""
  step = stepper(config, batch, seq_len)
  seconds = statistics.median(step() for _ in range(steps))
  if not np.isfinite(step.last_loss()):
    raise FloatingPointError(f'non-finite loss at T={seq_len}')
  return {'seconds_per_step': seconds, 'compile_seconds': step.compile_seconds,
          'peak_bytes': step.peak_bytes}


def time_dense_part(config, batch, seq_len, steps) -> dict:
  """`time_train_step` with the retention operator replaced by o = v: the step's dense part."""
  dense = config.copy_and_resolve_references()
  dense.model.retention_impl = 'skip'
  return time_train_step(dense, batch, seq_len, steps)


def variant(config, form: str):
  """The config of one timed model: RetNet in `form`, or the Transformer at the same size."""
  c = config.copy_and_resolve_references()
  if form == 'transformer':
    c.model.kind, c.model.value_dim = 'transformer', None
  else:
    c.model.form = form
  return c


def _torchscale_stepper(config, batch, seq_len, chunk):
  """torchscale's RetNetDecoder (chunkwise, `chunk`) at `config`'s sizes: a callable that runs one
  full AdamW step (after a warm-up step) and returns its seconds."""
  from tests import timm_stub  # torchscale imports timm only for drop_path.
  timm_stub.install()
  import torch
  from torchscale.architecture.config import RetNetConfig
  from torchscale.architecture.retnet import RetNetDecoder
  torch.manual_seed(0)
  m = config.model
  args = RetNetConfig(
      decoder_embed_dim=m.embed_dim, decoder_value_embed_dim=m.value_dim or 2 * m.embed_dim,
      decoder_retention_heads=m.num_heads, decoder_ffn_embed_dim=m.ffn_dim,
      decoder_layers=m.num_layers, vocab_size=m.vocab_size, chunkwise_recurrent=True,
      recurrent_chunk_size=chunk, activation_fn='swish')
  decoder = RetNetDecoder(args, embed_tokens=torch.nn.Embedding(m.vocab_size, m.embed_dim))
  opt = torch.optim.AdamW(decoder.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.05)
  x = torch.randint(0, m.vocab_size, (batch, seq_len))
  y = torch.randint(0, m.vocab_size, (batch, seq_len))

  def step():
    t = time.perf_counter()
    opt.zero_grad()
    logits, _ = decoder(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, m.vocab_size), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(decoder.parameters(), 2.0)
    opt.step()
    return time.perf_counter() - t

  step()
  step.threads = torch.get_num_threads()
  return step


def stepper(config, batch, seq_len):
  """Our compiled train step at `config`: a callable that runs one step (after a warm-up step)
  and returns its seconds; it also carries compile_seconds, peak_bytes and last_loss()."""
  jitted, state, data = build_step(config, batch, seq_len)
  t = time.perf_counter()
  compiled = jitted.lower(state, data).compile()
  compile_seconds = time.perf_counter() - t
  box = [state, None]

  def step():
    t = time.perf_counter()
    box[0], box[1] = compiled(box[0], data)
    jax.block_until_ready(box[1])
    return time.perf_counter() - t

  step()
  step.compile_seconds, step.peak_bytes = compile_seconds, common.peak_bytes(compiled)
  step.last_loss = lambda: float(box[1]['loss_sum'])
  return step


def time_torchscale(config, batch, seq_len, steps, chunk_sizes=(64, 128, 256, 512)) -> list[dict]:
  """torchscale's chunkwise RetNetDecoder at each of `chunk_sizes` (its default is 512), same sizes,
  full AdamW step: one dict per chunk size."""
  results = []
  for chunk in [c for c in chunk_sizes if c <= seq_len] or [seq_len]:
    step = _torchscale_stepper(config, batch, seq_len, chunk)
    result = {'seconds_per_step': statistics.median(step() for _ in range(steps)),
              'chunk_size': chunk, 'torch_threads': step.threads}
    logging.info('torchscale chunk %d: %.0f tok/s', chunk, batch * seq_len / result['seconds_per_step'])
    results.append(result)
  return results


def compile_seconds_by_depth(config, depths, seq_len=256, batch=4) -> dict[int, float]:
  out = {}
  for L in depths:
    c = config.copy_and_resolve_references()
    c.model.num_layers = L
    step, state, data = build_step(c, batch, seq_len)
    jax.clear_caches()
    t = time.perf_counter()
    step.lower(state, data).compile()
    out[L] = time.perf_counter() - t
  return out


def kernel_benchmark(seq_lens=(2048, 4096, 8192, 16384)) -> list[dict]:
  """On a GPU: the Pallas chunkwise kernel against fla's chunk_retention (B=8, H=32, K=V=128)."""
  if jax.default_backend() != 'gpu':
    return []
  from retnet_jax import decay
  from retnet_jax import retention_pallas
  rows = []
  B, H, K = 8, 32, 128
  log_gamma = jnp.asarray(decay.log_gammas('retnet', H), jnp.float32)
  for T in seq_lens:
    q, k, v = (jax.random.normal(jax.random.key(i), (B, T, H, K), jnp.bfloat16) for i in range(3))
    fwd = jax.jit(lambda q, k, v: retention_pallas.chunkwise(q, k, v, log_gamma, chunk_size=64)[0])
    bwd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(retention_pallas.chunkwise(
        q, k, v, log_gamma, chunk_size=64)[0].astype(jnp.float32)), argnums=(0, 1, 2)))
    row = {'kernel': 'retnet_jax_pallas', 'B': B, 'H': H, 'K': K, 'T': T}
    for name, fn in (('forward_ms', fwd), ('forward_backward_ms', bwd)):
      jax.block_until_ready(fn(q, k, v))
      t = time.perf_counter()
      for _ in range(10):
        out = fn(q, k, v)
      jax.block_until_ready(out)
      row[name] = (time.perf_counter() - t) / 10 * 1e3
    rows.append(row)
  return rows


def _fmt_bytes(n):
  return 'n/a' if n is None else f'{n / 2**20:.0f} MiB'


def write_outputs(out_dir, rows, extras):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'results.jsonl'), 'w') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')
  lines = ['# Training cost', '',
           f"Machine: {extras['device']}; float32 matmul peak measured in this run: "
           f"{extras['peak_flops'] / 1e9:.1f} GFLOP/s. Tokens per step: {extras['tokens_per_step']}.", '',
           common.markdown_table([{**r, 'peak': _fmt_bytes(r['peak_bytes'])} for r in rows
                                  if r['model'] != 'torchscale'], TABLE_COLUMNS)]
  lines += ['', '## Targets', '']
  for line in extras['targets']:
    lines.append(f'- {line}')
  if extras.get('kernel'):
    lines += ['', '## Pallas kernel vs flash-linear-attention (published H100, ms)', '',
              '| T | ours fwd | ours fwd+bwd | fla fwd | fla fwd+bwd |', '|---:|---:|---:|---:|---:|']
    fla = {2048: (0.455, 2.28), 4096: (0.639, 3.37), 8192: (1.012, 5.58), 16384: (1.749, 10.19)}
    for r in extras['kernel']:
      f_, fb = fla.get(r['T'], (math.nan, math.nan))
      lines.append(f"| {r['T']} | {r['forward_ms']:.3f} | {r['forward_backward_ms']:.3f} | {f_} | {fb} |")
  elif extras.get('kernel_note'):
    lines += ['', f"Pallas kernel timing: {extras['kernel_note']}"]
  with open(os.path.join(out_dir, 'table.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  _plot(out_dir, rows)


def _plot(out_dir, rows):
  fig, axes = common.new_figure(ncols=2, size=(5.5, 4.0))
  axes = axes[0]
  keys = sorted({(r['model'], r['form']) for r in rows
                 if r['model'] != 'torchscale' and not r.get('dense_part')})
  for model, form in keys:
    pts = sorted((r['seq_len'], r) for r in rows if (r['model'], r['form']) == (model, form))
    label = model if model == 'transformer' else f'{model} {form}'
    axes[0].plot([t for t, _ in pts], [r['tokens_per_second'] for _, r in pts], 'o-', label=label)
    axes[1].plot([t for t, _ in pts], [(r['peak_bytes'] or 0) / 2**20 for _, r in pts], 'o-', label=label)
  for r in rows:
    if r['model'] == 'torchscale' and r['best_chunk_size']:
      axes[0].plot([r['seq_len']], [r['tokens_per_second']], 'k*', ms=12,
                   label=f"torchscale chunkwise (C={r['chunk_size']})")
  for ax, title in zip(axes, ('training tokens/s (forward, backward, AdamW)', 'peak memory (MiB)')):
    ax.set_xscale('log', base=2)
    ax.set_xlabel('sequence length')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[1].set_yscale('log')
  common.save_figure(fig, os.path.join(out_dir, 'training_cost.png'))


def run(config, out_dir, *, seq_lens, forms, tokens_per_step, steps, max_quadratic_len,
        vs_torchscale=False, compare_len=2048, compare_pairs=9,
        compile_layers=(2, 4, 8)) -> list[dict]:
  platform.tune_xla_cpu_flags()
  platform.tune_host_allocator()
  peak = flops.measure_matmul_peak()
  logging.info('float32 matmul peak: %.1f GFLOP/s', peak / 1e9)
  rows, todo = [], [(f, T) for f in forms for T in seq_lens]
  t0 = time.perf_counter()
  for i, (form, T) in enumerate(todo):
    quadratic = form in ('parallel', 'transformer')
    if quadratic and T > max_quadratic_len:
      logging.info('skip %s at T=%d (T² memory; --max_quadratic_len=%d)', form, T, max_quadratic_len)
      continue
    batch = max(1, tokens_per_step // T)
    c = variant(config, form)
    cfg = config_lib.model_config(c)
    r = time_train_step(c, batch, T, steps)
    tps = batch * T / r['seconds_per_step']
    total, dense = model_flops_per_token(cfg, form if form != 'transformer' else 'parallel', T)
    rows.append({'model': cfg.kind, 'form': 'attention' if form == 'transformer' else form,
                 'seq_len': T, 'batch': batch, 'tokens_per_second': tps,
                 'peak_bytes': r['peak_bytes'], 'mfu': total * tps / peak, 'dense_mfu': dense * tps / peak,
                 'compile_seconds': r['compile_seconds'],
                 'params': int(sum(x.size for x in jax.tree.leaves(
                     model_lib.abstract_params(cfg))))})
    done = time.perf_counter() - t0
    logging.info('[%d/%d] %s T=%d: %.0f tok/s, peak %s, MFU %.1f%% | elapsed %.0fs, ETA %.0fs',
                 i + 1, len(todo), form, T, tps, _fmt_bytes(r['peak_bytes']), 100 * rows[-1]['mfu'],
                 done, done / (i + 1) * (len(todo) - i - 1))
  targets = []
  chunk = {r['seq_len']: r['tokens_per_second'] for r in rows if r['form'] == 'chunkwise'}
  if len(chunk) >= 2:
    lo, hi = min(chunk), max(chunk)
    ratio = chunk[hi] / chunk[lo]
    targets.append(f'chunkwise tokens/s at T={hi} / at T={lo} = {ratio:.2f} '
                   f"({target('length_ratio')}): {verdict(('length_ratio', ratio))}")
  dense_best = max((r['dense_mfu'] for r in rows if r['form'] == 'chunkwise'), default=None)
  if dense_best is not None:
    c = variant(config, 'chunkwise')
    batch = max(1, tokens_per_step // compare_len)
    part_tps = batch * compare_len / time_dense_part(c, batch, compare_len, steps)['seconds_per_step']
    part_mfu = model_flops_per_token(config_lib.model_config(c), 'chunkwise', compare_len)[1] * \
        part_tps / peak
    rows.append({'model': 'retnet', 'form': 'dense part (retention removed)', 'seq_len': compare_len,
                 'batch': batch, 'tokens_per_second': part_tps, 'peak_bytes': None,
                 'mfu': part_mfu, 'dense_mfu': part_mfu, 'dense_part': True})
    targets.append(f'dense part of the step (retention operator removed) at T={compare_len}: '
                   f'{part_mfu:.1%} of the measured peak '
                   f"({target('dense_mfu')}): {verdict(('dense_mfu', part_mfu))}; the whole chunkwise step's matmul "
                   f'FLOPs reach {dense_best:.1%} of peak at best')
  if vs_torchscale:
    cmp_cfg = variant(config, 'chunkwise')
    batch = max(1, tokens_per_step // compare_len)
    tps = lambda seconds: batch * compare_len / seconds
    theirs_all = time_torchscale(cmp_cfg, batch, compare_len, steps)
    best = min(theirs_all, key=lambda r: r['seconds_per_step'])
    # This machine's speed drifts by tens of percent within minutes: alternate ours and
    # torchscale's fastest step by step, so that each pair sees the same machine, and take the
    # median. The first step after the other framework's is slower for both (cold caches and
    # heap), so each side runs one untimed step before its timed one.
    ours_step = stepper(cmp_cfg, batch, compare_len)
    theirs_step = _torchscale_stepper(cmp_cfg, batch, compare_len, best['chunk_size'])
    second = lambda step: (step(), step())[1]
    pairs = []
    for i in range(compare_pairs):
      ours_i, theirs_i = tps(second(ours_step)), tps(second(theirs_step))
      pairs.append((ours_i / theirs_i, ours_i, theirs_i))
      logging.info('pair %d/%d: ours %.0f tok/s, torchscale %.0f tok/s, ratio %.2f', i + 1,
                   compare_pairs, ours_i, theirs_i, ours_i / theirs_i)
    ratio, ours, theirs = sorted(pairs)[len(pairs) // 2]
    for r in theirs_all:
      rows.append({'model': 'torchscale', 'form': 'chunkwise', 'seq_len': compare_len, 'batch': batch,
                   'tokens_per_second': tps(r['seconds_per_step']), 'peak_bytes': None, 'mfu': None,
                   'dense_mfu': None, 'chunk_size': r['chunk_size'], 'best_chunk_size': r is best,
                   'ours_tokens_per_second': ours, 'ratio': ours / tps(r['seconds_per_step'])})
    rows.append({'model': 'torchscale', 'form': 'chunkwise, alternating steps', 'seq_len': compare_len,
                 'batch': batch, 'tokens_per_second': theirs, 'peak_bytes': None, 'mfu': None,
                 'dense_mfu': None, 'chunk_size': best['chunk_size'], 'ours_tokens_per_second': ours,
                 'ratio': ratio, 'pair_ratios': [r[0] for r in pairs], 'best_chunk_size': False})
    # What 1.5× would take: the whole step's model FLOPs at that rate, as a fraction of the peak.
    needed_mfu = model_flops_per_token(config_lib.model_config(cmp_cfg), 'chunkwise', compare_len)[0] * \
        1.5 * theirs / peak
    targets.append(f"vs torchscale chunkwise at its fastest chunk size (C={best['chunk_size']}; "
                   f"{best['torch_threads']} threads) at T={compare_len}, batch {batch}, vocab 256, "
                   f'median of {compare_pairs} alternating step pairs: ours {ours:.0f} tok/s, '
                   f'torchscale {theirs:.0f} tok/s, ratio {ratio:.2f} (pairs: ' +
                   ', '.join(f'{r[0]:.2f}' for r in pairs) +
                   f"; {target('vs_torchscale')}): {verdict(('vs_torchscale', ratio))}. Against each chunk size "
                   'in one pass: ' +
                   ', '.join(f"C={r['chunk_size']} {ours / tps(r['seconds_per_step']):.2f}×"
                             for r in theirs_all) +
                   f'. 1.5× the fastest needs the whole step at {needed_mfu:.0%} MFU')
    print(f'ratio vs torchscale: {ratio:.2f}')
  if compile_layers:
    secs = compile_seconds_by_depth(config, [int(x) for x in compile_layers])
    growth = secs[max(secs)] / secs[min(secs)]
    worst = max(secs.values())
    targets.append('train-step compile time by depth: ' + ', '.join(
        f'{L} layers {s:.1f}s' for L, s in sorted(secs.items())) +
        f" ({target('compile_seconds')}; flat in depth, {target('compile_growth')}: "
        f'{max(secs)}/{min(secs)} layers = {growth:.2f}×): '
        f"{verdict(('compile_seconds', worst), ('compile_growth', growth))}")
  kernel = kernel_benchmark()
  extras = {'device': f'{jax.devices()[0].device_kind} ({jax.default_backend()}, '
                      f'{os.cpu_count()} CPUs)', 'peak_flops': peak,
            'tokens_per_step': tokens_per_step, 'targets': targets, 'kernel': kernel,
            'kernel_note': None if kernel else 'not run: needs a GPU (none in this run).'}
  write_outputs(out_dir, rows, extras)
  return rows


def main(argv, fl):
  del argv
  quick = fl['quick'].value
  seq_lens = ([int(x) for x in fl['seq_lens'].value] if fl['seq_lens'].value
              else QUICK_LENS if quick else DEFAULT_LENS)
  steps = 2 if quick and fl['steps'].value == 3 else fl['steps'].value
  run(fl['config'].value, fl['output_dir'].value, seq_lens=seq_lens, forms=fl['forms'].value,
      tokens_per_step=fl['tokens_per_step'].value, steps=steps,
      max_quadratic_len=fl['max_quadratic_len'].value, vs_torchscale=fl['vs_torchscale'].value,
      compare_len=fl['compare_len'].value, compare_pairs=fl['compare_pairs'].value,
      compile_layers=fl['compile_layers'].value)
  print(open(os.path.join(fl['output_dir'].value, 'table.md')).read())


if __name__ == '__main__':
  logging.get_absl_handler().python_handler.stream = sys.stdout
  _flags = define_flags()
  app.run(lambda argv: main(argv, _flags))
