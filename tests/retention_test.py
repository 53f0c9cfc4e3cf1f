"""The three retention forms and `step` against the float64 reference, gradients across forms."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax import decay
from retnet_jax import retention
from retnet_jax import retention_ops
from tests import reference
from tests import util
from tests.util import gammas
from tests.util import rel_err

K_DIM, V_DIM = 5, 6  # K ≠ V on purpose.
inputs = functools.partial(util.retention_inputs, K=K_DIM, V=V_DIM)


@functools.lru_cache(maxsize=None)
def jitted(form, chunk_size=None):
  if form == 'chunkwise':
    return jax.jit(functools.partial(retention.chunkwise, chunk_size=chunk_size))
  return jax.jit(getattr(retention, form))


def run_step(q, k, v, log_gamma, state):
  step = jitted('step')
  outs = []
  for t in range(q.shape[1]):
    o, state = step(q[:, t], k[:, t], v[:, t], log_gamma, state)
    outs.append(o)
  return jnp.stack(outs, axis=1), state


def all_forms(q, k, v, log_gamma, state, chunk_sizes=(1, 16, 64, 256)):
  yield 'parallel', jitted('parallel')(q, k, v, log_gamma, state)
  yield 'recurrent', jitted('recurrent')(q, k, v, log_gamma, state)
  for c in chunk_sizes:
    yield f'chunkwise{c}', jitted('chunkwise', c)(q, k, v, log_gamma, state)
  yield 'step', run_step(q, k, v, log_gamma, state)


def check_against_reference(schedule, H, T, seed, dtype=jnp.float32, tol=1e-5):
  g = gammas(schedule, H)
  q, k, v, state = inputs(seed, 2, T, H, dtype=dtype)
  o_ref, s_ref = reference.retention(q, k, v, g, state)
  log_gamma = jnp.asarray(np.log(g), jnp.float32)
  for name, (o, s) in all_forms(q, k, v, log_gamma, state):
    assert o.dtype == dtype and s.dtype == jnp.float32, name
    assert o.shape == o_ref.shape and s.shape == s_ref.shape, name
    # Per head: heads with small γ have small outputs, which one global scale would not see.
    o_err, s_err = util.rel_err_rows(o, o_ref, (0, 1, 3)), util.rel_err_rows(s, s_ref, (0, 2, 3))
    assert o_err <= tol and s_err <= tol, (name, o_err, s_err)


@pytest.mark.parametrize('schedule', decay.SCHEDULES)
@pytest.mark.parametrize('T', [1, 7, 64, 200])
def test_forms_match_reference_every_schedule(schedule, T):
  check_against_reference(schedule, 3, T, seed=T)


@pytest.mark.parametrize('H', [1, 8])
@pytest.mark.parametrize('schedule', ['retnet', 'none', 'custom'])
@pytest.mark.parametrize('T', [7, 200])
def test_forms_match_reference_heads(H, schedule, T):
  check_against_reference(schedule, H, T, seed=H * T)


@pytest.mark.parametrize('schedule', ['retnet', 'none'])
def test_bfloat16_inputs(schedule):
  check_against_reference(schedule, 3, 200, seed=7, dtype=jnp.bfloat16, tol=1e-2)


def test_zero_initial_state_is_default():
  q, k, v, _ = inputs(0, 2, 37, 3)
  log_gamma = jnp.log(jnp.asarray(gammas('retnet', 3), jnp.float32))
  o_ref, s_ref = reference.retention(q, k, v, np.exp(log_gamma))
  for form in ('parallel', 'recurrent', 'chunkwise'):
    o, s = getattr(retention, form)(q, k, v, log_gamma)
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(s, s_ref) <= 1e-5, form


@pytest.mark.parametrize('form,chunk', [('parallel', None), ('recurrent', None), ('chunkwise', 16),
                                        ('chunkwise', 5)])
def test_reset_matches_reference(form, chunk):
  B, T, H = 3, 53, 3
  q, k, v, state = inputs(11, B, T, H)
  reset = np.zeros((B, T), bool)
  reset[0, [0, 16, 17, 40]] = True  # At chunk starts, twice in a row, mid-chunk.
  reset[1, [5, 52]] = True  # The last token.
  g = gammas('lm', H)
  o_ref, s_ref = reference.retention(q, k, v, g, state, reset)
  fn = jitted(form, chunk)
  o, s = fn(q, k, v, jnp.log(jnp.asarray(g, jnp.float32)), state, reset=jnp.asarray(reset))
  assert util.rel_err_rows(o, o_ref, (1, 3)) <= 1e-5  # Per row and head: resets zero some rows.
  assert util.rel_err_rows(s, s_ref, (2, 3)) <= 1e-5


@pytest.mark.parametrize('form,chunk', [('parallel', None), ('recurrent', None), ('chunkwise', 16),
                                        ('chunkwise', 7)])
def test_split_anywhere_and_carry_state(form, chunk):
  B, T, H = 2, 61, 3
  q, k, v, state = inputs(3, B, T, H)
  log_gamma = jnp.log(jnp.asarray(gammas('retnet', H), jnp.float32))
  fn = jitted(form, chunk)
  o_full, s_full = fn(q, k, v, log_gamma, state)
  for cuts in ([1], [30], [16, 32], [5, 6, 59], [60]):
    bounds = [0, *cuts, T]
    s, outs = state, []
    for a, b in zip(bounds[:-1], bounds[1:]):
      o, s = fn(q[:, a:b], k[:, a:b], v[:, a:b], log_gamma, s)
      outs.append(o)
    assert rel_err(jnp.concatenate(outs, 1), o_full) <= 1e-5, cuts
    assert rel_err(s, s_full) <= 1e-5, cuts


def test_mixed_forms_prefill_then_step():
  """Chunkwise prefill of a prompt, then token-by-token `step`, equals one parallel pass."""
  q, k, v, _ = inputs(5, 2, 45, 4)
  log_gamma = jnp.log(jnp.asarray(gammas('lm', 4), jnp.float32))
  o_full, s_full = retention.parallel(q, k, v, log_gamma)
  o_pre, s = retention.chunkwise(q[:, :40], k[:, :40], v[:, :40], log_gamma, chunk_size=16)
  outs = [o_pre]
  for t in range(40, 45):
    o, s = retention.step(q[:, t], k[:, t], v[:, t], log_gamma, s)
    outs.append(o[:, None])
  assert rel_err(jnp.concatenate(outs, 1), o_full) <= 1e-5
  assert rel_err(s, s_full) <= 1e-5


@pytest.mark.parametrize('schedule', ['retnet', 'none'])
def test_gradients_agree_across_forms(schedule):
  B, T, H = 2, 45, 3
  q, k, v, state = inputs(9, B, T, H)
  log_gamma = jnp.log(jnp.asarray(gammas(schedule, H), jnp.float32))
  rng = np.random.default_rng(1)
  w_o = jnp.asarray(rng.standard_normal((B, T, H, V_DIM)), jnp.float32)
  w_s = jnp.asarray(rng.standard_normal((B, H, K_DIM, V_DIM)), jnp.float32)

  def loss(fn, q, k, v, log_gamma, state):
    o, s = fn(q, k, v, log_gamma, state)
    return jnp.sum(o * w_o) + jnp.sum(s * w_s)

  grads = {}
  fns = {'parallel': retention.parallel, 'recurrent': retention.recurrent,
         'chunkwise8': functools.partial(retention.chunkwise, chunk_size=8),
         'chunkwise64': functools.partial(retention.chunkwise, chunk_size=64)}
  for name, fn in fns.items():
    g = jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3, 4)))(
        q, k, v, log_gamma, state)
    grads[name] = g
    assert all(np.all(np.isfinite(x)) for x in g), name
  for name, g in grads.items():
    for arg, x, ref in zip('q k v log_gamma state'.split(), g, grads['parallel']):
      assert rel_err(x, ref) <= 1e-4, (name, arg, rel_err(x, ref))


def test_log_gamma_gradient_matches_finite_difference():
  """d loss / d log γ from autodiff against a float64 central difference of the reference."""
  B, T, H = 1, 30, 2
  q, k, v, state = inputs(4, B, T, H)
  log_gamma = np.log(gammas('retnet', H))
  rng = np.random.default_rng(2)
  w_o = rng.standard_normal((B, T, H, V_DIM))

  def ref_loss(lg):
    return np.sum(reference.retention(q, k, v, np.exp(lg), state)[0] * w_o)

  eps = 1e-6
  fd = np.array([(ref_loss(log_gamma + eps * e) - ref_loss(log_gamma - eps * e)) / (2 * eps)
                 for e in np.eye(H)])
  g = jax.grad(lambda lg: jnp.sum(retention.chunkwise(q, k, v, lg, state, chunk_size=8)[0] * w_o))(
      jnp.asarray(log_gamma, jnp.float32))
  assert rel_err(g, fd) <= 1e-4


def test_bad_shapes_raise():
  q, k, v, state = inputs(0, 2, 8, 3)
  lg = jnp.zeros(3)
  with pytest.raises(ValueError, match='log_gamma'):
    retention.parallel(q, k, v, jnp.zeros(4))
  with pytest.raises(ValueError, match='state'):
    retention.recurrent(q, k, v, lg, state[:, :2])
  with pytest.raises(ValueError, match='disagree'):
    retention.chunkwise(q, k[:, :4], v, lg)
  with pytest.raises(ValueError, match='chunk_size'):
    retention.chunkwise(q, k, v, lg, chunk_size=0)
  with pytest.raises(ValueError, match='Unknown retention form'):
    retention_ops.retention(q, k, v, lg, form='fast')


@pytest.mark.parametrize('form', ['chunkwise', 'recurrent', 'parallel'])
def test_no_overflow_at_16k_tokens_bfloat16(form):
  """T = 16384 with γ = 1 (no decay: the state only grows) and bfloat16 inputs stays finite; the
  parallel form at T = 4096 (its [T, T] decay matrix is what grows, not the sum's range)."""
  B, T, H = 1, 4096 if form == 'parallel' else 16384, 1 if form == 'parallel' else 2
  q, k, v, _ = inputs(0, B, T, H, K=8, V=8, dtype=jnp.bfloat16, with_state=False)
  for schedule in ('none', 'retnet'):
    log_gamma = jnp.log(jnp.asarray(gammas(schedule, H), jnp.float32))
    fn = jitted(form, 64 if form == 'chunkwise' else None)
    o, s = fn(q, k, v, log_gamma, None)
    assert np.all(np.isfinite(np.asarray(o, np.float32))) and np.all(np.isfinite(s)), schedule
    # Spot-check the last token against the definition: o_T = q_T Σ_s γ^{T−1−s} k_sᵀ v_s.
    if schedule == 'none':
      expect = np.einsum('bhk,bhkv->bhv', np.asarray(q[:, -1], np.float64), np.asarray(s, np.float64))
      assert rel_err(o[:, -1], expect) <= 1e-2
