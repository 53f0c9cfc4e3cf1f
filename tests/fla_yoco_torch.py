"""Torch stand-ins for the Triton calls of fla's YOCO, so `fla.models.YOCOForCausalLM` runs on a CPU.

On top of tests/fla_torch.py's patches (rotary, RMSNorm, swiglu), `patch()` replaces what
`fla.layers.yoco` looks up:

    chunk_simple_gla, fused_recurrent_simple_gla   `simple_gla` below (float64 recurrence)
    parallel_attn                                  `causal_attention` (grouped heads, window)
    attn_decoding_one_step                         `decoding_attention` (one query per sequence)
    rotary_embedding, swiglu                       tests/fla_torch.py's

`simple_gla` is fla's recurrence (fla.ops.simple_gla.naive.naive_recurrent_simple_gla: the decay is
applied before k_tᵀv_t is added), with an initial and a final state and packed sequences:
    S_t = exp(g_t) S_{t−1} + k_tᵀ v_t,   o_t = K^−½ q_t S_t
(tests/yoco_test.py checks it against that function).
"""

from __future__ import annotations

import torch

from tests import fla_torch


def _spans(B, T, cu_seqlens):
  if cu_seqlens is None:
    return [(b, 0, T) for b in range(B)]
  bounds = cu_seqlens.tolist()
  return [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]


def simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
               output_final_state=False, state_v_first=False, cu_seqlens=None, **unused):
  """q, k [B, T, H, K], v [B, T, H, V], g [B, T, H] -> (o, final state [N, H, K, V] (or [N, H, V, K]
  with state_v_first))."""
  del unused
  assert g_gamma is None
  B, T, H, K = q.shape
  scale = K**-0.5 if scale is None else scale
  o = torch.zeros(v.shape, dtype=torch.float64)
  finals = []
  for n, (b, s, e) in enumerate(_spans(B, T, cu_seqlens)):
    S = torch.zeros(H, K, v.shape[-1], dtype=torch.float64)
    if initial_state is not None:
      S = initial_state[n].double()
      S = S.transpose(-1, -2) if state_v_first else S
    for t in range(s, e):
      S = torch.exp(g[b, t].double())[:, None, None] * S + torch.einsum(
          'hk,hv->hkv', k[b, t].double(), v[b, t].double())
      o[b, t] = torch.einsum('hk,hkv->hv', q[b, t].double() * scale, S)
    finals.append(S.transpose(-1, -2) if state_v_first else S)
  final = torch.stack(finals).float() if output_final_state else None
  return o.to(q.dtype), final


def _attend(q_THK, k_SGK, v_SGK, allowed_TS, scale):
  H, G = q_THK.shape[1], k_SGK.shape[1]
  k_SHK, v_SHK = (x.double().repeat_interleave(H // G, dim=1) for x in (k_SGK, v_SGK))
  scores_HTS = torch.einsum('thk,shk->hts', q_THK.double() * scale, k_SHK)
  scores_HTS = scores_HTS.masked_fill(~allowed_TS[None], float('-inf'))
  return torch.einsum('hts,shk->thk', torch.softmax(scores_HTS, -1), v_SHK)


def causal_attention(q, k, v, g=None, scale=None, window_size=None, cu_seqlens=None, **unused):
  """fla.ops.attn.parallel_attn: q [B, T, HQ, K], k, v [B, T, H, K], causal, query head i reads kv
  head i // (HQ / H); window_size W: the last W positions."""
  del unused
  assert g is None
  B, T, _, K = q.shape
  scale = K**-0.5 if scale is None else scale
  o = torch.zeros(q.shape, dtype=torch.float64)
  for b, s, e in _spans(B, T, cu_seqlens):
    t = torch.arange(e - s)
    allowed = t[None, :] <= t[:, None]
    if window_size is not None:
      allowed &= t[:, None] - t[None, :] < window_size
    o[b, s:e] = _attend(q[b, s:e], k[b, s:e], v[b, s:e], allowed, scale)
  return o.to(q.dtype)


def decoding_attention(q, k, v, g=None, scale=None, cu_seqlens=None, do_gate_scale=False, *,
                       window_size=None, sink_bias=None):
  """fla.ops.attn.decoding.attn_decoding_one_step: q [1, N, HQ, K], the N sequences' keys packed in
  k, v [1, ΣS, H, K] by cu_seqlens; query n attends to all of sequence n."""
  assert g is None and window_size is None and sink_bias is None and not do_gate_scale
  K = q.shape[-1]
  scale = K**-0.5 if scale is None else scale
  o = torch.zeros(q.shape, dtype=torch.float64)
  bounds = cu_seqlens.tolist()
  for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
    allowed = torch.ones(1, e - s, dtype=torch.bool)
    o[0, n:n + 1] = _attend(q[0, n:n + 1], k[0, s:e], v[0, s:e], allowed, scale)
  return o.to(q.dtype)


PATCHES = {
    **fla_torch.PATCHES,
    'fla.layers.yoco': {
        'chunk_simple_gla': simple_gla, 'fused_recurrent_simple_gla': simple_gla,
        'parallel_attn': causal_attention, 'attn_decoding_one_step': decoding_attention,
        'rotary_embedding': fla_torch._rotary, 'swiglu': fla_torch._swiglu},  # pylint: disable=protected-access
}


def patch():
  """Inside it, fla's YOCO runs on CPU with the torch stand-ins; restored on exit."""
  return fla_torch.patch(PATCHES)
