"""Reading weights (torch .pt / .bin, safetensors), JSON and a Hugging Face tokenizer."""

from __future__ import annotations

import glob
import json
import os

from absl import logging
import ml_dtypes
import numpy as np

from retnet_jax.convert.checks import ConversionError


def _torch_to_numpy(t):
  import torch  # pylint: disable=g-import-not-at-top
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.float().numpy().astype(ml_dtypes.bfloat16)
  return t.numpy()


def _torch_load(path: str, trust_pickle: bool = False):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f'reading {path!r} needs torch (pip install -e ".[torch]").') from e
  try:
    return torch.load(path, map_location='cpu', weights_only=not trust_pickle)
  except Exception as e:  # pickle errors come in many types.
    hint = '' if trust_pickle else (
        ' If it is a fairseq checkpoint (its args are pickled objects) from a source you trust, '
        'pass --trust_pickle.')
    raise ConversionError(f'cannot read {path!r}: {type(e).__name__}: {e}.{hint}') from e


def _tensors_to_numpy(tree, where):
  out = {}
  for name, value in tree.items():
    if hasattr(value, 'detach'):
      out[name] = _torch_to_numpy(value)
    elif isinstance(value, np.ndarray):
      out[name] = value
    else:
      raise ConversionError(f'{where}: entry {name!r} is a {type(value).__name__}, not a tensor.')
  return out


def _safetensors_files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    return [os.path.join(path, s) for s in shards]
  return sorted(glob.glob(os.path.join(path, '*.safetensors')))


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file, or of a directory's shards, as NumPy arrays (no torch)."""
  try:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError('reading .safetensors needs the safetensors package '
                          '(pip install -e ".[convert]").') from e
  files = _safetensors_files(path)
  if not files:
    raise ConversionError(f'no .safetensors file in {path!r}.')
  out = {}
  for f in files:
    try:
      tensors = load_file(f)
    except Exception as e:  # safetensors raises its own error types.
      raise ConversionError(f'cannot read {f!r}: {type(e).__name__}: {e}') from e
    for name in set(out) & set(tensors):
      raise ConversionError(f'tensor {name!r} appears in two shards (the second: {f!r}).')
    out.update(tensors)
  return out


def read_state_dict(path: str, trust_pickle: bool = False) -> tuple[dict[str, np.ndarray], dict]:
  """(state dict as NumPy arrays, args found in the checkpoint) from a file or a directory.

  .safetensors (or a directory of them) needs no torch; .pt / .bin files need it. A fairseq
  checkpoint's weights are under 'model' and its args under 'cfg'['model'] or 'args'.
  """
  if not os.path.exists(path):
    raise ConversionError(f'input {path!r} does not exist.')
  if os.path.isdir(path) or path.endswith('.safetensors'):
    if _safetensors_files(path):
      return read_safetensors(path), {}
    bins = sorted(glob.glob(os.path.join(path, '*.bin')) + glob.glob(os.path.join(path, '*.pt')))
    if not bins:
      raise ConversionError(f'no .safetensors, .bin or .pt weights in directory {path!r}.')
    merged = {}
    for b in bins:
      sd, _ = read_state_dict(b, trust_pickle)
      merged.update(sd)
    return merged, {}
  raw = _torch_load(path, trust_pickle)
  if not isinstance(raw, dict):
    raise ConversionError(f'{path!r} holds a {type(raw).__name__}, not a state dict.')
  args = {}
  if isinstance(raw.get('model'), dict):  # fairseq
    cfg = raw.get('cfg')
    model_args = cfg.get('model') if hasattr(cfg, 'get') else None
    if model_args is None:
      model_args = raw.get('args')
    if model_args is not None:
      args = dict(model_args.items()) if hasattr(model_args, 'items') else dict(vars(model_args))
    raw = raw['model']
  return _tensors_to_numpy(raw, path), args


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConversionError(f'cannot read JSON {path!r}: {e}') from e
  if not isinstance(value, dict):
    raise ConversionError(f'{path!r} must hold a JSON object.')
  return value


def read_tokenizer(directory: str, hf_config: dict | None = None) -> dict | None:
  """The meta entry for `<directory>/tokenizer.json` (see the module docstring), or None."""
  path = os.path.join(directory, 'tokenizer.json')
  if not os.path.isfile(path):
    return None
  info = {'kind': 'huggingface', 'path': os.path.abspath(path)}
  for key in ('bos_token_id', 'eos_token_id', 'pad_token_id'):
    if (hf_config or {}).get(key) is not None:
      info[key] = hf_config[key]
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning('%s found but the tokenizers package is not installed: meta keeps its path only.',
                    path)
    return info
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises plain Exception for bad files.
    raise ConversionError(f'cannot load tokenizer {path!r}: {e}') from e
  info['vocab_size'] = tok.get_vocab_size()
  info['json'] = tok.to_str()
  return info


def load_hf_tokenizer(meta: dict):
  """The Hugging Face `tokenizers.Tokenizer` stored in a converted checkpoint's meta, or None if there
  is none (`lm_eval.load_tokenizer` wraps the same meta in this package's tokenizer interface)."""
  info = meta.get('tokenizer')
  if not info:
    return None
  import tokenizers  # pylint: disable=g-import-not-at-top
  if 'json' in info:
    return tokenizers.Tokenizer.from_str(info['json'])
  return tokenizers.Tokenizer.from_file(info['path'])
