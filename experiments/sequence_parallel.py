r"""Sequence parallelism on 8 virtual CPU devices: per-device peak memory and tokens/s of the tiny
model's train step against sequence length, for sequence axes 1, 2, 4 and 8; and the state exchange
alone (each layer's [B, H, K, V] state and decay: one all-gather and a local fold, or the log-depth
ppermute scan), its time and per-device peak.

  python -m experiments.sequence_parallel --output_dir=DIR [--quick]

Peak memory is XLA's buffer assignment of the compiled SPMD step (per device: arguments, outputs
and temporaries less donated aliases). The 8 virtual devices share this host's cores, so tokens/s
shows overheads, not a speed-up; timed steps run only up to --time_up_to tokens.
"""

from __future__ import annotations

import os

if __name__ == '__main__':  # The devices must exist before jax starts.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from retnet_jax import config_lib
from retnet_jax import retention_ops
from retnet_jax import sharding
from retnet_jax import train

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                      'retnet_tiny.py')


def tiny_config(seq_len: int, sequence: int, overrides=()):
  c = config_lib.load(CONFIG, [f'seq_len={seq_len}', 'batch_size=1', 'mesh.data=1',
                               f'mesh.sequence={sequence}', *overrides])
  return c


def measure(seq_len: int, sequence: int, *, timed_steps: int, overrides=()) -> dict:
  """Compiles the train step for one (length, sequence axis); times it when timed_steps > 0."""
  run = train.Run(tiny_config(seq_len, sequence, overrides), None, read_data=False)
  step = train.make_train_step(run)
  row = {'seq_len': seq_len, 'sequence': sequence}
  with sharding.use_rules(run.mesh, run.rules):
    t0 = time.perf_counter()
    compiled = step.lower(run.abstract_train_state(), run.abstract_batch()).compile()
    row['compile_seconds'] = time.perf_counter() - t0
    row['peak_bytes_per_device'] = common.peak_bytes(compiled)
    if timed_steps:
      state = run._init(run._key)  # pylint: disable=protected-access
      rng = np.random.default_rng(0)
      shape = (1, seq_len)
      host = {'inputs': rng.integers(0, 256, shape, np.int32),
              'targets': rng.integers(0, 256, shape, np.int32),
              'segment_ids': np.ones(shape, np.int32), 'loss_mask': np.ones(shape, np.float32)}
      batch = {k: jax.device_put(v, run.batch_sh) for k, v in host.items()}
      state, stats = compiled(state, batch)  # Warm-up.
      jax.block_until_ready(stats)
      times = []
      for _ in range(timed_steps):
        t = time.perf_counter()
        state, stats = compiled(state, batch)
        jax.block_until_ready(stats)
        times.append(time.perf_counter() - t)
      row['seconds_per_step'] = statistics.median(times)
      row['tokens_per_second'] = seq_len / row['seconds_per_step']
  return row


def exchange_costs(sequence: int, *, B=1, H=4, K=64, V=128, layers=4, repeats=10,
                   rounds=7) -> list[dict]:
  """Each exchange of `retention_ops.EXCHANGE_FNS` alone, forward and backward, for `layers`
  layers of [B, H, K, V] states: its compiled per-device peak and its time, the median of
  `rounds` rounds of `repeats` calls that alternate between the exchanges (a noisy shared host)."""
  mesh = sharding.make_mesh({'data': 1, 'sequence': sequence})
  P = jax.sharding.PartitionSpec
  rng = np.random.default_rng(0)
  u = jnp.asarray(rng.standard_normal((layers, sequence * B, H, K, V)), jnp.float32)
  a = jnp.asarray(rng.uniform(0.5, 1.0, (layers, sequence * B, H)), jnp.float32)
  s0 = jnp.asarray(rng.standard_normal((layers, B, H, K, V)), jnp.float32)

  def build(scan):
    def per_block(u_BHKV, a_BH, s0_BHKV):
      entering, final = scan(a_BH, u_BHKV, s0_BHKV, 'sequence', sequence)
      return entering + final

    per_device = jax.shard_map(per_block, mesh=mesh, in_specs=(P('sequence'), P('sequence'), P()),
                               out_specs=P('sequence'), check_vma=False)
    loss = lambda u, a, s0: sum(jnp.sum(per_device(u[l], a[l], s0[l])) for l in range(layers))
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(u, a, s0).compile()
    jax.block_until_ready(fn(u, a, s0))
    return fn

  fns = {name: build(scan) for name, scan in sorted(retention_ops.EXCHANGE_FNS.items())}
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t = time.perf_counter()
      for _ in range(repeats):
        out = fn(u, a, s0)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t) / repeats)
  return [{'sequence': sequence, 'exchange': name,
           'exchange_ms_fwd_bwd': 1e3 * statistics.median(times[name]),
           'peak_bytes_per_device': common.peak_bytes(fn),
           'state_bytes_per_layer': B * H * K * V * 4} for name, fn in fns.items()]


def sweep(lengths, axes, *, time_up_to, timed_steps, overrides=(), log=print) -> dict:
  rows, exchange = [], []
  for T in lengths:
    for n in axes:
      row = measure(T, n, timed_steps=timed_steps if T <= time_up_to else 0, overrides=overrides)
      rows.append(row)
      log(json.dumps(row))
  for n in axes:
    for row in exchange_costs(n) if n > 1 else ():
      exchange.append(row)
      log(json.dumps(row))
  return {'steps': rows, 'exchange': exchange}


def markdown(result) -> str:
  lines = ['| tokens | sequence axis | peak MiB / device | ratio to axis 1 | tokens/s |',
           '|---:|---:|---:|---:|---:|']
  base = {r['seq_len']: r['peak_bytes_per_device'] for r in result['steps'] if r['sequence'] == 1}
  for r in result['steps']:
    mib = r['peak_bytes_per_device'] / 2**20
    ratio = r['peak_bytes_per_device'] / base[r['seq_len']] if r['seq_len'] in base else float('nan')
    tps = f"{r['tokens_per_second']:,.0f}" if 'tokens_per_second' in r else '—'
    lines.append(f"| {r['seq_len']:,} | {r['sequence']} | {mib:,.1f} | {ratio:.2f} | {tps} |")
  lines += ['', '| sequence axis | exchange | ms (4 layers, fwd + bwd) | peak KiB / device |',
            '|---:|---|---:|---:|']
  lines += [f"| {e['sequence']} | {e['exchange']} | {e['exchange_ms_fwd_bwd']:.2f} | "
            f"{e['peak_bytes_per_device'] / 2**10:,.0f} |" for e in result['exchange']]
  return '\n'.join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  if f.quick:
    lengths, axes, time_up_to, steps = (512,), (1, 2), 512, 1
    overrides = ('model.num_layers=1', 'model.embed_dim=64', 'model.value_dim=128',
                 'model.ffn_dim=128', 'model.chunk_size=64')
  else:
    lengths, axes = (4096, 16384, 32768, 131072), (1, 2, 4, 8)
    time_up_to, steps, overrides = f.time_up_to, 2, ()
  result = sweep(lengths, axes, time_up_to=time_up_to, timed_steps=steps, overrides=overrides)
  os.makedirs(f.output_dir, exist_ok=True)
  with open(os.path.join(f.output_dir, 'sequence_parallel.json'), 'w') as fh:
    json.dump(result, fh, indent=1)
  table = markdown(result)
  with open(os.path.join(f.output_dir, 'sequence_parallel.md'), 'w') as fh:
    fh.write(table + '\n')
  print(table)


if __name__ == '__main__':
  flags.DEFINE_string('output_dir', None, 'Where the JSON and Markdown go.', required=True)
  flags.DEFINE_bool('quick', False, 'A seconds-long smoke run (CI).')
  flags.DEFINE_integer('time_up_to', 16384, 'Time train steps only up to this many tokens.')
  app.run(main)
