r"""Entry point: flags in, `train.train_and_evaluate(config, workdir)` out.

  python -m retnet_jax.main --config=configs/retnet_tiny.py --workdir=/tmp/retnet_tiny
  python -m retnet_jax.main --config=configs/retnet_tiny.py:gamma=lm --config.total_steps=100 ...
  python -m retnet_jax.main --config=configs/retnet_tiny.py --workdir=/tmp/retnet_tiny --mode=eval
  python -m retnet_jax.main --config=configs/retnet_tiny.py --workdir=/tmp/retnet_tiny \
      --mode=generate --prompt=$'def fib(n):\n' [--prompt=... | --prompt_file=prompts.jsonl] \
      [--max_new_tokens=200 --temperature=0.7 --top_k=0 --top_p=0.9 --seed=0]
  python -m retnet_jax.main --config=configs/retnet_paper.py:1.3b --workdir=/tmp/aot \
      --mode=compile --topology=v5p-32        (or --mode=compile_generate [--decode_batch=64,256])
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from retnet_jax import aot
from retnet_jax import generate
from retnet_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path.py[:arg]).',
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'generate', 'compile', 'compile_generate'],
                          'What to do; compile*: compile for --topology ahead of time (retnet_jax/aot.py).')
_TOPOLOGY = flags.DEFINE_string('topology', None, 'TPU slice to compile for: v5p-32, v5e:4x4, ...')
_DECODE_BATCH = flags.DEFINE_list('decode_batch', ['64', '256'], 'compile_generate: batch sizes.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', None, 'compile_generate: prompt length (seq_len).')
# --mode=generate: unset values come from config.generate.
_PROMPT = flags.DEFINE_multi_string('prompt', None, 'Prompt text to continue (repeatable).')
_PROMPT_FILE = flags.DEFINE_string(
    'prompt_file', None, 'One prompt per line, or a .jsonl of strings / {"prompt": ...} objects.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', None, 'Tokens to generate per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', None, 'Sampling temperature; 0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', None, 'Sample among the k most likely tokens; 0: all.')
_TOP_P = flags.DEFINE_float('top_p', None, 'Nucleus sampling mass; 1: off.')
_SEED = flags.DEFINE_integer('seed', None, 'Sampling seed.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Generated text owns stdout; logs go to stderr then.
  logging.get_absl_handler().python_handler.stream = (
      sys.stderr if _MODE.value == 'generate' else sys.stdout)
  try:
    if _MODE.value.startswith('compile') and not _TOPOLOGY.value:
      raise ValueError('--mode=compile needs --topology (e.g. v5p-32, v5e-16, v4-32, v6e-8).')
    if _MODE.value == 'train':
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    elif _MODE.value == 'compile':
      aot.compile_train(_CONFIG.value, _WORKDIR.value, _TOPOLOGY.value)
    elif _MODE.value == 'compile_generate':
      aot.compile_generate(_CONFIG.value, _WORKDIR.value, _TOPOLOGY.value,
                           batch_sizes=[int(b) for b in _DECODE_BATCH.value],
                           prompt_len=_PROMPT_LEN.value, max_new_tokens=_MAX_NEW_TOKENS.value)
    elif _MODE.value == 'generate':
      generate.generate_text(
          _CONFIG.value, _WORKDIR.value, generate.read_prompts(_PROMPT.value, _PROMPT_FILE.value),
          max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
          top_p=_TOP_P.value, seed=_SEED.value)
    else:
      train.evaluate(_CONFIG.value, _WORKDIR.value)
  except ValueError as e:  # Bad configs, data, workdirs or checkpoints: one clear line.
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
