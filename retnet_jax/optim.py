"""The optimiser: AdamW with global-norm clipping over a warmup-then-decay learning-rate schedule,
over all parameters or only those whose path matches `optim.trainable`."""

from __future__ import annotations

import re

import jax
import numpy as np
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


STACKED = ('blocks', 'self_blocks', 'cross_blocks')  # Leaves with a leading [repeats] axis.


def trainable_mask(pattern: str | None, params):
  """Per parameter: True where `pattern` matches its path ('blocks/retention/wq', 'head', ...;
  re.search), else for a stacked layer parameter (under `STACKED`) a bool array [R] of the repeats
  whose path with the index appended ('blocks/retention/wq/23') it matches, else False. All True
  for an empty pattern; a pattern that matches nothing is an error."""
  if not pattern:
    return jax.tree.map(lambda _: True, params)
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(f'config.optim.trainable {pattern!r} is not a regular expression: {e}.') from e
  name = lambda keys: '/'.join(str(getattr(k, 'key', k)) for k in keys)

  def leaf(keys, x):
    path = name(keys)
    if regex.search(path):
      return True
    if name(keys[:1]) in STACKED:
      rows = np.array([bool(regex.search(f'{path}/{r}')) for r in range(x.shape[0])])
      return rows if rows.any() else False
    return False

  mask = jax.tree_util.tree_map_with_path(leaf, params)
  if not any(m is True or isinstance(m, np.ndarray) for m in jax.tree.leaves(mask)):
    paths = [name(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    raise ValueError(f'config.optim.trainable {pattern!r} matches no parameter; paths: {paths}.')
  return mask


def apply_mask(tree, mask):
  """`tree` with what `mask` (trainable_mask's) freezes set to zero: whole leaves, or the frozen
  repeats of a stacked leaf."""
  def one(x, m):
    if isinstance(m, np.ndarray):
      return x * m.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    return x if m else jax.numpy.zeros_like(x)
  return jax.tree.map(one, tree, mask)


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
    # A stacked leaf with some repeats trainable keeps its optimiser state; its frozen repeats get
    # zero gradients (train.py) and, so that weight decay cannot move them, zero updates.
    labels = lambda params: jax.tree.map(lambda m: 'frozen' if m is False else 'train',
                                         trainable_mask(pattern, params))
    freeze = optax.stateless(
        lambda updates, params: apply_mask(updates, trainable_mask(pattern, updates)))
    tx = optax.multi_transform({'train': optax.chain(tx, freeze), 'frozen': optax.set_to_zero()},
                               labels)
  return tx, schedule
