"""The one retention dispatcher: picks the form and the implementation, and places the call.

`retention(q, k, v, log_gamma, state=None, *, reset=None, form, chunk_size, impl)` runs one of the
reference forms of `retention` (XLA ops) or the fused Pallas kernel of `retention_pallas`, as
`choose` decides from the shapes and the platform of the devices the computation is placed on (the
active mesh's, `sharding.platform`; not `jax.default_backend()`, so that a CPU host can build for a
TPU mesh). Under a mesh the kernel runs per shard of batch and heads (`shard_map`): the compiler
does not partition a Pallas call. The model's retention layer makes this one call.

impl: 'auto' (the kernel where the platform is GPU/TPU and it supports the shapes, else XLA),
'xla', 'pallas' (the kernel always; interpreted off GPU/TPU, for tests), or 'skip', a
benchmark-only stand-in for "the step without the retention operator": o = v and the state passed
through (zero without one), so that a cost benchmark times everything else in the same step.

Sequence parallelism: where the rules map 'length' to a mesh axis of size n > 1 ('sequence'),
device j of that axis holds tokens [jL, (j+1)L). It runs the chunkwise form (XLA or the kernel) on
its block from a zero state, giving o_loc and U_j; with a_j = γ^L, or exp(Σ log γ_t over the block)
for a per-token decay (0 if the block holds a reset),
the state entering block j is S_j = a_{j−1} S_{j−1} + U_{j−1}, S_0 = the initial state. The
default exchange='scan' composes the maps S -> a_j S + U_j by a log-depth (Hillis–Steele) prefix
scan over `ppermute`: ⌈log2 n⌉ + 1 sends of one state per device; exchange='all_gather' gathers
every (U, a) (n − 1 states received per device) and folds them locally (docs/results.md has
both measured). The device then adds the cross term γ^{t+1} q_t S_j, or exp(c_t) q_t S_j with c the
block's cumulative sum of log γ (zero from its block's first reset on). Gradients flow through the
collectives (a ppermute transposes to the reverse ppermute, an all-gather to a reduce-scatter).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from retnet_jax import retention as ref
from retnet_jax import retention_pallas
from retnet_jax import sharding

IMPLS = ('auto', 'xla', 'pallas', 'skip')


class Choice(NamedTuple):
  """How a retention call runs: impl 'pallas' | 'xla' | 'skip'; target 'gpu' | 'tpu' for the
  kernel (None otherwise); interpret: the kernel runs in the Pallas interpreter; reason: why."""
  impl: str
  target: str | None
  reason: str
  interpret: bool = False


def choose(q_shape, v_shape, dtype, *, form='chunkwise', chunk_size=64, impl='auto',
           platform=None) -> Choice:
  """The implementation of a retention call with q [B, T, H, K], v [B, T, H, V] of `dtype`.

  platform: that of the devices the call is placed on; by default `sharding.platform()`.
  """
  if form not in ref.FORMS:
    raise ValueError(f'Unknown retention form {form!r}; expected one of {sorted(ref.FORMS)}.')
  if impl not in IMPLS:
    raise ValueError(f'Unknown retention impl {impl!r}; expected one of {IMPLS}.')
  if impl == 'pallas' and form != 'chunkwise':
    raise ValueError(f'impl="pallas" is only for form="chunkwise"; got form={form!r}.')
  if impl == 'skip':
    return Choice('skip', None, 'impl="skip": benchmark stand-in, o = v')
  if impl == 'xla':
    return Choice('xla', None, 'impl="xla" asked for')
  if form != 'chunkwise':
    return Choice('xla', None, f'form {form!r} has no kernel')
  platform = platform or sharding.platform()
  on_accelerator = platform in retention_pallas.TARGETS
  target = platform if on_accelerator else 'gpu'
  if impl == 'pallas':
    how = f'compiled for {platform}' if on_accelerator else f'interpreted on {platform}'
    return Choice('pallas', target, f'impl="pallas" asked for, {how}', not on_accelerator)
  if not on_accelerator:
    return Choice('xla', None, f'platform {platform}: the kernel is compiled only for GPU/TPU')
  H, K, V = q_shape[2], q_shape[3], v_shape[-1]
  why = retention_pallas.backend_unavailable(target)
  if why:
    return Choice('xla', None, f'the {target} kernel is unavailable: {why}')
  why = retention_pallas.unsupported(H, K, V, chunk_size, dtype, target)
  if why:
    return Choice('xla', None, f'the {target} kernel does not support {why}')
  return Choice('pallas', target, f'platform {platform}: the kernel supports these shapes')


def retention(q, k, v, log_gamma, state=None, *, reset=None, form='chunkwise', chunk_size=64,
              impl='auto', exchange='scan'):
  """Retention in `form` by the implementation `choose` picks; (o [B, T, H, V], state [B, H, K, V]).

  Shapes as in `retention`: q, k [B, T, H, K]; v [B, T, H, V]; log_gamma [H] or [B, T, H] (per
  token); state f32 or None
  (zero); reset [B, T] bool or None. exchange: how blocks pass states under a sequence axis,
  'scan' or 'all_gather' (see above).
  """
  if exchange not in EXCHANGE_FNS:
    raise ValueError(f'Unknown sequence exchange {exchange!r}; expected one of '
                     f'{sorted(EXCHANGE_FNS)}.')
  B, T, H, K, V = ref.check_shapes(q, k, v, log_gamma, state, reset)
  choice = choose(q.shape, v.shape, v.dtype, form=form, chunk_size=chunk_size, impl=impl)
  if choice.impl == 'skip':
    return v, (ref.zero_state(B, H, K, V) if state is None else state)
  axis, n = sharding.sequence_axis()
  if n > 1:
    if form != 'chunkwise':
      raise ValueError(f'the sequence mesh axis ({n} devices) needs form="chunkwise"; got '
                       f'form={form!r}.')
    if T % (n * chunk_size):
      raise ValueError(f'sequence length {T} is not divisible by the sequence axis ({n}) times '
                       f'chunk_size ({chunk_size}).')
    return _sequence_parallel(q, k, v, log_gamma, state, reset, choice, axis, n, chunk_size,
                              exchange)
  if choice.impl == 'xla':
    options = {'chunk_size': chunk_size} if form == 'chunkwise' else {}
    return ref.FORMS[form](q, k, v, log_gamma, state, reset=reset, **options)
  if state is None:
    state = ref.zero_state(B, H, K, V)
  bthk, bhkv = ('batch', None, 'heads', None), ('batch', 'heads', None, None)
  resets = () if reset is None else (reset,)  # shard_map takes arrays, not None.
  gamma_axes = ('batch', None, 'heads') if ref.per_token(log_gamma) else ('heads',)
  in_axes = (bthk, bthk, bthk, gamma_axes, bhkv) + (('batch', None),) * len(resets)
  run = sharding.per_shard(_local(choice, chunk_size), in_axes, (bthk, bhkv))
  return run(q, k, v, log_gamma, state, *resets)


def _local(choice, chunk_size):
  """The chunkwise form on one device's block, (q, k, v, log γ, state, reset=None) -> (o, state)."""
  if choice.impl == 'xla':
    return lambda q, k, v, g, s, r=None: ref.chunkwise(q, k, v, g, s, reset=r, chunk_size=chunk_size)
  return lambda q, k, v, g, s, r=None: retention_pallas.chunkwise(
      q, k, v, g, s, reset=r, chunk_size=chunk_size, target=choice.target,
      interpret=choice.interpret)


def gather_and_fold(a_BH, u_BHKV, s0_BHKV, axis, n):
  """(S_j entering this device's block, S_n): all-gather every block's (a, U), fold locally.

  Inside a shard_map over `axis` (n devices); a [B, H], u and s0 [B, H, K, V] float32: this block's
  decay over its length (0 after a reset), its final state from zero, and the initial state.
  """
  u_NBHKV = jax.lax.all_gather(u_BHKV, axis)
  a_NBH = jax.lax.all_gather(a_BH, axis)
  s_BHKV, before = s0_BHKV, []
  for i in range(n):
    before.append(s_BHKV)
    s_BHKV = a_NBH[i][..., None, None] * s_BHKV + u_NBHKV[i]
  return jnp.stack(before)[jax.lax.axis_index(axis)], s_BHKV


def prefix_scan(a_BH, u_BHKV, s0_BHKV, axis, n):
  """(S_j entering this device's block, S_n) by a Hillis–Steele scan of the maps S -> a S + U;
  the arguments of `gather_and_fold`.

  After round r device j holds the composition of blocks max(0, j − 2^r + 1)..j; one shift by a
  device then turns the inclusive prefixes into the exclusive ones.
  """
  j = jax.lax.axis_index(axis)
  d = 1
  while d < n:
    shift = [(i, i + d) for i in range(n - d)]  # Devices below d receive zeros: U += a·0.
    a_prev, u_prev = jax.lax.ppermute((a_BH, u_BHKV), axis, shift)
    u_BHKV = a_BH[..., None, None] * u_prev + u_BHKV  # First the earlier blocks, then this one.
    a_BH = jnp.where(j >= d, a_BH * a_prev, a_BH)
    d *= 2
  s_BHKV = a_BH[..., None, None] * s0_BHKV + u_BHKV  # The state leaving this device's block.
  entering = jax.lax.ppermute(s_BHKV, axis, [(i, i + 1) for i in range(n - 1)])
  entering = jnp.where(j == 0, s0_BHKV, entering)
  final = jax.lax.psum(jnp.where(j == n - 1, s_BHKV, 0.0), axis)  # Dropped when unused.
  return entering, final


EXCHANGE_FNS = {'all_gather': gather_and_fold, 'scan': prefix_scan}


def _sequence_parallel(q, k, v, log_gamma, state, reset, choice, axis, n, chunk_size, exchange):
  """Chunkwise retention with the length split over mesh axis `axis` (n devices): see above."""
  B, T, H, K, V = ref.check_shapes(q, k, v, log_gamma, state, reset)
  L = T // n
  local = _local(choice, chunk_size)
  with_state, with_reset = state is not None, reset is not None
  gated = ref.per_token(log_gamma)

  def block(q_BLHK, k_BLHK, v_BLHV, log_gamma, *rest):
    rest = list(rest)
    s_in_BHKV = rest.pop(0) if with_state else None
    reset_BL = rest.pop(0) if with_reset else None
    b, _, h, kd = q_BLHK.shape
    zero = ref.zero_state(b, h, kd, v_BLHV.shape[-1])
    o_BLHV, u_BHKV = local(q_BLHK, k_BLHK, v_BLHV, log_gamma, zero, reset_BL)
    if gated:  # a_j = exp(Σ log γ over the block); the cross term's weight exp(c_t).
      c_BLH = jnp.cumsum(log_gamma.astype(jnp.float32), axis=1)
      carry_BH, q_weight_BLH = jnp.exp(c_BLH[:, -1]), jnp.exp(c_BLH)
    else:
      g_H = log_gamma.astype(jnp.float32)
      carry_BH = jnp.broadcast_to(jnp.exp(L * g_H), (b, h))
      t_L = jnp.arange(L, dtype=jnp.float32)
      q_weight_BLH = jnp.broadcast_to(jnp.exp((t_L[:, None] + 1) * g_H), (b, L, h))
    if reset_BL is not None:
      open_BL = ref.segments(reset_BL) == 0  # Tokens before the block's first reset.
      carry_BH = carry_BH * open_BL[:, -1:]
      q_weight_BLH = q_weight_BLH * open_BL[..., None]
    s0_BHKV = zero if s_in_BHKV is None else s_in_BHKV.astype(jnp.float32)
    scan = EXCHANGE_FNS[exchange]
    entering_BHKV, s_BHKV = scan(carry_BH, u_BHKV.astype(jnp.float32), s0_BHKV, axis, n)
    q_BLHK32 = q_BLHK.astype(jnp.float32) * q_weight_BLH[..., None]
    cross_BLHV = jnp.einsum('blhk,bhkv->blhv', q_BLHK32, entering_BHKV)
    o_BLHV = (o_BLHV.astype(jnp.float32) + cross_BLHV).astype(o_BLHV.dtype)
    return o_BLHV, s_BHKV

  spec = lambda axes, x: sharding.logical_to_spec(axes, sharding.active_rules(),
                                                  sharding.active_mesh(), x.shape)
  bthk = ('batch', 'length', 'heads', None)
  bhkv = ('batch', 'heads', None, None)
  gamma_axes = ('batch', 'length', 'heads') if gated else ('heads',)
  args, in_specs = [q, k, v, log_gamma], [spec(bthk, q), spec(bthk, k), spec(bthk, v),
                                          spec(gamma_axes, log_gamma)]
  if with_state:
    args.append(state)
    in_specs.append(spec(bhkv, state))
  if with_reset:
    args.append(reset)
    in_specs.append(spec(('batch', 'length'), reset))
  for s_ in in_specs[:3]:
    if s_[1] != axis:
      raise ValueError(f'the sequence axis {axis!r} does not split length {T} of {q.shape}.')
  out_specs = (spec(bthk, v), spec(bhkv, jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)))
  return jax.shard_map(block, mesh=sharding.active_mesh(), in_specs=tuple(in_specs),
                       out_specs=out_specs, check_vma=False)(*args)
