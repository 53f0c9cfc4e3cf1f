"""Fused chunkwise retention (eq. 7) as Pallas kernels, forward and backward, for GPU and TPU.

Same contract as `retention.chunkwise`: q, k [B, T, H, K]; v [B, T, H, V]; log_gamma [H] (one γ
per head) or [B, T, H] (per token, gated retention); state [B, H, K, V] float32; returns
(o [B, T, H, V] in the input dtype, final state [B, H, K, V] float32).

Per (batch, head, block of BV value columns) the kernels run one linear recurrence over the N chunks
of C tokens, carrying a [K, BV] float32 state. With S_n the state before chunk n (S_0 = S_in),
L_n ≤ C the chunk's length (only the last chunk of a ragged T is shorter), D_ij = γ^{i−j} (i ≥ j),
ξ_i = γ^{i+1} and ζ_j = γ^{L_n−1−j} (j < L_n, else 0):

    O_n     = (Q_n K_nᵀ ⊙ D) V_n + (Q_n ⊙ ξ) S_n                                        (eq. 7)
    S_{n+1} = γ^{L_n} S_n + (K_n ⊙ ζ)ᵀ V_n

and, with G_n = ∂L/∂S_{n+1} (G_{N−1} = the final state's cotangent) and dP_n = dO_n V_nᵀ ⊙ D,

    dQ_n = dP_n K_n + ξ ⊙ (dO_n S_nᵀ)               (forward loop, recomputes S_n)
    dK_n = dP_nᵀ Q_n + ζ ⊙ (V_n G_nᵀ)               (reverse loop)
    dV_n = (Q_n K_nᵀ ⊙ D)ᵀ dO_n + (K_n ⊙ ζ) G_n     (reverse loop)
    G_{n−1} = γ^{L_n} G_n + (Q_n ⊙ ξ)ᵀ dO_n,        dS_in = G_{−1}.

dQ and dK sum over the value blocks: each block writes a float32 partial that a plain sum reduces.

A ragged T is zero-padded at the END to a multiple of C; the kernels know the true length, so the
last chunk decays the state by γ^{L}, not γ^C: nothing is ever divided by a power of γ.

A per-token decay replaces the powers of γ by within-chunk cumulative sums c_i = Σ_{u≤i} log γ_u
(computed outside the kernel; a [B, H, T, 1] float32 input): D_ij = exp(c_i − c_j), ξ_i = exp(c_i),
ζ_j = exp(c_{C−1} − c_j) and the carry exp(c_{C−1}). Padded tokens get log γ = 0, so the last chunk
needs no length. With log γ ≤ 0 no exponent is positive (a positive log γ grows the state, as γ > 1
would, and can overflow). d log γ_s is the sum of ∂L/∂c_t = q_t·dq_t − k_t·dk_t (+ ⟨dS_T, S_T⟩ at
the last token) over the tokens t ≥ s of s's segment, zero at a reset (its γ meets a zero state).

Resets (document boundaries) only mask these factors, chunk by chunk, in both passes: D_ij keeps
tokens i, j of one segment, ξ_i tokens before the chunk's first reset, ζ_j tokens of the chunk's
last segment, and γ^L becomes 0 in a chunk with a reset. Three per-token [B, T, 1] float32 inputs
carry what the masks need (`_segment_inputs`); D's mask keeps i, j whose segments start at the
same position of the chunk (the start column compared with itself as a row), and selects.

Two drivers run the same per-chunk maths (`_forward_chunk`, `_dq_chunk`, `_dkv_chunk` or
`_dk_chunk` and `_dv_chunk`):
- 'gpu' (Pallas Triton): grid (B, H, V/BV · K/BK); each program holds its head's whole sequence
  as a ref and walks the chunks with an in-kernel `lax.fori_loop`, a [BK, BV] state in registers.
  The backward splits K in blocks (every term above is a sum over key blocks, so dQ and dK are
  written per key block and dV sums float32 partials over them); the forward takes the whole K,
  or, in float32, with resets or with a per-token decay, the same key blocks, O summing float32
  partials. In float32 and with a per-token decay, dK and dV are two passes, each with one [C, C]
  tile. Blocks, warps and stages are those with which an H100 compile spills no register
  (docs/accelerators.md).
- 'tpu' (Pallas Mosaic): grid (B, H, V/BV, N) with the chunk axis last and 'arbitrary'; the state
  lives in a VMEM scratch buffer across grid steps; blocks are [C, K] / [C, BV] tiles.
Both read q, k, v as the free reshape [B, T, H·K] (no transposes). Matmul operands are in the input
dtype (float32 operands ask for full precision: three TF32 passes compiled for a GPU; with bfloat16
inputs the float32 state enters Q·S as bfloat16, as in fla, where the XLA path keeps it float32),
products accumulate in float32 and the carried state stays float32. d log γ is computed from dQ, dK
and the final state with plain jnp; masking changes none of the exponents, so the same formula holds
with resets.

Under a sharded `jit` the compiler does not partition a pallas_call (it would gather the operands),
so the dispatcher (`retention_ops.retention`) runs the kernel per shard of batch and heads (a
`shard_map`); it also decides where the kernel runs (`retention_ops.choose`).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from retnet_jax import retention

# Pallas' Triton backend: deprecated since jax 0.11 and due to be removed. Where it is absent the
# 'gpu' kernel is unavailable and `retention_ops.choose` falls back to XLA (`backend_unavailable`).
try:
  from jax.experimental.pallas import triton as pl_triton
except ImportError:  # pragma: no cover
  pl_triton = None

F32 = jnp.float32
TARGETS = ('gpu', 'tpu')
GPU_MAX_BLOCK = 64  # K and V blocks on GPU: fla splits K and V into blocks of at most 64 too.
GPU_MAX_BLOCK_F32 = 16  # float32 tiles take twice the registers, and TF32x3 dots three passes.
GPU_FORWARD_STATE = 128 * 64  # Most float32 state values a forward program keeps in registers.
TPU_BLOCK_V = 128


def backend_unavailable(target) -> str | None:
  """Why this jax cannot compile the kernel for `target`; None when it can."""
  if target == 'gpu' and getattr(pl_triton, 'CompilerParams', None) is None:
    return "this jax has no Pallas Triton backend (jax.experimental.pallas.triton)"
  return None


def _compiler_params(target, chunk_fn, state_size, dtype, resets):
  """Triton warps and stages, chosen from H100 compiles without spills (docs/accelerators.md): 4
  warps for a forward pass, or a bfloat16 dQ pass, over at most 64 × 64 state values without
  resets, else 8; one pipeline stage for the fused dK/dV pass (with two it spilled with resets),
  else 2. On TPU, Mosaic's grid semantics."""
  if target == 'gpu':
    narrow = (chunk_fn in (_forward_chunk, _dq_chunk) and state_size <= 64 * 64 and not resets
              and (chunk_fn is _forward_chunk or jnp.dtype(dtype) != jnp.dtype(F32)))
    return pl_triton.CompilerParams(num_warps=4 if narrow else 8,
                                    num_stages=1 if chunk_fn is _dkv_chunk else 2)
  return pltpu.CompilerParams(dimension_semantics=(pltpu.PARALLEL,) * 3 + (pltpu.ARBITRARY,))


# ----------------------------------------------------------------------------------------------
# Which shapes the kernels take.


def _pow2(n):
  return n > 0 and n & (n - 1) == 0


def _gpu_max_block(dtype):
  return GPU_MAX_BLOCK_F32 if jnp.dtype(dtype) == jnp.dtype(F32) else GPU_MAX_BLOCK


def default_block_v(V, target, K=None, dtype=jnp.bfloat16):
  """The forward's value block: on GPU at most 64 and small enough that the [K, BV] float32 state
  stays within GPU_FORWARD_STATE values."""
  if target == 'tpu':
    return TPU_BLOCK_V if V % TPU_BLOCK_V == 0 else V
  bv = min(V, _gpu_max_block(dtype))
  while K and K * bv > GPU_FORWARD_STATE and bv > 16:
    bv //= 2
  return bv


def default_block_k(K, target, dtype=jnp.bfloat16):
  """The backward passes' key block: at most 64 on GPU (the state and the dK, dQ tiles of one
  program are [BK, BV] and [C, BK]); the whole K on TPU."""
  return min(K, _gpu_max_block(dtype)) if target == 'gpu' else K


def forward_block_k(K, block_k, target, dtype, resets, per_token):
  """The forward's key block: the whole K, except on GPU in float32, with resets or with a
  per-token decay, where it takes the backward's `block_k` (whole-K tiles of Q and K beside the
  masks or the decay's [C, C] exponential, or in float32, spill registers on H100); O then sums
  float32 partials over the key blocks."""
  f32 = jnp.dtype(dtype) == jnp.dtype(F32)
  return block_k if target == 'gpu' and (f32 or resets or per_token) else K


def split_dkv(target, dtype, per_token):
  """Whether the backward computes dK and dV in two passes (each with one [C, C] tile) instead of
  one: on GPU in float32 or with a per-token decay, where the fused pass spills registers on H100."""
  return target == 'gpu' and (jnp.dtype(dtype) == jnp.dtype(F32) or per_token)


def unsupported(H, K, V, chunk_size, dtype, target, block_v=None) -> str | None:
  """Why the kernel cannot run this shape on `target` ('gpu' | 'tpu'); None when it can."""
  bv = block_v or default_block_v(V, target, K, dtype)
  if jnp.dtype(dtype) not in (jnp.dtype(F32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f'dtype {jnp.dtype(dtype)} (float32, bfloat16 or float16 only)'
  if V % bv:
    return f'block_v {bv} does not divide V = {V}'
  if target == 'gpu':
    # Triton tensors have power-of-two sizes and tl.dot needs every dimension ≥ 16.
    if not all(_pow2(x) and x >= 16 for x in (K, bv, chunk_size)):
      return f'K = {K}, block_v = {bv}, chunk = {chunk_size} must be powers of two ≥ 16'
    if K > 256 or bv > 64 or chunk_size > 128:
      return f'K = {K} > 256, block_v = {bv} > 64 or chunk = {chunk_size} > 128 (registers)'
    return None
  if target == 'tpu':
    # Mosaic blocks: the last two dims are multiples of (8, 128) or the whole array dim; the
    # [B, T, H·K] view's last dim is H·K, so K (and BV) must be multiples of 128 unless H = NV = 1.
    if chunk_size % 16 or chunk_size > 1024:
      return f'chunk = {chunk_size} must be a multiple of 16 (at most 1024)'
    whole = H == 1 and bv == V
    if not whole and (K % 128 or bv % 128):
      return f'K = {K} and block_v = {bv} must be multiples of 128 (or H = 1, one value block)'
    return None
  return f'target {target!r} (one of {TARGETS})'


# ----------------------------------------------------------------------------------------------
# Per-chunk maths, shared by both drivers. Values only (no refs): ops that Triton and Mosaic lower.


# float32 operands: full precision. Compiled for a GPU, three TF32 tensor-core passes (about
# float32's accuracy) instead of Triton's IEEE FMA loops, which spill; set while tracing a kernel.
_F32_DOT = {'precision': lax.Precision.HIGHEST}


def _dot(a, b, contract=(1, 0)):
  """2-D matmul contracting a's dim contract[0] with b's dim contract[1], float32 accumulation."""
  precision = _F32_DOT['precision'] if a.dtype == F32 else None  # Triton's DEFAULT is TF32.
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                         precision=precision, preferred_element_type=F32)


def _decay_in_chunk(lam, C):
  """D_CC (γ^{i−j} for i ≥ j, else 0; eq. 5 inside a chunk) and ξ_C1 = γ^{i+1}, float32."""
  i_CC = lax.broadcasted_iota(jnp.int32, (C, C), 0)
  j_CC = lax.broadcasted_iota(jnp.int32, (C, C), 1)
  causal_CC = i_CC >= j_CC
  diff_CC = jnp.where(causal_CC, i_CC - j_CC, 0).astype(F32)
  decay_CC = jnp.where(causal_CC, jnp.exp(lam * diff_CC), 0.0)
  i_C1 = lax.broadcasted_iota(jnp.int32, (C, 1), 0)
  xi_C1 = jnp.exp(lam * (i_C1 + 1).astype(F32))
  return decay_CC, xi_C1


def _decay_across(lam, C, length_n):
  """ζ_C1 = γ^{L−1−j} for j < L (else 0) and the carry γ^L as [1, 1], L = length_n ≤ C."""
  j_C1 = lax.broadcasted_iota(jnp.int32, (C, 1), 0)
  valid_C1 = j_C1 < length_n
  exponent_C1 = jnp.where(valid_C1, length_n - 1 - j_C1, 0).astype(F32)  # Never negative.
  zeta_C1 = jnp.where(valid_C1, jnp.exp(lam * exponent_C1), 0.0)
  carry_11 = jnp.exp(lam * (jnp.zeros((1, 1), jnp.int32) + length_n).astype(F32))
  return zeta_C1, carry_11


def _as_row(x_C1):
  """A [C, 1] column as a [1, C] row: a masked sum over the diagonal (exact, no matmul)."""
  C = x_C1.shape[0]
  diagonal_CC = (lax.broadcasted_iota(jnp.int32, (C, C), 0)
                 == lax.broadcasted_iota(jnp.int32, (C, C), 1))
  return jnp.sum(jnp.where(diagonal_CC, x_C1, 0.0), axis=0, keepdims=True)


def _token_decay(c_C1):
  """(D_CC, ξ_C1, ζ_C1, carry_11) of a chunk from its within-chunk cumulative log γ c_C1: D_ij =
  exp(c_i − c_j) for i ≥ j, ξ_i = exp(c_i), ζ_j = exp(c_{C−1} − c_j), carry exp(c_{C−1})."""
  C = c_C1.shape[0]
  causal_CC = (lax.broadcasted_iota(jnp.int32, (C, C), 0)
               >= lax.broadcasted_iota(jnp.int32, (C, C), 1))
  # The exponent is masked before exp: above the diagonal c_i − c_j ≥ 0 could overflow.
  decay_CC = jnp.where(causal_CC, jnp.exp(jnp.where(causal_CC, c_C1 - _as_row(c_C1), 0.0)), 0.0)
  last_C1 = lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1
  total_11 = jnp.sum(jnp.where(last_C1, c_C1, 0.0), axis=0, keepdims=True)
  return decay_CC, jnp.exp(c_C1), jnp.exp(total_11 - c_C1), jnp.exp(total_11)


def _mask_consts(consts, start_C1, open_C1, tail_C1):
  """The chunk's (D, ξ, ζ, γ^L) with its resets: see the module docstring."""
  decay_CC, xi_C1, zeta_C1, carry_11 = consts
  # Tokens i, j share a segment when their segments start at the same position of the chunk.
  same_segment_CC = start_C1 == _as_row(start_C1)
  return (jnp.where(same_segment_CC, decay_CC, 0.0), jnp.where(open_C1 > 0.5, xi_C1, 0.0),
          jnp.where(tail_C1 > 0.5, zeta_C1, 0.0),
          jnp.where(jnp.min(open_C1, axis=0, keepdims=True) > 0.5, carry_11, 0.0))


def _forward_chunk(consts, ins, state_KB):
  """O_n = (Q Kᵀ ⊙ D) V + (Q ⊙ ξ) S;  S ← γ^L S + (K ⊙ ζ)ᵀ V."""
  decay_CC, xi_C1, zeta_C1, carry_11 = consts
  q_CK, k_CK, v_CB = ins
  dt = v_CB.dtype
  scores_CC = _dot(q_CK, k_CK, (1, 1)) * decay_CC
  o_CB = _dot(scores_CC.astype(dt), v_CB) + _dot((q_CK * xi_C1).astype(dt), state_KB.astype(dt))
  state_KB = carry_11 * state_KB + _dot((k_CK * zeta_C1).astype(dt), v_CB, (0, 0))
  return (o_CB,), state_KB


def _dq_chunk(consts, ins, state_KB):
  """dQ_n = (dO Vᵀ ⊙ D) K + ξ ⊙ (dO Sᵀ), one value block's share;  S advances as forward."""
  decay_CC, xi_C1, zeta_C1, carry_11 = consts
  k_CK, v_CB, do_CB = ins
  dt = v_CB.dtype
  dp_CC = _dot(do_CB, v_CB, (1, 1)) * decay_CC
  dq_CK = _dot(dp_CC.astype(dt), k_CK) + xi_C1 * _dot(do_CB, state_KB.astype(dt), (1, 1))
  state_KB = carry_11 * state_KB + _dot((k_CK * zeta_C1).astype(dt), v_CB, (0, 0))
  return (dq_CK,), state_KB


def _dv_of(consts, q_CK, k_CK, do_CB, grad_KB):
  """dV_n = (Q Kᵀ ⊙ D)ᵀ dO_n + (K ⊙ ζ) G_n (this key block's share)."""
  decay_CC, _, zeta_C1, _ = consts
  dt = do_CB.dtype
  scores_CC = _dot(q_CK, k_CK, (1, 1)) * decay_CC
  return (_dot(scores_CC.astype(dt), do_CB, (0, 0))
          + _dot((k_CK * zeta_C1).astype(dt), grad_KB.astype(dt)))


def _dk_of(consts, q_CK, v_CB, do_CB, grad_KB):
  """dK_n = (dO V_nᵀ ⊙ D)ᵀ Q_n + ζ ⊙ (V_n G_nᵀ) (this value block's share)."""
  decay_CC, _, zeta_C1, _ = consts
  dt = v_CB.dtype
  dp_CC = _dot(do_CB, v_CB, (1, 1)) * decay_CC
  return _dot(dp_CC.astype(dt), q_CK, (0, 0)) + zeta_C1 * _dot(v_CB, grad_KB.astype(dt), (1, 1))


def _grad_back(consts, q_CK, do_CB, grad_KB):
  """G_{n−1} = γ^L G_n + (Q_n ⊙ ξ)ᵀ dO_n."""
  _, xi_C1, _, carry_11 = consts
  return carry_11 * grad_KB + _dot((q_CK * xi_C1).astype(do_CB.dtype), do_CB, (0, 0))


def _dkv_chunk(consts, ins, grad_KB):
  """dK_n (value block's share), dV_n from G_n = ∂L/∂S_{n+1};  G ← γ^L G + (Q ⊙ ξ)ᵀ dO."""
  q_CK, k_CK, v_CB, do_CB = ins
  # One [C, C] tile live at a time: the scores are used up (in dV) before dP is formed.
  dv_CB = _dv_of(consts, q_CK, k_CK, do_CB, grad_KB)
  dk_CK = _dk_of(consts, q_CK, v_CB, do_CB, grad_KB)
  return (dk_CK, dv_CB), _grad_back(consts, q_CK, do_CB, grad_KB)


def _dk_chunk(consts, ins, grad_KB):
  """dK_n alone (`_dkv_chunk` in two passes: one [C, C] tile where registers are short)."""
  q_CK, v_CB, do_CB = ins
  return (_dk_of(consts, q_CK, v_CB, do_CB, grad_KB),), _grad_back(consts, q_CK, do_CB, grad_KB)


def _dv_chunk(consts, ins, grad_KB):
  """dV_n alone (the other pass of `_dk_chunk`)."""
  q_CK, k_CK, do_CB = ins
  return (_dv_of(consts, q_CK, k_CK, do_CB, grad_KB),), _grad_back(consts, q_CK, do_CB, grad_KB)


# ----------------------------------------------------------------------------------------------
# Drivers: one pallas_call per pass. Operands are [B, Tp, H·K] ('k', split in key blocks of BK),
# [B, Tp, H·V] ('v', split in value blocks of BV), or float32 partials [NV, B, Tp, H·K] ('kp', one
# per value block) and [NK, B, Tp, H·V] ('vp', one per key block).


def _scan_chunks(chunk_fn, ins, in_kinds, out_kinds, out_dtypes, state_BHKV, decay, *,
                 dims, chunk, length, reverse, target, interpret, segments=()):
  """Runs `chunk_fn` over the chunks of every (b, h, value block); returns (*outs, state).

  decay: log γ [H], or the within-chunk cumulative sums of a per-token log γ, [B, H, Tp, 1]
  float32 (`_chunk_cumsum`). segments: () without resets, else the three [B, Tp, 1] inputs of
  `_segment_inputs`.
  """
  B, Tp, H, K, V, BK, BV = dims
  C, NK, NV, N = chunk, K // BK, V // BV, Tp // chunk
  last_length = length - (N - 1) * C  # L of the last chunk; C when T divides evenly.
  tpu = target == 'tpu'
  width = {'k': BK, 'v': BV, 'kp': BK, 'vp': BV, 's': 1, 'c': 1}
  n_seg = len(segments)
  per_token = decay.ndim == 4
  if per_token:  # The cumulative sums enter as one more per-token input, one column per head.
    ins, in_kinds = (*ins, decay), (*in_kinds, 'c')
    decay = jnp.zeros(H, F32)  # The per-head γ the kernels read: unused.
  ins, in_kinds = (*ins, *segments), (*in_kinds, *('s',) * n_seg)
  rows = C if tpu else Tp  # Block length along time: one chunk (tpu) or the whole sequence (gpu).

  def blocks(jk):
    """(value block, key block) of the third grid index: NV·NK programs on GPU, NV on TPU."""
    return (jk, 0) if tpu else (jk // NK, jk % NK)

  def block(kind, chunk_index):
    """BlockSpec of an operand kind; chunk_index(grid ids) -> time-block index."""
    def index_map(b, h, jk, *i):
      n, (j, kb) = chunk_index(*i), blocks(jk)
      return {'k': lambda: (b, n, h * NK + kb), 's': lambda: (b, n, 0), 'c': lambda: (b, h, n, 0),
              'v': lambda: (b, n, h * NV + j), 'kp': lambda: (j, b, n, h * NK + kb),
              'vp': lambda: (kb, b, n, h * NV + j)}[kind]()
    shape = ((None, None, rows, width[kind]) if kind in ('kp', 'vp', 'c')
             else (None, rows, width[kind]))
    return pl.BlockSpec(shape, index_map)

  shapes = {'k': (B, Tp, H * K), 'v': (B, Tp, H * V), 'kp': (NV, B, Tp, H * K),
            'vp': (NK, B, Tp, H * V)}
  out_shapes = [jax.ShapeDtypeStruct(shapes[kind], dtype)
                for kind, dtype in zip(out_kinds, out_dtypes)]
  out_shapes.append(jax.ShapeDtypeStruct((B, H, K, V), F32))
  state_spec = pl.BlockSpec((None, None, BK, BV),
                            lambda b, h, jk, *i: (b, h, blocks(jk)[1], blocks(jk)[0]))
  n_in, n_out = len(ins), len(out_kinds)

  def consts(lam, n, invariant):
    """(D_CC, ξ_C1, ζ_C1, γ^L) of chunk n; only the last chunk of a ragged T has L < C."""
    if per_token:
      return None  # Built from the chunk's cumulative sums in `run_chunk`.
    length_n = C if last_length == C else jnp.minimum(C, length - n * C)
    return (*invariant, *_decay_across(lam, C, length_n))

  def run_chunk(consts_n, values, state_KB):
    """chunk_fn on the chunk's operands, its consts masked by its resets if there are any."""
    if n_seg:
      values, seg_values = values[:-n_seg], values[-n_seg:]
    if per_token:
      values, consts_n = values[:-1], _token_decay(values[-1])
    if n_seg:
      consts_n = _mask_consts(consts_n, *seg_values)
    return chunk_fn(consts_n, values, state_KB)

  if not tpu:
    def kernel(lam_ref, *refs):
      in_refs, s0_ref = refs[:n_in], refs[n_in]
      out_refs, s_out_ref = refs[n_in + 1:n_in + 1 + n_out], refs[-1]
      lam = lam_ref[0]
      invariant = None if per_token else _decay_in_chunk(lam, C)  # Once, outside the loop.
      hoisted = consts(lam, 0, invariant) if last_length == C else None

      def body(step, state_KB):
        n = N - 1 - step if reverse else step
        t = pl.ds(pl.multiple_of(n * C, C), C)
        outs, state_KB = run_chunk(hoisted or consts(lam, n, invariant),
                                   tuple(r[t, :] for r in in_refs), state_KB)
        for r, x in zip(out_refs, outs):
          r[t, :] = x.astype(r.dtype)
        return state_KB

      s_out_ref[...] = lax.fori_loop(0, N, body, s0_ref[...].astype(F32))

    grid = (B, H, NV * NK)
    in_specs = [pl.BlockSpec((1,), lambda b, h, jk: (h,))]  # log γ of the program's head.
    in_specs += [block(kind, lambda: 0) for kind in in_kinds]
    out_specs = [block(kind, lambda: 0) for kind in out_kinds]
    scratch = ()
  else:
    def kernel(lam_ref, *refs):
      in_refs, s0_ref = refs[:n_in], refs[n_in]
      out_refs, s_out_ref, state_ref = refs[n_in + 1:n_in + 1 + n_out], refs[-2], refs[-1]
      step = pl.program_id(3)
      n = N - 1 - step if reverse else step

      @pl.when(step == 0)
      def _():
        state_ref[...] = s0_ref[...].astype(F32)

      lam = lam_ref[pl.program_id(1)]
      outs, state_KB = run_chunk(consts(lam, n, None if per_token else _decay_in_chunk(lam, C)),
                                 tuple(r[...] for r in in_refs), state_ref[...])
      for r, x in zip(out_refs, outs):
        r[...] = x.astype(r.dtype)
      state_ref[...] = state_KB

      @pl.when(step == N - 1)
      def _():
        s_out_ref[...] = state_KB

    grid = (B, H, NV, N)
    chunk_index = (lambda i: N - 1 - i) if reverse else (lambda i: i)
    in_specs = [pl.BlockSpec(memory_space=pltpu.SMEM)]  # All of log γ, read as scalars.
    in_specs += [block(kind, chunk_index) for kind in in_kinds]
    out_specs = [block(kind, chunk_index) for kind in out_kinds]
    scratch = (pltpu.VMEM((K, BV), F32),)

  call = pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs + [state_spec], out_specs=out_specs + [state_spec],
      out_shape=out_shapes, scratch_shapes=scratch, interpret=interpret,
      compiler_params=None if interpret else _compiler_params(
          target, chunk_fn, BK * BV, ins[0].dtype, bool(n_seg)),
      name=f'retention_{chunk_fn.__name__.strip("_")}')
  gpu_compiled = target == 'gpu' and not interpret
  _F32_DOT['precision'] = (lax.DotAlgorithmPreset.TF32_TF32_F32_X3 if gpu_compiled
                           else lax.Precision.HIGHEST)
  try:
    return call(decay.astype(F32), *ins, state_BHKV)
  finally:
    _F32_DOT['precision'] = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# The custom VJP over padded inputs (Tp = N·C ≥ length).


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _fused(q_BTHK, k_BTHK, v_BTHV, log_gamma, state_BHKV, segments, reset_BT, static, interpret):
  return _fused_fwd(q_BTHK, k_BTHK, v_BTHV, log_gamma, state_BHKV, segments, reset_BT, static,
                    interpret)[0]


def _flat(x_BTHD):
  B, T, H, D = x_BTHD.shape
  return x_BTHD.reshape(B, T, H * D)


def _segment_inputs(reset_BT, Tp, C):
  """Per token, float32 [B, Tp, 1] each: where its segment starts in its chunk (0 if before it),
  whether no reset precedes it in the chunk (it sees the incoming state), and whether it belongs
  to the chunk's last segment (it enters the outgoing state). Padding continues the last segment."""
  B, T = reset_BT.shape
  reset_BNC = jnp.pad(reset_BT.astype(bool), ((0, 0), (0, Tp - T))).reshape(B, Tp // C, C)
  seen_BNC = retention.segments(reset_BNC)  # Resets so far in the chunk.
  start_BNC = lax.cummax(jnp.where(reset_BNC, jnp.arange(C), 0), axis=2)
  column = lambda x: x.astype(F32).reshape(B, Tp, 1)
  return (column(start_BNC), column(seen_BNC == 0), column(seen_BNC == seen_BNC[..., -1:]))


def _chunk_cumsum(log_gamma, chunk):
  """log γ [H] as it is, or a per-token log γ [B, Tp, H] as its within-chunk inclusive cumulative
  sums, [B, H, Tp, 1] float32: the kernels' `decay` input."""
  if log_gamma.ndim == 1:
    return log_gamma
  B, Tp, H = log_gamma.shape
  c_BNCH = jnp.cumsum(log_gamma.astype(F32).reshape(B, Tp // chunk, chunk, H), axis=2)
  return c_BNCH.reshape(B, Tp, H).transpose(0, 2, 1)[..., None]


def _segment_sums_from_end(x_BTH, reset_BT):
  """y_s = Σ x_t over the tokens t ≥ s of s's segment (up to the next reset), in float32."""
  # Scanned from the end, a new segment starts after every reset: token s starts one when s + 1
  # is a reset. A segmented sum is associative on (starts, x) pairs.
  starts_BT = jnp.concatenate([reset_BT[:, 1:], jnp.zeros_like(reset_BT[:, :1])], axis=1) > 0.5
  def combine(a, b):  # a precedes b in scan order (b nearer the start of the sequence).
    return a[0] | b[0], jnp.where(b[0][..., None], b[1], a[1] + b[1])
  _, y_BTH = lax.associative_scan(combine, (starts_BT, x_BTH), reverse=True, axis=1)
  return y_BTH


def _fused_fwd(q_BTHK, k_BTHK, v_BTHV, log_gamma, state_BHKV, segments, reset_BT, static,
               interpret):
  chunk, length, target, BV, BK = static
  B, Tp, H, K = q_BTHK.shape
  V = v_BTHV.shape[-1]
  BKF = forward_block_k(K, BK, target, v_BTHV.dtype, bool(segments), log_gamma.ndim == 3)
  # With K in blocks, O sums float32 partials over them; with one block it is written directly.
  o_kind, o_dtype = ('v', v_BTHV.dtype) if BKF == K else ('vp', F32)
  o_BTV, final_BHKV = _scan_chunks(
      _forward_chunk, (_flat(q_BTHK), _flat(k_BTHK), _flat(v_BTHV)), ('k', 'k', 'v'), (o_kind,),
      (o_dtype,), state_BHKV, _chunk_cumsum(log_gamma, chunk), dims=(B, Tp, H, K, V, BKF, BV),
      chunk=chunk, length=length, reverse=False, target=target, interpret=interpret,
      segments=segments)
  if o_kind == 'vp':
    o_BTV = o_BTV.sum(0).astype(v_BTHV.dtype)
  residuals = (q_BTHK, k_BTHK, v_BTHV, log_gamma, state_BHKV, segments, reset_BT, final_BHKV)
  return (o_BTV.reshape(B, Tp, H, V), final_BHKV), residuals


def _fused_bwd(static, interpret, residuals, cotangents):
  chunk, length, target, BV, BK = static
  q_BTHK, k_BTHK, v_BTHV, log_gamma, state_BHKV, segments, reset_BT, final_BHKV = residuals
  do_BTHV, dfinal_BHKV = cotangents
  B, Tp, H, K = q_BTHK.shape
  V = v_BTHV.shape[-1]
  do_BTHV = do_BTHV.astype(v_BTHV.dtype)
  q, k, v, do = map(_flat, (q_BTHK, k_BTHK, v_BTHV, do_BTHV))
  common = dict(dims=(B, Tp, H, K, V, BK, BV), chunk=chunk, length=length, target=target,
                interpret=interpret, segments=segments)
  decay = _chunk_cumsum(log_gamma, chunk)
  dq_JBTK, _ = _scan_chunks(_dq_chunk, (k, v, do), ('k', 'v', 'v'), ('kp',), (F32,), state_BHKV,
                            decay, reverse=False, **common)
  # With K in blocks, dV sums over them (float32 partials); with one block it is written directly.
  dv_kind, dv_dtype = ('v', v_BTHV.dtype) if BK == K else ('vp', F32)
  if split_dkv(target, v_BTHV.dtype, log_gamma.ndim == 3):
    dk_JBTK, _ = _scan_chunks(_dk_chunk, (q, v, do), ('k', 'v', 'v'), ('kp',), (F32,),
                              dfinal_BHKV.astype(F32), decay, reverse=True, **common)
    dv_BTV, dstate_BHKV = _scan_chunks(_dv_chunk, (q, k, do), ('k', 'k', 'v'), (dv_kind,),
                                       (dv_dtype,), dfinal_BHKV.astype(F32), decay, reverse=True,
                                       **common)
  else:
    dk_JBTK, dv_BTV, dstate_BHKV = _scan_chunks(
        _dkv_chunk, (q, k, v, do), ('k', 'k', 'v', 'v'), ('kp', dv_kind), (F32, dv_dtype),
        dfinal_BHKV.astype(F32), decay, reverse=True, **common)
  if dv_kind == 'vp':
    dv_BTV = dv_BTV.sum(0).astype(v_BTHV.dtype)
  dq_BTHK = dq_JBTK.sum(0).reshape(B, Tp, H, K)
  dk_BTHK = dk_JBTK.sum(0).reshape(B, Tp, H, K)
  # d log γ from the other gradients: with a_t = Σ_{u≤t} log γ_u, the operator only sees
  # q_t e^{a_t}, k_s e^{−a_s} and the final state's factor e^{a_{T−1}} (the masks of resets do
  # not depend on γ), so ∂L/∂a_t = q_t·dq_t − k_t·dk_t (+ ⟨dS_T, S_T⟩ at t = T−1). A fixed γ has
  # a_t = (t+1) log γ; a per-token one sums ∂L/∂a_t from the end of each segment (module
  # docstring). Padded tokens have q = k = 0.
  da_BTH = jnp.sum(q_BTHK.astype(F32) * dq_BTHK, -1) - jnp.sum(k_BTHK.astype(F32) * dk_BTHK, -1)
  dfinal_BH = jnp.sum(dfinal_BHKV.astype(F32) * final_BHKV, (2, 3))
  if log_gamma.ndim == 1:
    pos_T = jnp.arange(1, Tp + 1, dtype=F32)
    dlog_gamma = jnp.einsum('bth,t->h', da_BTH, pos_T) + length * jnp.sum(dfinal_BH, 0)
  else:
    da_BTH = da_BTH.at[:, length - 1].add(dfinal_BH)
    if reset_BT is None:
      dlog_gamma = jnp.flip(jnp.cumsum(jnp.flip(da_BTH, 1), axis=1), 1)
    else:  # A reset's γ multiplies a zero state: its gradient is exactly zero.
      dlog_gamma = jnp.where(reset_BT[..., None] > 0.5, 0.0,
                             _segment_sums_from_end(da_BTH, reset_BT))
  return (dq_BTHK.astype(q_BTHK.dtype), dk_BTHK.astype(k_BTHK.dtype),
          dv_BTV.reshape(B, Tp, H, V), dlog_gamma.astype(log_gamma.dtype),
          dstate_BHKV.astype(state_BHKV.dtype), tuple(jnp.zeros_like(x) for x in segments),
          None if reset_BT is None else jnp.zeros_like(reset_BT))


_fused.defvjp(_fused_fwd, _fused_bwd)


# ----------------------------------------------------------------------------------------------
# Public entry points.


def chunkwise(q, k, v, log_gamma, state=None, *, reset=None, chunk_size=64, target=None,
              interpret=False, block_v=None, block_k=None):
  """Chunkwise retention (eq. 7) by the fused kernels; the semantics of `retention.chunkwise`.

  target: the lowering the kernels are built for, 'gpu' (Triton) or 'tpu' (Mosaic). Given, it is
  built for that target whether or not this process has its backend (e.g. compiled for TPU
  devices from a CPU host); None takes the default backend's and refuses without a GPU or TPU
  unless interpret. interpret: run the kernels in the Pallas interpreter (any platform; tests).
  block_v: value columns per program (`default_block_v`: at most 64 on GPU, 16 in float32, 128 on
  TPU). block_k: key columns per program of the backward passes, and of the forward in float32,
  with resets or per token (`forward_block_k`; `default_block_k`: at most 64 on GPU, 16 in
  float32, all of K on TPU). Interpret mode takes any shape; compiled, `unsupported` must be None.
  log_gamma [H] or [B, T, H] and reset [B, T] bool, as in `retention`.
  """
  B, T, H, K, V = retention.check_shapes(q, k, v, log_gamma, state, reset)
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be positive; got {chunk_size}.')
  if target is None:
    backend = jax.default_backend()
    if not interpret and backend not in TARGETS:
      raise ValueError(f'No GPU or TPU (backend {backend!r}): the kernel runs here only with '
                       'interpret=True, or built for an explicit target.')
    target = 'tpu' if backend == 'tpu' else 'gpu'
  if target not in TARGETS:
    raise ValueError(f'target must be one of {TARGETS}; got {target!r}.')
  block_v = block_v or default_block_v(V, target, K, v.dtype)
  block_k = block_k or default_block_k(K, target, v.dtype)
  if K % block_k or (target == 'tpu' and block_k != K):
    raise ValueError(f'block_k {block_k} must divide K = {K} (and be K on TPU).')
  if not interpret and backend_unavailable(target):
    raise ValueError(f'The Pallas retention kernel cannot run: {backend_unavailable(target)}.')
  why = unsupported(H, K, V, chunk_size, v.dtype, target, block_v)
  if why and not interpret:
    raise ValueError(f'The Pallas retention kernel does not support {why}.')
  if state is None:
    state = retention.zero_state(B, H, K, V)
  q, k = q.astype(v.dtype), k.astype(v.dtype)  # o has v's dtype.
  pad = -T % chunk_size
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
  log_gamma = log_gamma.astype(F32)
  if retention.per_token(log_gamma) and pad:  # Padded tokens keep the state: log γ = 0.
    log_gamma = jnp.pad(log_gamma, ((0, 0), (0, pad), (0, 0)))
  segments = () if reset is None else _segment_inputs(reset, T + pad, chunk_size)
  # Only a per-token d log γ needs the resets themselves (the segmented sum in `_fused_bwd`).
  reset_BT = (jnp.pad(reset.astype(F32), ((0, 0), (0, pad)))
              if reset is not None and retention.per_token(log_gamma) else None)
  o_BTHV, final_BHKV = _fused(q, k, v, log_gamma, state.astype(F32), segments, reset_BT,
                              (chunk_size, T, target, block_v, block_k), interpret)
  return (o_BTHV[:, :T] if pad else o_BTHV), final_BHKV
