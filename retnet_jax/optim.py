"""The optimiser: AdamW with global-norm clipping over a warmup-then-decay learning-rate schedule."""

from __future__ import annotations

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


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with global-norm clipping (the paper: β = (0.9, 0.98), weight decay 0.05, clip 2.0)."""
  schedule = learning_rate_schedule(optim, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=_decay_mask))
  return tx, schedule
