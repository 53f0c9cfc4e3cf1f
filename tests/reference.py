"""Float64 NumPy references written from the paper's equations (not from the code under test)."""

import numpy as np


def retention(q, k, v, gamma, state=None, reset=None):
  """o_t = Σ_{s≤t, same segment} γ^{t−s} (q_t·k_s) v_s + [no reset ≤ t] γ^{t+1} q_t S_in.

  q, k [B, T, H, K]; v [B, T, H, V]; gamma [H]; state [B, H, K, V]; reset [B, T] bool.
  Returns (o [B, T, H, V], final state [B, H, K, V]) in float64.
  """
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
