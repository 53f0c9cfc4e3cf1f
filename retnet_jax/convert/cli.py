"""The command: `python -m retnet_jax.convert --from=FORMAT ... | --to=FORMAT ...`."""

from __future__ import annotations

import argparse
import os
import sys

from absl import logging
import jax
import numpy as np

from retnet_jax import checkpoint
from retnet_jax.convert import checks
from retnet_jax.convert import fla
from retnet_jax.convert import reading
from retnet_jax.convert import torchscale
from retnet_jax.convert.checks import ConversionError
from retnet_jax.convert.layout import NP_DTYPES

# Each format module has import_weights(input, config_json, param_dtype, trust_pickle) ->
# (params, ModelConfig, Hugging Face config or None); exporters have export_weights(params, cfg,
# output, meta) -> a description of what they wrote.
SOURCES = {'torchscale': torchscale, 'fla': fla}
TARGETS = {'torchscale': torchscale, 'fla': fla}


def import_checkpoint(source: str, input_path: str, output: str, config_json: str | None = None,
                      param_dtype: str = 'float32', trust_pickle: bool = False):
  """Converts `input_path` from `source` ('torchscale' | 'fla') into an orbax dir `output`.

  Returns (params, ModelConfig, extra_meta).
  """
  if source not in SOURCES:
    raise ConversionError(f'unknown source {source!r}; expected one of {sorted(SOURCES)}.')
  if param_dtype not in NP_DTYPES:
    raise ConversionError(f'param_dtype must be one of {sorted(NP_DTYPES)}; got {param_dtype!r}.')
  if not os.path.exists(input_path):
    raise ConversionError(f'input {input_path!r} does not exist.')
  checks.check_output_dir(output)
  params, cfg, hf_config = SOURCES[source].import_weights(input_path, config_json, param_dtype,
                                                         trust_pickle)
  directory = input_path if os.path.isdir(input_path) else os.path.dirname(os.path.abspath(input_path))
  meta = {'source': {'format': source, 'input': os.path.abspath(input_path)}}
  tokenizer = reading.read_tokenizer(directory, hf_config)
  if tokenizer is not None:
    if tokenizer.get('vocab_size', 0) > cfg.vocab_size:
      logging.warning('tokenizer has %d ids but the model only %d embeddings.',
                      tokenizer['vocab_size'], cfg.vocab_size)
    meta['tokenizer'] = tokenizer
  checkpoint.save_params(output, params, cfg, extra_meta=meta)
  return params, cfg, meta


def export_checkpoint(target: str, input_dir: str, output: str, step: int | None = None) -> str:
  """Writes the orbax checkpoint `input_dir` (a workdir or a checkpoints directory) at `step`
  (default the latest) in `target`'s format at `output`; says what it wrote."""
  if target not in TARGETS:
    raise ConversionError(f'unknown target {target!r}; expected one of {sorted(TARGETS)}.')
  params, cfg, meta = checkpoint.load_params(input_dir, step=step)
  params = jax.tree.map(np.asarray, params)
  return TARGETS[target].export_weights(params, cfg, output, meta)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m retnet_jax.convert',
      description='Import torchscale / fla RetNet weights into an orbax checkpoint, or export one '
                  'to torchscale / fla.')
  parser.add_argument('--from', dest='source', choices=sorted(SOURCES), help='import from this format')
  parser.add_argument('--to', dest='target', choices=sorted(TARGETS), help='export to this format')
  parser.add_argument('--input', required=True,
                      help='import: .pt / .safetensors / directory; export: orbax directory')
  parser.add_argument('--output', required=True, help='import: new orbax directory; export: torchscale .pt file, fla directory')
  parser.add_argument('--config_json', default=None,
                      help='torchscale: JSON of RetNetConfig fields; fla: its config.json')
  parser.add_argument('--step', type=int, default=None,
                      help='export: the checkpoint step to write (default the latest)')
  parser.add_argument('--param_dtype', default='float32', choices=sorted(NP_DTYPES))
  parser.add_argument('--trust_pickle', action='store_true',
                      help='let torch unpickle arbitrary objects (fairseq args); trusted files only')
  a = parser.parse_args(argv)
  if (a.source is None) == (a.target is None):
    parser.error('give exactly one of --from and --to.')
  if a.source and a.step is not None:
    parser.error('--step selects the checkpoint to export; an import writes step 0.')
  try:
    if a.source:
      _, cfg, meta = import_checkpoint(a.source, a.input, a.output, a.config_json, a.param_dtype,
                                       a.trust_pickle)
      print(f'wrote {a.output}: {cfg}' + (' with tokenizer' if 'tokenizer' in meta else ''))
    else:
      print(f'wrote {export_checkpoint(a.target, a.input, a.output, a.step)}')
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0

