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
"""

from __future__ import annotations

from typing import NamedTuple

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
  why = retention_pallas.unsupported(H, K, V, chunk_size, dtype, target)
  if why:
    return Choice('xla', None, f'the {target} kernel does not support {why}')
  return Choice('pallas', target, f'platform {platform}: the kernel supports these shapes')


def retention(q, k, v, log_gamma, state=None, *, reset=None, form='chunkwise', chunk_size=64,
              impl='auto'):
  """Retention in `form` by the implementation `choose` picks; (o [B, T, H, V], state [B, H, K, V]).

  Shapes as in `retention`: q, k [B, T, H, K]; v [B, T, H, V]; log_gamma [H]; state f32 or None
  (zero); reset [B, T] bool or None.
  """
  B, T, H, K, V = ref.check_shapes(q, k, v, log_gamma, state, reset)
  choice = choose(q.shape, v.shape, v.dtype, form=form, chunk_size=chunk_size, impl=impl)
  if choice.impl == 'skip':
    return v, (ref.zero_state(B, H, K, V) if state is None else state)
  if choice.impl == 'xla':
    options = {'chunk_size': chunk_size} if form == 'chunkwise' else {}
    return ref.FORMS[form](q, k, v, log_gamma, state, reset=reset, **options)
  if state is None:
    state = ref.zero_state(B, H, K, V)
  kernel = lambda q, k, v, g, s, *r: retention_pallas.chunkwise(
      q, k, v, g, s, reset=(r or (None,))[0], chunk_size=chunk_size, target=choice.target,
      interpret=choice.interpret)
  bthk, bhkv = ('batch', None, 'heads', None), ('batch', 'heads', None, None)
  resets = () if reset is None else (reset,)  # shard_map takes arrays, not None.
  in_axes = (bthk, bthk, bthk, ('heads',), bhkv) + (('batch', None),) * len(resets)
  run = sharding.per_shard(kernel, in_axes, (bthk, bhkv))
  return run(q, k, v, log_gamma, state, *resets)
