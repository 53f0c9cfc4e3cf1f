r"""Inference cost of RetNet against a Transformer with a KV cache, at equal size (paper Fig. 1, §3.4).

  python -m experiments.inference_cost --output_dir=/tmp/inference_cost [--quick]

For each model, context length L and batch size B: the decoding state after L tokens, then N decoded
tokens timed through `generate.decode` (the jitted while_loop that `generate` runs: sampling plus the
recurrent form, or the KV cache). Reported per (model, L, B):

  ms_per_token       wall time of the N-token loop / N (one step of the whole batch), median of repeats
  tokens_per_second  B · N / wall time
  state_bytes        RetNet: the retention state; Transformer: the KV cache (and its segment ids) sized
                     L + N, as `generate` allocates it
  peak_bytes         XLA's buffer assignment for the decode executable: parameters + state + outputs +
                     temporaries, less donated (aliased) buffers. On CPU, device.memory_stats() is None, so
                     this static figure stands in for the measured peak; on GPU the process's measured
                     peak (memory_stats()['peak_bytes_in_use']) is written to table.md as well.

The context is synthetic: the state holds random values at offset L rather than coming from a prefill of
L random tokens, which would cost the Transformer O(L²) here and not change the decode step, whose work
depends on the state's shape, never on its values (RetNet's state shape is the same for every L). Each
repeat times every (model, L, B) once, in a fresh random order, so machine noise and the cache effects
of the case run before spread evenly over them.

Outputs in --output_dir: results.jsonl (one object a line), table.md (with the RetNet/Transformer ratios)
and inference_cost.png (latency vs context, throughput vs batch, state bytes vs context).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from retnet_jax import config_lib
from retnet_jax import generate
from retnet_jax import model as model_lib
from retnet_jax import platform


def define_flags() -> dict:
  """Flags, defined from `__main__` only (importing this module next to other experiments is safe)."""
  return dict(
      output_dir=flags.DEFINE_string('output_dir', None, 'Where results.jsonl, table.md and the plot go.'),
      quick=flags.DEFINE_bool('quick', False, 'Small sweep: contexts 256…8192, batches 1 and 4.'),
      retnet_config=flags.DEFINE_string('retnet_config', 'configs/retnet_tiny.py', 'RetNet config.'),
      transformer_config=flags.DEFINE_string('transformer_config', 'configs/transformer_tiny.py',
                                             'Transformer config (same size).'),
      contexts=flags.DEFINE_list('contexts', None, 'Context lengths (default: by --quick).'),
      batches=flags.DEFINE_list('batches', None, 'Batch sizes (default: by --quick).'),
      decode_tokens=flags.DEFINE_integer('decode_tokens', None, 'Tokens decoded per timing.'),
      repeats=flags.DEFINE_integer('repeats', None, 'Timed repeats (the median is reported).'))


QUICK = dict(contexts=(256, 1024, 4096, 8192), batches=(1, 4), decode_tokens=32, repeats=9)
FULL = dict(contexts=(256, 512, 1024, 2048, 4096, 8192, 16384), batches=(1, 4, 16), decode_tokens=64,
            repeats=7)
KEYS = ('model', 'context_len', 'batch', 'ms_per_token', 'tokens_per_second', 'state_bytes')


def tree_bytes(tree) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def build(config, seed: int = 0):
  """(setup, random params) at the config's model size."""
  setup = model_lib.make_setup(config_lib.model_config(config))
  return setup, jax.jit(lambda k: model_lib.init_params(setup.model_config, k))(jax.random.key(seed))


def context_state(setup, batch: int, context: int, new_tokens: int, key):
  """The decoding state after `context` tokens (random values) with room for `new_tokens` more.

  Same shapes and dtypes as `generate.prefill` returns: RetNet's state has no length; the Transformer's
  cache holds context + new_tokens positions, the first `context` of them filled (segment 1).
  """
  cfg = setup.model_config
  abstract = model_lib.abstract_model(cfg)
  max_len = context + new_tokens if cfg.state_grows else None
  shapes = jax.eval_shape(lambda: abstract.init_state(batch, max_len))

  @jax.jit
  def make(key):
    def fill(path, s):
      name = getattr(path[-1], 'name', '') if path else ''
      # Slot i of a cache of S slots holds the latest position ≡ i (mod S) before `context`.
      S = s.shape[-2] if name == 'v' else s.shape[-1]  # v [R, B, H, S, K]; the others end in S.
      last, slots = context - 1, jnp.arange(S)
      pos = last - (last - slots) % S
      if name == 'positions':  # [R, S]; empty slots (pos < 0) lie past every query.
        return jnp.broadcast_to(jnp.where(pos >= 0, pos, model_lib.EMPTY_POSITION), s.shape)
      if name == 'segment_ids':  # [R, B, S]: the filled slots hold segment 1.
        return jnp.broadcast_to((pos >= 0).astype(s.dtype), s.shape)
      x = 0.1 * jax.random.normal(jax.random.fold_in(key, ('k', 'v').index(name) if name in ('k', 'v') else 2), s.shape, jnp.float32)
      if name in ('k', 'v'):  # Only the filled slots hold values.
        # k [R, B, H, K, S], v [R, B, H, S, K] (model.KVCache).
        x = jnp.where((pos >= 0) if name == 'k' else (pos >= 0)[:, None], x, 0.0)
      return x.astype(s.dtype)

    return shapes._replace(offset=jnp.asarray(context, jnp.int32),
                           segment=jnp.ones((batch,), jnp.int32),
                           layers=jax.tree_util.tree_map_with_path(fill, shapes.layers))

  return make(key)


class Case:
  """One (model, context, batch): its compiled decode loop, state and timings."""

  def __init__(self, name, setup, params, context, batch, new_tokens, compiled_cache, key):
    self.name, self.setup, self.params = name, setup, params
    self.context, self.batch, self.new_tokens = context, batch, new_tokens
    self.state = context_state(setup, batch, context, new_tokens, key)
    self.state_bytes = tree_bytes(self.state.layers)
    vocab = setup.model_config.vocab_size
    self.logits = jax.random.normal(jax.random.fold_in(key, 1), (batch, vocab), jnp.float32)
    self.done = jnp.zeros((batch,), bool)
    self.counts = {'prompt_BV': jnp.zeros((batch, vocab), bool),
                   'counts_BV': jnp.zeros((batch, vocab), jnp.int32)}
    self.knobs = generate._knobs(0.0, 0, 1.0, 0, (), 0)  # pylint: disable=protected-access
    self.args = (jnp.asarray(0, jnp.int32), jnp.asarray(new_tokens, jnp.int32), self.knobs)
    # The executable depends only on shapes: RetNet's is shared by every context.
    shape_key = (name, batch, tuple((v.shape, str(v.dtype)) for v in jax.tree.leaves(self.state)))
    if shape_key not in compiled_cache:
      compiled_cache[shape_key] = generate.decode.lower(
          setup.graphdef, params, self.state, self.logits, self.done, self.counts, *self.args,
          out_len=new_tokens).compile()
    self.compiled = compiled_cache[shape_key]
    self.peak_bytes = common.peak_bytes(self.compiled)
    self.times = []

  def run(self) -> float:
    """Decodes new_tokens from the context; returns the wall time in seconds."""
    start = time.perf_counter()
    out = self.compiled(self.params, self.state, self.logits, self.done, self.counts, *self.args)
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - start
    steps = int(out[-1])
    if steps != self.new_tokens:
      raise RuntimeError(f'decoded {steps} tokens, expected {self.new_tokens}.')
    # Continue from the same context next time (the state was donated; its offset moved on).
    self.state = out[2]._replace(offset=jnp.asarray(self.context, jnp.int32))
    return elapsed

  def record(self) -> dict:
    t = statistics.median(self.times)
    return {'model': self.name, 'context_len': self.context, 'batch': self.batch,
            'ms_per_token': 1e3 * t / self.new_tokens,
            'tokens_per_second': self.batch * self.new_tokens / t, 'state_bytes': self.state_bytes,
            'peak_bytes': self.peak_bytes, 'decode_tokens': self.new_tokens,
            'ms_per_token_repeats': [1e3 * x / self.new_tokens for x in self.times]}


def sweep(configs: dict, *, contexts, batches, decode_tokens: int, repeats: int, seed: int = 0,
          log=print) -> list[dict]:
  """configs: {'retnet': ConfigDict, 'transformer': ConfigDict}. Returns one record per case."""
  cases, compiled_cache, params_count = [], {}, {}
  key = jax.random.key(seed)
  for name, config in configs.items():
    setup, params = build(config, seed)
    params_count[name] = model_lib.count_params(params)
    for context in contexts:
      for batch in batches:
        t0 = time.perf_counter()
        case = Case(name, setup, params, int(context), int(batch), decode_tokens, compiled_cache,
                    jax.random.fold_in(key, len(cases)))
        case.run()  # Warm-up.
        cases.append(case)
        log(f'{name:12s} L={context:6d} B={batch:3d}: ready in {time.perf_counter() - t0:.1f}s')
  order = np.random.default_rng(seed)
  for r in range(repeats):  # Every case once per repeat, in a fresh random order: machine noise and
    for i in order.permutation(len(cases)):  # cache effects of the case before spread evenly.
      cases[i].times.append(cases[i].run())
    log(f'repeat {r + 1}/{repeats} done')
  records = [case.record() for case in cases]
  for rec in records:
    rec['params'] = params_count[rec['model']]
  return records


# ------------------------------------------------------------------------------------------------
# Report.


def _mb(n):
  return 'n/a' if n is None else f'{n / 2**20:.2f}'


def must_show(records) -> dict:
  """RetNet latency at the longest context / at the shortest, per batch; state-size and growth facts."""
  by = {(r['model'], r['context_len'], r['batch']): r for r in records}
  contexts = sorted({r['context_len'] for r in records})
  batches = sorted({r['batch'] for r in records})
  lo, hi = contexts[0], contexts[-1]
  out = {'short': lo, 'long': hi, 'batches': {}}
  for b in batches:
    row = {}
    for m in ('retnet', 'transformer'):
      if (m, lo, b) in by and (m, hi, b) in by:
        row[f'{m}_latency_ratio'] = by[(m, hi, b)]['ms_per_token'] / by[(m, lo, b)]['ms_per_token']
        row[f'{m}_state_ratio'] = by[(m, hi, b)]['state_bytes'] / by[(m, lo, b)]['state_bytes']
    out['batches'][b] = row
  return out


def write_table(records, path, meta: dict):
  by = {(r['model'], r['context_len'], r['batch']): r for r in records}
  contexts = sorted({r['context_len'] for r in records})
  batches = sorted({r['batch'] for r in records})
  lines = ['# Inference cost: RetNet (recurrent) vs Transformer (KV cache), equal size', '']
  for k, v in meta.items():
    lines.append(f'- {k}: {v}')
  lines += ['', '## Per-token decoding latency and memory', '',
            '| batch | context | RetNet ms/token | Transformer ms/token | Transformer/RetNet latency '
            '| RetNet state MB | Transformer KV cache MB | state memory reduction '
            '| RetNet peak MB | Transformer peak MB | peak reduction |',
            '|---|---|---|---|---|---|---|---|---|---|---|']
  for b in batches:
    for L in contexts:
      r, t = by.get(('retnet', L, b)), by.get(('transformer', L, b))
      if r is None or t is None:
        continue
      peak = (f"{100 * (1 - r['peak_bytes'] / t['peak_bytes']):.1f}%"
              if r['peak_bytes'] and t['peak_bytes'] else 'n/a')
      lines.append(
          f"| {b} | {L} | {r['ms_per_token']:.3f} | {t['ms_per_token']:.3f} "
          f"| {t['ms_per_token'] / r['ms_per_token']:.2f}× | {_mb(r['state_bytes'])} "
          f"| {_mb(t['state_bytes'])} | {100 * (1 - r['state_bytes'] / t['state_bytes']):.1f}% "
          f"| {_mb(r['peak_bytes'])} | {_mb(t['peak_bytes'])} | {peak} |")
  lines += ['', '## Decoding throughput (tokens/s)', '',
            '| model | context | ' + ' | '.join(f'batch {b}' for b in batches) + ' |',
            '|---|---|' + '---|' * len(batches)]
  for m in ('retnet', 'transformer'):
    for L in contexts:
      cells = [f"{by[(m, L, b)]['tokens_per_second']:.0f}" if (m, L, b) in by else '' for b in batches]
      lines.append(f'| {m} | {L} | ' + ' | '.join(cells) + ' |')
  ms = must_show(records)
  lines += ['', f"## Growth from context {ms['short']} to {ms['long']}", '',
            '| batch | RetNet latency ratio | RetNet state ratio | Transformer latency ratio '
            '| Transformer cache ratio |', '|---|---|---|---|---|']
  for b, row in ms['batches'].items():
    lines.append(f"| {b} | {row.get('retnet_latency_ratio', float('nan')):.3f} "
                 f"| {row.get('retnet_state_ratio', float('nan')):.2f} "
                 f"| {row.get('transformer_latency_ratio', float('nan')):.2f} "
                 f"| {row.get('transformer_state_ratio', float('nan')):.2f} |")
  lines += ['', 'Latency: median over the repeats of the wall time of the jitted N-token decode loop, '
            'divided by N. Peak: XLA buffer assignment of that executable (parameters, state, outputs, '
            'temporaries; donated buffers counted once). State memory reduction compares the RetNet '
            "state with the KV cache; peak reduction the whole executables'.", '']
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


def plot(records, path):
  contexts = sorted({r['context_len'] for r in records})
  batches = sorted({r['batch'] for r in records})
  by = {(r['model'], r['context_len'], r['batch']): r for r in records}
  fig, axes = common.new_figure(ncols=3, size=(5.3, 4.6))
  axes = axes[0]
  styles = {'retnet': ('tab:blue', 'o'), 'transformer': ('tab:red', 's')}
  for m, (color, marker) in styles.items():
    for i, b in enumerate(batches):
      xs = [L for L in contexts if (m, L, b) in by]
      axes[0].plot(xs, [by[(m, L, b)]['ms_per_token'] for L in xs], color=color, marker=marker,
                   alpha=0.4 + 0.6 * (i + 1) / len(batches), label=f'{m} B={b}')
    L = contexts[-1]
    bs = [b for b in batches if (m, L, b) in by]
    axes[1].plot(bs, [by[(m, L, b)]['tokens_per_second'] for b in bs], color=color, marker=marker,
                 label=f'{m} (context {L})')
    b = batches[0]
    xs = [L for L in contexts if (m, L, b) in by]
    axes[2].plot(xs, [by[(m, L, b)]['state_bytes'] / 2**20 for L in xs], color=color, marker=marker,
                 label=f"{m} {'state' if m == 'retnet' else 'KV cache'} (B={b})")
  axes[0].set(xscale='log', xlabel='context length', ylabel='ms per decoded token',
              title='Decoding latency vs context')
  axes[1].set(xscale='log', yscale='log', xlabel='batch size', ylabel='tokens / s',
              title='Decoding throughput vs batch')
  axes[2].set(xscale='log', yscale='log', xlabel='context length', ylabel='MB',
              title='Decoding state vs context')
  for ax in axes:
    ax.set_xscale('log', base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  common.save_figure(fig, path)


def run(configs: dict, output_dir: str, *, contexts, batches, decode_tokens: int, repeats: int,
        log=print) -> list[dict]:
  """Sweeps, then writes results.jsonl, table.md and inference_cost.png into output_dir."""
  os.makedirs(output_dir, exist_ok=True)
  t0 = time.perf_counter()
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  records = sweep(configs, contexts=contexts, batches=batches, decode_tokens=decode_tokens,
                  repeats=repeats, log=log)
  with open(os.path.join(output_dir, 'results.jsonl'), 'w') as f:
    for rec in records:
      f.write(json.dumps(rec) + '\n')
  device = jax.devices()[0]
  stats = device.memory_stats()
  params = {r['model']: r['params'] for r in records}
  meta = {
      'device': f'{device.platform} ({device.device_kind}), {jax.device_count()} device(s)',
      'parameters': ', '.join(f'{m} {n:,}' for m, n in params.items()),
      'decoded tokens per timing': decode_tokens, 'repeats (median)': repeats,
      'context': 'synthetic state at offset L (random values; decode cost depends only on shapes)',
      'measured device peak': (f"{stats['peak_bytes_in_use'] / 2**20:.1f} MB (whole sweep)"
                               if stats and 'peak_bytes_in_use' in stats else
                               'device.memory_stats() is None on this backend: peaks are XLA '
                               'buffer-assignment figures'),
      'process peak RSS growth': f'{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024:.0f} MB (whole sweep)',
      'sweep time': f'{time.perf_counter() - t0:.0f} s',
  }
  write_table(records, os.path.join(output_dir, 'table.md'), meta)
  plot(records, os.path.join(output_dir, 'inference_cost.png'))
  return records


def main(argv, fl):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  platform.start()
  if not fl['output_dir'].value:
    raise app.UsageError('--output_dir is required.')
  sweep_args = dict(QUICK if fl['quick'].value else FULL)
  if fl['contexts'].value:
    sweep_args['contexts'] = tuple(int(x) for x in fl['contexts'].value)
  if fl['batches'].value:
    sweep_args['batches'] = tuple(int(x) for x in fl['batches'].value)
  if fl['decode_tokens'].value:
    sweep_args['decode_tokens'] = fl['decode_tokens'].value
  if fl['repeats'].value:
    sweep_args['repeats'] = fl['repeats'].value
  configs = {'retnet': config_lib.load(fl['retnet_config'].value),
             'transformer': config_lib.load(fl['transformer_config'].value)}
  for name, c in configs.items():
    if c.model.kind != name:
      raise app.UsageError(f'the {name} config has model.kind={c.model.kind!r}.')
  run(configs, fl['output_dir'].value, **sweep_args)
  with open(os.path.join(fl['output_dir'].value, 'table.md')) as f:
    print(f.read())


if __name__ == '__main__':
  _flags = define_flags()
  app.run(lambda argv: main(argv, _flags))
