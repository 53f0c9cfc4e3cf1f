"""The RetNet language model (Sun et al. 2023, §2.2–2.3) and a Transformer baseline, in flax.nnx.

    X ← X + MSR(RMSNorm(X));  X ← X + FFN(RMSNorm(X));  logits = W_head RMSNorm(X)        (eq. 9)
    MSR(X) = W_O (swish(X W_G) ⊙ GroupNorm_h(Retention_h(X)))                              (eq. 8)

`kind='transformer'` swaps retention for causal softmax attention with a KV cache and keeps
everything else (embedding, pre-norm, SwiGLU FFN, rotary positions, head).

Both run as `model(tokens, state=None, *, form=None, segment_ids=None, rng=None) -> (logits
[B, T, vocab] float32, state)`, where `state` is a typed decoding state (`RetNetState`,
`TransformerState`: the position offset, each row's last segment id and the stacked layers' mixer
states), so that the logits of x[:n] and then of x[n:] with the carried state equal those of x.

The two mixers, `MultiScaleRetention` and `Attention`, share one interface: `init_state(batch,
max_len)` and `mixer(x, state, *, positions, segment_ids, prev_segment, form) -> (y, state)`; each
builds its own resets or masks. `Block` and `Model` only look the mixer up by kind (`MIXERS`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retnet_jax import decay
from retnet_jax import retention
from retnet_jax import retention_ops
from retnet_jax import sharding

F32 = jnp.float32
KINDS = ('retnet', 'transformer')
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_saveable,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = ('float32', 'bfloat16', 'float16')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture. Built from `config.model` by `ModelConfig(**config.model)`."""
  kind: str = 'retnet'
  vocab_size: int = 384
  num_layers: int = 2
  embed_dim: int = 128  # D; q and k are D wide, so the q-k head dim is K = D / H.
  num_heads: int = 4  # H
  value_dim: int | None = None  # Total value width (V · H); default 2·D for RetNet, D for attention.
  ffn_dim: int = 256
  ffn_activation: str = 'swish'  # 'swish' (SwiGLU) | 'gelu' (torchscale's GLU default).
  # Decay schedule (see decay.py): gamma in decay.SCHEDULES; gamma_value for 'uniform';
  # gamma_values for 'custom'; gamma_init is the schedule a 'learnable' γ starts from.
  gamma: str = 'retnet'
  gamma_value: float | None = None
  gamma_values: tuple[float, ...] = ()
  gamma_init: str = 'retnet'
  form: str = 'chunkwise'  # Default retention form: 'parallel' | 'chunkwise' | 'recurrent'.
  chunk_size: int = 64
  # Chunkwise implementation (retention_ops): 'auto' (the fused Pallas kernel on GPU/TPU where it
  # applies, else XLA), 'xla', 'pallas' (interpreted on CPU: slow, for tests), or 'skip'
  # (benchmarks only: o = v, the step without the retention operator).
  retention_impl: str = 'auto'
  # How the blocks of one sequence pass retention states under a 'sequence' mesh axis
  # (retention_ops): 'scan' (a log-depth ppermute scan) or 'all_gather' (one all-gather and a fold).
  sequence_exchange: str = 'scan'
  # Rotary angles on q and k: 'interleaved' pairs (torchscale), 'half'-split (fla), or 'none';
  # frequencies 'torchscale' (θ_i = base^−linspace(0, 1, K/2)) or 'standard' (θ_i = base^(−2i/K)).
  rotary: str = 'interleaved'
  rotary_freqs: str = 'torchscale'
  rotary_base: float = 10000.0
  swish_gate: bool = True  # Table 6 "− swish gate" sets False.
  group_norm: bool = True  # Per-head RMSNorm of the retention output; "− GroupNorm" sets False.
  group_norm_affine: bool = False  # A learned per-channel scale in that norm (fla).
  # Divide o_t by sqrt(Σ_{i≤t} γ^i), the paper's D̃ (§2.2). Under group_norm it cancels (up to eps);
  # without it, it keeps the output's scale independent of γ, as in the paper's "− GroupNorm" run.
  decay_row_norm: bool = False
  norm_eps: float = 1e-6
  dropout: float = 0.0
  tie_embeddings: bool = False
  dtype: str = 'float32'  # Compute dtype; parameters stay param_dtype.
  param_dtype: str = 'float32'
  scan_layers: bool = True  # lax.scan over stacked layers: compile time flat in depth.
  remat: str = 'none'  # One of REMAT_POLICIES.

  def __post_init__(self):
    def need(ok, msg):
      if not ok:
        raise ValueError(f'model config: {msg}')
    need(self.kind in KINDS, f'kind must be one of {KINDS}; got {self.kind!r}.')
    for name in ('vocab_size', 'num_layers', 'embed_dim', 'num_heads', 'ffn_dim', 'chunk_size'):
      need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
           f'{name} must be a positive integer; got {getattr(self, name)!r}.')
    need(self.embed_dim % self.num_heads == 0,
         f'num_heads ({self.num_heads}) must divide embed_dim ({self.embed_dim}).')
    need(self.values % self.num_heads == 0,
         f'num_heads ({self.num_heads}) must divide value_dim ({self.values}).')
    need(self.kind == 'retnet' or self.value_dim in (None, self.embed_dim),
         'the transformer uses value_dim = embed_dim.')
    need(self.rotary in ('interleaved', 'half', 'none'),
         f"rotary must be 'interleaved', 'half' or 'none'; got {self.rotary!r}.")
    need(self.rotary_freqs in ('torchscale', 'standard'),
         f"rotary_freqs must be 'torchscale' or 'standard'; got {self.rotary_freqs!r}.")
    need(self.rotary == 'none' or self.head_dim % 2 == 0,
         f'rotary angles need an even head dimension; got {self.head_dim}.')
    need(self.ffn_activation in ('swish', 'gelu'),
         f"ffn_activation must be 'swish' or 'gelu'; got {self.ffn_activation!r}.")
    need(self.form in retention.FORMS, f'form must be one of {sorted(retention.FORMS)}.')
    need(self.retention_impl in retention_ops.IMPLS,
         f'retention_impl must be one of {retention_ops.IMPLS}; got {self.retention_impl!r}.')
    need(self.sequence_exchange in retention_ops.EXCHANGE_FNS,
         f'sequence_exchange must be one of {sorted(retention_ops.EXCHANGE_FNS)}; '
         f'got {self.sequence_exchange!r}.')
    need(self.remat in REMAT_POLICIES, f'remat must be one of {sorted(REMAT_POLICIES)}.')
    need(self.dtype in DTYPES and self.param_dtype in DTYPES, f'dtypes must be among {DTYPES}.')
    need(0.0 <= self.dropout < 1.0, f'dropout must be in [0, 1); got {self.dropout}.')
    need(isinstance(self.gamma_values, tuple), 'gamma_values must be a tuple.')
    if self.kind == 'retnet':
      self.gammas()  # Raises on an unknown or impossible schedule.

  @property
  def head_dim(self) -> int:
    """K, the q-k head dimension."""
    return self.embed_dim // self.num_heads

  @property
  def values(self) -> int:
    """Total value width."""
    if self.value_dim is not None:
      return self.value_dim
    return 2 * self.embed_dim if self.kind == 'retnet' else self.embed_dim

  @property
  def value_head_dim(self) -> int:
    return self.values // self.num_heads

  def gammas(self) -> np.ndarray:
    """Initial (or fixed) γ per head, float64 [H]."""
    return decay.gammas(self.gamma, self.num_heads, value=self.gamma_value,
                        values=tuple(self.gamma_values), init=self.gamma_init)


# ------------------------------------------------------------------------------------------------
# Building blocks.


def _xavier(gain, in_axis, out_axis):
  """torchscale's xavier_uniform_(gain) for a kernel whose fan-in and fan-out axes are given."""
  return jax.nn.initializers.variance_scaling(gain**2, 'fan_avg', 'uniform', in_axis, out_axis)


_TORCH_LINEAR = jax.nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')  # U(±fan_in^−½)


def _param(rngs, init, shape, axes, dtype):
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def dense(x, w, dtype, in_dims=1, out_dtype=None):
  """x [..., *w.shape[:in_dims]] · w [*in, *out] -> [..., *out], as one 2-D matmul over all tokens.

  XLA:CPU lays 3-D einsum operands out transposed in the backward pass, which makes the layer's
  gradient slower than this form (README, Performance); accelerators run both alike.
  """
  in_shape, out_shape = w.shape[:in_dims], w.shape[in_dims:]
  lead = x.shape[:x.ndim - in_dims]
  n_in = math.prod(in_shape)
  y = jnp.matmul(x.reshape(-1, n_in).astype(dtype), w.reshape(n_in, -1).astype(dtype),
                 preferred_element_type=out_dtype)
  return y.reshape(*lead, *out_shape)


def _dropout(x, rate, key):
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x²) + eps), in float32, times a learned scale when `affine`."""

  def __init__(self, dim, eps, *, affine=True, axes=('embed',), param_dtype=F32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=axes) if affine else None

  def __call__(self, x):
    x32 = x.astype(F32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(F32)
    return y.astype(x.dtype)


def rotary_angles(cfg: ModelConfig, positions_T):
  """(sin, cos) [T, K] of the rotary angles n·θ for each position n (the paper's e^{inθ})."""
  K = cfg.head_dim
  if cfg.rotary_freqs == 'torchscale':
    inv_freq = cfg.rotary_base ** -np.linspace(0.0, 1.0, K // 2)
  else:
    inv_freq = cfg.rotary_base ** -(np.arange(0, K, 2) / K)
  angle_TK2 = jnp.asarray(positions_T, F32)[:, None] * jnp.asarray(inv_freq, F32)[None, :]
  if cfg.rotary == 'interleaved':
    angle_TK = jnp.repeat(angle_TK2, 2, axis=-1)  # θ0 θ0 θ1 θ1 ...
  else:
    angle_TK = jnp.concatenate([angle_TK2, angle_TK2], axis=-1)  # θ0 θ1 ... θ0 θ1 ...
  return jnp.sin(angle_TK), jnp.cos(angle_TK)


def apply_rotary(x_BTHK, sin_TK, cos_TK, style):
  """x·cos + rotate(x)·sin; rotate maps each pair (x1, x2) to (−x2, x1)."""
  if style == 'none':
    return x_BTHK
  if style == 'interleaved':
    x1, x2 = x_BTHK[..., 0::2], x_BTHK[..., 1::2]
    rotated = jnp.stack([-x2, x1], axis=-1).reshape(x_BTHK.shape)
  else:
    x1, x2 = jnp.split(x_BTHK, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
  sin, cos = sin_TK[:, None, :], cos_TK[:, None, :]
  return (x_BTHK.astype(F32) * cos + rotated.astype(F32) * sin).astype(x_BTHK.dtype)


class MultiScaleRetention(nnx.Module):
  """Gated multi-scale retention, one γ per head (§2.2)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, H, K, V = cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.value_head_dim
    pd = jnp.dtype(cfg.param_dtype)
    small = _xavier(2**-2.5, 0, (1, 2))
    self.wq = _param(rngs, small, (D, H, K), ('embed', 'heads', 'kv'), pd)
    self.wk = _param(rngs, small, (D, H, K), ('embed', 'heads', 'kv'), pd)
    self.wv = _param(rngs, small, (D, H, V), ('embed', 'heads', 'kv'), pd)
    self.wg = _param(rngs, small, (D, H, V), ('embed', 'heads', 'kv'), pd) if cfg.swish_gate else None
    self.wo = _param(rngs, _xavier(2**-1, (0, 1), 2), (H, V, D), ('heads', 'kv', 'embed'), pd)
    self.norm = (RMSNorm(V, cfg.norm_eps, affine=cfg.group_norm_affine, axes=('kv',), param_dtype=pd)
                 if cfg.group_norm else None)
    if cfg.gamma == 'learnable':  # log γ = −exp(θ): γ stays in (0, 1).
      theta = np.log(-np.log(cfg.gammas()))
      self.decay_log_rate = nnx.Param(jnp.asarray(theta, pd), logical_axes=('heads',))
    else:
      self.decay_log_rate = None

  def log_gamma(self):
    """log γ per head [H] float32."""
    if self.decay_log_rate is not None:
      return -jnp.exp(self.decay_log_rate[...].astype(F32))
    return jnp.asarray(np.log(self.cfg.gammas()), F32)

  def init_state(self, batch: int, max_len: int | None = None) -> jax.Array:
    """The empty retention state [B, H, K, V] float32 (it has no length: max_len is unused)."""
    cfg = self.cfg
    return retention.zero_state(batch, cfg.num_heads, cfg.head_dim, cfg.value_head_dim)

  def __call__(self, x_BTD, state, *, positions, segment_ids, prev_segment, form):
    """Returns (y [B, T, D], the state [B, H, K, V] after x).

    state: None (zero) or [B, H, K, V]. positions [T]: global token positions (rotary angles).
    segment_ids [B, T] or None: the state resets where the id changes, also against prev_segment
    [B], the id of the token before x. form: the retention form.
    """
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    positions_T = positions
    reset_BT = None
    if segment_ids is not None:
      reset_BT = segment_ids != jnp.concatenate([prev_segment[:, None], segment_ids[:, :-1]], 1)
    sin, cos = rotary_angles(cfg, positions_T)
    proj = lambda w: dense(x_BTD, w[...], dt)
    q_BTHK = apply_rotary(proj(self.wq), sin, cos, cfg.rotary)
    k_BTHK = apply_rotary(proj(self.wk) * cfg.head_dim**-0.5, sin, cos, cfg.rotary)
    v_BTHV = proj(self.wv)
    q_BTHK, k_BTHK, v_BTHV = (sharding.constrain(a, ('batch', 'length', 'heads', 'kv'))
                              for a in (q_BTHK, k_BTHK, v_BTHV))
    log_gamma_H = self.log_gamma()
    impl = cfg.retention_impl if form == 'chunkwise' or cfg.retention_impl == 'skip' else 'auto'
    o_BTHV, state_BHKV = retention_ops.retention(
        q_BTHK, k_BTHK, v_BTHV, log_gamma_H, state, reset=reset_BT, form=form,
        chunk_size=cfg.chunk_size, impl=impl, exchange=cfg.sequence_exchange)
    if cfg.decay_row_norm:
      # Σ_{i≤t} γ^i = (1 − γ^{t+1}) / (1 − γ), or t + 1 for γ = 1.
      n_T1 = jnp.asarray(positions_T, F32)[:, None] + 1.0
      g_H = jnp.exp(log_gamma_H)
      total_TH = jnp.where(g_H < 1.0, -jnp.expm1(n_T1 * log_gamma_H) / (1.0 - g_H), n_T1)
      o_BTHV = (o_BTHV * jax.lax.rsqrt(total_TH)[None, :, :, None]).astype(o_BTHV.dtype)
    if self.norm is not None:
      o_BTHV = self.norm(o_BTHV)
    if self.wg is not None:
      o_BTHV = jax.nn.silu(proj(self.wg)) * o_BTHV
    y_BTD = dense(o_BTHV, self.wo[...], dt, in_dims=2)
    return y_BTD, state_BHKV


class Attention(nnx.Module):
  """Causal softmax attention with rotary positions and a KV cache (the Transformer baseline)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, H, K = cfg.embed_dim, cfg.num_heads, cfg.head_dim
    pd = jnp.dtype(cfg.param_dtype)
    init = _xavier(2**-0.5, 0, (1, 2))
    self.wq = _param(rngs, init, (D, H, K), ('embed', 'heads', 'kv'), pd)
    self.wk = _param(rngs, init, (D, H, K), ('embed', 'heads', 'kv'), pd)
    self.wv = _param(rngs, init, (D, H, K), ('embed', 'heads', 'kv'), pd)
    self.wo = _param(rngs, _xavier(1.0, (0, 1), 2), (H, K, D), ('heads', 'kv', 'embed'), pd)

  def init_state(self, batch: int, max_len: int | None = None) -> 'KVCache':
    """An empty KV cache of max_len positions (required: the cache has a length)."""
    if max_len is None:
      raise ValueError('the Transformer needs max_len to allocate its KV cache.')
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    bh = (batch, cfg.num_heads)
    return KVCache(k=jnp.zeros(bh + (cfg.head_dim, max_len), dt),
                   v=jnp.zeros(bh + (max_len, cfg.head_dim), dt),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32))

  def __call__(self, x_BTD, state, *, positions, segment_ids, prev_segment, form=None):
    """Returns (y [B, T, D], the cache after x).

    state: None (attend within x; the returned cache holds x's tokens only) or a `KVCache`: attends
    over it with x written at [positions[0], positions[0] + T). segment_ids [B, T] or None (all
    tokens continue prev_segment [B]): tokens attend only within their segment. form: unused.
    """
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    positions_T = positions
    B, T = x_BTD.shape[:2]
    if segment_ids is None:
      segment_ids = jnp.broadcast_to(prev_segment[:, None], (B, T))
    sin, cos = rotary_angles(cfg, positions_T)
    proj = lambda w: dense(x_BTD, w[...], dt)
    q_BTHK = apply_rotary(proj(self.wq), sin, cos, cfg.rotary)
    k_BTHK = apply_rotary(proj(self.wk), sin, cos, cfg.rotary)
    v_BTHK = proj(self.wv)
    new = KVCache(k=k_BTHK.transpose(0, 2, 3, 1), v=v_BTHK.transpose(0, 2, 1, 3),
                  segment_ids=segment_ids)
    if state is None:  # Training: attend within x, in x's own layout.
      cache = new
      scores_BHTS = jnp.einsum('bthk,bshk->bhts', q_BTHK, k_BTHK, preferred_element_type=F32)
      attend = lambda p_BHTS: jnp.einsum('bhts,bshk->bthk', p_BHTS, v_BTHK)
      valid_TS = jnp.tril(jnp.ones((T, T), bool))
    else:
      cache = write_cache(state, new, positions_T[0])
      k_BHKS, v_BHSK = cache.k.astype(dt), cache.v.astype(dt)
      scores_BHTS = jnp.einsum('bthk,bhks->bhts', q_BTHK, k_BHKS, preferred_element_type=F32)
      attend = lambda p_BHTS: jnp.einsum('bhts,bhsk->bthk', p_BHTS, v_BHSK)
      valid_TS = jnp.arange(cache.segment_ids.shape[1])[None, :] <= positions_T[:, None]
    mask_BTS = valid_TS[None] & (segment_ids[:, :, None] == cache.segment_ids[:, None, :])
    scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS * cfg.head_dim**-0.5, -1e30)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
    o_BTHK = attend(probs_BHTS.astype(dt))
    y_BTD = dense(o_BTHK, self.wo[...], dt, in_dims=2)
    return y_BTD, cache


class KVCache(NamedTuple):
  """One attention layer's cache: k [B, H, K, S], v [B, H, S, K] (the layouts a decoding step's two
  matmuls read without a transpose) and each position's segment id [B, S] int32."""
  k: jax.Array
  v: jax.Array
  segment_ids: jax.Array


def write_cache(cache: KVCache, new: KVCache, offset) -> KVCache:
  """Writes T new tokens into a KV cache at positions [offset, offset + T) (a stacked [L, ...]
  cache works alike)."""
  write = lambda c, x, axis: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), offset, axis)
  return KVCache(k=write(cache.k, new.k, cache.k.ndim - 1), v=write(cache.v, new.v, cache.v.ndim - 2),
                 segment_ids=write(cache.segment_ids, new.segment_ids, cache.segment_ids.ndim - 1))


class FeedForward(nnx.Module):
  """Gated FFN: W_down(act(x W_gate) ⊙ x W_up) — SwiGLU, or torchscale's GLU with gelu."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, F = cfg.embed_dim, cfg.ffn_dim
    pd = jnp.dtype(cfg.param_dtype)
    self.w_gate = _param(rngs, _TORCH_LINEAR, (D, F), ('embed', 'mlp'), pd)
    self.w_up = _param(rngs, _TORCH_LINEAR, (D, F), ('embed', 'mlp'), pd)
    self.w_down = _param(rngs, _TORCH_LINEAR, (F, D), ('mlp', 'embed'), pd)

  def __call__(self, x_BTD):
    dt = jnp.dtype(self.cfg.dtype)
    act = jax.nn.silu if self.cfg.ffn_activation == 'swish' else (
        lambda a: jax.nn.gelu(a, approximate=False))
    gate_BTF = dense(x_BTD, self.w_gate[...], dt)
    up_BTF = dense(x_BTD, self.w_up[...], dt)
    h_BTF = sharding.constrain(act(gate_BTF.astype(F32)).astype(dt) * up_BTF, ('batch', 'length', 'mlp'))
    return dense(h_BTF, self.w_down[...], dt)


# The mixer of each kind: (its attribute name in a Block, its class). The attribute names are the
# parameter paths ('blocks/retention/wq') that checkpoints and the converters use.
MIXERS = {'retnet': ('retention', MultiScaleRetention), 'transformer': ('attention', Attention)}


class Block(nnx.Module):
  """Pre-norm residual block: the kind's mixer (retention or attention), then the FFN."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.mixer_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, param_dtype=pd)
    name, mixer_class = MIXERS[cfg.kind]
    setattr(self, name, mixer_class(cfg, rngs=rngs))
    self.ffn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, param_dtype=pd)
    self.ffn = FeedForward(cfg, rngs=rngs)

  @property
  def mixer(self):
    return getattr(self, MIXERS[self.cfg.kind][0])

  def __call__(self, x_BTD, layer_state, ctx, dropout_key=None):
    keys = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    h, layer_state = self.mixer(self.mixer_norm(x_BTD), layer_state, **ctx)
    x_BTD = x_BTD + _dropout(h, self.cfg.dropout, keys[0])
    x_BTD = x_BTD + _dropout(self.ffn(self.ffn_norm(x_BTD)), self.cfg.dropout, keys[1])
    return sharding.constrain(x_BTD, ('batch', 'length', 'embed')), layer_state


class RetNetState(NamedTuple):
  """RetNet's decoding state: offset [] int32 (tokens so far), segment [B] int32 (each row's last
  segment id), layers [L, B, H, K, V] float32 (each layer's retention state)."""
  offset: jax.Array
  segment: jax.Array
  layers: jax.Array


class TransformerState(NamedTuple):
  """The Transformer's decoding state: offset, segment as in `RetNetState`; layers: a `KVCache`
  stacked over layers (k [L, B, H, K, S], v [L, B, H, S, K], segment_ids [L, B, S])."""
  offset: jax.Array
  segment: jax.Array
  layers: KVCache


STATES = {'retnet': RetNetState, 'transformer': TransformerState}


# ------------------------------------------------------------------------------------------------
# The language model.


class Model(nnx.Module):
  """Embedding, `num_layers` stacked blocks, final RMSNorm, LM head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, pd = cfg.embed_dim, jnp.dtype(cfg.param_dtype)
    normal = jax.nn.initializers.normal(D**-0.5)
    self.embed = _param(rngs, normal, (cfg.vocab_size, D), ('vocab', 'embed'), pd)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked(rngs):
      return Block(cfg, rngs=rngs)

    self.blocks = stacked(rngs)
    for _, var in nnx.iter_graph(self.blocks):
      if isinstance(var, nnx.Variable):
        var.set_metadata(logical_axes=('layers',) + var.get_metadata()['logical_axes'])
    self.final_norm = RMSNorm(D, cfg.norm_eps, param_dtype=pd)
    self.head = None if cfg.tie_embeddings else _param(rngs, normal, (D, cfg.vocab_size),
                                                        ('embed', 'vocab'), pd)

  def init_state(self, batch: int, max_len: int | None = None):
    """The empty decoding state (`STATES[kind]`). RetNet needs no max_len; the Transformer's cache
    holds max_len positions."""
    cfg = self.cfg
    one = self.blocks.mixer.init_state(batch, max_len)
    layers = jax.tree.map(lambda x: jnp.zeros((cfg.num_layers,) + x.shape, x.dtype), one)
    return STATES[cfg.kind](offset=jnp.zeros((), jnp.int32),
                            segment=jnp.zeros((batch,), jnp.int32), layers=layers)

  def __call__(self, tokens, state=None, *, form: str | None = None, segment_ids=None, rng=None,
               head: bool = True):
    """Logits [B, T, vocab] float32 and the state after the last token.

    tokens [B, T] int. state: None (empty) or this model's decoding state (`init_state`).
    form: the retention form ('parallel' | 'chunkwise' | 'recurrent'; default cfg.form).
    segment_ids [B, T] int: document ids; the state resets (attention is masked) where the id
      changes, also against the last id of the carried state. Left-padded prompts use 0 for padding.
    rng: a PRNG key for dropout (None: deterministic).
    head: False returns the final-norm features [B, T, D] instead of the logits (the loss applies
      `head_weights()` itself, chunk by chunk: retnet_jax/loss.py).
    """
    cfg, tokens_BT = self.cfg, tokens
    form = cfg.form if form is None else form
    if form not in retention.FORMS:
      raise ValueError(f'form must be one of {sorted(retention.FORMS)}; got {form!r}.')
    B, T = tokens_BT.shape
    offset = jnp.zeros((), jnp.int32) if state is None else state.offset
    positions_T = offset + jnp.arange(T, dtype=jnp.int32)
    segment_ids_BT = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    if state is not None:
      prev_B = state.segment
    elif segment_ids_BT is not None:
      prev_B = segment_ids_BT[:, 0]
    else:
      prev_B = jnp.zeros((B,), jnp.int32)
    last_B = prev_B if segment_ids_BT is None else segment_ids_BT[:, -1]

    # Gather from the whole table (as FSDP gathers every weight): a lookup into a table sharded
    # over vocab and embed makes the partitioner rematerialise the output.
    table_VD = sharding.constrain(self.embed[...], (None, None))
    x_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(jnp.dtype(cfg.dtype))
    keys = (None, None) if rng is None else jax.random.split(rng)
    x_BTD = sharding.constrain(_dropout(x_BTD, cfg.dropout, keys[0]), ('batch', 'length', 'embed'))

    ctx = dict(positions=positions_T, segment_ids=segment_ids_BT, prev_segment=prev_B, form=form)
    layer_states = None if state is None else state.layers
    x_BTD, layers = self._run_blocks(x_BTD, layer_states, ctx, keys[1])

    x_BTD = self.final_norm(x_BTD)
    new_state = STATES[cfg.kind](offset=offset + T, segment=last_B, layers=layers)
    if not head:
      return x_BTD, new_state
    logits_BTV = dense(x_BTD, self.head_weights(), x_BTD.dtype, out_dtype=F32)
    return sharding.constrain(logits_BTV, ('batch', 'length', 'vocab')), new_state

  def head_weights(self) -> jax.Array:
    """The LM head [D, vocab]: its own matrix, or the embedding's transpose when tied."""
    return self.embed[...].T if self.head is None else self.head[...]

  def _run_blocks(self, x_BTD, layer_states, ctx, rng):
    """Applies the stacked blocks, as a lax.scan over layers or a Python loop."""
    cfg, L = self.cfg, self.cfg.num_layers
    graphdef, params = nnx.split(self.blocks)
    keys = None if rng is None else jax.random.split(rng, L)

    def body(x, xs):
      layer_params, layer_state, key = xs
      return nnx.merge(graphdef, layer_params)(x, layer_state, ctx, key)

    policy = REMAT_POLICIES[cfg.remat]
    if cfg.remat != 'none':
      body = jax.checkpoint(body, policy=policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      return jax.lax.scan(body, x_BTD, (params, layer_states, keys))
    outputs = []
    for i in range(L):
      x_BTD, out = body(x_BTD, jax.tree.map(lambda a: a[i], (params, layer_states, keys)))
      outputs.append(out)
    return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *outputs)


def count_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def create(cfg: ModelConfig, seed: int = 0) -> Model:
  return Model(cfg, rngs=nnx.Rngs(seed))


# ------------------------------------------------------------------------------------------------
# The model as pure functions of its parameters (what the trainer, generation, checkpoints, the
# converters and the experiments share).


@dataclasses.dataclass(frozen=True)
class Setup:
  """What jitted functions of the parameters close over: no arrays but `token_bytes`.

  use_segments: pass the batch's segment ids to the model (reset retention at document bounds).
  token_bytes: [vocab] UTF-8 bytes per token id, for bits per byte (ones when unknown).
  """
  model_config: ModelConfig
  graphdef: Any
  use_segments: bool
  token_bytes: np.ndarray


def abstract_model(model_config: ModelConfig) -> Model:
  """The Model with ShapeDtypeStructs for arrays (nnx.eval_shape): shapes, metadata, graphdef."""
  return nnx.eval_shape(lambda: Model(model_config, rngs=nnx.Rngs(0)))


def make_setup(model_config: ModelConfig, *, use_segments: bool = True,
               token_bytes=None) -> Setup:
  """The Setup of `model_config`; `token_bytes` shorter than the vocabulary is padded with 0."""
  if token_bytes is None:
    table = np.ones((model_config.vocab_size,), np.int32)
  else:
    given = np.asarray(token_bytes, np.int32)[:model_config.vocab_size]
    table = np.zeros((model_config.vocab_size,), np.int32)
    table[:len(given)] = given
  return Setup(model_config, nnx.graphdef(abstract_model(model_config)), bool(use_segments), table)


def apply_model(setup: Setup, params, tokens, **kwargs):
  """Model.__call__ on a pure dict of parameters: (logits, state)."""
  return nnx.merge(setup.graphdef, params)(tokens, **kwargs)


def init_params(model_config: ModelConfig, key) -> dict:
  """Freshly initialised parameters as a pure dict."""
  model = Model(model_config, rngs=nnx.Rngs(params=key))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_params(model_config: ModelConfig) -> dict:
  """The parameters' ShapeDtypeStructs as a pure dict (no arrays allocated)."""
  return nnx.to_pure_dict(nnx.state(abstract_model(model_config), nnx.Param))


def param_logical_axes(model_config: ModelConfig):
  """The logical axes of every parameter, as a pure-dict tree of tuples."""
  return sharding.logical_axes(abstract_model(model_config))
