r"""Hybrid retention–attention stacks against RetNet and the Transformer: loss, decode cost, state.

  python -m experiments.hybrid --quick --output_dir=/tmp/hybrid_quick [--seeds=0,1,2]
  python -m experiments.hybrid --output_dir=/tmp/hybrid

Variants (configs/retnet_tiny.py with 4 layers; the Transformer is configs/transformer_tiny.py with
its FFN widened to RetNet's parameter count):

  retnet              retention in every layer
  gated               retention in every layer with gated decay (model.gamma=gated)
  hybrid_1in4         layer_pattern=retention,retention,retention,attention
  hybrid_1in2         layer_pattern=retention,attention
  hybrid_1in4_window  the same with attention_window = seq_len / 4
  hybrid_1in2_window
  yoco                configs/yoco_tiny.py: gated retention in the first half of the layers, then
                      cross-attention to one shared KV cache (its FFN widened to RetNet's count)
  transformer         attention in every layer

Each is trained into `<workdir>/<name>` (resumable, `--only`, `--seeds` as in every runner here, see
experiments/common.py). Attention layers have fewer parameters than retention layers (4·D² against
2·D² + 3·D·V), so the table gives each model's parameter count beside its loss.

Then, per variant on this machine's default device: decode ms/token (batch 1, greedy, the jitted
`generate.decode` loop) after a context of each length in `--contexts` (a random state of that
context: only shapes matter for time), and the decoding state's bytes per sequence.

Writes into --output_dir: table.md, results.csv (loss), decode.md, decode.csv, decode.png.
`--compile_depths=4,8,16,32` instead only times compiling the 1-in-4 hybrid's gradient at those
depths (compile.md): the layers are scanned by repeats of the pattern, so it stays flat in depth.
"""

from __future__ import annotations

import csv
import os
import time
from typing import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import configs
from experiments import common
from experiments import inference_cost
from retnet_jax import config_lib
from retnet_jax import model as model_lib

RETNET = 'configs/retnet_tiny.py'
TRANSFORMER = 'configs/transformer_tiny.py'
YOCO = 'configs/yoco_tiny.py'
PATTERNS = {'retnet': '', 'gated': '', 'hybrid_1in4': 'retention,retention,retention,attention',
            'hybrid_1in2': 'retention,attention', 'hybrid_1in4_window': 'retention,retention,retention,attention',
            'hybrid_1in2_window': 'retention,attention', 'yoco': '', 'transformer': ''}
NAMES = tuple(PATTERNS)
CONTEXTS = (1024, 8192, 16384)
QUICK_CONTEXTS = (256, 1024)
DECODE_TOKENS = 32
COLUMNS = (common.Column('model', 'model'), common.Column('params', 'parameters', '{:,}'),
           common.Column('final_eval_loss', 'final eval loss (nats)', '{:.4f}'),
           common.Column('delta', 'Δ vs retnet', '{:+.4f}'), common.Column('steps', 'steps'))
SEED_COLUMNS = (common.Column('model', 'model'), common.Column('params', 'parameters', '{:,}'),
                common.Column('loss_mean', 'final eval loss (nats)', '{:.4f}'),
                common.Column('loss_std', '± std', '{:.4f}'),
                common.Column('delta_mean', 'Δ vs retnet', '{:+.4f}'),
                common.Column('delta_std', '± std', '{:.4f}'), common.Column('seeds', 'seeds'))


def shared_overrides(quick: bool, steps: int | None, overrides: Sequence[str] = ()) -> tuple:
  quick_preset = tuple(f'{k}={v}' for k, v in configs.PRESETS['quick'].items()) if quick else ()
  return (quick_preset + ('model.num_layers=4',)
          + ((f'total_steps={steps}',) if steps else ()) + tuple(overrides))


def variants(names: Sequence[str], overrides: Sequence[str]) -> list[common.Variant]:
  base = common.build_config(common.Variant('retnet', RETNET), overrides)
  window = max(1, base.seq_len // 4)
  out = []
  for name in names:
    if name not in PATTERNS:
      raise ValueError(f'unknown model {name!r}; one of {NAMES}.')
    if name == 'transformer':
      out.append(common.Variant(name, TRANSFORMER, common.matched_transformer_overrides(base)))
      continue
    if name == 'yoco':  # The quick preset's value width is RetNet's 2·D; YOCO's is D.
      own = ('model.value_dim=None',)
      out.append(common.Variant(name, YOCO, own + matched_ffn(YOCO, own, base, overrides)))
      continue
    own = (f'model.layer_pattern={PATTERNS[name]}',) if PATTERNS[name] else ()
    if name == 'gated':
      own = ('model.gamma=gated',)
    if name.endswith('_window'):
      own += (f'model.attention_window={window}',)
    out.append(common.Variant(name, RETNET, own))
  return out


def matched_ffn(config: str, own: tuple, target, overrides: Sequence[str]) -> tuple[str, ...]:
  """The FFN width (a multiple of 8) that gives `config` with `own` the parameter count of the
  built config `target`: the count is linear in the width, so two builds fix it."""
  count = lambda ffn: common.param_count(common.build_config(
      common.Variant('', config, own + (f'model.ffn_dim={ffn}',)), overrides))
  lo, hi = 64, 128
  per_unit = (count(hi) - count(lo)) / (hi - lo)
  ffn = lo + (common.param_count(target) - count(lo)) / per_unit
  return (f'model.ffn_dim={max(8, 8 * round(ffn / 8))}',)


def decode_ms_per_token(config, context: int, key) -> float:
  """Best of three: ms per token of the jitted decode loop (batch 1) after `context` tokens, timed
  as experiments.inference_cost times it."""
  setup = model_lib.make_setup(config_lib.model_config(config))
  params = model_lib.init_params(setup.model_config, key)
  case = inference_cost.Case('model', setup, params, context, 1, DECODE_TOKENS, {}, key)
  case.run()  # The first call after compiling.
  return 1e3 * min(case.run() for _ in range(3)) / DECODE_TOKENS


def run(output_dir: str, *, quick: bool = False, steps: int | None = None,
        workdir: str | None = None, only: Sequence[str] | None = None,
        overrides: Sequence[str] = (), names: Sequence[str] = NAMES, seeds=None,
        contexts: Sequence[int] | None = None) -> list[dict]:
  """Trains the variants (skipping finished runs), times decoding; writes the tables."""
  overrides = shared_overrides(quick, steps, overrides)
  todo = variants(names, overrides)
  runs = common.runs_dir(output_dir, workdir)
  seeds = common.parse_seeds(seeds)
  configs = {v.name: common.build_config(v, overrides) for v in todo}
  params = {n: common.param_count(c) for n, c in configs.items()}
  results = common.run_variants(common.with_seeds(todo, seeds), runs, overrides=overrides,
                                only=common.seeded_names(only, [v.name for v in todo], seeds))
  grouped = common.by_seed(results, [v.name for v in todo], seeds)
  base = configs[todo[0].name]
  note = (f'{RETNET} with 4 layers{" and --quick" if quick else ""}: width {base.model.embed_dim}, '
          f'{base.total_steps} steps of {base.batch_size}×{base.seq_len} tokens; windowed attention '
          f'sees {max(1, base.seq_len // 4)} positions.')
  loss = common.seed_rows(grouped, lambda r: r['eval']['loss'], 'retnet' if 'retnet' in grouped else None)
  if seeds:
    rows = [{'model': r['name'], 'params': params[r['name']], 'loss_mean': r['mean'],
             'loss_std': r['std'], 'delta_mean': r['delta_mean'], 'delta_std': r['delta_std'],
             'seeds': r['seeds']} for r in loss]
    common.write_table(output_dir, rows, SEED_COLUMNS, title='Hybrid stacks, over seeds', notes=[
        note + f' Mean ± sample std over seeds {",".join(map(str, seeds))}; Δ paired by seed.'])
    common.write_seed_csv(output_dir, loss)
  else:
    rows = [{'model': r['name'], 'params': params[r['name']], 'final_eval_loss': r['mean'],
             'delta': r['delta_mean'], 'steps': grouped[r['name']][None]['steps']} for r in loss]
    common.write_table(output_dir, rows, COLUMNS, title='Hybrid stacks', notes=[note])
  common.check_finite(results)
  write_decode(output_dir, configs, contexts or (QUICK_CONTEXTS if quick else CONTEXTS))
  return rows


def write_decode(output_dir: str, configs: dict, contexts: Sequence[int]) -> list[dict]:
  """decode.md / decode.csv / decode.png: ms per token and state bytes per sequence by context."""
  key = jax.random.key(0)
  rows = []
  for name, config in configs.items():
    cfg = config_lib.model_config(config)
    for context in contexts:
      rows.append({'model': name, 'context': context, 'ms_per_token': decode_ms_per_token(config, context, key),
                   'state_bytes': cfg.state_bytes(1, context + DECODE_TOKENS)})
  device = jax.devices()[0]
  header = (f'{time.strftime("%Y-%m-%d", time.gmtime())}, {device.platform} ({device.device_kind}), '
            f'`python -m experiments.hybrid` decode: batch 1, {DECODE_TOKENS} greedy tokens, best of 3')
  lines = ['# Hybrid stacks: decoding', '', header, '',
           '| model | context | ms / token | state bytes / sequence |', '|---|---|---|---|']
  lines += [f'| {r["model"]} | {r["context"]:,} | {r["ms_per_token"]:.3f} | {r["state_bytes"]:,} |'
            for r in rows]
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, 'decode.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(output_dir, 'decode.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  fig, axes = common.new_figure(ncols=2, size=(5.0, 3.8))
  for i, name in enumerate(configs):
    mine = [r for r in rows if r['model'] == name]
    x = np.array([r['context'] for r in mine])
    axes[0, 0].plot(x, [r['ms_per_token'] for r in mine], 'o-', color=f'C{i}', label=name)
    axes[0, 1].plot(x, [r['state_bytes'] / 2**20 for r in mine], 'o-', color=f'C{i}', label=name)
  axes[0, 0].set(xlabel='context (tokens)', ylabel='ms / token', xscale='log')
  axes[0, 1].set(xlabel='context (tokens)', ylabel='decoding state (MiB / sequence)', xscale='log')
  axes[0, 1].legend(fontsize='small')
  common.save_figure(fig, os.path.join(output_dir, 'decode.png'))
  return rows


def compile_seconds(num_layers: int, pattern: str = PATTERNS['hybrid_1in4']) -> float:
  """Seconds to lower and compile the forward and backward pass of a small hybrid of num_layers."""
  cfg = model_lib.ModelConfig(num_layers=num_layers, embed_dim=64, num_heads=4, ffn_dim=128,
                              chunk_size=16, layer_pattern=pattern)
  setup = model_lib.make_setup(cfg)
  tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)
  loss = lambda p, t: jnp.mean(model_lib.apply_model(setup, p, t)[0])
  t0 = time.perf_counter()
  jax.jit(jax.value_and_grad(loss)).lower(model_lib.abstract_params(cfg), tokens).compile()
  return time.perf_counter() - t0


def write_compile_times(output_dir: str, depths: Sequence[int]) -> list[dict]:
  """compile.md: compile seconds of the 1-in-4 hybrid's gradient against depth (the layer scan)."""
  rows = [{'layers': n, 'seconds': compile_seconds(n)} for n in depths]
  device = jax.devices()[0]
  lines = ['# Hybrid stacks: compile time against depth', '',
           f'{time.strftime("%Y-%m-%d", time.gmtime())}, {device.platform} ({device.device_kind}), '
           f'`python -m experiments.hybrid --compile_depths={",".join(map(str, depths))}`: '
           'forward and backward, width 64, 2×64 tokens, pattern retention,retention,retention,attention',
           '', '| layers | compile seconds |', '|---|---|']
  lines += [f'| {r["layers"]} | {r["seconds"]:.1f} |' for r in rows]
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, 'compile.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return rows


def main() -> None:
  shared = common.define_flags()
  names = flags.DEFINE_list('models', list(NAMES), 'Models to compare.')
  contexts = flags.DEFINE_list('contexts', None, 'Decode contexts (default 1024,8192,16384; '
                               '--quick: 256,1024).')
  depths = flags.DEFINE_list('compile_depths', None, 'Only time compiling the 1-in-4 hybrid at '
                             'these depths (e.g. 4,8,16,32) into compile.md.')
  seeds = common.define_seeds_flag()

  def go(argv):
    del argv
    if depths.value:
      common.setup_logging()
      print(write_compile_times(shared['output_dir'].value or '.', [int(d) for d in depths.value]))
      return
    common.main_from_flags(run, shared, names=names.value, seeds=seeds.value,
                           contexts=None if contexts.value is None else [int(c) for c in contexts.value])

  app.run(go)


if __name__ == '__main__':
  main()
