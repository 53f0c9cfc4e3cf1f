"""Ahead-of-time compiles for TPU from this host (retnet_jax/aot.py): topology names, the FLOPs
formula against the compiler's count, the Pallas kernels under the TPU compiler (Mosaic), sharded
train steps of the tiny config on a 4-chip slice, decoding, and the one-line errors of the CLI."""

import dataclasses
import json
import math
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from retnet_jax import aot
from retnet_jax import config_lib
from retnet_jax import flops
from retnet_jax import train
from tests import util

needs_libtpu = pytest.mark.skipif(
    __import__('importlib').util.find_spec('libtpu') is None and not util.IN_CI,
    reason="the TPU compiler (libtpu) is not installed: pip install -e '.[tpu]'")


# ------------------------------------------------------------------------------------------------
# Names and formulas (no compiler).


@pytest.mark.parametrize('name, libtpu_name, chips', [
    ('v5p-32', 'v5p:2x2x4', 16), ('v5p-128', 'v5p:4x4x4', 64), ('v5p-64', 'v5p:2x4x4', 32),
    ('v4-32', 'v4:2x2x4', 16), ('v4-256', 'v4:4x4x8', 128), ('v4-8', 'v4:2x2x1', 4),
    ('v5e-16', 'v5e:4x4', 16), ('v5e-32', 'v5e:4x8', 32), ('v5litepod-8', 'v5e:2x4', 8),
    ('v6e-8', 'v6e:2x4', 8), ('v6e-1', 'v6e:1x1', 1), ('V5P:2x2x1', 'v5p:2x2x1', 4),
    ('v5e:4x8', 'v5e:4x8', 32), ('h100-8', 'h100:1x1x8', 8), ('h100-16', 'h100:1x2x8', 16)])
def test_topology_names(name, libtpu_name, chips):
  t = aot.parse_topology(name)
  assert (t.libtpu_name, t.num_chips) == (libtpu_name, chips)


@pytest.mark.parametrize('name, words', [
    ('v7-8', 'unknown TPU topology'), ('tpu', 'unknown TPU topology'),
    ('v5p-12', 'power of two'), ('v5p-1', 'power of two'), ('v5e:0x4', '2 or 3 positive'),
    ('h100-12', 'up to 8 GPUs or a multiple')])
def test_bad_topology_names(name, words):
  with pytest.raises(ValueError, match=words):
    aot.parse_topology(name)


def test_mesh_must_use_every_chip():
  mesh = lambda **s: {'data': 1, 'fsdp': 1, 'tensor': 1, **s}
  assert aot.check_mesh(mesh(fsdp=-1), 16, 'v5p-32') == {'data': 1, 'fsdp': 16, 'sequence': 1, 'tensor': 1}
  assert aot.check_mesh(mesh(data=2, fsdp=4, tensor=2), 16, 'v5p-32')['tensor'] == 2
  with pytest.raises(ValueError, match='has 8 devices but v5p-32 has 16 chips'):
    aot.check_mesh(mesh(data=2, fsdp=4), 16, 'v5p-32')
  with pytest.raises(ValueError, match='3 does not divide 16'):
    aot.check_mesh(mesh(data=3, fsdp=-1), 16, 'v5p-32')


def test_missing_libtpu_is_one_clear_error(monkeypatch):
  monkeypatch.setattr(aot.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(ValueError, match=r"TPU compiler is not installed.*\[tpu\]"):
    aot.topology_devices(aot.parse_topology('v5e-4'))


@pytest.mark.parametrize('kind, form', [('retnet', 'chunkwise'), ('transformer', 'chunkwise')])
def test_forward_flops_formula_matches_the_compiler(kind, form):
  """The formula against XLA's own count of the forward pass, layers unrolled (no loop body counted
  once for many; the chunkwise form's products are batched over chunks, only its elementwise state
  recurrence is a loop). The last chunk's state update feeds only the unused final state, which
  the compiler drops: 1/N of one term, within the tolerance."""
  name = 'retnet_tiny' if kind == 'retnet' else 'transformer_tiny'
  T = 64
  c = util.config(name, model__embed_dim=256, model__num_heads=2, model__ffn_dim=512,
                  model__num_layers=2, model__scan_layers=False, model__form=form,
                  model__chunk_size=16, model__remat='none', seq_len=T, batch_size=2,
                  **({'model__value_dim': 512} if kind == 'retnet' else {'model__value_dim': None}))
  cfg = config_lib.model_config(c)
  from retnet_jax import model as model_lib
  model = model_lib.Model(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  fwd = lambda p, t: nnx.merge(graphdef, p)(t)[0]
  tokens = jnp.zeros((2, T), jnp.int32)
  counted = jax.jit(fwd).lower(params, tokens).compile().cost_analysis()
  counted = (counted[0] if isinstance(counted, (list, tuple)) else counted)['flops']
  formula = flops.forward_flops_per_token(cfg, T) * 2 * T
  # The compiler also counts elementwise work (norms, softmax, rotary): a few per cent more.
  assert formula <= counted <= 1.08 * formula, (formula, counted)


def test_train_flops_match_the_compiler_with_its_trip_counts():
  """The train step (3 x forward, flops.train_flops_per_step) against XLA's count of the compiled step
  with the layers scanned and 2 accumulation steps: XLA counts each loop body once, so its count
  is the head plus one layer, on one micro-batch (plus the optimiser's elementwise update)."""
  T, B, A, L = 64, 4, 2, 3
  c = util.config('retnet_tiny', model__embed_dim=256, model__num_heads=2, model__ffn_dim=512,
                  model__value_dim=512, model__num_layers=L, model__chunk_size=16,
                  model__remat='none', model__retention_impl='xla', seq_len=T, batch_size=B,
                  optim__grad_accum_steps=A)
  cfg = config_lib.model_config(c)
  run = train.Run(c, None, read_data=False, devices=jax.devices()[:1])
  compiled = train.make_train_step(run).lower(run.abstract_train_state(),
                                              run.abstract_batch()).compile()
  counted = aot.compiler_flops(compiled)
  model = flops.train_flops_per_step(cfg, B, T)
  one_layer = model - flops.train_flops_per_step(dataclasses.replace(cfg, num_layers=L - 1), B, T)
  head = model - L * one_layer
  body_once = (head + one_layer) / A  # The trip counts: A micro-batches, L layers.
  assert body_once <= counted <= 1.2 * body_once, (body_once, counted)


# ------------------------------------------------------------------------------------------------
# The kernels under the TPU compiler.


def _one_chip_sharding():
  devices = aot.topology_devices(aot.parse_topology('v5e:1x1'))
  return NamedSharding(jax.sharding.Mesh(np.array(devices[:1]), ('x',)), P())


def _kernel_grad(cases, sh):
  """One jitted function: the loss over several kernel calls and its gradient in q, k, v, log γ."""
  from retnet_jax import retention_pallas

  def loss(args, resets):
    total = 0.0
    for (q, k, v, g), reset, (chunk, _) in zip(args, resets, cases):
      o, s = retention_pallas.chunkwise(q, k, v, g, reset=reset, chunk_size=chunk, target='tpu')
      total += jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s)
    return total

  args, resets = [], []
  for chunk, (B, T, H, K, V, dtype, with_resets) in cases:
    a = lambda *shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
    args.append((a(B, T, H, K), a(B, T, H, K), a(B, T, H, V), a(H, dt=jnp.float32)))
    resets.append(a(B, T, dt=jnp.bool_) if with_resets else None)
  return jax.jit(jax.grad(loss)).lower(args, resets).compile()


@needs_libtpu
@pytest.mark.parametrize('cases', [
    # (chunk, (B, T, H, K, V, dtype, resets)): the paper sizes' K = 256, V = 512 with resets and
    # a T that no chunk divides; K = 128 in float32 without resets.
    [(256, (1, 600, 2, 256, 512, jnp.bfloat16, True)), (64, (2, 256, 2, 128, 256, jnp.float32, False))],
    [(64, (1, 200, 2, 128, 128, jnp.bfloat16, False)), (128, (1, 256, 1, 256, 512, jnp.float32, True))],
], ids=['k256_bf16_resets_ragged+k128_f32', 'k128_bf16_ragged+k256_f32_resets'])
def test_kernels_compile_for_tpu(cases):
  """Forward and backward (forward, dq and dk/dv kernels) of each call compile with Mosaic."""
  compiled = _kernel_grad(cases, _one_chip_sharding())
  kernels = aot.kernels_in(compiled)
  calls = len(cases)
  assert kernels == {'retention_forward_chunk': calls, 'retention_dq_chunk': calls,
                     'retention_dkv_chunk': calls}, kernels


@needs_libtpu
@pytest.mark.parametrize('H, K, V, chunk, dtype, words', [
    (2, 64, 128, 64, jnp.bfloat16, 'multiples of 128'),
    (2, 128, 256, 8, jnp.bfloat16, 'multiple of 16'),
    (2, 128, 256, 64, jnp.int8, 'dtype'),
])
def test_refused_shapes_run_xla_on_tpu(H, K, V, chunk, dtype, words):
  """Shapes the kernel refuses: a clear reason, and the step compiled for TPU has no kernel."""
  from retnet_jax import retention_ops
  from retnet_jax import retention_pallas
  from retnet_jax import sharding
  assert words in retention_pallas.unsupported(H, K, V, chunk, dtype, 'tpu')
  sh = _one_chip_sharding()
  mesh = sh.mesh
  rules = {a: None for a in sharding.LOGICAL_AXES}
  q = jax.ShapeDtypeStruct((1, 96, H, K), dtype, sharding=sh)
  v = jax.ShapeDtypeStruct((1, 96, H, V), dtype, sharding=sh)
  with sharding.use_rules(mesh, rules):
    choice = retention_ops.choose(q.shape, v.shape, dtype, form='chunkwise', chunk_size=chunk)
  assert choice.impl == 'xla' and words in choice.reason and 'tpu' in choice.reason
  if dtype == jnp.int8:
    return
  g = jax.ShapeDtypeStruct((H,), jnp.float32, sharding=sh)
  f = lambda q, k, v, g: retention_ops.retention(q.astype(jnp.float32), k.astype(jnp.float32),
                                                 v.astype(jnp.float32), g, chunk_size=chunk)[0]
  with sharding.use_rules(mesh, rules):
    compiled = jax.jit(f).lower(q, q, v, g).compile()
  assert aot.kernels_in(compiled) == {}


# ------------------------------------------------------------------------------------------------
# Train steps and decoding of the tiny config, compiled for a 4-chip slice.


def _tiny(**overrides):
  """The tiny config with heads the TPU kernel takes (K = 128, V = 256), shrunk."""
  return util.config('retnet_tiny', model__num_layers=2, model__embed_dim=256, model__num_heads=2,
                     model__value_dim=512, model__ffn_dim=512, model__chunk_size=64,
                     model__dtype='bfloat16', seq_len=128, batch_size=8, **overrides)


@needs_libtpu
@pytest.mark.parametrize('mesh', [dict(data=2, fsdp=2, tensor=1), dict(data=2, fsdp=1, tensor=2)],
                         ids=['data2_fsdp2', 'data2_tensor2'])
def test_sharded_train_step_compiles_with_the_kernel(mesh, tmp_path):
  c = _tiny(**{f'mesh__{a}': s for a, s in mesh.items()}, optim__grad_accum_steps=2)
  report = aot.compile_train(c, str(tmp_path), 'v5e-4')
  with open(tmp_path / 'compile.json') as f:
    assert json.load(f) == json.loads(json.dumps(report))
  assert (tmp_path / 'compile_summary.txt').read_text().startswith('retnet_tiny train step')
  assert report['mesh'] == {**mesh, 'sequence': 1} and report['num_devices'] == 4
  assert report['device_kind'] == 'TPU v5 lite' and report['libtpu_topology'] == 'v5e:2x2'
  impl = report['retention_impl_in_step']
  assert impl['impl'] == 'pallas' and 'retention_pallas.chunkwise' in impl['kernel']
  # Forward, dq and dk/dv kernels, each once in the (scanned) layer body.
  assert set(impl['kernel_calls_in_step']) == {'retention_forward_chunk', 'retention_dq_chunk',
                                               'retention_dkv_chunk'}
  per = report['per_device']
  # The arguments are this chip's shards of the state and the batch: bounded by their sharded
  # size (a replicated state would be 2x over it), computed from the same mesh on CPU devices.
  run = train.Run(c, None, read_data=False, devices=jax.devices()[:4])
  shard_bytes = lambda a: math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
  state = sum(map(shard_bytes, jax.tree.leaves(run.abstract_train_state())))
  args = state + sum(map(shard_bytes, jax.tree.leaves(run.abstract_batch())))
  params = report['model']['parameters']
  assert state <= 0.6 * 3 * 4 * params  # f32 parameters and two Adam moments, split in two.
  assert args <= per['argument_bytes'] <= 1.1 * args + 2**20, (args, per['argument_bytes'])
  assert per['total_bytes'] == (per['argument_bytes'] + per['output_bytes'] - per['alias_bytes']
                                + per['temp_bytes'] + per['generated_code_bytes'])
  assert per['alias_bytes'] > 0.9 * state  # The state is donated.
  assert per['fits'] and report['fits'] and per['hbm_bytes'] == 16 * 2**30
  # The compiler counts the scanned layer and accumulation bodies once, on one chip's quarter of
  # the batch, and nothing inside the kernels' custom calls (the retention itself).
  counts = report['flops_per_step']
  model = counts['model']
  cfg = config_lib.model_config(c)
  L, A = cfg.num_layers, 2
  one_layer = model - flops.train_flops_per_step(dataclasses.replace(cfg, num_layers=L - 1), 8, 128)
  body_once = (model - (L - 1) * one_layer) / (A * 4)
  assert 0.75 * body_once <= counts['compiler_per_device'] <= 1.25 * body_once, (body_once, counts)
  assert report['step_seconds_lower_bound'] == pytest.approx(model / (4 * 197e12))
  assert report['compile_seconds'] > 0


@needs_libtpu
def test_decoding_compiles_and_its_state_is_per_chip(tmp_path):
  c = _tiny(mesh__data=4, mesh__fsdp=1)
  report = aot.compile_generate(c, str(tmp_path), 'v5e-4', batch_sizes=(8,), prompt_len=100,
                                max_new_tokens=20)
  (run,) = report['runs']
  assert (run['prompt_len'], run['decode_out_len']) == (128, 32)
  cfg = config_lib.model_config(c)
  # The retention state [L, B, H, K, V] float32, its batch split over the 4 chips.
  per_chip = cfg.num_layers * 8 * cfg.num_heads * cfg.head_dim * cfg.value_head_dim * 4 / 4
  assert per_chip <= run['decode_state_bytes_per_device'] <= per_chip + 4096
  assert run['decode']['fits'] and run['prefill']['fits']
  assert run['prefill_retention_kernels'].get('retention_forward_chunk') == 1
  assert os.path.exists(tmp_path / 'generate_compile.json')
  # Again in the same process: jit's caches hold the first call's devices, so the slice is
  # described once and its devices reused.
  again = aot.compile_generate(_tiny(mesh__data=4, mesh__fsdp=1), str(tmp_path / 'again'), 'v5e-4',
                               batch_sizes=(8,), prompt_len=100, max_new_tokens=20)
  assert again['runs'][0]['decode_state_bytes_per_device'] == run['decode_state_bytes_per_device']


# ------------------------------------------------------------------------------------------------
# The command line: one clear line and a non-zero exit.


def test_cli_unknown_topology_is_one_line(tmp_path):
  words = 'unknown TPU topology'
  cmd = [sys.executable, '-m', 'retnet_jax.main', f'--config={util.ROOT}/configs/retnet_tiny.py',
         f'--workdir={tmp_path}', '--mode=compile', '--topology=v9-8']
  p = subprocess.run(cmd, capture_output=True, text=True, cwd=util.ROOT, timeout=300)
  assert p.returncode == 1
  errors = [line for line in p.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and words in errors[0], p.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# GPU: jax's CUDA plugin compiles for an H100 without a GPU (not installed in CI: it would make
# every jax start try CUDA; see docs/planning.md for installing it beside the environment).


def test_train_step_compiles_for_h100_with_the_triton_kernel(tmp_path):
  if aot.cuda_plugin() is None:
    pytest.skip('the CUDA plugin (xla_cuda12 or xla_cuda13) is not on the path')
  c = _tiny(mesh__data=2, mesh__fsdp=1)
  report = aot.compile_train(c, str(tmp_path), 'h100-2')
  assert report['platform'] == 'gpu' and report['device_kind'] == 'NVIDIA H100 80GB HBM3'
  impl = report['retention_impl_in_step']
  assert impl['impl'] == 'pallas' and 'Triton' in impl['kernel']
  # The tiny step compiles in bfloat16 for a GPU: one fused dK/dV pass.
  assert set(impl['kernel_calls_in_step']) == {'retention_forward_chunk', 'retention_dq_chunk',
                                               'retention_dkv_chunk'}
  assert report['fits']


def test_kernels_in_names_cudnn_attention_calls():
  """cuDNN's fused attention custom calls (as an H100 compile of the Transformer writes them) count
  under their target's name; other custom calls do not count."""
  text = '\n'.join([
      '  %custom-call.1 = (bf16[4,4,256,64]{3,2,1,0}, f32[4,4,256]{2,1,0}, u8[0]{0}) custom-call(%a, %b), '
      'custom_call_target="__cudnn$fmhaScaleBiasSoftmax", backend_config={}',
      '  %custom-call.2 = (bf16[4,4,256,64]{3,2,1,0}) custom-call(%c), '
      'custom_call_target="__cudnn$fmhaScaleBiasSoftmaxBackward"',
      '  %custom-call.3 = f32[8]{0} custom-call(%d), custom_call_target="__cublas$gemm"',
      '  %custom-call.4 = (bf16[4,4,256,64]{3,2,1,0}) custom-call(%e), '
      'custom_call_target="__cudnn$fmhaScaleBiasSoftmax"'])
  compiled = type('Compiled', (), {'as_text': lambda self: text})()
  assert aot.kernels_in(compiled) == {'cudnn$fmhaScaleBiasSoftmax': 2,
                                      'cudnn$fmhaScaleBiasSoftmaxBackward': 1}
