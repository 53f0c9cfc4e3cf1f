"""Retention (Sun et al. 2023, §2.1) in its three equivalent forms, as pure functions.

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; state [B, H, K, V], always float32. log_gamma is the
log of the decay, either [H] (one fixed γ ∈ (0, 1] per head) or [B, T, H] (a per-token γ_t, gated
retention: YOCO, fla's simple GLA), applied before token t is added. Every form computes, with
S_{-1} = S_in (zero by default),

    S_t = γ_t · S_{t−1} + k_tᵀ v_t,      o_t = q_t · S_t                                (eq. 1–2)
        = Σ_{s≤t} (Π_{s<u≤t} γ_u) (q_t · k_s) v_s + (Π_{u≤t} γ_u) q_t S_in

(γ_t = γ for a fixed decay: the products are γ^{t−s} and γ^{t+1}.)

and returns (o [B, T, H, V] in the input dtype, S_{T−1} [B, H, K, V] float32). Products accumulate in
float32 whatever the input dtype. There is no normalisation: the paper's D̃ and R̃ rescalings (§2.2) are
per-(head, position) scalars that the layer's per-head norm cancels.

`reset` [B, T] (bool, optional) empties the state before token t (S_t = k_tᵀ v_t): document boundaries
of packed sequences, the first real token of a left-padded prompt. Decay exponents only ever appear as
γ^n with n ≥ 0, or, per token, as exp(c_t − c_s) with c the cumulative sum of log γ and t ≥ s (masked
before the exponential, so masked entries have zero value and zero gradient): for log γ_t ≤ 0 nothing
overflows however long the sequence or fast the decay. A positive log γ_t (γ_t > 1) is not refused:
the state then grows, and may overflow.

The kernels (`retention_pallas`) and the one dispatcher that picks a form and an implementation
(`retention_ops.retention`) sit above this module; it imports neither.

The fixed and the per-token decay enter only through the weight helpers below (`_fixed_weights`,
`_token_weights`); every form is otherwise one code path.
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
  if jnp.shape(log_gamma) not in ((H,), (B, T, H)):
    raise ValueError(f'log_gamma must have shape [H] = ({H},) or [B, T, H] = {(B, T, H)}; got '
                     f'{jnp.shape(log_gamma)}.')
  if state is not None and state.shape != (B, H, K, V):
    raise ValueError(f'state must have shape [B, H, K, V] = {(B, H, K, V)}; got {state.shape}.')
  if reset is not None and reset.shape != (B, T):
    raise ValueError(f'reset must have shape [B, T] = {(B, T)}; got {reset.shape}.')
  return B, T, H, K, V


def zero_state(batch: int, num_heads: int, key_dim: int, value_dim: int) -> jax.Array:
  """The empty state [B, H, K, V] float32."""
  return jnp.zeros((batch, num_heads, key_dim, value_dim), F32)


def per_token(log_gamma) -> bool:
  """Whether log_gamma is a per-token decay [B, T, H] (else one per head, [H])."""
  return jnp.ndim(log_gamma) == 3


def _pow(log_gamma_H, n):
  """γ^n for integer exponents n ≥ 0 of any shape; result [*n.shape, H] in float32."""
  return jnp.exp(jnp.asarray(n, F32)[..., None] * log_gamma_H.astype(F32))


def _decay_matrix(log_gamma_H, length):
  """D_hts = γ_h^{t−s} for s ≤ t, else 0 (eq. 5). Returns [H, T, T] float32."""
  t = jnp.arange(length)
  diff_TS = t[:, None] - t[None, :]
  d_TSH = _pow(log_gamma_H, jnp.maximum(diff_TS, 0))
  return jnp.where((diff_TS >= 0)[..., None], d_TSH, 0.0).transpose(2, 0, 1)


def _masked_exp(x, mask):
  """exp(x) where mask, else 0; the exponent is masked first, so masked entries (whose x may be
  positive) give neither inf nor a NaN gradient."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def segments(reset_BT):
  """Segment index of each token: the number of resets at or before it. [B, T] int32."""
  return jnp.cumsum(reset_BT.astype(jnp.int32), axis=-1)


def _fixed_weights(log_gamma_H, B, T, seg_BT):
  """The decay weights of one block of T tokens for a fixed γ [H]: (D [B|1, H, T, T] with
  D_ts = γ^{t−s} inside a segment, s ≤ t; ξ_t = γ^{t+1}, the weight of the state entering the
  block in o_t; ζ_s = γ^{T−1−s}, that of token s in the state leaving it; γ^T, that of the entering
  state in the leaving one), ξ and ζ [B, T, H], γ^T [B, H]; zero across resets."""
  t = jnp.arange(T)
  decay_BHTS = _decay_matrix(log_gamma_H, T)[None]
  xi_BTH = jnp.broadcast_to(_pow(log_gamma_H, t + 1), (B, T, log_gamma_H.shape[0]))
  zeta_BTH = jnp.broadcast_to(_pow(log_gamma_H, T - 1 - t), xi_BTH.shape)
  carry_BH = jnp.broadcast_to(_pow(log_gamma_H, T), (B, log_gamma_H.shape[0]))
  if seg_BT is not None:
    decay_BHTS = decay_BHTS * (seg_BT[:, :, None] == seg_BT[:, None, :])[:, None]
    xi_BTH, zeta_BTH, carry_BH = _reset_weights(seg_BT, xi_BTH, zeta_BTH, carry_BH)
  return decay_BHTS, xi_BTH, zeta_BTH, carry_BH


def _token_weights(log_gamma_BTH, seg_BT):
  """`_fixed_weights` for a per-token decay [B, T, H]: with c_t = Σ_{u≤t} log γ_u, D_ts =
  exp(c_t − c_s), ξ_t = exp(c_t), ζ_s = exp(c_{T−1} − c_s), carry exp(c_{T−1}); D is [B, H, T, T]."""
  T = log_gamma_BTH.shape[1]
  c_BTH = jnp.cumsum(log_gamma_BTH.astype(F32), axis=1)
  c_BHT = c_BTH.transpose(0, 2, 1)
  t = jnp.arange(T)
  mask_BTS = (t[:, None] >= t[None, :])[None]
  if seg_BT is not None:
    mask_BTS = mask_BTS & (seg_BT[:, :, None] == seg_BT[:, None, :])
  decay_BHTS = _masked_exp(c_BHT[..., :, None] - c_BHT[..., None, :], mask_BTS[:, None])
  xi_BTH, zeta_BTH, carry_BH = jnp.exp(c_BTH), jnp.exp(c_BTH[:, -1:] - c_BTH), jnp.exp(c_BTH[:, -1])
  if seg_BT is not None:
    xi_BTH, zeta_BTH, carry_BH = _reset_weights(seg_BT, xi_BTH, zeta_BTH, carry_BH)
  return decay_BHTS, xi_BTH, zeta_BTH, carry_BH


def _reset_weights(seg_BT, xi_BTH, zeta_BTH, carry_BH):
  """ξ, ζ and the carry zeroed where a reset cuts the block's tokens off its ends."""
  return (xi_BTH * (seg_BT == 0)[..., None], zeta_BTH * (seg_BT == seg_BT[:, -1:])[..., None],
          carry_BH * (seg_BT[:, -1] == 0)[:, None])


def weights(log_gamma, B, T, reset_BT=None):
  """(D, ξ, ζ, carry) of one block of T tokens (see `_fixed_weights`), fixed or per token."""
  seg_BT = None if reset_BT is None else segments(reset_BT)
  if per_token(log_gamma):
    return _token_weights(log_gamma, seg_BT)
  return _fixed_weights(log_gamma, B, T, seg_BT)


def parallel(q, k, v, log_gamma, state=None, *, reset=None):
  """Parallel form, (Q Kᵀ ⊙ D) V (eq. 5), plus the initial state's contribution."""
  B, T, H, K, V = check_shapes(q, k, v, log_gamma, state, reset)
  dtype = v.dtype
  scores_BHTS = jnp.einsum('bthk,bshk->bhts', q, k, preferred_element_type=F32)
  decay_BHTS, xi_BTH, zeta_BTH, carry_BH = weights(log_gamma, B, T, reset)
  o_BTHV = jnp.einsum('bhts,bshv->bthv', (scores_BHTS * decay_BHTS).astype(dtype), v,
                      preferred_element_type=F32)
  k_decayed_BTHK = k.astype(F32) * zeta_BTH[..., None]
  final_BHKV = jnp.einsum('bshk,bshv->bhkv', k_decayed_BTHK, v.astype(F32))
  if state is not None:
    q_decayed_BTHK = q.astype(F32) * xi_BTH[..., None]
    o_BTHV = o_BTHV + jnp.einsum('bthk,bhkv->bthv', q_decayed_BTHK, state.astype(F32))
    final_BHKV = final_BHKV + carry_BH[..., None, None] * state
  return o_BTHV.astype(dtype), final_BHKV


def step(q, k, v, log_gamma, state, *, reset=None):
  """One token of the recurrent form (eq. 6): S ← γ S + kᵀv; o = q S.

  q, k [B, H, K]; v [B, H, V]; log_gamma [H] or [B, H] (this token's); state [B, H, K, V];
  reset [B] bool. Returns (o [B, H, V], S).
  """
  B, H = q.shape[:2]
  if jnp.shape(log_gamma) not in ((H,), (B, H)):
    raise ValueError(f'step: log_gamma must have shape [H] = ({H},) or [B, H] = {(B, H)}; got '
                     f'{jnp.shape(log_gamma)}.')
  gamma_BH = jnp.broadcast_to(jnp.exp(log_gamma.astype(F32)), (B, H))
  if reset is not None:
    gamma_BH = jnp.where(reset[:, None], 0.0, gamma_BH)
  kv_BHKV = jnp.einsum('bhk,bhv->bhkv', k.astype(F32), v.astype(F32))
  state_BHKV = gamma_BH[..., None, None] * state + kv_BHKV
  o_BHV = jnp.einsum('bhk,bhkv->bhv', q.astype(F32), state_BHKV)
  return o_BHV.astype(v.dtype), state_BHKV


def recurrent(q, k, v, log_gamma, state=None, *, reset=None):
  """Recurrent form (eq. 6): a `lax.scan` of `step` over time, O(1) state per token."""
  B, T, H, K, V = check_shapes(q, k, v, log_gamma, state, reset)
  if state is None:
    state = zero_state(B, H, K, V)
  if reset is None:
    reset = jnp.zeros((B, T), bool)
  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  xs = tuple(map(time_major, (q, k, v, reset)))
  if per_token(log_gamma):
    xs += (time_major(log_gamma),)

  def body(state_BHKV, xs):
    q_BHK, k_BHK, v_BHV, reset_B, *gate = xs
    o_BHV, state_BHKV = step(q_BHK, k_BHK, v_BHV, gate[0] if gate else log_gamma, state_BHKV,
                             reset=reset_B)
    return state_BHKV, o_BHV

  final_BHKV, o_TBHV = jax.lax.scan(body, state.astype(F32), xs)
  return time_major(o_TBHV), final_BHKV


def _chunk_weights_fixed(log_gamma_H, B, N, C, seg_B1NC):
  """Per-chunk (D [H|B, H, N?, C, C], ξ, ζ [B, H, N, C], carry [B, H, N]) for a fixed γ."""
  H = log_gamma_H.shape[0]
  i = jnp.arange(C)
  decay = _decay_matrix(log_gamma_H, C)[:, None]
  xi_BHNC = jnp.broadcast_to(_pow(log_gamma_H, i + 1).T[None, :, None], (B, H, N, C))
  zeta_BHNC = jnp.broadcast_to(_pow(log_gamma_H, C - 1 - i).T[None, :, None], (B, H, N, C))
  carry_BHN = jnp.broadcast_to(_pow(log_gamma_H, C)[None, :, None], (B, H, N))
  if seg_B1NC is not None:
    decay = decay * (seg_B1NC[..., :, None] == seg_B1NC[..., None, :])
  return decay, xi_BHNC, zeta_BHNC, carry_BHN


def _chunk_weights_token(g_BHNC, seg_B1NC):
  """Per-chunk weights for a per-token decay from within-chunk cumulative sums c of log γ:
  D_ij = exp(c_i − c_j) (i ≥ j), ξ_i = exp(c_i), ζ_j = exp(c_{C−1} − c_j), carry exp(c_{C−1})."""
  C = g_BHNC.shape[-1]
  c_BHNC = jnp.cumsum(g_BHNC.astype(F32), axis=-1)
  i = jnp.arange(C)
  mask = i[:, None] >= i[None, :]
  if seg_B1NC is not None:
    mask = mask & (seg_B1NC[..., :, None] == seg_B1NC[..., None, :])
  decay_BHNCC = _masked_exp(c_BHNC[..., :, None] - c_BHNC[..., None, :], mask)
  return (decay_BHNCC, jnp.exp(c_BHNC), jnp.exp(c_BHNC[..., -1:] - c_BHNC),
          jnp.exp(c_BHNC[..., -1]))


def _full_chunks(q_BTHK, k_BTHK, v_BTHV, log_gamma, state_BHKV, reset_BT, chunk):
  """Chunkwise form over T = N·C tokens (eq. 7).

  Inside chunk n the parallel form gives the inner term; the state before the chunk, R_{n−1}, adds
  the cross term (Q_n ⊙ ξ) R_{n−1}, ξ_i = γ^{i+1}; and R_n = γ^C R_{n−1} + K_nᵀ (V_n ⊙ ζ),
  ζ_j = γ^{C−1−j} (per token: the products of γ_u over the same spans, `_chunk_weights_token`).
  Only the cheap state recurrence runs as a scan; all matrix products are batched over chunks. They
  run heads-major, [B, H, N, C, ·], so that every product's batch axes lead (faster on CPU;
  docs/performance.md).
  """
  B, T, H, K = q_BTHK.shape
  V = v_BTHV.shape[-1]
  N, C = T // chunk, chunk
  dtype = v_BTHV.dtype
  heads_major = lambda x_BTHX: x_BTHX.reshape(B, N, C, H, -1).transpose(0, 3, 1, 2, 4)
  q_BHNCK, k_BHNCK, v_BHNCV = heads_major(q_BTHK), heads_major(k_BTHK), heads_major(v_BTHV)
  # Resets seen so far inside the chunk; equal counts mean the same segment.
  seg_B1NC = None if reset_BT is None else segments(reset_BT.reshape(B, N, C))[:, None]
  if per_token(log_gamma):
    g_BHNC = heads_major(log_gamma[..., None])[..., 0]
    decay, xi_BHNC, zeta_BHNC, carry_BHN = _chunk_weights_token(g_BHNC, seg_B1NC)
  else:
    decay, xi_BHNC, zeta_BHNC, carry_BHN = _chunk_weights_fixed(log_gamma, B, N, C, seg_B1NC)
  if seg_B1NC is not None:
    xi_BHNC = xi_BHNC * (seg_B1NC == 0)
    zeta_BHNC = zeta_BHNC * (seg_B1NC == seg_B1NC[..., -1:])
    carry_BHN = carry_BHN * (seg_B1NC[..., -1] == 0)
  scores_BHNCC = jnp.einsum('bhnik,bhnjk->bhnij', q_BHNCK, k_BHNCK, preferred_element_type=F32)
  scores_BHNCC = scores_BHNCC * decay
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
  B, T, H, K, V = check_shapes(q, k, v, log_gamma, state, reset)
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be positive; got {chunk_size}.')
  if state is None:
    state = zero_state(B, H, K, V)
  main = (T // chunk_size) * chunk_size
  sl = lambda x, a, b: None if x is None else x[:, a:b]
  gl = (lambda a, b: log_gamma[:, a:b]) if per_token(log_gamma) else (lambda a, b: log_gamma)
  outputs = []
  if main:
    o_BTHV, state = _full_chunks(q[:, :main], k[:, :main], v[:, :main], gl(0, main), state,
                                 sl(reset, 0, main), chunk_size)
    outputs.append(o_BTHV)
  if main < T:
    o_BTHV, state = parallel(q[:, main:], k[:, main:], v[:, main:], gl(main, T), state,
                             reset=sl(reset, main, T))
    outputs.append(o_BTHV)
  o_BTHV = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)
  return o_BTHV, state


FORMS = {'parallel': parallel, 'recurrent': recurrent, 'chunkwise': chunkwise}
