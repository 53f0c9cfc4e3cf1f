"""Float64 NumPy references written from the paper's equations (not from the code under test)."""

import numpy as np


def retention(q, k, v, gamma, state=None, reset=None):
  """o_t = Σ_{s≤t, same segment} γ^{t−s} (q_t·k_s) v_s + [no reset ≤ t] γ^{t+1} q_t S_in.

  The parallel form of the definition, (Q Kᵀ ⊙ D) V with D_ts = γ^{t−s} for s ≤ t in t's segment,
  else 0 (paper eq. 5), plus the initial state's share. `retention_loop` is the same sum term by term.
  q, k [B, T, H, K]; v [B, T, H, V]; gamma [H]; state [B, H, K, V]; reset [B, T] bool.
  Returns (o [B, T, H, V], final state [B, H, K, V]) in float64.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  gamma = np.asarray(gamma, np.float64)
  B, T, H, K = q.shape
  V = v.shape[-1]
  state = np.zeros((B, H, K, V)) if state is None else np.asarray(state, np.float64)
  reset = np.zeros((B, T), bool) if reset is None else np.asarray(reset, bool)
  seg = np.cumsum(reset, axis=1)  # [B, T]
  t = np.arange(T)
  delta = t[:, None] - t[None, :]  # t − s
  same = (seg[:, :, None] == seg[:, None, :]) & (delta >= 0)[None]  # [B, T, S]
  D = np.where(same[:, None], gamma[None, :, None, None] ** np.maximum(delta, 0)[None, None], 0.0)
  o = np.einsum('bhts,bthk,bshk,bshv->bthv', D, q, k, v, optimize=True)
  first = seg == 0  # [B, T]: no reset yet, the initial state still counts.
  carry = gamma[None, None, :] ** (t + 1)[None, :, None] * first[:, :, None]  # [B, T, H]
  o += carry[..., None] * np.einsum('bthk,bhkv->bthv', q, state)
  # The final state is the next token's view: S_T = Σ_{s in the last segment} γ^{T−1−s} k_sᵀ v_s.
  w = gamma[None, None, :] ** (T - 1 - t)[None, :, None] * (seg == seg[:, -1:])[:, :, None]
  final = np.einsum('bsh,bshk,bshv->bhkv', w, k, v)
  final += (gamma[None, :] ** T * first[:, -1:])[..., None, None] * state
  return o, final


def retention_loop(q, k, v, gamma, state=None, reset=None):
  """`retention`, one (t, s) term at a time (slow: for small T, as a check of the vectorised one)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  gamma = np.asarray(gamma, np.float64)
  B, T, H, K = q.shape
  V = v.shape[-1]
  state = np.zeros((B, H, K, V)) if state is None else np.asarray(state, np.float64)
  reset = np.zeros((B, T), bool) if reset is None else np.asarray(reset, bool)
  seg = np.cumsum(reset, axis=1)
  o = np.zeros((B, T, H, V))
  for t in range(T):
    for s in range(t + 1):
      same = (seg[:, t] == seg[:, s]).astype(np.float64)  # [B]
      w = gamma[None, :] ** (t - s) * same[:, None]  # [B, H]
      qk = np.einsum('bhk,bhk->bh', q[:, t], k[:, s])
      o[:, t] += (w * qk)[..., None] * v[:, s]
    carry = gamma[None, :] ** (t + 1) * (seg[:, t] == 0)[:, None]
    o[:, t] += carry[..., None] * np.einsum('bhk,bhkv->bhv', q[:, t], state)
  final = (gamma[None, :] ** T * (seg[:, -1] == 0)[:, None])[..., None, None] * state
  for s in range(T):
    w = gamma[None, :] ** (T - 1 - s) * (seg[:, s] == seg[:, -1])[:, None]
    final += w[..., None, None] * np.einsum('bhk,bhv->bhkv', k[:, s], v[:, s])
  return o, final


# ------------------------------------------------------------------------------------------------
# Decay schedules (the paper and torchscale; docs: the RetNet reference notes).


def gammas(schedule, H, values=()):
  """γ per head: 'retnet' eq. 8 γ_h = 1 − 2^{−5−h}; 'lm' 1 − exp(linspace(ln 1/32, ln 1/512, H));
  'uniform' (Table 6 − multi-scale) 1 − 2^{−6.5}; 'none' 1; 'custom' the given values."""
  if schedule == 'retnet':
    return np.array([1.0 - 2.0 ** (-5.0 - h) for h in range(H)])
  if schedule == 'lm':
    lo, hi = np.log(1 / 32), np.log(1 / 512)
    return np.array([1.0 - np.exp(lo + (hi - lo) * h / max(H - 1, 1)) for h in range(H)])
  if schedule == 'uniform':
    return np.full(H, 1.0 - 2.0 ** -6.5)
  if schedule == 'none':
    return np.ones(H)
  if schedule == 'custom':
    return np.asarray(values, np.float64)
  raise ValueError(schedule)


# ------------------------------------------------------------------------------------------------
# The layers.


def rotary(x, positions, base=10000.0, freqs='torchscale', style='interleaved'):
  """x [B, T, H, K] rotated as complex numbers: pair j (x_2j, x_2j+1 interleaved, or x_j, x_j+K/2
  half-split) times e^{i n θ_j}; θ_j = base^{−j/(K/2−1)} (torchscale) or base^{−2j/K}."""
  x = np.asarray(x, np.float64)
  K = x.shape[-1]
  j = np.arange(K // 2)
  theta = base ** (-j / (K // 2 - 1)) if freqs == 'torchscale' else base ** (-2.0 * j / K)
  turn = np.exp(1j * np.asarray(positions, np.float64)[:, None] * theta)[None, :, None, :]
  if style == 'interleaved':
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * turn
    return np.stack([z.real, z.imag], -1).reshape(x.shape)
  z = (x[..., :K // 2] + 1j * x[..., K // 2:]) * turn
  return np.concatenate([z.real, z.imag], -1)


def rms_norm(x, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def silu(x):
  return x / (1.0 + np.exp(-x))


def multi_scale_retention(x, w, gamma, *, reset=None, gate=True, group_norm=True, row_norm=False,
                          eps=1e-6):
  """MSR(X) = W_O (swish(X W_G) ⊙ GroupNorm_h(Retention_h(X)))  (paper eq. 8), x [B, T, D].

  w: {'wq', 'wk' [D, H, K], 'wv', 'wg' [D, H, V], 'wo' [H, V, D]}. q, k rotated (positions 0..T−1),
  k scaled by K^−½. gate / group_norm False: Table 6's "− swish gate" / "− GroupNorm"; row_norm
  divides o_t by √(Σ_{i≤t'} γ^i), t' the position inside t's segment (§2.2's D̃).
  """
  x = np.asarray(x, np.float64)
  w = {name: np.asarray(a, np.float64) for name, a in w.items() if a is not None}
  B, T, _ = x.shape
  K = w['wq'].shape[-1]
  pos = np.arange(T)
  q = rotary(np.einsum('btd,dhk->bthk', x, w['wq']), pos)
  k = rotary(np.einsum('btd,dhk->bthk', x, w['wk']) * K**-0.5, pos)
  v = np.einsum('btd,dhv->bthv', x, w['wv'])
  o, _ = retention(q, k, v, gamma, reset=reset)
  if row_norm:
    reset = np.zeros((B, T), bool) if reset is None else np.asarray(reset, bool)
    seg = np.cumsum(reset, 1)
    start = np.array([[np.argmax(seg[b] == seg[b, t]) for t in range(T)] for b in range(B)])
    n = pos[None, :] - start + 1  # [B, T]: positions 0..t' in the segment.
    total = np.array([[[np.sum(g ** np.arange(m)) for g in gamma] for m in row] for row in n])
    o = o / np.sqrt(total)[..., None]
  if group_norm:
    o = rms_norm(o, eps)
  if gate:
    o = silu(np.einsum('btd,dhv->bthv', x, w['wg'])) * o
  return np.einsum('bthv,hvd->btd', o, w['wo'])


def causal_attention(x, w, segment_ids=None, **rotary_args):
  """softmax(q kᵀ / √K + mask) v per head, the mask keeping s ≤ t in t's segment; q, k rotated
  by `rotary(..., **rotary_args)`. x [B, T, D]; w {'wq', 'wk', 'wv' [D, H, K], 'wo' [H, K, D]}."""
  x = np.asarray(x, np.float64)
  w = {name: np.asarray(a, np.float64) for name, a in w.items()}
  B, T, _ = x.shape
  K = w['wq'].shape[-1]
  seg = np.zeros((B, T), int) if segment_ids is None else np.asarray(segment_ids)
  pos = np.arange(T)
  q = rotary(np.einsum('btd,dhk->bthk', x, w['wq']), pos, **rotary_args)
  k = rotary(np.einsum('btd,dhk->bthk', x, w['wk']), pos, **rotary_args)
  v = np.einsum('btd,dhk->bthk', x, w['wv'])
  out = np.zeros_like(v)
  for b in range(B):
    for t in range(T):
      allowed = [s for s in range(t + 1) if seg[b, s] == seg[b, t]]
      scores = np.einsum('hk,shk->hs', q[b, t], k[b, allowed]) / np.sqrt(K)
      p = np.exp(scores - scores.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[b, t] = np.einsum('hs,shk->hk', p, v[b, allowed])
  return np.einsum('bthk,hkd->btd', out, w['wo'])
