"""The attention dispatcher: each implementation that runs here against a float64 NumPy reference
written from the definition (causal, document segments, local window), and the choice and its reason
on each platform."""

import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax import attention


def reference(q, k, v, segment_ids, window):
  """o_t = Σ_s softmax(q_t·k_s / √K) v_s over s ≤ t, seg_s = seg_t, t − s < window; float64."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  B, T, H, K = q.shape
  out = np.zeros_like(v)
  for b in range(B):
    for t in range(T):
      keys = [s for s in range(t + 1) if segment_ids[b, s] == segment_ids[b, t]
              and (window is None or t - s < window)]
      for h in range(H):
        logits = np.array([q[b, t, h] @ k[b, s, h] for s in keys]) / np.sqrt(K)
        p = np.exp(logits - logits.max())
        out[b, t, h] = (p / p.sum()) @ v[b, keys, h]
  return out


def _inputs(B, T, H, K, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((B, T, H, K)).astype(np.float32) for _ in range(3))
  # Documents of uneven lengths, a different cut in each row.
  seg = np.stack([np.cumsum(rng.random(T) < 0.08) for _ in range(B)]).astype(np.int32)
  return q, k, v, seg


def rel_err(x, ref):
  return float(np.max(np.abs(np.asarray(x, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize('window', [None, 1, 7])
@pytest.mark.parametrize('segments', [False, True])
def test_xla_matches_the_definition(window, segments):
  q, k, v, seg = _inputs(2, 37, 3, 8)
  seg = seg if segments else np.zeros_like(seg)
  got = attention.attention(q, k, v, segment_ids=jnp.asarray(seg) if segments else None,
                            window=window, impl='xla')
  assert got.shape == q.shape and got.dtype == jnp.float32
  assert rel_err(got, reference(q, k, v, seg, window)) <= 1e-5


@pytest.mark.parametrize('window', [None, 100])
def test_splash_kernel_interpreted_matches_the_definition(window):
  """The TPU splash kernel in Pallas interpret mode: segment ids and the local window."""
  q, k, v, seg = _inputs(1, 256, 2, 64, seed=1)
  got = attention.attention(q, k, v, segment_ids=jnp.asarray(seg), window=window, impl='splash')
  assert rel_err(got, reference(q, k, v, seg, window)) <= 1e-4


def test_bfloat16_inputs_keep_float32_scores():
  q, k, v, seg = _inputs(2, 19, 2, 16, seed=2)
  got = attention.attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)),
                            segment_ids=jnp.asarray(seg), window=5, impl='xla')
  assert got.dtype == jnp.bfloat16
  ref = reference(*(np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32) for a in (q, k, v)), seg, 5)
  assert rel_err(got, ref) <= 2e-2


def test_choice_and_reason_per_platform():
  choose = attention.choose
  cpu = choose((2, 256, 4, 64), jnp.float32, platform='cpu')
  assert cpu.impl == 'xla' and 'platform cpu' in cpu.reason
  assert choose((2, 256, 4, 64), jnp.bfloat16, platform='gpu').impl == 'cudnn'
  gpu32 = choose((2, 256, 4, 64), jnp.float32, platform='gpu')
  assert gpu32.impl == 'xla' and 'float32' in gpu32.reason
  assert 'head dim 200' in choose((2, 256, 4, 200), jnp.bfloat16, platform='gpu').reason
  assert choose((2, 2048, 8, 128), jnp.bfloat16, platform='tpu').impl == 'splash'
  ragged = choose((2, 100, 8, 128), jnp.bfloat16, platform='tpu')
  assert ragged.impl == 'xla' and 'sequence length 100' in ragged.reason
  interp = choose((2, 256, 4, 64), jnp.float32, impl='splash', platform='cpu')
  assert interp.impl == 'splash' and interp.interpret
  with pytest.raises(ValueError, match='needs a GPU'):
    choose((2, 256, 4, 64), jnp.float32, impl='cudnn', platform='cpu')
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    choose((2, 256, 4, 64), jnp.float32, impl='flash')


def test_allowed_mask_of_a_ring_buffer():
  """A cache slot is visible by its stored position, wherever the ring put it."""
  q_pos = jnp.asarray([9, 10])
  k_pos = jnp.asarray([8, 9, 6, 7, 2**30])  # A ring of 4 after position 9, and an empty slot.
  seg = jnp.ones((1, 2), jnp.int32)
  mask = np.asarray(attention.allowed(q_pos, k_pos, seg, jnp.ones((1, 5), jnp.int32), 3))[0]
  np.testing.assert_array_equal(mask, [[True, True, False, True, False],
                                       [True, True, False, False, False]])
