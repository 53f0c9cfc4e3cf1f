"""The optimiser: AdamW with global-norm clipping over a warmup-then-decay learning-rate schedule,
over all parameters or only those whose path matches `optim.trainable`."""

from __future__ import annotations

import re

import jax
import optax


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine or linear decay to end_lr_fraction of it."""
  peak, warmup = optim.learning_rate, min(optim.warmup_steps, total_steps)
  end = peak * optim.get('end_lr_fraction', 0.1)
  decay_steps = max(total_steps - warmup, 1)
  if optim.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
  elif optim.schedule == 'linear':
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif optim.schedule == 'constant':
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optim.schedule must be 'cosine', 'linear' or 'constant'; got {optim.schedule!r}.")
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _decay_mask(params):
  """Weight decay on matrices only: not on norm scales or the learnable decay rates."""
  def keep(path, _):
    name = getattr(path[-1], 'key', '')
    return name not in ('scale', 'decay_log_rate')
  return jax.tree_util.tree_map_with_path(keep, params)


def trainable_mask(pattern: str | None, params):
  """True for each parameter whose path ('blocks/retention/wq', 'head', ...) `pattern` matches
  (re.search); all True for an empty pattern. A pattern that matches nothing is an error."""
  if not pattern:
    return jax.tree.map(lambda _: True, params)
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(f'config.optim.trainable {pattern!r} is not a regular expression: {e}.') from e
  name = lambda keys: '/'.join(str(getattr(k, 'key', k)) for k in keys)
  mask = jax.tree_util.tree_map_with_path(lambda keys, _: bool(regex.search(name(keys))), params)
  if not any(jax.tree.leaves(mask)):
    paths = [name(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    raise ValueError(f'config.optim.trainable {pattern!r} matches no parameter; paths: {paths}.')
  return mask


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with global-norm clipping (the paper: β = (0.9, 0.98), weight decay 0.05, clip 2.0).

  With optim.trainable set, parameters it does not match get a zero update and no optimiser
  state (optax.multi_transform); clipping sees the trainable gradients only."""
  schedule = learning_rate_schedule(optim, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=_decay_mask))
  pattern = optim.get('trainable') or ''
  if pattern:
    labels = lambda params: jax.tree.map(lambda m: 'train' if m else 'frozen',
                                         trainable_mask(pattern, params))
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx, schedule
