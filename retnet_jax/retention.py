"""Retention (Sun et al. 2023, §2.1) in its three equivalent forms, as pure functions.

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; log_gamma [H] (log of each head's decay γ ∈ (0, 1]);
state [B, H, K, V], always float32. Every form computes, with S_{-1} = S_in (zero by default),

    S_t = γ · S_{t−1} + k_tᵀ v_t,      o_t = q_t · S_t                                  (eq. 1–2)
        = Σ_{s≤t} γ^{t−s} (q_t · k_s) v_s + γ^{t+1} q_t S_in

and returns (o [B, T, H, V] in the input dtype, S_{T−1} [B, H, K, V] float32). Products accumulate in
float32 whatever the input dtype. There is no normalisation: the paper's D̃ and R̃ rescalings (§2.2) are
per-(head, position) scalars that the layer's per-head norm cancels.

`reset` [B, T] (bool, optional) empties the state before token t (S_t = k_tᵀ v_t): document boundaries
of packed sequences, the first real token of a left-padded prompt. Decay exponents only ever appear as
γ^n with n ≥ 0, so nothing overflows however long the sequence or slow the decay.

The kernels (`retention_pallas`) and the one dispatcher that picks a form and an implementation
(`retention_ops.retention`) sit above this module; it imports neither.

The decay enters only through `_decay_exponent` and the `γ^n` helpers below, so a per-token decay
[B, T, H] can later replace `log_gamma` [H] without changing the callers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def check_shapes(q, k, v, log_gamma, state=None, reset=None):
  """Validates the shapes of a retention call's arguments; returns (B, T, H, K, V)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f'q, k, v must be [B, T, H, K|V]; got {q.shape}, {k.shape}, {v.shape}.')
  B, T, H, K = q.shape
  V = v.shape[-1]
  if k.shape != q.shape or v.shape[:3] != (B, T, H):
    raise ValueError(f'q {q.shape}, k {k.shape}, v {v.shape} disagree on [B, T, H] or K.')
  if jnp.shape(log_gamma) != (H,):
    raise ValueError(f'log_gamma must have shape [H] = ({H},); got {jnp.shape(log_gamma)}.')
  if state is not None and state.shape != (B, H, K, V):
    raise ValueError(f'state must have shape [B, H, K, V] = {(B, H, K, V)}; got {state.shape}.')
  if reset is not None and reset.shape != (B, T):
    raise ValueError(f'reset must have shape [B, T] = {(B, T)}; got {reset.shape}.')
  return B, T, H, K, V


def zero_state(batch: int, num_heads: int, key_dim: int, value_dim: int) -> jax.Array:
  """The empty state [B, H, K, V] float32."""
  return jnp.zeros((batch, num_heads, key_dim, value_dim), F32)


def _pow(log_gamma_H, n):
  """γ^n for integer exponents n ≥ 0 of any shape; result [*n.shape, H] in float32."""
  return jnp.exp(jnp.asarray(n, F32)[..., None] * log_gamma_H.astype(F32))


def _decay_matrix(log_gamma_H, length):
  """D_hts = γ_h^{t−s} for s ≤ t, else 0 (eq. 5). Returns [H, T, T] float32."""
  t = jnp.arange(length)
  diff_TS = t[:, None] - t[None, :]
  d_TSH = _pow(log_gamma_H, jnp.maximum(diff_TS, 0))
  return jnp.where((diff_TS >= 0)[..., None], d_TSH, 0.0).transpose(2, 0, 1)


def segments(reset_BT):
  """Segment index of each token: the number of resets at or before it. [B, T] int32."""
  return jnp.cumsum(reset_BT.astype(jnp.int32), axis=-1)


def parallel(q, k, v, log_gamma, state=None, *, reset=None):
  """Parallel form, (Q Kᵀ ⊙ D) V (eq. 5), plus the initial state's contribution."""
  q_BTHK, k_BTHK, v_BTHV, log_gamma_H, state_BHKV, reset_BT = q, k, v, log_gamma, state, reset
  B, T, H, K, V = check_shapes(q_BTHK, k_BTHK, v_BTHV, log_gamma_H, state_BHKV, reset_BT)
  dtype = v_BTHV.dtype
  t = jnp.arange(T)
  scores_BHTS = jnp.einsum('bthk,bshk->bhts', q_BTHK, k_BTHK, preferred_element_type=F32)
  decay_BHTS = _decay_matrix(log_gamma_H, T)[None]
  # Weight of the initial state in o_t and of token s in the final state.
  q_weight_BTH = jnp.broadcast_to(_pow(log_gamma_H, t + 1), (B, T, H))
  k_weight_BTH = jnp.broadcast_to(_pow(log_gamma_H, T - 1 - t), (B, T, H))
  carry_weight_BH = jnp.broadcast_to(_pow(log_gamma_H, T), (B, H))
  if reset_BT is not None:
    seg_BT = segments(reset_BT)
    decay_BHTS = decay_BHTS * (seg_BT[:, :, None] == seg_BT[:, None, :])[:, None]
    q_weight_BTH = q_weight_BTH * (seg_BT == 0)[..., None]
    k_weight_BTH = k_weight_BTH * (seg_BT == seg_BT[:, -1:])[..., None]
    carry_weight_BH = carry_weight_BH * (seg_BT[:, -1] == 0)[:, None]
  o_BTHV = jnp.einsum('bhts,bshv->bthv', (scores_BHTS * decay_BHTS).astype(dtype), v_BTHV,
                      preferred_element_type=F32)
  k_decayed_BTHK = k_BTHK.astype(F32) * k_weight_BTH[..., None]
  final_BHKV = jnp.einsum('bshk,bshv->bhkv', k_decayed_BTHK, v_BTHV.astype(F32))
  if state_BHKV is not None:
    q_decayed_BTHK = q_BTHK.astype(F32) * q_weight_BTH[..., None]
    o_BTHV = o_BTHV + jnp.einsum('bthk,bhkv->bthv', q_decayed_BTHK, state_BHKV.astype(F32))
    final_BHKV = final_BHKV + carry_weight_BH[..., None, None] * state_BHKV
  return o_BTHV.astype(dtype), final_BHKV


def step(q, k, v, log_gamma, state, *, reset=None):
  """One token of the recurrent form (eq. 6): S ← γ S + kᵀv; o = q S.

  q, k [B, H, K]; v [B, H, V]; state [B, H, K, V]; reset [B] bool. Returns (o [B, H, V], S).
  """
  q_BHK, k_BHK, v_BHV, log_gamma_H, state_BHKV, reset_B = q, k, v, log_gamma, state, reset
  gamma_BH = jnp.broadcast_to(jnp.exp(log_gamma_H.astype(F32)), q_BHK.shape[:2])
  if reset_B is not None:
    gamma_BH = jnp.where(reset_B[:, None], 0.0, gamma_BH)
  kv_BHKV = jnp.einsum('bhk,bhv->bhkv', k_BHK.astype(F32), v_BHV.astype(F32))
  state_BHKV = gamma_BH[..., None, None] * state_BHKV + kv_BHKV
  o_BHV = jnp.einsum('bhk,bhkv->bhv', q_BHK.astype(F32), state_BHKV)
  return o_BHV.astype(v_BHV.dtype), state_BHKV


def recurrent(q, k, v, log_gamma, state=None, *, reset=None):
  """Recurrent form (eq. 6): a `lax.scan` of `step` over time, O(1) state per token."""
  q_BTHK, k_BTHK, v_BTHV, log_gamma_H, state_BHKV, reset_BT = q, k, v, log_gamma, state, reset
  B, T, H, K, V = check_shapes(q_BTHK, k_BTHK, v_BTHV, log_gamma_H, state_BHKV, reset_BT)
  if state_BHKV is None:
    state_BHKV = zero_state(B, H, K, V)
  if reset_BT is None:
    reset_BT = jnp.zeros((B, T), bool)

  def body(state, xs):
    q_BHK, k_BHK, v_BHV, reset_B = xs
    o_BHV, state = step(q_BHK, k_BHK, v_BHV, log_gamma_H, state, reset=reset_B)
    return state, o_BHV

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  final_BHKV, o_TBHV = jax.lax.scan(
      body, state_BHKV.astype(F32), tuple(map(time_major, (q_BTHK, k_BTHK, v_BTHV, reset_BT))))
  return time_major(o_TBHV), final_BHKV


def _full_chunks(q_BTHK, k_BTHK, v_BTHV, log_gamma_H, state_BHKV, reset_BT, chunk):
  """Chunkwise form over T = N·C tokens (eq. 7).

  Inside chunk n the parallel form gives the inner term; the state before the chunk, R_{n−1}, adds
  the cross term (Q_n ⊙ ξ) R_{n−1}, ξ_i = γ^{i+1}; and R_n = γ^C R_{n−1} + K_nᵀ (V_n ⊙ ζ),
  ζ_j = γ^{C−1−j}. Only the cheap state recurrence runs as a scan; all matrix products are batched
  over chunks. They run heads-major, [B, H, N, C, ·], so that every product's batch axes lead
  (faster on CPU; docs/performance.md).
  """
  B, T, H, K = q_BTHK.shape
  V = v_BTHV.shape[-1]
  N, C = T // chunk, chunk
  dtype = v_BTHV.dtype
  heads_major = lambda x_BTHX: x_BTHX.reshape(B, N, C, H, -1).transpose(0, 3, 1, 2, 4)
  q_BHNCK, k_BHNCK, v_BHNCV = heads_major(q_BTHK), heads_major(k_BTHK), heads_major(v_BTHV)
  i = jnp.arange(C)

  decay_HCC = _decay_matrix(log_gamma_H, C)
  xi_BHNC = jnp.broadcast_to(_pow(log_gamma_H, i + 1).T[None, :, None], (B, H, N, C))
  zeta_BHNC = jnp.broadcast_to(_pow(log_gamma_H, C - 1 - i).T[None, :, None], (B, H, N, C))
  carry_BHN = jnp.broadcast_to(_pow(log_gamma_H, C)[None, :, None], (B, H, N))
  scores_BHNCC = jnp.einsum('bhnik,bhnjk->bhnij', q_BHNCK, k_BHNCK, preferred_element_type=F32)
  scores_BHNCC = scores_BHNCC * decay_HCC[:, None]
  if reset_BT is not None:
    # Resets seen so far inside the chunk; equal counts mean the same segment.
    seg_B1NC = segments(reset_BT.reshape(B, N, C))[:, None]
    scores_BHNCC = scores_BHNCC * (seg_B1NC[..., :, None] == seg_B1NC[..., None, :])
    xi_BHNC = xi_BHNC * (seg_B1NC == 0)
    zeta_BHNC = zeta_BHNC * (seg_B1NC == seg_B1NC[..., -1:])
    carry_BHN = carry_BHN * (seg_B1NC[..., -1] == 0)
  inner_BHNCV = jnp.einsum('bhnij,bhnjv->bhniv', scores_BHNCC.astype(dtype), v_BHNCV,
                           preferred_element_type=F32)
  k_zeta_BHNCK = (k_BHNCK.astype(F32) * zeta_BHNC[..., None]).astype(dtype)
  update_BHNKV = jnp.einsum('bhnjk,bhnjv->bhnkv', k_zeta_BHNCK, v_BHNCV, preferred_element_type=F32)

  def across(state_BHKV, xs):
    carry_BH, update_BHKV = xs
    return carry_BH[..., None, None] * state_BHKV + update_BHKV, state_BHKV

  final_BHKV, before_NBHKV = jax.lax.scan(
      across, state_BHKV.astype(F32), (jnp.moveaxis(carry_BHN, 2, 0), jnp.moveaxis(update_BHNKV, 2, 0)))
  q_xi_BHNCK = q_BHNCK.astype(F32) * xi_BHNC[..., None]
  cross_BHNCV = jnp.einsum('bhnik,nbhkv->bhniv', q_xi_BHNCK, before_NBHKV)
  o_BTHV = (inner_BHNCV + cross_BHNCV).transpose(0, 2, 3, 1, 4).reshape(B, T, H, V)
  return o_BTHV.astype(dtype), final_BHKV


def chunkwise(q, k, v, log_gamma, state=None, *, reset=None, chunk_size=64):
  """Chunkwise form (eq. 7): parallel inside chunks of `chunk_size`, recurrent across them.

  Any T: the ⌊T/C⌋ full chunks run chunkwise and the remaining T mod C tokens continue from their
  state in the parallel form, so no padding ever decays the state.
  """
  q_BTHK, k_BTHK, v_BTHV, log_gamma_H, state_BHKV, reset_BT = q, k, v, log_gamma, state, reset
  B, T, H, K, V = check_shapes(q_BTHK, k_BTHK, v_BTHV, log_gamma_H, state_BHKV, reset_BT)
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be positive; got {chunk_size}.')
  if state_BHKV is None:
    state_BHKV = zero_state(B, H, K, V)
  main = (T // chunk_size) * chunk_size
  sl = lambda x, a, b: None if x is None else x[:, a:b]
  outputs = []
  if main:
    o_BTHV, state_BHKV = _full_chunks(
        q_BTHK[:, :main], k_BTHK[:, :main], v_BTHV[:, :main], log_gamma_H, state_BHKV,
        sl(reset_BT, 0, main), chunk_size)
    outputs.append(o_BTHV)
  if main < T:
    o_BTHV, state_BHKV = parallel(
        q_BTHK[:, main:], k_BTHK[:, main:], v_BTHV[:, main:], log_gamma_H, state_BHKV,
        reset=sl(reset_BT, main, T))
    outputs.append(o_BTHV)
  o_BTHV = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)
  return o_BTHV, state_BHKV


FORMS = {'parallel': parallel, 'recurrent': recurrent, 'chunkwise': chunkwise}
