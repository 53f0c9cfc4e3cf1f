"""The fused chunkwise Pallas kernels against the float64 reference.

Both drivers are exercised: 'gpu' (one program per (b, h, value block) looping over chunks) and
'tpu' (chunks on the grid, the state in scratch). On a CPU every test interprets the kernels, which
checks the maths and the block plumbing; on a GPU the model-size tests compile them with Triton
(the GPU check runs this file there), and the deviceless H100 compile checks their resources.
"""

import functools
import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax import decay
from retnet_jax import retention
from retnet_jax import retention_ops
from retnet_jax import retention_pallas
from retnet_jax import sharding
from tests import reference
from tests import util
from tests.util import gammas
from tests.util import rel_err

F32 = jnp.float32

K_DIM, V_DIM, CHUNK = 16, 32, 16  # K ≠ V; the smallest sizes the Triton lowering takes.
ON_GPU = jax.default_backend() == 'gpu'  # Compile the model-size cases there; interpret elsewhere.
inputs = functools.partial(util.retention_inputs, K=K_DIM, V=V_DIM)


@functools.lru_cache(maxsize=None)
def kernel(chunk=CHUNK, target='gpu', block_v=None):
  return jax.jit(functools.partial(retention_pallas.chunkwise, chunk_size=chunk, interpret=True,
                                   target=target, block_v=block_v))


def log_gammas(g):
  return jnp.asarray(np.log(g), jnp.float32)


@pytest.mark.parametrize('T,H,schedule,with_state', [
    (64, 1, 'retnet', True), (64, 3, 'none', False), (100, 3, 'lm', True), (100, 1, 'none', True),
    (100, 3, 'custom', False), (256, 3, 'retnet', True), (256, 1, 'uniform', False),
])
def test_forward_matches_reference(T, H, schedule, with_state):
  g = gammas(schedule, H)
  q, k, v, state = inputs(T + H, 2, T, H, with_state=with_state)
  o_ref, s_ref = reference.retention(q, k, v, g, state)
  o, s = kernel()(q, k, v, log_gammas(g), state)
  assert o.dtype == jnp.float32 and s.dtype == jnp.float32
  assert o.shape == o_ref.shape and s.shape == s_ref.shape
  assert rel_err(o, o_ref) <= 1e-5, rel_err(o, o_ref)
  assert rel_err(s, s_ref) <= 1e-5, rel_err(s, s_ref)


@pytest.mark.parametrize('target,chunk,block_v,T', [
    ('gpu', 16, 16, 100),  # Two value blocks: dq/dk partials summed.
    ('gpu', 64, None, 100),  # One full chunk, then a ragged one.
    ('gpu', 64, None, 40),  # Shorter than one chunk.
    ('tpu', 16, None, 100),
    ('tpu', 32, 16, 64),
])
def test_forward_blocks_and_drivers(target, chunk, block_v, T):
  H = 3
  g = gammas('retnet', H)
  q, k, v, state = inputs(T, 2, T, H)
  o_ref, s_ref = reference.retention(q, k, v, g, state)
  o, s = kernel(chunk, target, block_v)(q, k, v, log_gammas(g), state)
  assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5, (rel_err(o, o_ref),
                                                                    rel_err(s, s_ref))


@pytest.mark.parametrize('schedule', ['retnet', 'none'])
def test_bfloat16_inputs(schedule):
  H = 3
  g = gammas(schedule, H)
  q, k, v, state = inputs(7, 2, 100, H, dtype=jnp.bfloat16)
  o_ref, s_ref = reference.retention(q, k, v, g, state)
  o, s = kernel()(q, k, v, log_gammas(g), state)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  assert rel_err(o, o_ref) <= 1e-2 and rel_err(s, s_ref) <= 1e-2, (rel_err(o, o_ref),
                                                                    rel_err(s, s_ref))


def test_state_carries_across_calls():
  """Prefill in two kernel calls (the first ragged) equals one call."""
  H = 3
  q, k, v, state = inputs(3, 2, 100, H)
  lg = log_gammas(gammas('lm', H))
  o_full, s_full = kernel()(q, k, v, lg, state)
  o1, s = kernel()(q[:, :37], k[:, :37], v[:, :37], lg, state)
  o2, s = kernel()(q[:, 37:], k[:, 37:], v[:, 37:], lg, s)
  assert rel_err(jnp.concatenate([o1, o2], 1), o_full) <= 1e-5 and rel_err(s, s_full) <= 1e-5


@pytest.mark.parametrize('schedule,target,block_v,T,with_reset', [
    ('retnet', 'gpu', None, 100, False), ('none', 'gpu', 16, 100, False),
    ('lm', 'tpu', 16, 64, False), ('retnet', 'gpu', 16, 45, True), ('retnet', 'tpu', None, 45, True),
])
def test_gradients_match_parallel(schedule, target, block_v, T, with_reset):
  B, H = 2, 3
  q, k, v, state = inputs(9, B, T, H)
  lg = log_gammas(gammas(schedule, H))
  reset = _resets(B, T) if with_reset else None
  _assert_kernel_gradients_match_parallel(1, q, k, v, lg, state, reset, target=target,
                                          block_v=block_v)


def _assert_kernel_gradients_match_parallel(seed, q, k, v, lg, state, reset, **kernel):
  """d/d(q, k, v, log γ, state) of a random projection of (o, final state): the interpreted kernel
  against the parallel form."""
  rng = np.random.default_rng(seed)
  w_o = jnp.asarray(rng.standard_normal(q.shape[:3] + v.shape[-1:]), jnp.float32)
  w_s = jnp.asarray(rng.standard_normal(state.shape), jnp.float32)

  def loss(fn, *args):
    o, s = fn(*args, reset=reset)
    return jnp.sum(o * w_o) + jnp.sum(s * w_s)

  grad = lambda fn: jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3, 4)))
  ref = grad(retention.parallel)(q, k, v, lg, state)
  got = grad(functools.partial(retention_pallas.chunkwise, chunk_size=CHUNK, interpret=True,
                               **kernel))(q, k, v, lg, state)
  for name, x, r in zip('q k v log_gamma state'.split(), got, ref):
    assert x.shape == r.shape and x.dtype == r.dtype, name
    assert rel_err(x, r) <= 1e-4, (name, rel_err(x, r))


def test_gradient_without_initial_state():
  B, T, H = 1, 48, 2
  q, k, v, _ = inputs(2, B, T, H, with_state=False)
  lg = log_gammas(gammas('retnet', H))
  w_o = jnp.asarray(np.random.default_rng(3).standard_normal((B, T, H, V_DIM)), jnp.float32)
  loss = lambda fn: lambda q, k, v, lg: jnp.sum(fn(q, k, v, lg)[0] * w_o)
  ref = jax.grad(loss(retention.parallel), argnums=(0, 1, 2, 3))(q, k, v, lg)
  got = jax.jit(jax.grad(loss(functools.partial(retention_pallas.chunkwise, chunk_size=CHUNK,
                                                interpret=True)), argnums=(0, 1, 2, 3)))(q, k, v, lg)
  for name, x, r in zip('q k v log_gamma'.split(), got, ref):
    assert rel_err(x, r) <= 1e-4, (name, rel_err(x, r))


def _resets(B, T):
  """Resets at the first token, on a chunk boundary, twice inside one chunk, at the last token."""
  reset = np.zeros((B, T), bool)
  reset[0, [0, 16, 21, 25, T - 1]] = True
  reset[1, [CHUNK - 1, 2 * CHUNK + 3]] = True
  return jnp.asarray(reset)


@pytest.mark.parametrize('target,chunk,block_v,T', [
    ('gpu', 16, None, 45), ('gpu', 16, 16, 64), ('gpu', 64, None, 45), ('tpu', 16, None, 45),
    ('tpu', 32, 16, 64),
])
def test_resets_match_reference(target, chunk, block_v, T):
  """Document boundaries: each chunk's decay, ξ, ζ and carry masked, in both drivers."""
  B, H = 2, 3
  q, k, v, state = inputs(11, B, T, H)
  reset = _resets(B, T)
  g = gammas('lm', H)
  o_ref, s_ref = reference.retention(q, k, v, g, state, reset)
  o, s = jax.jit(functools.partial(
      retention_pallas.chunkwise, chunk_size=chunk, interpret=True, target=target,
      block_v=block_v))(q, k, v, log_gammas(g), state, reset=reset)
  assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5, (rel_err(o, o_ref),
                                                                    rel_err(s, s_ref))


def test_choose_by_platform_and_shape():
  """'auto' runs the kernel on a GPU/TPU platform where the shapes fit, XLA otherwise; each with a
  reason. Only shapes and a platform name: no accelerator needed."""
  q, _, v, _ = inputs(0, 1, 8, 2)
  choose = lambda q, v, chunk=CHUNK, **kw: retention_ops.choose(
      q.shape, v.shape, v.dtype, form='chunkwise', chunk_size=chunk, **kw)
  assert jax.default_backend() == 'cpu'
  c = choose(q, v)  # The platform of the devices in use: CPU.
  assert c.impl == 'xla' and 'cpu' in c.reason
  c = choose(q, v, platform='gpu')
  assert (c.impl, c.target, c.interpret) == ('pallas', 'gpu', False) and c.reason
  assert choose(q, v, 12, platform='gpu').impl == 'xla'  # Chunk not a power of two.
  c = choose(q[..., :5], v, platform='gpu')  # K = 5.
  assert c.impl == 'xla' and 'K = 5' in c.reason
  c = choose(q, v, platform='tpu')  # K = 16: not a lane tile.
  assert c.impl == 'xla' and 'multiples of 128' in c.reason
  big = jax.ShapeDtypeStruct((8, 16384, 32, 128), jnp.bfloat16)  # fla's benchmark shape.
  for platform in ('gpu', 'tpu'):
    c = choose(big, big, 64, platform=platform)
    assert (c.impl, c.target) == ('pallas', platform), c
  c = choose(q, v, impl='pallas')
  assert (c.impl, c.target, c.interpret) == ('pallas', 'gpu', True) and 'interpreted' in c.reason
  assert choose(q, v, impl='xla', platform='tpu').impl == 'xla'
  assert retention_ops.choose(big.shape, big.shape, big.dtype, form='recurrent',
                              platform='tpu').impl == 'xla'
  with pytest.raises(ValueError, match='interpret=True'):
    retention_pallas.chunkwise(*inputs(0, 1, 8, 2)[:3], jnp.zeros(2))


def test_choose_reads_the_mesh_platform():
  """The platform comes from the devices of the mesh the computation is traced under (here an
  abstract TPU mesh on a CPU host), not from jax.default_backend()."""
  big = jax.ShapeDtypeStruct((8, 1024, 4, 128), jnp.bfloat16)
  choose = lambda: retention_ops.choose(big.shape, big.shape, big.dtype, form='chunkwise',
                                        chunk_size=64)
  assert choose().impl == 'xla'
  tpu = jax.sharding.AbstractDevice(device_kind='TPU v5p', num_cores=None, platform='tpu')
  mesh = jax.sharding.AbstractMesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                                   abstract_device=tpu)
  with jax.sharding.use_abstract_mesh(mesh):
    assert sharding.platform() == 'tpu'
    c = choose()
  assert (c.impl, c.target) == ('pallas', 'tpu') and 'tpu' in c.reason, c
  cpu_mesh = sharding.make_mesh({'data': 1})
  with sharding.use_rules(cpu_mesh, {}):
    assert sharding.platform() == 'cpu' and choose().impl == 'xla'


def test_no_overflow_long_sequence_no_decay():
  """γ = 1 over 4096 tokens (the state only grows): finite, and the last token matches q_T S_T."""
  T, H = 4096, 1
  q, k, v, _ = inputs(0, 1, T, H, dtype=jnp.bfloat16, with_state=False)
  lg = log_gammas(decay.gammas('none', H))
  o, s = kernel(64)(q, k, v, lg, None)
  assert np.all(np.isfinite(np.asarray(o, np.float32))) and np.all(np.isfinite(s))
  expect = np.einsum('bhk,bhkv->bhv', np.asarray(q[:, -1], np.float64), np.asarray(s, np.float64))
  assert rel_err(o[:, -1], expect) <= 1e-2


@pytest.mark.parametrize('platform,target,T,with_reset,gated', [
    ('cuda', 'gpu', 16384, False, False), ('cuda', 'gpu', 1000, True, False),
    ('cuda', 'gpu', 1000, True, True), ('tpu', 'tpu', 16384, False, False),
    ('tpu', 'tpu', 1000, True, False), ('tpu', 'tpu', 1000, True, True)])
def test_lowers_to_triton_and_mosaic(platform, target, T, with_reset, gated):
  """Forward and backward at fla's benchmark shape (and a ragged T, with resets, with a fixed or a
  per-token decay) pass Pallas' Triton / Mosaic lowering, built for the target on this CPU host.
  Lowering only: compiling and running them needs the GPU / TPU."""
  B, H, K, V = 8, 32, 128, 128
  spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
  log_gamma = spec(B, T, H, dtype=jnp.float32) if gated else spec(H, dtype=jnp.float32)
  args = (spec(B, T, H, K), spec(B, T, H, K), spec(B, T, H, V), log_gamma,
          spec(B, H, K, V, dtype=jnp.float32))
  if with_reset:
    args += (spec(B, T, dtype=jnp.bool_),)
  fn = lambda *a: retention_pallas.chunkwise(*a[:5], chunk_size=64, reset=(*a[5:], None)[0],
                                             target=target)

  def loss(*args):
    o, s = fn(*args)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

  call = {'gpu': 'xla.gpu.triton', 'tpu': 'tpu_custom_call'}[target]
  for f, calls in ((fn, 1), (jax.grad(loss, argnums=(0, 1, 2, 3, 4)), 3)):
    text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(call) >= calls, (target, calls)


def test_choose_falls_back_to_xla_without_the_triton_backend(monkeypatch):
  """A jax without Pallas' Triton backend: 'auto' on a GPU runs XLA and says why; asking for the
  compiled kernel is one line."""
  monkeypatch.setattr(retention_pallas, 'pl_triton', None)
  big = jax.ShapeDtypeStruct((8, 1024, 4, 128), jnp.bfloat16)
  c = retention_ops.choose(big.shape, big.shape, big.dtype, form='chunkwise', chunk_size=64,
                           platform='gpu')
  assert (c.impl, c.target) == ('xla', None) and 'no Pallas Triton backend' in c.reason, c
  c = retention_ops.choose(big.shape, big.shape, big.dtype, form='chunkwise', chunk_size=64,
                           platform='tpu')
  assert c.impl == 'pallas'  # The TPU kernel does not need it.
  q, k, v, _ = inputs(0, 1, 16, 2)
  with pytest.raises(ValueError, match='no Pallas Triton backend'):
    retention_pallas.chunkwise(q, k, v, jnp.zeros(2), target='gpu')
  o, _ = retention_pallas.chunkwise(q, k, v, jnp.zeros(2), target='gpu', interpret=True)
  assert o.shape == v.shape


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('dim', [64, pytest.param(128, marks=pytest.mark.slow)])
def test_model_sizes_forward_and_backward(dim, dtype):
  """K = V = 64 and 128 at chunk 64, with resets (inside a chunk and on a chunk start), a ragged T
  and an initial state: forward against the float64 reference, gradients against XLA's parallel
  form at full precision. Compiled on a GPU, interpreted elsewhere."""
  B, T, H, C = 2, 150, 2, 64
  dt = jnp.dtype(dtype)
  q, k, v, state = inputs(dim + (dt == jnp.bfloat16), B, T, H, K=dim, V=dim, dtype=dt)
  q = (q.astype(F32) * dim**-0.5).astype(dt)
  state = state * 0.1
  g = gammas('retnet', H)
  reset = np.zeros((B, T), bool)
  reset[0, [C // 2, C, 97]] = True
  reset[1, [3, 2 * C + 5]] = True
  reset = jnp.asarray(reset)
  o_ref, s_ref = reference.retention(q, k, v, g, state, reset)
  kernel_fn = functools.partial(retention_pallas.chunkwise, chunk_size=C, reset=reset,
                                target='gpu', interpret=not ON_GPU)
  tol = 1e-4 if dt == F32 else 3e-2  # bfloat16: inputs rounded, the state enters Q·S rounded.
  o, s = jax.jit(kernel_fn)(q, k, v, log_gammas(g), state)
  assert o.dtype == dt and rel_err(o, o_ref) <= tol and rel_err(s, s_ref) <= tol, (
      rel_err(o, o_ref), rel_err(s, s_ref))
  rng = np.random.default_rng(dim)
  w_o = jnp.asarray(rng.standard_normal((B, T, H, dim)), dt)
  w_s = jnp.asarray(rng.standard_normal((B, H, dim, dim)), F32)

  def loss(fn, q, k, v, lg, s0):
    o, s = fn(q, k, v, lg, s0, reset=reset)
    return jnp.sum(o.astype(F32) * w_o.astype(F32)) + jnp.sum(s * w_s)

  grad = lambda fn: jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3, 4)))
  with jax.default_matmul_precision('highest'):
    up = lambda x: x.astype(F32)  # The reference's gradients in float32 from the same inputs.
    ref = grad(retention.parallel)(up(q), up(k), up(v), log_gammas(g), state)
    got = grad(functools.partial(retention_pallas.chunkwise, chunk_size=C, target='gpu',
                                 interpret=not ON_GPU))(q, k, v, log_gammas(g), state)
  for name, x, r in zip('q k v log_gamma state'.split(), got, ref):
    assert rel_err(x, r) <= tol, (name, rel_err(x, r))


@pytest.mark.parametrize('with_reset', [False, True])
def test_backward_in_key_blocks(with_reset):
  """The GPU backward splits K into blocks (dQ, dK per key block, dV summed over them): two key
  and two value blocks give the parallel form's gradients."""
  B, T, H, K, V = 2, 45, 2, 32, 32
  q, k, v, state = util.retention_inputs(5, B, T, H, K, V)
  lg = log_gammas(gammas('lm', H))
  reset = _resets(B, T) if with_reset else None
  _assert_kernel_gradients_match_parallel(6, q, k, v, lg, state, reset, target='gpu', block_v=16,
                                          block_k=16)


@pytest.fixture(scope='module')
def h100_resources(tmp_path_factory):
  """experiments/kernel_resources.py's report: every model-size case (K = V = 64 and 128, bfloat16
  and float32, with and without resets, chunk 64; bfloat16 also with a per-token decay) compiled
  forward and backward for an H100 by the CUDA plugin, without a GPU."""
  from retnet_jax import aot  # pylint: disable=g-import-not-at-top
  # CI installs the plugin (and ptxas) into RETNET_JAX_CUDA_DIR, on the path of this run only.
  cuda_dir = os.environ.get('RETNET_JAX_CUDA_DIR')
  if aot.cuda_plugin() is None and not (cuda_dir and os.path.isdir(
      os.path.join(cuda_dir, 'jax_plugins'))):
    pytest.skip('the CUDA plugin (xla_cuda12 or xla_cuda13) is not on the path')
  out = tmp_path_factory.mktemp('kernel_resources')
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      [util.ROOT, *filter(None, [cuda_dir]),
       *filter(None, os.environ.get('PYTHONPATH', '').split(os.pathsep))])}
  proc = subprocess.run([sys.executable, '-m', 'experiments.kernel_resources',
                         f'--output_dir={out}'], cwd=util.ROOT, env=env, capture_output=True,
                        text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / 'resources.json') as f:
    return json.load(f)


def _spills(resources, keep):
  return [r for r in resources['rows'] if keep(r) and r['spill_store_bytes']]


def test_h100_compile_of_every_model_size_fits(h100_resources):
  rows = h100_resources['rows']
  assert not [r for r in rows if 'error' in r], [r for r in rows if 'error' in r]
  cases = [(*c, False) for c in itertools.product((64, 128), ('bfloat16', 'float32'), (False, True))]
  cases += [(dim, 'bfloat16', resets, True) for dim in (64, 128) for resets in (False, True)]
  for case in cases:
    found = [r for r in rows if (r['K'], r['dtype'], r['resets'], r['gated']) == case]
    _, dtype, _, gated = case
    # dK and dV in one pass, or in two where the fused pass would spill (float32, per-token decay).
    backward = ({'retention_dk_chunk', 'retention_dv_chunk'} if dtype == 'float32' or gated
                else {'retention_dkv_chunk'})
    assert {r['kernel'] for r in found} == {'retention_forward_chunk', 'retention_dq_chunk',
                                            *backward}, case
    for r in found:
      assert r['shared_bytes'] <= 227 * 1024 and r['threads'] in (128, 256), r


def test_h100_compile_spills_no_register(h100_resources):
  """K = V = 64 and 128, bfloat16 and float32, with and without resets, a fixed or per-token
  decay, chunk 64: ptxas reports no spill store in any kernel."""
  if h100_resources['ptxas'] is None:
    pytest.skip('no ptxas: registers and spills are not reported')
  rows = h100_resources['rows']
  assert len(rows) >= 36 and all(r['registers'] <= 255 for r in rows)
  assert not _spills(h100_resources, lambda r: True)
