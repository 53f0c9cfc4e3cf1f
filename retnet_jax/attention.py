"""Causal softmax attention with document segments and an optional local window, and its dispatcher.

    o_t = Σ_s softmax_s(q_t·k_s / √K + mask_ts) v_s,
    mask_ts = 0 where pos_s ≤ pos_t, pos_t − pos_s < W (W = window; None: no limit) and
              seg_s = seg_t, else −∞.

`attention(q, k, v, segment_ids=, window=, impl=)` runs this over one sequence (training, scoring,
a prefill without a cache) by the implementation `choose` picks, with its reason:

- 'xla': einsum + softmax over the [T, T] scores in float32 (the reference; every platform);
- 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')` on GPU (16-bit inputs, head
  dimensions cuDNN's fused kernel takes; segments as a boolean mask);
- 'splash': the TPU splash-attention Pallas kernel (causal or local mask, segment ids), interpreted
  on other platforms when asked for by name.

`allowed(...)` builds the boolean mask from positions, so that a decoding cache (model.KVCache,
with its own layouts) attends by the same definition.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from retnet_jax import sharding

F32 = jnp.float32
IMPLS = ('auto', 'xla', 'cudnn', 'splash')
MASKED = -1e30  # Not −inf: a fully masked row stays finite.


@dataclasses.dataclass(frozen=True)
class Choice:
  impl: str
  reason: str
  interpret: bool = False


def allowed(q_pos, k_pos, q_seg_BT, k_seg_BS, window: int | None):
  """The mask [B, T, S] bool: key s is visible from query t (causal, same segment, in the window).

  q_pos [T], k_pos [S] int: global positions (a cache's empty slots hold a position past any query).
  """
  q_pos, k_pos = jnp.asarray(q_pos)[:, None], jnp.asarray(k_pos)[None, :]
  ok_TS = k_pos <= q_pos
  if window is not None:
    ok_TS &= q_pos - k_pos < window
  return ok_TS[None] & (q_seg_BT[:, :, None] == k_seg_BS[:, None, :])


def xla(q_BTHK, k_BSHK, v_BSHK, allowed_BTS):
  """The reference: scores in float32, masked softmax, probabilities in v's dtype."""
  K = q_BTHK.shape[-1]
  scores_BHTS = jnp.einsum('bthk,bshk->bhts', q_BTHK, k_BSHK, preferred_element_type=F32)
  scores_BHTS = jnp.where(allowed_BTS[:, None], scores_BHTS * K**-0.5, MASKED)
  probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
  return jnp.einsum('bhts,bshk->bthk', probs_BHTS.astype(v_BSHK.dtype), v_BSHK)


def _cudnn_unsupported(q_shape, dtype) -> str | None:
  K = q_shape[-1]
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f'dtype {jnp.dtype(dtype).name} (cuDNN fused attention takes bfloat16 / float16)'
  if K % 8 or K > 128:
    return f'head dim {K} (needs a multiple of 8, at most 128)'
  return None


def _splash_unsupported(q_shape) -> str | None:
  T, K = q_shape[1], q_shape[-1]
  if T % 128:
    return f'sequence length {T} (needs a multiple of 128)'
  if K % 128 and K not in (64,):
    return f'head dim {K} (needs 64 or a multiple of 128)'
  return None


def choose(q_shape, dtype, *, impl: str = 'auto', platform: str | None = None) -> Choice:
  """The implementation for q [B, T, H, K] of `dtype` on `platform` (default: where the call runs)."""
  if impl not in IMPLS:
    raise ValueError(f'attention_impl must be one of {IMPLS}; got {impl!r}.')
  platform = platform or sharding.platform()
  if impl == 'xla':
    return Choice('xla', 'attention_impl="xla" asked for')
  if impl == 'splash':
    return Choice('splash', f'attention_impl="splash" asked for, '
                  + ('compiled for tpu' if platform == 'tpu' else f'interpreted on {platform}'),
                  platform != 'tpu')
  if impl == 'cudnn':
    if platform != 'gpu':
      raise ValueError(f'attention_impl="cudnn" needs a GPU; the platform is {platform}.')
    return Choice('cudnn', 'attention_impl="cudnn" asked for')
  if platform == 'gpu':
    why = _cudnn_unsupported(q_shape, dtype)
    return Choice('xla', f'cuDNN does not take {why}') if why else Choice(
        'cudnn', 'platform gpu: cuDNN fused attention takes these shapes')
  if platform == 'tpu':
    why = _splash_unsupported(q_shape)
    return Choice('xla', f'splash attention does not take {why}') if why else Choice(
        'splash', 'platform tpu: the splash kernel takes these shapes')
  return Choice('xla', f'platform {platform}: the XLA form (no fused attention kernel here)')


def attention(q_BTHK, k_BTHK, v_BTHK, *, segment_ids=None, window: int | None = None,
              impl: str = 'auto'):
  """Causal self-attention of one sequence: o [B, T, H, K] (same positions for queries and keys).

  segment_ids [B, T] int or None: tokens attend only within their segment.
  """
  B, T = q_BTHK.shape[:2]
  choice = choose(q_BTHK.shape, q_BTHK.dtype, impl=impl)
  if choice.impl == 'splash':
    return _splash(q_BTHK, k_BTHK, v_BTHK, segment_ids, window, choice.interpret)
  seg_BT = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids
  pos_T = jnp.arange(T)
  mask_BTS = allowed(pos_T, pos_T, seg_BT, seg_BT, window)
  if choice.impl == 'cudnn':
    return jax.nn.dot_product_attention(
        q_BTHK, k_BTHK, v_BTHK, mask=mask_BTS[:, None], implementation='cudnn')
  return xla(q_BTHK, k_BTHK, v_BTHK, mask_BTS)


@functools.lru_cache(maxsize=None)
def _splash_kernel(T: int, H: int, window: int | None, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  one = (sm.CausalMask((T, T)) if window is None
         else sm.LocalMask((T, T), window_size=(window - 1, 0), offset=0))
  block = min(T, 512)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  return sk.make_splash_mha(sm.MultiHeadMask([one] * H), block_sizes=sizes, head_shards=1,
                            q_seq_shards=1, interpret=interpret)


def _splash(q_BTHK, k_BTHK, v_BTHK, segment_ids, window, interpret):
  """The splash kernel, per row ([H, T, K] operands), under a shard_map over the batch's mesh axes."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  B, T, H, K = q_BTHK.shape
  seg_BT = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)

  def rows(q, k, v, seg):  # One device's rows and heads; the kernel takes one row's [H, T, K].
    kernel = _splash_kernel(q.shape[1], q.shape[2], window, interpret)
    one = lambda q, k, v, s: kernel((q * K**-0.5).astype(q.dtype).swapaxes(0, 1), k.swapaxes(0, 1),
                                    v.swapaxes(0, 1), segment_ids=sk.SegmentIds(s, s)).swapaxes(0, 1)
    return (jax.vmap(one)(q, k, v, seg),)

  bthk = ('batch', None, 'heads', None)
  run = sharding.per_shard(rows, (bthk, bthk, bthk, ('batch', None)), (bthk,))
  return run(q_BTHK, k_BTHK, v_BTHK, seg_BT)[0]
