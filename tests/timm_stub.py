"""A stand-in for `timm`, which torchscale imports only for `timm.models.layers.drop_path`.

timm needs torchvision, which has no CPU wheel here; `install()` puts this module's `drop_path`
under the names torchscale imports, unless a real timm is importable.
"""

import sys
import types


def drop_path(x, drop_prob=0.0, training=False, scale_by_keep=True):
  """Stochastic depth: zeroes whole samples of x [B, ...] with probability drop_prob in training."""
  if drop_prob == 0.0 or not training:
    return x
  keep = 1.0 - drop_prob
  mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
  return x * mask / keep if scale_by_keep else x * mask


def install() -> None:
  try:
    import timm.models.layers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return
  except ImportError:
    pass
  timm = types.ModuleType('timm')
  models = types.ModuleType('timm.models')
  layers = types.ModuleType('timm.models.layers')
  layers.drop_path = drop_path
  timm.models, models.layers = models, layers
  sys.modules.update({'timm': timm, 'timm.models': models, 'timm.models.layers': layers})
