"""Decay (γ) schedules: one γ_h ∈ (0, 1] per head, chosen by name in the config.

- `retnet`:    γ_h = 1 − 2^(−5−h)                                  (paper eq. 8, torchscale)
- `lm`:        γ = 1 − exp(linspace(log 1/32, log 1/512, H))       (the paper's language-model runs)
- `uniform`:   one γ for every head, default 1 − 2^−6.5             (Table 6, "− multi-scale decay")
- `none`:      γ = 1                                               (Table 6, "− γ decay")
- `learnable`: trained as log(−log γ), so γ stays inside (0, 1); initialised from `init`
- `custom`:    an explicit list of H values

and, outside these fixed schedules, `gated` (GATED): a γ per token and head computed from the input,
log γ_t = logsigmoid(x_t W_γ) / τ (YOCO, Sun et al. 2024; fla's simple GLA), see `gate`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ('retnet', 'lm', 'uniform', 'none', 'learnable', 'custom')
GATED = 'gated'
UNIFORM_DEFAULT = 1.0 - 2.0**-6.5


def gate(logits, temperature: float = 16.0, floor: float | None = None):
  """log γ_t = max(logsigmoid(logits) / temperature, floor), float32; logits [..., H] = x_t W_γ.

  Always ≤ 0 (γ_t ∈ (0, 1)); with τ = 16 (YOCO) logits near 0 give γ_t ≈ 2^(−1/16) ≈ 0.96, and no
  logit gives less than exp(logsigmoid(logit) / 16). floor (a log γ < 0, optional) keeps a head
  from forgetting faster than γ = exp(floor); its gradient is zero where it binds.
  """
  log_gamma = jax.nn.log_sigmoid(jnp.asarray(logits, jnp.float32)) / temperature
  return log_gamma if floor is None else jnp.maximum(log_gamma, floor)


def gammas(schedule: str, num_heads: int, *, value: float | None = None,
           values: tuple[float, ...] = (), init: str = 'retnet') -> np.ndarray:
  """The schedule's γ for each head, float64 [H]. For `learnable`, the initial values."""
  H = num_heads
  if schedule == 'retnet':
    g = 1.0 - 2.0 ** (-5.0 - np.arange(H, dtype=np.float64))
  elif schedule == 'lm':
    g = 1.0 - np.exp(np.linspace(np.log(1 / 32), np.log(1 / 512), H))
  elif schedule == 'uniform':
    g = np.full(H, UNIFORM_DEFAULT if value is None else value, np.float64)
  elif schedule == 'none':
    g = np.ones(H, np.float64)
  elif schedule == 'custom':
    if len(values) != H:
      raise ValueError(f'gamma schedule "custom" needs one value per head ({H}); got {len(values)}.')
    g = np.asarray(values, np.float64)
  elif schedule == GATED:
    raise ValueError('gamma schedule "gated" decays per token: it has no fixed γ per head.')
  elif schedule == 'learnable':
    if init in ('learnable', 'none'):
      raise ValueError(f'a learnable γ cannot start from schedule {init!r}: it needs γ < 1.')
    g = gammas(init, H, value=value, values=values)
    if np.any(g >= 1.0):
      raise ValueError(f'a learnable γ needs every initial γ < 1; got {g.tolist()}.')
  else:
    raise ValueError(f'Unknown gamma schedule {schedule!r}; expected one of {SCHEDULES}.')
  if np.any(g <= 0.0) or np.any(g > 1.0):
    raise ValueError(f'every γ must lie in (0, 1]; schedule {schedule!r} gave {g.tolist()}.')
  return g


def log_gammas(schedule: str, num_heads: int, **kwargs) -> np.ndarray:
  return np.log(gammas(schedule, num_heads, **kwargs))


def effective_memory(gamma) -> np.ndarray:
  """1 / (1 − γ): the number of tokens a head effectively remembers (inf for γ = 1)."""
  gamma = np.asarray(gamma, np.float64)
  with np.errstate(divide='ignore'):
    return 1.0 / (1.0 - gamma)
