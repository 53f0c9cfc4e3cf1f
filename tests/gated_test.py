"""Gated retention: a per-token decay log γ [B, T, H] in every form, against a float64 recurrence,
its analytic float64 gradients, extreme gates, long bfloat16 sequences and fla's own reference."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax import decay
from retnet_jax import model as model_lib
from retnet_jax import retention
from retnet_jax import retention_ops
from retnet_jax import retention_pallas
from retnet_jax import sharding
from tests import util
from tests.util import rel_err

K_DIM, V_DIM = 5, 6  # K ≠ V on purpose.


def reference(q, k, v, log_gamma, state, reset, w_o=None, w_s=None):
  """S_t = γ_t S_{t−1} + k_tᵀ v_t (S_{t−1} = 0 at a reset), o_t = q_t S_t, in float64 NumPy.

  With w_o [B, T, H, V] and w_s [B, H, K, V] also returns the gradients of
  Σ w_o · o + Σ w_s · S_{T−1} with respect to (q, k, v, log γ, S_in), by the recurrence run
  backwards: G_t = ∂/∂S_t = a_{t+1} G_{t+1} + q_tᵀ w_o,t with a_t = γ_t (0 at a reset).
  """
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, log_gamma))
  B, T, H, K = q.shape
  V = v.shape[-1]
  s = np.zeros((B, H, K, V)) if state is None else np.asarray(state, np.float64)
  a = np.exp(g) * (1.0 - np.asarray(reset, np.float64))[..., None]  # [B, T, H]
  states, o = [s], np.zeros((B, T, H, V))
  for t in range(T):
    s = a[:, t, :, None, None] * s + np.einsum('bhk,bhv->bhkv', k[:, t], v[:, t])
    states.append(s)
    o[:, t] = np.einsum('bhk,bhkv->bhv', q[:, t], s)
  if w_o is None:
    return o, s
  w_o, w_s = np.asarray(w_o, np.float64), np.asarray(w_s, np.float64)
  dq, dk, dv, dg = (np.zeros_like(x) for x in (q, k, v, g))
  grad = w_s.copy()
  for t in reversed(range(T)):
    grad = grad + np.einsum('bhk,bhv->bhkv', q[:, t], w_o[:, t])  # G_t
    dq[:, t] = np.einsum('bhkv,bhv->bhk', states[t + 1], w_o[:, t])
    dk[:, t] = np.einsum('bhkv,bhv->bhk', grad, v[:, t])
    dv[:, t] = np.einsum('bhkv,bhk->bhv', grad, k[:, t])
    dg[:, t] = np.einsum('bhkv,bhkv->bh', grad, states[t]) * a[:, t]  # ∂a/∂log γ = a.
    grad = a[:, t, :, None, None] * grad
  return o, s, (dq, dk, dv, dg, grad)


def inputs(seed, B, T, H, dtype=jnp.float32, gate_scale=0.3, resets=()):
  """Random q, k, v, per-token log γ ≤ 0 (some exactly 0), a state and resets at `resets`."""
  rng = np.random.default_rng(seed)
  q, k = rng.standard_normal((2, B, T, H, K_DIM)) * 0.5
  v = rng.standard_normal((B, T, H, V_DIM))
  g = -rng.exponential(gate_scale, (B, T, H))
  g[rng.random((B, T, H)) < 0.1] = 0.0
  state = rng.standard_normal((B, H, K_DIM, V_DIM))
  reset = np.zeros((B, T), bool)
  for b, t in resets:
    if b < B and t < T:
      reset[b, t] = True
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), cast(k), cast(v), jnp.asarray(g, jnp.float32), jnp.asarray(state, jnp.float32),
          jnp.asarray(reset))


def run_step(q, k, v, log_gamma, state, reset):
  step = jax.jit(retention.step)
  outs = []
  for t in range(q.shape[1]):
    o, state = step(q[:, t], k[:, t], v[:, t], log_gamma[:, t], state, reset=reset[:, t])
    outs.append(o)
  return jnp.stack(outs, axis=1), state


def forms(chunk_sizes=(1, 16, 64)):
  """name -> f(q, k, v, log γ, state, reset) for every form and the dispatcher."""
  out = {'parallel': lambda *a: retention.parallel(*a[:5], reset=a[5]),
         'recurrent': lambda *a: retention.recurrent(*a[:5], reset=a[5]),
         'dispatch': lambda *a: retention_ops.retention(*a[:5], reset=a[5], chunk_size=16)}
  for c in chunk_sizes:
    out[f'chunkwise{c}'] = functools.partial(
        lambda *a, c: retention.chunkwise(*a[:5], reset=a[5], chunk_size=c), c=c)
  return out


# Resets on the first token of the sequence and of a 16-token chunk, inside chunks, twice in a row.
RESETS = ((0, 0), (0, 16), (1, 5), (1, 6), (1, 32), (2, 63))


@pytest.mark.parametrize('T', [1, 7, 77])
def test_forms_match_float64_recurrence(T):
  args = inputs(T, 3, T, 2, resets=RESETS)
  o_ref, s_ref = reference(*args)
  results = {name: jax.jit(fn)(*args) for name, fn in forms().items()}
  results['step'] = run_step(*args)
  for name, (o, s) in results.items():
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32, name
    assert rel_err(o, o_ref) <= 1e-5, (name, rel_err(o, o_ref))
    assert rel_err(s, s_ref) <= 1e-5, (name, rel_err(s, s_ref))


def test_bfloat16_inputs_match_float64_recurrence():
  args = inputs(3, 3, 100, 2, dtype=jnp.bfloat16, resets=RESETS)
  o_ref, s_ref = reference(*args)
  for name, fn in forms((16,)).items():
    o, s = jax.jit(fn)(*args)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32, name
    assert rel_err(o, o_ref) <= 2e-2 and rel_err(s, s_ref) <= 2e-2, name


def _loss_grads(fn, args, w_o, w_s):
  q, k, v, g, state, reset = args

  def loss(q, k, v, g, state):
    o, s = fn(q, k, v, g, state, reset)
    return jnp.sum(o * w_o) + jnp.sum(s * w_s)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, g, state)


@pytest.mark.parametrize('T', [7, 45])
def test_gradients_match_float64_backward(T):
  """d/d(q, k, v, log γ, S_in) of every form against the recurrence run backwards in float64."""
  args = inputs(10 + T, 3, T, 2, resets=RESETS)
  rng = np.random.default_rng(T)
  w_o = jnp.asarray(rng.standard_normal((3, T, 2, V_DIM)), jnp.float32)
  w_s = jnp.asarray(rng.standard_normal((3, 2, K_DIM, V_DIM)), jnp.float32)
  *_, ref_grads = reference(*args, w_o, w_s)
  for name, fn in forms((16,)).items():
    grads = _loss_grads(fn, args, w_o, w_s)
    for arg, x, r in zip('q k v log_gamma state'.split(), grads, ref_grads):
      assert rel_err(x, r) <= 1e-5, (name, arg, rel_err(x, r))


def test_float64_backward_matches_finite_differences():
  """The analytic reference gradient of log γ is itself checked by central differences."""
  args = [np.asarray(a, np.float64) for a in inputs(5, 1, 6, 2, resets=((0, 3),))]
  rng = np.random.default_rng(0)
  w_o, w_s = rng.standard_normal((1, 6, 2, V_DIM)), rng.standard_normal((1, 2, K_DIM, V_DIM))
  loss = lambda g: sum(np.sum(x * w) for x, w in zip(reference(*args[:3], g, *args[4:]), (w_o, w_s)))
  dg = reference(*args, w_o, w_s)[2][3]
  eps, g = 1e-6, args[3]
  for idx in np.ndindex(g.shape):
    e = np.zeros_like(g)
    e[idx] = eps
    np.testing.assert_allclose((loss(g + e) - loss(g - e)) / (2 * eps), dg[idx], rtol=1e-5, atol=1e-8)


def test_gate_of_minus_30_gives_zeros_not_nan():
  """log γ = −30 on every token of a 256-token chunk: finite values and gradients, = reference."""
  q, k, v, _, state, reset = inputs(1, 2, 300, 2)
  g = jnp.full(q.shape[:3], -30.0)
  args = (q, k, v, g, state, reset)
  rng = np.random.default_rng(1)
  w_o = jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
  w_s = jnp.asarray(rng.standard_normal(state.shape), jnp.float32)
  o_ref, s_ref, ref_grads = reference(*args, w_o, w_s)
  for name, fn in forms((256,)).items():
    o, s = jax.jit(fn)(*args)
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5, name
    for arg, x, r in zip('q k v log_gamma state'.split(), _loss_grads(fn, args, w_o, w_s),
                         ref_grads):
      assert np.all(np.isfinite(x)), (name, arg)
      assert rel_err(x, r) <= 1e-5 or np.max(np.abs(r)) < 1e-12, (name, arg, rel_err(x, r))


def test_gate_of_zero_is_no_decay():
  """log γ = 0 exactly: every form equals the fixed γ = 1 ([H]) and the reference."""
  q, k, v, _, state, reset = inputs(2, 2, 70, 3, resets=RESETS)
  g = jnp.zeros(q.shape[:3])
  o_ref, s_ref = reference(q, k, v, g, state, reset)
  fixed = retention.chunkwise(q, k, v, jnp.zeros((3,)), state, reset=reset, chunk_size=16)
  for name, fn in forms((16,)).items():
    o, s = jax.jit(fn)(q, k, v, g, state, reset)
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5, name
    np.testing.assert_allclose(o, fixed[0], rtol=1e-5, atol=1e-5)


def test_per_token_decay_equal_across_time_equals_fixed_decay():
  q, k, v, _, state, reset = inputs(4, 2, 40, 3, resets=RESETS)
  g_H = jnp.log(jnp.asarray([0.5, 0.9, 0.999]))
  g_BTH = jnp.broadcast_to(g_H, q.shape[:3])
  for name, fn in forms((16,)).items():
    o1, s1 = fn(q, k, v, g_H, state, reset)
    o2, s2 = fn(q, k, v, g_BTH, state, reset)
    assert rel_err(o2, o1) <= 1e-5 and rel_err(s2, s1) <= 1e-5, name


def test_long_bfloat16_sequence_is_finite_and_close_to_float32():
  """T = 16,384 in bfloat16, chunkwise: finite, and close to the same call in float32."""
  q, k, v, g, state, _ = inputs(6, 1, 16384, 2, dtype=jnp.float32, gate_scale=0.05)
  run = jax.jit(functools.partial(retention.chunkwise, chunk_size=64))
  o32, s32 = run(q, k, v, g, state)
  bf = lambda x: x.astype(jnp.bfloat16)
  o16, s16 = run(bf(q), bf(k), bf(v), g, state)
  assert o16.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(o16, np.float32))) and np.all(np.isfinite(s16))
  assert rel_err(o16, o32) <= 3e-2 and rel_err(s16, s32) <= 3e-2


def test_fla_naive_recurrent_simple_gla_agrees():
  """fla's own torch reference (scale 1: ours leaves the 1/√K to the caller's k)."""
  torch = pytest.importorskip('torch')
  naive = pytest.importorskip('fla.ops.simple_gla.naive')
  q, k, v, g, state, _ = inputs(8, 2, 37, 3)
  t = lambda x: torch.from_numpy(np.array(x, np.float32))
  o_fla, s_fla = naive.naive_recurrent_simple_gla(t(q), t(k), t(v), t(g), scale=1.0,
                                                  initial_state=t(state), output_final_state=True)
  for name, fn in forms((16,)).items():
    o, s = fn(q, k, v, g, state, None)
    assert rel_err(o, o_fla.numpy()) <= 1e-5 and rel_err(s, s_fla.numpy()) <= 1e-5, name


def test_bad_log_gamma_shape_is_one_line_error():
  q, k, v, *_ = inputs(0, 2, 5, 3)
  for bad in ((2, 5), (2, 3), (1, 5, 3), (3, 1)):
    with pytest.raises(ValueError, match=r'log_gamma must have shape .*got \(') as err:
      retention.chunkwise(q, k, v, jnp.zeros(bad))
    assert '\n' not in str(err.value) and str(bad) in str(err.value)
  with pytest.raises(ValueError, match='step: log_gamma'):
    retention.step(q[:, 0], k[:, 0], v[:, 0], jnp.zeros((2, 5, 3)), jnp.zeros((2, 3, 5, 6)))


# ------------------------------------------------------------------------------------------------
# The Pallas kernels (interpreted here; both drivers) with a per-token decay.


def kernel_form(target, chunk=16, **blocks):
  return lambda *a: retention_pallas.chunkwise(*a[:5], reset=a[5], chunk_size=chunk, target=target,
                                               interpret=True, **blocks)


@pytest.mark.parametrize('target,T,blocks', [
    ('gpu', 45, {}), ('gpu', 64, dict(block_v=2, block_k=1)), ('tpu', 77, {})])
def test_kernel_matches_float64_recurrence_and_backward(target, T, blocks):
  """Values and d/d(q, k, v, log γ, S_in), with resets on a chunk's first token and twice in a
  row, a ragged last chunk (45, 77) and split key/value blocks (GPU driver)."""
  args = inputs(20 + T, 3, T, 2, resets=RESETS)
  rng = np.random.default_rng(T)
  w_o = jnp.asarray(rng.standard_normal((3, T, 2, V_DIM)), jnp.float32)
  w_s = jnp.asarray(rng.standard_normal((3, 2, K_DIM, V_DIM)), jnp.float32)
  o_ref, s_ref, ref_grads = reference(*args, w_o, w_s)
  fn = kernel_form(target, **blocks)
  o, s = jax.jit(fn)(*args)
  assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5, (rel_err(o, o_ref),
                                                                    rel_err(s, s_ref))
  for arg, x, r in zip('q k v log_gamma state'.split(), _loss_grads(fn, args, w_o, w_s),
                       ref_grads):
    assert x.shape == r.shape and rel_err(x, r) <= 1e-5, (arg, rel_err(x, r))
  d_log_gamma = _loss_grads(fn, args, w_o, w_s)[3]
  assert np.all(np.asarray(d_log_gamma)[np.asarray(args[5])] == 0)  # A reset's γ meets zero.


@pytest.mark.parametrize('target', ['gpu', 'tpu'])
def test_kernel_gate_of_minus_30_gives_zeros_not_nan(target):
  """log γ = −30 on every token of 256-token chunks: exact zeros where the reference has them,
  finite gradients, and equal to the reference."""
  q, k, v, _, state, reset = inputs(1, 2, 300, 2)
  args = (q, k, v, jnp.full(q.shape[:3], -30.0), state, reset)
  rng = np.random.default_rng(1)
  w_o = jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
  w_s = jnp.asarray(rng.standard_normal(state.shape), jnp.float32)
  o_ref, s_ref, ref_grads = reference(*args, w_o, w_s)
  fn = kernel_form(target, chunk=256)
  o, s = jax.jit(fn)(*args)
  assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5
  for arg, x, r in zip('q k v log_gamma state'.split(), _loss_grads(fn, args, w_o, w_s),
                       ref_grads):
    assert np.all(np.isfinite(x)), arg
    assert rel_err(x, r) <= 1e-5 or np.max(np.abs(r)) < 1e-12, (arg, rel_err(x, r))


def test_kernel_bfloat16_and_gate_of_zero():
  """bfloat16 inputs against the float64 recurrence; log γ = 0 equals the kernel's fixed γ = 1."""
  args = inputs(3, 3, 100, 2, dtype=jnp.bfloat16, resets=RESETS)
  o_ref, s_ref = reference(*args)
  o, s = jax.jit(kernel_form('gpu'))(*args)
  assert o.dtype == jnp.bfloat16 and rel_err(o, o_ref) <= 2e-2 and rel_err(s, s_ref) <= 2e-2
  q, k, v, _, state, reset = inputs(2, 2, 70, 3, resets=RESETS)
  o, s = jax.jit(kernel_form('tpu'))(q, k, v, jnp.zeros(q.shape[:3]), state, reset)
  o1, s1 = jax.jit(kernel_form('tpu'))(q, k, v, jnp.zeros(3), state, reset)
  assert rel_err(o, o1) <= 1e-6 and rel_err(s, s1) <= 1e-6


def test_the_dispatcher_runs_the_kernel_for_a_per_token_decay():
  """choose() takes the kernel for a gated call on GPU/TPU; under a mesh the per-shard kernel gets
  its [B, T, H] slice of log γ (batch and heads sharded)."""
  for platform in ('gpu', 'tpu'):
    choice = retention_ops.choose((2, 64, 4, 128), (2, 64, 4, 128), jnp.bfloat16,
                                  platform=platform)
    assert (choice.impl, choice.target) == ('pallas', platform), choice
  args = inputs(8, 4, 40, 2, resets=RESETS)
  o_ref, s_ref = reference(*args)
  rules = {'batch': 'data', 'heads': 'tensor', 'length': None}
  with sharding.use_rules(sharding.make_mesh(dict(data=2, tensor=2)), rules):
    o, s = jax.jit(lambda *a: retention_ops.retention(*a[:5], reset=a[5], chunk_size=16,
                                                      impl='pallas'))(*args)
  assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5


# ------------------------------------------------------------------------------------------------
# The layer: model.gamma='gated'.


def _gated_model(**overrides):
  cfg = util.model_config(model__gamma='gated', **overrides)
  model = model_lib.create(cfg, seed=2)
  graphdef, params = nnx.split(model)
  run = jax.jit(lambda toks, state, seg, form: nnx.merge(graphdef, params)(
      toks, state, form=form, segment_ids=seg), static_argnames='form')
  return model, cfg, run


def test_gated_layer_gate_is_per_token_and_bounded():
  """W_γ [D, H] per layer; log γ_t = logsigmoid(x W_γ) / τ within [floor, 0]; τ = 16 at 0 logits."""
  model, cfg, _ = _gated_model(model__gate_floor=-0.5)
  ret = nnx.to_pure_dict(nnx.state(model))['blocks']['retention']
  assert ret['wgamma'].shape == (cfg.num_layers, cfg.embed_dim, cfg.num_heads)
  x = jax.random.normal(jax.random.key(0), (2, 9, cfg.embed_dim)) * 30
  w = jnp.asarray(ret['wgamma'][0])
  g = decay.gate(x @ w, cfg.gate_temperature, cfg.gate_floor)
  assert g.shape == (2, 9, cfg.num_heads) and jnp.all(g <= 0) and jnp.all(g >= -0.5)
  np.testing.assert_allclose(decay.gate(jnp.zeros(3), 16.0), np.full(3, -np.log(2) / 16), rtol=1e-6)


def test_gated_layer_prefill_then_decode_equals_one_pass():
  """Logits of x[:n] then x[n:] (and token by token) with the carried state equal one pass; with
  packed documents (resets) the same holds."""
  _, cfg, run = _gated_model()
  T = 37
  toks = jax.random.randint(jax.random.key(3), (2, T), 0, cfg.vocab_size)
  seg = jnp.asarray(np.repeat([[1] * 9 + [2] * 20 + [3] * 8], 2, axis=0), jnp.int32)
  for segs in (None, seg):
    ref, ref_state = run(toks, None, segs, 'parallel')
    for form in ('chunkwise', 'recurrent'):
      out, state = run(toks, None, segs, form)
      assert rel_err(out, ref) <= 1e-4 and rel_err(state.layers, ref_state.layers) <= 1e-4, form
    for n in (1, 16, 20, T - 1):
      sl = lambda a, b: None if segs is None else segs[:, a:b]
      first, state = run(toks[:, :n], None, sl(0, n), 'chunkwise')
      second, state = run(toks[:, n:], state, sl(n, T), 'chunkwise')
      assert rel_err(jnp.concatenate([first, second], 1), ref) <= 1e-4, n
      assert rel_err(state.layers, ref_state.layers) <= 1e-4, n
    first, state = run(toks[:, :20], None, None if segs is None else segs[:, :20], 'chunkwise')
    outs = [first]
    for t in range(20, T):
      out, state = run(toks[:, t:t + 1], state, None if segs is None else segs[:, t:t + 1],
                       'recurrent')
      outs.append(out)
    assert state.layers[0].shape[-2:] == (cfg.head_dim, cfg.value_head_dim)  # Constant-size state.
    assert rel_err(jnp.concatenate(outs, 1), ref) <= 1e-4


def test_gated_layer_gradient_reaches_the_gate():
  model, cfg, _ = _gated_model(model__gate_bias=True)
  toks = jax.random.randint(jax.random.key(4), (2, 21), 0, cfg.vocab_size)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    logits, _ = nnx.merge(graphdef, params)(toks)
    return jnp.mean(logits**2)

  grads = nnx.to_pure_dict(jax.grad(loss)(params))
  for name, shape in (('wgamma', (cfg.num_layers, cfg.embed_dim, cfg.num_heads)),
                      ('bgamma', (cfg.num_layers, cfg.num_heads))):
    g = np.asarray(grads['blocks']['retention'][name])
    assert g.shape == shape and np.all(np.isfinite(g)) and np.abs(g).max() > 0, name


@pytest.mark.parametrize('overrides,message', [
    ({'model__decay_row_norm': True}, 'decay_row_norm needs a fixed'),
    ({'model__gate_temperature': 0.0}, 'gate_temperature must be positive'),
    ({'model__gate_floor': 0.5}, 'gate_floor must be a log'),
])
def test_bad_gated_config_is_refused(overrides, message):
  with pytest.raises(ValueError, match=message):
    util.model_config(model__gamma='gated', **overrides)


@pytest.mark.slow
def test_gamma_ablation_reports_the_gate_spread(tmp_path):
  """Two 2-step runs (retnet, gated): the table's gate column and γ table read the learned gates."""
  from experiments import gamma_ablation  # pylint: disable=g-import-not-at-top
  from tests.experiments_test import TINY  # pylint: disable=g-import-not-at-top
  rows = gamma_ablation.run(str(tmp_path), quick=True, steps=2, schedules=('retnet', 'gated'),
                            overrides=TINY)
  assert [r['schedule'] for r in rows] == ['retnet', 'gated']
  assert rows[0]['gate_spread'] == '' and rows[1]['gate_spread'].startswith('h0 0.')
  with open(tmp_path / 'table.md') as f:
    md = f.read()
  assert 'gate γ_t per head' in md and 'gated (mean γ_t on held-out data' in md


def test_log_gammas_reads_each_layer_gate():
  """Model.log_gammas: layer 0's gates equal a float64 gate of its normed embedding; every later
  layer's gates are causal in the tokens; a fixed decay gives its schedule."""
  model, cfg, _ = _gated_model(model__gate_bias=True)
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 11))
  gates = model.log_gammas(tokens)
  assert len(gates) == cfg.num_layers
  assert all(g.shape == (2, 11, cfg.num_heads) for g in gates)
  state = nnx.to_pure_dict(nnx.state(model))
  ret, norm = state['blocks']['retention'], state['blocks']['mixer_norm']
  x = np.asarray(state['embed'], np.float64)[tokens]
  x = x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.norm_eps) * np.asarray(norm['scale'][0])
  logits = x @ np.asarray(ret['wgamma'][0], np.float64) + np.asarray(ret['bgamma'][0])
  want = -np.logaddexp(0.0, -logits) / cfg.gate_temperature  # logsigmoid / τ
  np.testing.assert_allclose(gates[0], want, rtol=1e-5, atol=1e-7)
  changed = tokens.copy()
  changed[:, 7] = (changed[:, 7] + 1) % cfg.vocab_size
  for before, after in zip(gates, model.log_gammas(changed)):
    np.testing.assert_array_equal(before[:, :7], after[:, :7])
    assert np.abs(np.asarray(before[:, 7:]) - np.asarray(after[:, 7:])).max() > 0
  fixed = model_lib.create(util.model_config(), seed=0)
  for g in fixed.log_gammas(tokens):
    np.testing.assert_allclose(g, np.log(fixed.cfg.gammas()), rtol=1e-6)
