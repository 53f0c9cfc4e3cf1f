"""Name, shape and tree checks shared by every format; the one error type."""

from __future__ import annotations

import os
import re

import jax
import numpy as np

from retnet_jax import model as model_lib

IGNORED_KEYS = ('version',)  # fairseq bookkeeping, not weights.


class ConversionError(ValueError):
  """A checkpoint that does not fit the expected layout, or an unsupported feature."""


def check_names_and_shapes(state_dict: dict, expected: dict[str, tuple], where: str,
                           optional: tuple[str, ...] = ()) -> None:
  """Raises one ConversionError listing every missing, unexpected and misshapen tensor."""
  problems = []
  missing = [n for n in expected if n not in state_dict and n not in optional]
  unexpected = [n for n in state_dict if n not in expected and n.split('.')[-1] not in IGNORED_KEYS]
  if missing:
    problems.append(f'missing tensors ({len(missing)}): {", ".join(missing[:12])}'
                    + (' ...' if len(missing) > 12 else ''))
  if unexpected:
    problems.append(f'unexpected tensors ({len(unexpected)}): {", ".join(sorted(unexpected)[:12])}'
                    + (' ...' if len(unexpected) > 12 else ''))
  for name, shape in expected.items():
    if name in state_dict and tuple(state_dict[name].shape) != tuple(shape):
      problems.append(f'{name}: expected shape {tuple(shape)}, got {tuple(state_dict[name].shape)}')
  if problems:
    raise ConversionError(f'{where} does not fit the expected layout:\n  ' + '\n  '.join(problems))


def layer_count(state_dict: dict, pattern: str, where: str) -> int:
  indices = {int(m.group(1)) for n in state_dict if (m := re.match(pattern, n))}
  if not indices:
    raise ConversionError(f'{where}: no layer tensors (names like {pattern!r}).')
  if indices != set(range(max(indices) + 1)):
    raise ConversionError(f'{where}: layer indices {sorted(indices)} are not 0..{max(indices)}.')
  return len(indices)


def need(state_dict: dict, name: str, where: str, hint: str = '') -> np.ndarray:
  if name not in state_dict:
    some = ', '.join(sorted(state_dict)[:6])
    raise ConversionError(f'{where}: missing tensor {name!r}{hint} (it has: {some} ...).')
  return state_dict[name]


def check_params(params, cfg: model_lib.ModelConfig) -> None:
  """The converted tree must be exactly the model's parameter tree."""
  abstract = model_lib.abstract_params(cfg)
  want = jax.tree.map(lambda a: tuple(a.shape), abstract)
  got = jax.tree.map(lambda a: tuple(a.shape), params)
  if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
    raise ConversionError(f'internal: converted parameters {got} do not fit the model {want}.')


def check_output_dir(output: str) -> None:
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise ConversionError(f'output {output!r} exists and is not an empty directory.')
