"""YOCO, "You Only Cache Once" (Sun et al. 2024, arXiv 2405.05254): a self-decoder, one shared KV
cache, and a cross-decoder that attends to it.

    X_0 = √D · Embed(tokens)
    X_l = Block_l(X_{l−1}),  l = 1 … L_s       self-decoder: gated retention, or windowed attention
    K̂ = rotary(RMSNorm(X_{L_s}) W_K),  V̂ = RMSNorm(X_{L_s}) W_V      one cache, Hkv heads [B, S, Hkv, K]
    Y_0 = X_{L_s}
    Y_l = Y_{l−1} + Attn(rotary(RMSNorm(Y_{l−1}) W_Q^l), K̂, V̂) W_O^l;  Y_l += FFN(RMSNorm(Y_l))
    logits = W_head RMSNorm(Y_{L − L_s})

The self-decoder's blocks are `model.Block`s of one mixer (`retention` for
`self_decoder='gated_retention'`, `attention` in a window for 'swa'), stacked and scanned; the
cross-decoder's blocks are stacked and scanned too. Query head h reads kv head h // (H / Hkv).

The decoding state is a `model.DecodeState` whose `layers` is (the self-decoder's states [L_s, ...],
the shared `model.KVCache` of Hkv heads): constant per self-decoder layer, one cache entry per token.
"""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp

from retnet_jax import attention as attention_lib
from retnet_jax import model as model_lib
from retnet_jax import sharding

F32 = jnp.float32
SELF_DECODERS = {'gated_retention': 'retention', 'swa': 'attention'}


def self_mixer(cfg) -> str:
  """The model.MIXERS name of the self-decoder's layers."""
  return SELF_DECODERS[cfg.self_decoder]


def kv_heads(cfg) -> int:
  return cfg.num_heads if cfg.num_kv_heads is None else cfg.num_kv_heads


# Static answers for the cost models and the decoding loop (ModelConfig asks these for kind='yoco').


def num_cross_layers(cfg) -> int:
  return cfg.num_layers - cfg.num_self_decoder_layers


def state_bytes(cfg, batch: int, context: int) -> int:
  """The self-decoder's states plus the one shared cache (k, v of Hkv heads, segment, position)."""
  mixer = model_lib.MIXERS[self_mixer(cfg)]
  own = cfg.num_self_decoder_layers * mixer.state_bytes(cfg, batch, context)
  per_slot = 2 * kv_heads(cfg) * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize + 4
  return own + batch * context * per_slot + 4 * context


def matmul_params(cfg) -> int:
  mixer = model_lib.MIXERS[self_mixer(cfg)]
  D = cfg.embed_dim
  kv = 2 * D * kv_heads(cfg) * cfg.head_dim
  return cfg.num_self_decoder_layers * mixer.matmul_params(cfg) + kv + num_cross_layers(cfg) * 2 * D * D


def mixing_flops(cfg, seq_len: int, form: str) -> float:
  """The self-decoder's mixers plus 4S·K per head and cross layer over the S = T cached keys."""
  mixer = model_lib.MIXERS[self_mixer(cfg)]
  cross = cfg.num_heads * 4 * seq_len * cfg.head_dim
  return float(cfg.num_self_decoder_layers * mixer.mixing_flops(cfg, seq_len, form)
               + num_cross_layers(cfg) * cross)


# ------------------------------------------------------------------------------------------------
# Layers.


class KVBuilder(nnx.Module):
  """RMSNorm, then k (with interleaved rotary) and v projections of Hkv heads: the shared cache."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, G, K = cfg.embed_dim, kv_heads(cfg), cfg.head_dim
    pd = jnp.dtype(cfg.param_dtype)
    self.norm = model_lib.RMSNorm(D, cfg.norm_eps, param_dtype=pd)
    self.wk = model_lib._param(rngs, model_lib._TORCH_LINEAR, (D, G, K), ('embed', 'heads', 'kv'), pd)
    self.wv = model_lib._param(rngs, model_lib._TORCH_LINEAR, (D, G, K), ('embed', 'heads', 'kv'), pd)

  def __call__(self, x_BTD, positions_T):
    """(k [B, T, Hkv, K], v [B, T, Hkv, K]) of the self-decoder's output x."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    h_BTD = self.norm(x_BTD)
    sin, cos = model_lib.rotary_angles(cfg, positions_T)
    k_BTGK = model_lib.apply_rotary(model_lib.dense(h_BTD, self.wk[...], dt), sin, cos, cfg.rotary)
    v_BTGK = model_lib.dense(h_BTD, self.wv[...], dt)
    return k_BTGK, v_BTGK


class CrossBlock(nnx.Module):
  """Pre-norm residual block: attention of its own queries to the shared cache, then the FFN."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, H, K = cfg.embed_dim, cfg.num_heads, cfg.head_dim
    pd = jnp.dtype(cfg.param_dtype)
    self.mixer_norm = model_lib.RMSNorm(D, cfg.norm_eps, param_dtype=pd)
    self.wq = model_lib._param(rngs, model_lib._TORCH_LINEAR, (D, H, K), ('embed', 'heads', 'kv'), pd)
    self.wo = model_lib._param(rngs, model_lib._TORCH_LINEAR, (H, K, D), ('heads', 'kv', 'embed'), pd)
    self.ffn_norm = model_lib.RMSNorm(D, cfg.norm_eps, param_dtype=pd)
    self.ffn = model_lib.FeedForward(cfg, rngs=rngs)

  def attend(self, x_BTD, shared, positions_T):
    """shared: ('self', k [B, T, Hkv, K], v, segment_ids or None) to attend within x (training,
    scoring), or ('cache', KVCache, mask [B, T, S])."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    sin, cos = model_lib.rotary_angles(cfg, positions_T)
    q_BTHK = model_lib.apply_rotary(model_lib.dense(x_BTD, self.wq[...], dt), sin, cos, cfg.rotary)
    H, G = cfg.num_heads, kv_heads(cfg)
    if shared[0] == 'self':
      _, k_BTGK, v_BTGK, segment_ids = shared
      k_BTHK, v_BTHK = (jnp.repeat(a, H // G, axis=2) for a in (k_BTGK, v_BTGK))
      o_BTHK = attention_lib.attention(q_BTHK, k_BTHK.astype(dt), v_BTHK.astype(dt),
                                       segment_ids=segment_ids, impl=cfg.attention_impl)
    else:
      _, cache, mask_BTS = shared
      B, T = x_BTD.shape[:2]
      q_BTGRK = q_BTHK.reshape(B, T, G, H // G, cfg.head_dim)
      scores = jnp.einsum('btgrk,bgks->bgrts', q_BTGRK, cache.k.astype(dt), preferred_element_type=F32)
      scores = jnp.where(mask_BTS[:, None, None], scores * cfg.head_dim**-0.5, attention_lib.MASKED)
      probs = jax.nn.softmax(scores, axis=-1)
      o_BTHK = jnp.einsum('bgrts,bgsk->btgrk', probs.astype(dt), cache.v.astype(dt)).reshape(q_BTHK.shape)
    return model_lib.dense(o_BTHK, self.wo[...], dt, in_dims=2)

  def __call__(self, x_BTD, shared, positions_T, dropout_key=None):
    keys = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    h = self.attend(self.mixer_norm(x_BTD), shared, positions_T)
    x_BTD = x_BTD + model_lib._dropout(h, self.cfg.dropout, keys[0])
    x_BTD = x_BTD + model_lib._dropout(self.ffn(self.ffn_norm(x_BTD)), self.cfg.dropout, keys[1])
    return sharding.constrain(x_BTD, ('batch', 'length', 'embed'))


def _stack(n, make, rngs):
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def stacked(rngs):
    return make(rngs)

  blocks = stacked(rngs)
  for _, var in nnx.iter_graph(blocks):
    if isinstance(var, nnx.Variable):
      var.set_metadata(logical_axes=('layers',) + var.get_metadata()['logical_axes'])
  return blocks


def _scan(cfg, blocks, step, x, xs):
  """x, ys = scan of step(block, x, xs_l) -> (x, y_l) over the stacked blocks (or a Python loop)."""
  graphdef, params = nnx.split(blocks)

  def body(x, p_xs):
    p, one = p_xs
    return step(nnx.merge(graphdef, p), x, one)

  if cfg.remat != 'none':
    body = jax.checkpoint(body, policy=model_lib.REMAT_POLICIES[cfg.remat],
                          prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    return jax.lax.scan(body, x, (params, xs))
  n = jax.tree.leaves(params)[0].shape[0]
  ys = []
  for i in range(n):
    x, y = body(x, jax.tree.map(lambda a: a[i], (params, xs)))
    ys.append(y)
  return x, (None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys))


class YOCO(model_lib.Model):
  """Embedding (times √D), the self-decoder's stacked Blocks ('self_blocks/retention/wq' [L_s, ...]),
  the KV builder ('kv/wk' [D, Hkv, K]), the cross-decoder's stacked CrossBlocks ('cross_blocks/wq'
  [L − L_s, D, H, K]), final RMSNorm, LM head. `Model.__call__` runs it: only the blocks differ."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):  # pylint: disable=super-init-not-called
    self.cfg = cfg
    D, pd = cfg.embed_dim, jnp.dtype(cfg.param_dtype)
    normal = jax.nn.initializers.normal(D**-0.5)
    self.embed = model_lib._param(rngs, normal, (cfg.vocab_size, D), ('vocab', 'embed'), pd)
    mixer = self_mixer(cfg)
    self.self_blocks = _stack(cfg.num_self_decoder_layers,
                              lambda r: model_lib.Block(cfg, mixer, rngs=r), rngs)
    self.kv = KVBuilder(cfg, rngs=rngs)
    self.cross_blocks = _stack(num_cross_layers(cfg), lambda r: CrossBlock(cfg, rngs=r), rngs)
    self.final_norm = model_lib.RMSNorm(D, cfg.norm_eps, param_dtype=pd)
    self.head = None if cfg.tie_embeddings else model_lib._param(
        rngs, normal, (D, cfg.vocab_size), ('embed', 'vocab'), pd)

  def init_state(self, batch: int, max_len: int | None = None) -> model_lib.DecodeState:
    """The empty state: the self-decoder's zero states and a shared cache of max_len positions."""
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    if max_len is None:
      raise ValueError("YOCO's shared KV cache needs max_len.")
    one = self.self_blocks.mixer.init_state(batch, max_len)
    own = jax.tree.map(lambda x: jnp.broadcast_to(x, (cfg.num_self_decoder_layers,) + x.shape), one)
    G, K = kv_heads(cfg), cfg.head_dim
    cache = model_lib.KVCache(k=jnp.zeros((batch, G, K, max_len), dt),
                              v=jnp.zeros((batch, G, max_len, K), dt),
                              segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                              positions=jnp.full((max_len,), model_lib.EMPTY_POSITION, jnp.int32))
    return model_lib.DecodeState(offset=jnp.zeros((), jnp.int32),
                                 segment=jnp.zeros((batch,), jnp.int32), layers=(own, cache))

  def carried(self, own: model_lib.DecodeState, max_len: int | None = None) -> model_lib.DecodeState:
    """The state of a prompt run from no state, ready to decode: the self-decoder's states as they
    are, the prompt's shared keys and values in the first slots of a max_len cache."""
    empty = self.init_state(own.segment.shape[0], max_len)
    mixer = type(self.self_blocks.mixer)
    states = jax.vmap(lambda e, o: mixer.carry(self.cfg, e, o))(empty.layers[0], own.layers[0])
    return own._replace(layers=(states, model_lib.write_cache(empty.layers[1], own.layers[1], 0)))

  def _run_blocks(self, x_BTD, layer_states, ctx, rng, last_only=False):
    """Self-decoder, KV builder, cross-decoder; returns (y, (self states, shared cache)).

    last_only: the cross-decoder runs at the last position only (y [B, 1, D]): a prefill builds the
    whole shared cache but needs one position's logits.
    """
    cfg = self.cfg
    x_BTD = x_BTD * jnp.asarray(math.sqrt(cfg.embed_dim), x_BTD.dtype)
    Ls, Lc = cfg.num_self_decoder_layers, num_cross_layers(cfg)
    keys = (None, None) if rng is None else jax.random.split(rng)
    self_keys = None if rng is None else jax.random.split(keys[0], Ls)
    cross_keys = None if rng is None else jax.random.split(keys[1], Lc)
    own, cache = (None, None) if layer_states is None else layer_states

    def self_step(block, x, xs):
      state, key = xs
      return block(x, state, ctx, key)

    x_BTD, own = _scan(cfg, self.self_blocks, self_step, x_BTD, (own, self_keys))

    positions_T, segment_ids = ctx['positions'], ctx['segment_ids']
    B, T = x_BTD.shape[:2]
    k_BTGK, v_BTGK = self.kv(x_BTD, positions_T)
    seg_BT = (jnp.broadcast_to(ctx['prev_segment'][:, None], (B, T)) if segment_ids is None
              else segment_ids)
    new = model_lib.KVCache(k=k_BTGK.transpose(0, 2, 3, 1), v=v_BTGK.transpose(0, 2, 1, 3),
                            segment_ids=seg_BT, positions=positions_T.astype(jnp.int32))
    if cache is None and not last_only:
      shared, cache = ('self', k_BTGK, v_BTGK, segment_ids), new
    else:
      cache = new if cache is None else model_lib.write_cache(cache, new, positions_T[0])
      if last_only:
        x_BTD, positions_T, seg_BT = x_BTD[:, -1:], positions_T[-1:], seg_BT[:, -1:]
      mask_BTS = attention_lib.allowed(positions_T, cache.positions, seg_BT, cache.segment_ids, None)
      shared = ('cache', cache, mask_BTS)

    def cross_step(block, y, key):
      return block(y, shared, positions_T, key), None

    x_BTD, _ = _scan(cfg, self.cross_blocks, cross_step, x_BTD, cross_keys)
    return x_BTD, (own, cache)
