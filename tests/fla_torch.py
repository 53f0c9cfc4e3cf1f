"""Torch stand-ins for the Triton calls of fla's RetNet, so fla's own model code runs on a CPU.

`fla.models.RetNetForCausalLM` reaches Triton in five places (six in a hybrid); `patch()` replaces only those module
attributes (where fla's layers look them up) and leaves everything else fla's own: projections,
head layout, gating, norms' placement, rotary tables, the cache, generation.

    fla.modules.rotary.ops.rotary_embedding          fla's rotary_embedding_ref, per sequence
    fla.modules.norm.layernorm.rms_norm              fla's layernorm.rms_norm_ref
    fla.modules.norm.fused_norm_gate.rms_norm_gated  fla's layernorm_gated.rms_norm_ref (z = gate)
    fla.modules.mlp.swiglu, swiglu_linear            silu(x) · y (then the linear)
    fla.layers.multiscale_retention.*_retention      `retention` below (all four kernels)
    fla.layers.attn.flash_attn_func                  `_attention`: a torch softmax reference

`retention` is fla's naive formula (fla.ops.retention.naive.naive_retention: γ_h = 1 − 2^(−5−h),
q scaled by K^−½, no normalisation) with an initial and a final state:
    o_t = Σ_{s≤t} γ^{t−s} (q_t·k_s) v_s + γ^{t+1} q_t S_0,   S_T = γ^T S_0 + Σ_s γ^{T−1−s} k_sᵀ v_s
(tests/convert_fla_test.py checks it against naive_retention, whole and split with the state carried).

A GPU run compares with fla's real kernels by not calling `patch()` (see tests/convert_fla_test.py:
RETNET_JAX_FLA_KERNELS=triton).
"""

from __future__ import annotations

import contextlib
import importlib

import torch
import torch.nn.functional as F


def _rotary(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
            chunk_indices=None):
  """fla.modules.rotary.rotary_embedding: x [B, T, H, D], tables [TR, R/2], per-sequence offsets."""
  del inplace, chunk_indices
  from fla.modules.rotary.ops import rotary_embedding_ref  # pylint: disable=g-import-not-at-top
  B, T = x.shape[:2]
  if cu_seqlens is None:
    lengths, rows = [T] * B, [(b, 0, T) for b in range(B)]
  else:
    assert B == 1, 'packed sequences come as one row'
    bounds = cu_seqlens.tolist()
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    rows = [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]
  offsets = (seqlen_offsets.tolist() if torch.is_tensor(seqlen_offsets)
             else [int(seqlen_offsets)] * len(rows))
  out = torch.empty_like(x)
  for (b, s, e), n, off in zip(rows, lengths, offsets):
    pos = torch.arange(off, off + n, device=x.device)
    out[b:b + 1, s:e] = rotary_embedding_ref(x[b:b + 1, s:e], cos[pos], sin[pos], interleaved)
  return out


def _rms_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
  from fla.modules.norm.layernorm import rms_norm_ref  # pylint: disable=g-import-not-at-top
  del residual_in_fp32
  if weight is None:
    weight = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
  return rms_norm_ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm)


def _rms_norm_gated(x, g, weight, bias, activation='swish', residual=None, prenorm=False,
                    residual_in_fp32=False, eps=1e-6):
  from fla.modules.norm.layernorm_gated import rms_norm_ref  # pylint: disable=g-import-not-at-top
  del residual_in_fp32
  assert activation in ('swish', 'silu') and residual is None and not prenorm, (activation, prenorm)
  if weight is None:
    weight = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
  return rms_norm_ref(x, weight, bias, z=g, eps=eps, norm_before_gate=True)


def _swiglu(x, y):
  return F.silu(x.float()).to(x.dtype) * y


def _swiglu_linear(x, y, weight, bias):
  return F.linear(_swiglu(x, y), weight, bias)


def retention(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
              output_attentions=False, reverse=False, state_v_first=False, **unused):
  """fla's retention ops' contract: q, k [B, T, H, K], v [B, T, H, V] -> (o, final state [N, H, K, V])."""
  del unused, output_attentions
  assert not reverse and not state_v_first
  B, T, H, K = q.shape
  scale = K**-0.5 if scale is None else scale
  if cu_seqlens is None:
    spans = [(b, 0, T) for b in range(B)]
  else:
    bounds = cu_seqlens.tolist()
    spans = [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]
  log2_gamma_H = torch.log2(1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64)))
  o = torch.zeros(v.shape, dtype=torch.float64)
  finals = []
  for n, (b, s, e) in enumerate(spans):
    q_THK, k_THK, v_THV = (x[b, s:e].double() for x in (q, k, v))
    t = torch.arange(e - s, dtype=torch.float64)
    diff_TS = t[:, None] - t[None, :]
    decay_HTS = torch.exp2(diff_TS.clamp(min=0)[None] * log2_gamma_H[:, None, None]) * (diff_TS >= 0)
    o_THV = torch.einsum('thk,shk,hts,shv->thv', q_THK * scale, k_THK, decay_HTS, v_THV)
    tail_HS = torch.exp2((e - s - 1 - t)[None] * log2_gamma_H[:, None])
    final_HKV = torch.einsum('hs,shk,shv->hkv', tail_HS, k_THK, v_THV)
    if initial_state is not None:
      s0_HKV = initial_state[n].double()
      carry_HT = torch.exp2((t + 1)[None] * log2_gamma_H[:, None])
      o_THV = o_THV + torch.einsum('ht,thk,hkv->thv', carry_HT, q_THK * scale, s0_HKV)
      final_HKV = final_HKV + torch.exp2((e - s) * log2_gamma_H)[:, None, None] * s0_HKV
    o[b, s:e] = o_THV
    finals.append(final_HKV)
  final = torch.stack(finals).float() if output_final_state else None
  return o.to(q.dtype), final


def _attention(q, k, v, causal=True, window_size=(-1, -1), **kwargs):
  """fla.layers.attn.flash_attn_func: softmax(q·kᵀ / √K) v over keys s ≤ t (bottom-right aligned
  when q is shorter than k, as in a cached step) and t − s ≤ window_size[0] (−1: no limit); kv
  heads repeated to q's."""
  del kwargs
  assert causal
  B, T, H, K = q.shape
  S = k.shape[1]
  k, v = (x.repeat_interleave(H // x.shape[2], dim=2) for x in (k, v))
  scores = torch.einsum('bthk,bshk->bhts', q.double(), k.double()) * K**-0.5
  t = torch.arange(T)[:, None] + (S - T)
  s = torch.arange(S)[None, :]
  ok = s <= t
  if window_size[0] >= 0:
    ok = ok & (t - s <= window_size[0])
  probs = torch.softmax(scores.masked_fill(~ok, float('-inf')), dim=-1)
  return torch.einsum('bhts,bshk->bthk', probs, v.double()).to(q.dtype)


PATCHES = {
    'fla.layers.attn': {'flash_attn_func': _attention},
    'fla.modules.rotary.ops': {'rotary_embedding': _rotary},
    'fla.modules.norm.layernorm': {'rms_norm': _rms_norm},
    'fla.modules.norm.fused_norm_gate': {'rms_norm_gated': _rms_norm_gated},
    'fla.modules.mlp': {'swiglu': _swiglu, 'swiglu_linear': _swiglu_linear},
    'fla.layers.multiscale_retention': {
        name: retention for name in ('chunk_retention', 'fused_chunk_retention',
                                     'fused_recurrent_retention', 'parallel_retention')},
}


@contextlib.contextmanager
def patch(patches=None):
  """Inside it, fla's RetNet (or the model `patches` covers: {module: {attribute: stand-in}}) runs
  on CPU with the torch stand-ins; restored on exit."""
  saved = []
  try:
    for module_name, attrs in (PATCHES if patches is None else patches).items():
      module = importlib.import_module(module_name)
      for attr, fn in attrs.items():
        saved.append((module, attr, getattr(module, attr)))
        setattr(module, attr, fn)
    yield
  finally:
    for module, attr, original in reversed(saved):
      setattr(module, attr, original)
