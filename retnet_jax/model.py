"""The RetNet language model (Sun et al. 2023, §2.2–2.3) and a Transformer baseline, in flax.nnx.

    X ← X + MSR(RMSNorm(X));  X ← X + FFN(RMSNorm(X));  logits = W_head RMSNorm(X)        (eq. 9)
    MSR(X) = W_O (swish(X W_G) ⊙ GroupNorm_h(Retention_h(X)))                              (eq. 8)

Each layer's token mixer is named by `layer_pattern` (a comma-separated list of `MIXERS` names
repeated to fill `num_layers`); `kind='retnet'` is the pattern `retention`, `kind='transformer'`
is `attention` (causal softmax attention with a KV cache, optionally in a local window). Everything
else (embedding, pre-norm, SwiGLU FFN, rotary positions, head) is shared.

The model runs as `model(tokens, state=None, *, form=None, segment_ids=None, rng=None) -> (logits
[B, T, vocab] float32, state)`, where `state` is a `DecodeState` (the position offset, each row's
last segment id, and per pattern position that mixer's state stacked over the pattern's repeats),
so that the logits of x[:n] and then of x[n:] with the carried state equal those of x.

A mixer is a class in `MIXERS` with `init_state(batch, max_len)`, `mixer(x, state, *, positions,
segment_ids, prev_segment, form) -> (y, state)`, `carry(cfg, empty, own)` (the state a run from no
state returned, placed in init_state's shapes), and static answers about itself (`state_grows`,
`state_bytes`, `matmul_params`, `mixing_flops`, `quadratic`) that `ModelConfig` sums over the layers
for the trainer, generation, scoring and the cost models, which never branch on a kind.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax import attention as attention_lib
from retnet_jax import decay
from retnet_jax import retention
from retnet_jax import retention_ops
from retnet_jax import sharding

F32 = jnp.float32
KINDS = ('retnet', 'transformer', 'yoco')
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
  # Mixer names (MIXERS) repeated to fill num_layers; '' = the kind's own ('retention' / 'attention').
  layer_pattern: str = ''
  attention_window: int | None = None  # Attention layers see the last W positions; None: all.
  attention_impl: str = 'auto'  # attention.IMPLS: 'auto' | 'xla' | 'cudnn' | 'splash'.
  # kind='yoco' (yoco.py): the first num_self_decoder_layers layers are the self-decoder
  # ('gated_retention' | 'swa', attention in attention_window), the rest the cross-decoder, which
  # attends to one shared KV cache of num_kv_heads heads (default num_heads).
  num_self_decoder_layers: int = 1
  self_decoder: str = 'gated_retention'
  num_kv_heads: int | None = None
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
  # gamma='gated' (decay.GATED): a per-token decay log γ_t = logsigmoid(x_t W_γ) / gate_temperature
  # (YOCO's gated retention, fla's simple GLA), at least gate_floor (a log γ < 0) when set;
  # gate_bias adds a learned b_γ [H] to x_t W_γ (fla's SimpleGatedLinearAttention has one, YOCO not).
  gate_temperature: float = 16.0
  gate_floor: float | None = None
  gate_bias: bool = False
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
    names = [m.strip() for m in str(self.layer_pattern).split(',')] if self.layer_pattern else []
    unknown = [m for m in names if m not in MIXERS]
    need(not unknown, f'layer_pattern {self.layer_pattern!r} names {unknown}; mixers are '
         f'{sorted(MIXERS)}.')
    need(not names or self.num_layers % len(names) == 0,
         f'layer_pattern {self.layer_pattern!r} has {len(names)} layers, which does not divide '
         f'num_layers={self.num_layers}.')
    need(self.attention_window is None or (isinstance(self.attention_window, int)
                                           and self.attention_window > 0),
         f'attention_window must be None or a positive integer; got {self.attention_window!r}.')
    if self.kind == 'yoco':
      _check_yoco(self, need)
    need(self.attention_impl in attention_lib.IMPLS,
         f'attention_impl must be one of {attention_lib.IMPLS}; got {self.attention_impl!r}.')
    for name in ('vocab_size', 'num_layers', 'embed_dim', 'num_heads', 'ffn_dim', 'chunk_size'):
      need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
           f'{name} must be a positive integer; got {getattr(self, name)!r}.')
    need(self.embed_dim % self.num_heads == 0,
         f'num_heads ({self.num_heads}) must divide embed_dim ({self.embed_dim}).')
    need(self.values % self.num_heads == 0,
         f'num_heads ({self.num_heads}) must divide value_dim ({self.values}).')
    need('retention' in self.pattern or self.value_dim in (None, self.embed_dim),
         'attention uses value_dim = embed_dim.')
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
    need(self.gate_temperature > 0, f'gate_temperature must be positive; got {self.gate_temperature}.')
    need(self.gate_floor is None or self.gate_floor < 0,
         f'gate_floor must be a log γ < 0 (or None); got {self.gate_floor}.')
    if 'retention' in self.pattern and self.gamma == decay.GATED:
      need(not self.decay_row_norm, "decay_row_norm needs a fixed γ per head; gamma='gated' "
           'decays per token (its per-head norm cancels the scale anyway).')
    elif 'retention' in self.pattern:
      self.gammas()  # Raises on an unknown or impossible schedule.

  @property
  def pattern(self) -> tuple[str, ...]:
    """The mixer of each position of the repeated pattern (YOCO: its self-decoder's mixer, then the
    cross-decoder's attention)."""
    if self.kind == 'yoco':
      return (_yoco().self_mixer(self), 'attention')
    if self.layer_pattern:
      return tuple(m.strip() for m in self.layer_pattern.split(','))
    return (KIND_MIXER[self.kind],)

  @property
  def repeats(self) -> int:
    """How many times the pattern repeats (the length of the layer scan)."""
    if self.kind == 'yoco':
      return self.num_layers  # Not scanned as one pattern: yoco.YOCO scans each half.
    return self.num_layers // len(self.pattern)

  @property
  def layer_mixers(self) -> tuple[str, ...]:
    """The mixer of every layer, in depth order."""
    return self.pattern * self.repeats

  @property
  def state_grows(self) -> bool:
    """Whether the decoding state grows with the tokens read (it then needs a `max_len`)."""
    if self.kind == 'yoco':
      return True
    return any(MIXERS[m].state_grows(self) for m in self.pattern)

  def state_bytes(self, batch: int, context: int) -> int:
    """Bytes of the mixers' decoding states after `context` tokens of `batch` rows."""
    if self.kind == 'yoco':
      return _yoco().state_bytes(self, batch, context)
    return sum(MIXERS[m].state_bytes(self, batch, context) for m in self.layer_mixers)

  def mixer_matmul_params(self) -> int:
    """Weights every token multiplies by in the mixers' projections, over all layers."""
    if self.kind == 'yoco':
      return _yoco().matmul_params(self)
    return sum(MIXERS[m].matmul_params(self) for m in self.layer_mixers)

  def mixing_flops(self, seq_len: int, form: str) -> float:
    """Forward FLOPs per token of the mixing operators themselves, over all layers."""
    if self.kind == 'yoco':
      return _yoco().mixing_flops(self, seq_len, form)
    return float(sum(MIXERS[m].mixing_flops(self, seq_len, form) for m in self.layer_mixers))

  def quadratic(self, form: str) -> bool:
    """Whether some layer forms [T, T] products in `form` (the CPU dot library choice)."""
    return self.kind == 'yoco' or any(MIXERS[m].quadratic(self, form) for m in self.pattern)

  @property
  def head_dim(self) -> int:
    """K, the q-k head dimension."""
    return self.embed_dim // self.num_heads

  @property
  def values(self) -> int:
    """Total value width."""
    if self.value_dim is not None:
      return self.value_dim
    return 2 * self.embed_dim if 'retention' in self.pattern and self.kind != 'yoco' else self.embed_dim

  @property
  def value_head_dim(self) -> int:
    return self.values // self.num_heads

  def gammas(self) -> np.ndarray:
    """Initial (or fixed) γ per head, float64 [H]."""
    return decay.gammas(self.gamma, self.num_heads, value=self.gamma_value,
                        values=tuple(self.gamma_values), init=self.gamma_init)


def _yoco():
  from retnet_jax import yoco  # pylint: disable=g-import-not-at-top (yoco builds on this module)
  return yoco


def _check_yoco(cfg: ModelConfig, need) -> None:
  need(not cfg.layer_pattern, "kind='yoco' takes self_decoder, not layer_pattern.")
  need(cfg.self_decoder in _yoco().SELF_DECODERS,
       f'self_decoder must be one of {sorted(_yoco().SELF_DECODERS)}; got {cfg.self_decoder!r}.')
  need(cfg.self_decoder != 'swa' or cfg.attention_window is not None,
       "self_decoder='swa' needs attention_window.")
  need(isinstance(cfg.num_self_decoder_layers, int)
       and 0 < cfg.num_self_decoder_layers < cfg.num_layers,
       f'num_self_decoder_layers must be in [1, num_layers={cfg.num_layers}); '
       f'got {cfg.num_self_decoder_layers!r}.')
  G = cfg.num_heads if cfg.num_kv_heads is None else cfg.num_kv_heads
  need(isinstance(G, int) and G > 0 and cfg.num_heads % G == 0,
       f'num_kv_heads ({cfg.num_kv_heads}) must divide num_heads ({cfg.num_heads}).')


def build(cfg: ModelConfig, rngs: nnx.Rngs) -> 'Model':
  """The model of `cfg`: `Model`, or `yoco.YOCO` for kind='yoco'."""
  return _yoco().YOCO(cfg, rngs=rngs) if cfg.kind == 'yoco' else Model(cfg, rngs=rngs)


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
  gradient slower than this form (docs/performance.md); accelerators run both alike.
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
  """Gated multi-scale retention (§2.2): one γ per head, or one per token and head (gamma='gated',
  YOCO's gated retention)."""

  @staticmethod
  def state_grows(cfg: ModelConfig) -> bool:
    return False

  @staticmethod
  def state_bytes(cfg: ModelConfig, batch: int, context: int) -> int:
    return 4 * batch * cfg.num_heads * cfg.head_dim * cfg.value_head_dim  # [B, H, K, V] float32

  @staticmethod
  def matmul_params(cfg: ModelConfig) -> int:
    D, V = cfg.embed_dim, cfg.values
    return D * 2 * D + D * V * (2 if cfg.swish_gate else 1) + V * D  # q, k; v (and gate); out

  @staticmethod
  def mixing_flops(cfg: ModelConfig, seq_len: int, form: str) -> float:
    """Chunkwise 2C(K + V) inside a chunk and 4KV across chunks; parallel 2T(K + V); recurrent 4KV."""
    H, K, V = cfg.num_heads, cfg.head_dim, cfg.value_head_dim
    if form == 'chunkwise':
      C = min(cfg.chunk_size, seq_len)
      return H * (2 * C * (K + V) + 4 * K * V)
    if form == 'parallel':
      return H * 2 * seq_len * (K + V)
    return H * 4 * K * V

  @staticmethod
  def quadratic(cfg: ModelConfig, form: str) -> bool:
    return form == 'parallel'

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
    # W_γ of gated retention (fla's gk_proj) and its optional bias; torch's Linear initialisation.
    gated = cfg.gamma == decay.GATED
    self.wgamma = _param(rngs, _TORCH_LINEAR, (D, H), ('embed', 'heads'), pd) if gated else None
    self.bgamma = (nnx.Param(jnp.zeros((H,), pd), logical_axes=('heads',))
                   if gated and cfg.gate_bias else None)

  def log_gamma(self, x_BTD=None):
    """log γ float32: per head [H], or per token [B, T, H] for gamma='gated' (from x [B, T, D])."""
    if self.wgamma is not None:
      logits_BTH = dense(x_BTD, self.wgamma[...], jnp.dtype(self.cfg.dtype), out_dtype=F32)
      if self.bgamma is not None:
        logits_BTH = logits_BTH + self.bgamma[...].astype(F32)
      log_gamma_BTH = decay.gate(logits_BTH, self.cfg.gate_temperature, self.cfg.gate_floor)
      return sharding.constrain(log_gamma_BTH, ('batch', 'length', 'heads'))
    if self.decay_log_rate is not None:
      return -jnp.exp(self.decay_log_rate[...].astype(F32))
    return jnp.asarray(np.log(self.cfg.gammas()), F32)

  @staticmethod
  def carry(cfg: ModelConfig, empty, own):
    """A run from no state returns the state itself [B, H, K, V]."""
    del cfg, empty
    return own

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
    reset_BT = None
    if segment_ids is not None:
      reset_BT = segment_ids != jnp.concatenate([prev_segment[:, None], segment_ids[:, :-1]], 1)
    sin, cos = rotary_angles(cfg, positions)
    proj = lambda w: dense(x_BTD, w[...], dt)
    q_BTHK = apply_rotary(proj(self.wq), sin, cos, cfg.rotary)
    k_BTHK = apply_rotary(proj(self.wk) * cfg.head_dim**-0.5, sin, cos, cfg.rotary)
    v_BTHV = proj(self.wv)
    q_BTHK, k_BTHK, v_BTHV = (sharding.constrain(a, ('batch', 'length', 'heads', 'kv'))
                              for a in (q_BTHK, k_BTHK, v_BTHV))
    log_gamma = self.log_gamma(x_BTD)  # [H], or [B, T, H] when gated.
    impl = cfg.retention_impl if form == 'chunkwise' or cfg.retention_impl == 'skip' else 'auto'
    o_BTHV, state_BHKV = retention_ops.retention(
        q_BTHK, k_BTHK, v_BTHV, log_gamma, state, reset=reset_BT, form=form,
        chunk_size=cfg.chunk_size, impl=impl, exchange=cfg.sequence_exchange)
    if cfg.decay_row_norm:
      # Σ_{i<n} γ^i = (1 − γ^n) / (1 − γ), or n for γ = 1; n counts the tokens of t's document
      # up to t (from the last reset in x, else from position 0).
      n_BT = jnp.broadcast_to(jnp.asarray(positions, F32)[None, :] + 1.0, x_BTD.shape[:2])
      if reset_BT is not None:
        idx_T = jnp.arange(x_BTD.shape[1])
        last_BT = jax.lax.cummax(jnp.where(reset_BT, idx_T[None, :], -1), axis=1)
        n_BT = jnp.where(last_BT >= 0, (idx_T[None, :] - last_BT + 1).astype(F32), n_BT)
      n_BT1 = n_BT[..., None]
      g_H = jnp.exp(log_gamma)
      total_BTH = jnp.where(g_H < 1.0, -jnp.expm1(n_BT1 * log_gamma) / (1.0 - g_H), n_BT1)
      o_BTHV = (o_BTHV * jax.lax.rsqrt(total_BTH)[..., None]).astype(o_BTHV.dtype)
    if self.norm is not None:
      o_BTHV = self.norm(o_BTHV)
    if self.wg is not None:
      o_BTHV = jax.nn.silu(proj(self.wg)) * o_BTHV
    y_BTD = dense(o_BTHV, self.wo[...], dt, in_dims=2)
    return y_BTD, state_BHKV


class Attention(nnx.Module):
  """Causal softmax attention with rotary positions and a KV cache; with `attention_window` W, each
  token sees the last W positions and the cache is a ring buffer of W slots (constant memory)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, H, K = cfg.embed_dim, cfg.num_heads, cfg.head_dim
    pd = jnp.dtype(cfg.param_dtype)
    init = _xavier(2**-0.5, 0, (1, 2))
    self.wq = _param(rngs, init, (D, H, K), ('embed', 'heads', 'kv'), pd)
    self.wk = _param(rngs, init, (D, H, K), ('embed', 'heads', 'kv'), pd)
    self.wv = _param(rngs, init, (D, H, K), ('embed', 'heads', 'kv'), pd)
    self.wo = _param(rngs, _xavier(1.0, (0, 1), 2), (H, K, D), ('heads', 'kv', 'embed'), pd)

  @staticmethod
  def state_grows(cfg: ModelConfig) -> bool:
    return cfg.attention_window is None

  @staticmethod
  def state_bytes(cfg: ModelConfig, batch: int, context: int) -> int:
    S = context if cfg.attention_window is None else cfg.attention_window
    per_slot = 2 * cfg.num_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize + 4  # k, v, segment
    return batch * S * per_slot + 4 * S  # and each slot's position

  @staticmethod
  def matmul_params(cfg: ModelConfig) -> int:
    return 4 * cfg.embed_dim * cfg.embed_dim

  @staticmethod
  def mixing_flops(cfg: ModelConfig, seq_len: int, form: str) -> float:
    """2S·K for the scores and 2S·K for the weighted values per head, over the S = T keys the
    [T, T] form computes (the causal half and the window not subtracted)."""
    return cfg.num_heads * 2 * 2 * seq_len * cfg.head_dim

  @staticmethod
  def quadratic(cfg: ModelConfig, form: str) -> bool:
    return True

  @staticmethod
  def carry(cfg: ModelConfig, empty: KVCache, own: KVCache) -> KVCache:
    """The keys and values of a run from no state (T positions from 0) written into an empty cache:
    the first T slots of a full cache, or the last W tokens into a window's ring."""
    return write_cache(empty, own, 0) if cfg.attention_window is None else write_ring(empty, own)

  def init_state(self, batch: int, max_len: int | None = None) -> KVCache:
    """An empty cache: a ring of `attention_window` slots, else max_len positions (required)."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    S = cfg.attention_window or max_len
    if S is None:
      raise ValueError('full attention needs max_len to allocate its KV cache.')
    bh = (batch, cfg.num_heads)
    return KVCache(k=jnp.zeros(bh + (cfg.head_dim, S), dt), v=jnp.zeros(bh + (S, cfg.head_dim), dt),
                   segment_ids=jnp.zeros((batch, S), jnp.int32),
                   positions=jnp.full((S,), EMPTY_POSITION, jnp.int32))

  def __call__(self, x_BTD, state, *, positions, segment_ids, prev_segment, form=None):
    """Returns (y [B, T, D], the cache after x).

    state: None (attend within x; the returned cache holds x's tokens only) or a `KVCache`: x
    attends over it and itself, and is written at its positions (modulo the ring's length).
    segment_ids [B, T] or None (all tokens continue prev_segment [B]): tokens attend only within
    their segment. form: unused.
    """
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    B, T = x_BTD.shape[:2]
    given_segments = segment_ids is not None
    if segment_ids is None:
      segment_ids = jnp.broadcast_to(prev_segment[:, None], (B, T))
    sin, cos = rotary_angles(cfg, positions)
    proj = lambda w: dense(x_BTD, w[...], dt)
    q_BTHK = apply_rotary(proj(self.wq), sin, cos, cfg.rotary)
    k_BTHK = apply_rotary(proj(self.wk), sin, cos, cfg.rotary)
    v_BTHK = proj(self.wv)
    new = KVCache(k=k_BTHK.transpose(0, 2, 3, 1), v=v_BTHK.transpose(0, 2, 1, 3),
                  segment_ids=segment_ids, positions=positions.astype(jnp.int32))
    if state is None:  # Training and scoring: attend within x, by the dispatcher's choice.
      o_BTHK = attention_lib.attention(
          q_BTHK, k_BTHK, v_BTHK, segment_ids=segment_ids if given_segments else None,
          window=cfg.attention_window, impl=cfg.attention_impl)
      return dense(o_BTHK, self.wo[...], dt, in_dims=2), new
    if cfg.attention_window is None:  # Write, then attend over the cache.
      cache = write_cache(state, new, positions[0])
      keys = cache
    else:  # Attend over the ring and x, then keep x's last W tokens in the ring.
      keys = KVCache(jnp.concatenate([state.k, new.k.astype(state.k.dtype)], 3),
                     jnp.concatenate([state.v, new.v.astype(state.v.dtype)], 2),
                     jnp.concatenate([state.segment_ids, new.segment_ids], 1),
                     jnp.concatenate([state.positions, new.positions], 0))
      cache = write_ring(state, new)
    mask_BTS = attention_lib.allowed(positions, keys.positions, segment_ids, keys.segment_ids,
                                     cfg.attention_window)
    scores_BHTS = jnp.einsum('bthk,bhks->bhts', q_BTHK, keys.k.astype(dt), preferred_element_type=F32)
    scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS * cfg.head_dim**-0.5,
                            attention_lib.MASKED)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
    o_BTHK = jnp.einsum('bhts,bhsk->bthk', probs_BHTS.astype(dt), keys.v.astype(dt))
    return dense(o_BTHK, self.wo[...], dt, in_dims=2), cache


EMPTY_POSITION = 2**30  # An empty cache slot's position: after every query, so never visible.


class KVCache(NamedTuple):
  """One attention layer's cache: k [B, H, K, S], v [B, H, S, K] (the layouts a decoding step's two
  matmuls read without a transpose), each slot's segment id [B, S] int32 and position [S] int32."""
  k: jax.Array
  v: jax.Array
  segment_ids: jax.Array
  positions: jax.Array


def write_cache(cache: KVCache, new: KVCache, offset) -> KVCache:
  """Writes T new tokens into a KV cache at slots [offset, offset + T)."""
  write = lambda c, x, axis: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), offset, axis)
  return KVCache(k=write(cache.k, new.k, 3), v=write(cache.v, new.v, 2),
                 segment_ids=write(cache.segment_ids, new.segment_ids, 1),
                 positions=write(cache.positions, new.positions, 0))


def write_ring(cache: KVCache, new: KVCache) -> KVCache:
  """Writes the last min(T, S) new tokens into a ring of S slots, token at position n in slot n % S."""
  S, T = cache.positions.shape[0], new.positions.shape[0]
  keep = min(S, T)
  slots = new.positions[T - keep:] % S
  return KVCache(k=cache.k.at[:, :, :, slots].set(new.k[..., T - keep:].astype(cache.k.dtype)),
                 v=cache.v.at[:, :, slots].set(new.v[:, :, T - keep:].astype(cache.v.dtype)),
                 segment_ids=cache.segment_ids.at[:, slots].set(new.segment_ids[:, T - keep:]),
                 positions=cache.positions.at[slots].set(new.positions[T - keep:]))


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


# The mixers by name. The name is a Block's attribute, so parameter paths read 'blocks/retention/wq'
# (checkpoints and the converters use them). A new mixer is a class with Attention's interface
# (init_state, __call__ and the static answers), added here.
MIXERS = {'retention': MultiScaleRetention, 'attention': Attention}
KIND_MIXER = {'retnet': 'retention', 'transformer': 'attention'}


class Block(nnx.Module):
  """Pre-norm residual block: its mixer (`MIXERS[mixer]`), then the FFN."""

  def __init__(self, cfg: ModelConfig, mixer: str, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.mixer_name = mixer
    pd = jnp.dtype(cfg.param_dtype)
    self.mixer_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, param_dtype=pd)
    setattr(self, mixer, MIXERS[mixer](cfg, rngs=rngs))
    self.ffn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, param_dtype=pd)
    self.ffn = FeedForward(cfg, rngs=rngs)

  @property
  def mixer(self):
    return getattr(self, self.mixer_name)

  def __call__(self, x_BTD, layer_state, ctx, dropout_key=None):
    keys = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    h, layer_state = self.mixer(self.mixer_norm(x_BTD), layer_state, **ctx)
    x_BTD = x_BTD + _dropout(h, self.cfg.dropout, keys[0])
    x_BTD = x_BTD + _dropout(self.ffn(self.ffn_norm(x_BTD)), self.cfg.dropout, keys[1])
    return sharding.constrain(x_BTD, ('batch', 'length', 'embed')), layer_state


class DecodeState(NamedTuple):
  """Every model's decoding state: offset [] int32 (tokens so far), segment [B] int32 (each row's
  last segment id), layers: per pattern position, that mixer's state stacked over the pattern's
  repeats (retention [R, B, H, K, V] float32; attention a `KVCache` of [R, ...] arrays)."""
  offset: jax.Array
  segment: jax.Array
  layers: tuple


# ------------------------------------------------------------------------------------------------
# The language model.


class Model(nnx.Module):
  """Embedding, `num_layers` blocks (the pattern's blocks stacked over its repeats), final RMSNorm,
  LM head. A one-mixer pattern stacks Blocks ('blocks/retention/wq' [L, ...]); a longer one stacks
  lists of them ('blocks/1/attention/wq' [R, ...] for pattern position 1)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, pd = cfg.embed_dim, jnp.dtype(cfg.param_dtype)
    normal = jax.nn.initializers.normal(D**-0.5)
    self.embed = _param(rngs, normal, (cfg.vocab_size, D), ('vocab', 'embed'), pd)

    @nnx.split_rngs(splits=cfg.repeats)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked(rngs):
      blocks = [Block(cfg, m, rngs=rngs) for m in cfg.pattern]
      return blocks[0] if len(blocks) == 1 else nnx.List(blocks)

    self.blocks = stacked(rngs)
    for _, var in nnx.iter_graph(self.blocks):
      if isinstance(var, nnx.Variable):
        var.set_metadata(logical_axes=('layers',) + var.get_metadata()['logical_axes'])
    self.final_norm = RMSNorm(D, cfg.norm_eps, param_dtype=pd)
    self.head = None if cfg.tie_embeddings else _param(rngs, normal, (D, cfg.vocab_size),
                                                        ('embed', 'vocab'), pd)

  def init_state(self, batch: int, max_len: int | None = None) -> DecodeState:
    """The empty decoding state. max_len: the positions a growing state (full attention's cache)
    holds; None when `cfg.state_grows` is False."""
    cfg = self.cfg
    layers = []
    for block in self._pattern_blocks():
      one = block.mixer.init_state(batch, max_len)
      layers.append(jax.tree.map(lambda x: jnp.broadcast_to(x, (cfg.repeats,) + x.shape), one))
    return DecodeState(offset=jnp.zeros((), jnp.int32), segment=jnp.zeros((batch,), jnp.int32),
                       layers=tuple(layers))

  def carried(self, own: DecodeState, max_len: int | None = None) -> DecodeState:
    """The state `self(tokens)` returned (a prompt run from no state, so that attention attends
    within it by the dispatcher's kernel, not over a [T, max_len] cache) in `init_state`'s shapes,
    ready to decode: each mixer's `carry` of its part, per repeat."""
    empty = self.init_state(own.segment.shape[0], max_len)
    layers = tuple(jax.vmap(functools.partial(type(block.mixer).carry, self.cfg))(e, o)
                   for block, e, o in zip(self._pattern_blocks(), empty.layers, own.layers))
    return own._replace(layers=layers)

  def _pattern_blocks(self) -> list:
    """The (stacked) Block of each pattern position."""
    return [self.blocks] if len(self.cfg.pattern) == 1 else list(self.blocks)

  def __call__(self, tokens, state=None, *, form: str | None = None, segment_ids=None, rng=None,
               last_only: bool = False, head: bool = True):
    """Logits [B, T, vocab] float32 and the state after the last token.

    tokens [B, T] int. state: None (empty) or this model's decoding state (`init_state`).
    form: the retention form ('parallel' | 'chunkwise' | 'recurrent'; default cfg.form).
    segment_ids [B, T] int: document ids; the state resets (attention is masked) where the id
      changes, also against the last id of the carried state. Left-padded prompts use 0 for padding.
    rng: a PRNG key for dropout (None: deterministic).
    last_only: logits of the last position only ([B, 1, vocab]; a prefill's), skipping what only
      the other positions' logits need.
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
    x_BTD, layers = self._run_blocks(x_BTD, layer_states, ctx, keys[1], last_only)
    if last_only:
      x_BTD = x_BTD[:, -1:]

    x_BTD = self.final_norm(x_BTD)
    new_state = DecodeState(offset=offset + T, segment=last_B, layers=layers)
    if not head:
      return x_BTD, new_state
    logits_BTV = dense(x_BTD, self.head_weights(), x_BTD.dtype, out_dtype=F32)
    return sharding.constrain(logits_BTV, ('batch', 'length', 'vocab')), new_state

  def log_gammas(self, tokens) -> list[jax.Array]:
    """Each retention layer's log γ float32 in layer order, for tokens [B, T] read as one document
    from an empty state: [H] for a fixed decay, [B, T, H] for gamma='gated' (what its gates chose
    per token). For inspection: the blocks run one at a time, as `_run_blocks` does without scan."""
    cfg = self.cfg
    B, T = tokens.shape
    x_BTD = jnp.take(self.embed[...], jnp.asarray(tokens), axis=0).astype(jnp.dtype(cfg.dtype))
    ctx = dict(positions=jnp.arange(T, dtype=jnp.int32), segment_ids=None,
               prev_segment=jnp.zeros((B,), jnp.int32), form='chunkwise')
    graphdef, params = nnx.split(self.blocks)
    out = []
    for r in range(cfg.repeats):
      unit = nnx.merge(graphdef, jax.tree.map(lambda a: a[r], params))
      for block in [unit] if len(cfg.pattern) == 1 else list(unit):
        if isinstance(block.mixer, MultiScaleRetention):
          out.append(block.mixer.log_gamma(block.mixer_norm(x_BTD)))
        x_BTD, _ = block(x_BTD, None, ctx)
    return out

  def head_weights(self) -> jax.Array:
    """The LM head [D, vocab]: its own matrix, or the embedding's transpose when tied."""
    return self.embed[...].T if self.head is None else self.head[...]

  def _run_blocks(self, x_BTD, layer_states, ctx, rng, last_only=False):
    """Applies the blocks, as a lax.scan over the pattern's repeats or a Python loop.

    layer_states: None or a tuple (one per pattern position) of [R, ...] states; returns the same.
    last_only: unused (every block's state needs every position).
    """
    cfg, R, P = self.cfg, self.cfg.repeats, len(self.cfg.pattern)
    graphdef, params = nnx.split(self.blocks)
    keys = None if rng is None else jax.random.split(rng, (R, P))
    if layer_states is None:
      layer_states = (None,) * P

    def body(x, xs):
      unit_params, states, key = xs
      unit = nnx.merge(graphdef, unit_params)
      blocks = [unit] if P == 1 else list(unit)
      out = []
      for i, block in enumerate(blocks):
        x, state = block(x, states[i], ctx, None if key is None else key[i])
        out.append(state)
      return x, tuple(out)

    policy = REMAT_POLICIES[cfg.remat]
    if cfg.remat != 'none':
      body = jax.checkpoint(body, policy=policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      return jax.lax.scan(body, x_BTD, (params, layer_states, keys))
    outputs = []
    for r in range(R):
      x_BTD, out = body(x_BTD, jax.tree.map(lambda a: a[r], (params, layer_states, keys)))
      outputs.append(out)
    return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *outputs)


def count_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def create(cfg: ModelConfig, seed: int = 0) -> Model:
  return build(cfg, nnx.Rngs(seed))


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
  return nnx.eval_shape(lambda: build(model_config, nnx.Rngs(0)))


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
  model = build(model_config, nnx.Rngs(params=key))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_params(model_config: ModelConfig) -> dict:
  """The parameters' ShapeDtypeStructs as a pure dict (no arrays allocated)."""
  return nnx.to_pure_dict(nnx.state(abstract_model(model_config), nnx.Param))


def param_logical_axes(model_config: ModelConfig):
  """The logical axes of every parameter, as a pure-dict tree of tuples."""
  return sharding.logical_axes(abstract_model(model_config))
