r"""Entry point: flags in, `train.train_and_evaluate(config, workdir)` out.

  python -m retnet_jax.main --config=configs/retnet_tiny.py --workdir=/tmp/retnet_tiny
  python -m retnet_jax.main --config=configs/retnet_tiny.py:gamma=lm --config.total_steps=100 ...
  python -m retnet_jax.main --config=configs/retnet_tiny.py --workdir=/tmp/retnet_tiny --mode=eval
  python -m retnet_jax.main --config=configs/retnet_tiny.py --workdir=/tmp/retnet_tiny \
      --mode=generate --prompt=$'def fib(n):\n' [--prompt=... | --prompt_file=prompts.jsonl] \
      [--max_new_tokens=200 --temperature=0.7 --top_k=0 --top_p=0.9 --seed=0]
      [--repetition_penalty=1.3 --frequency_penalty=0 --presence_penalty=0]
  ... --step=N  (train: resume from step N; eval, generate: use step N; default the latest)

Exit status: 0 the run finished, 75 a signal stopped it after saving (rerun to resume), 1 an error
(one line on stderr: `error: ...`).
  python -m retnet_jax.main --config=configs/retnet_paper.py:1.3b --workdir=/tmp/aot \
      --mode=compile --topology=v5p-32        (or --mode=compile_generate [--decode_batch=64,256])
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from retnet_jax import aot
from retnet_jax import config_lib
from retnet_jax import generate
from retnet_jax import platform
from retnet_jax import preemption
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
_REPETITION_PENALTY = flags.DEFINE_float(
    'repetition_penalty', None, 'Divide a positive logit, multiply a negative one, of every token '
    'in the prompt or generated (Hugging Face); 1: off.')
_FREQUENCY_PENALTY = flags.DEFINE_float(
    'frequency_penalty', None, 'Subtract this times the count of a generated token; 0: off.')
_PRESENCE_PENALTY = flags.DEFINE_float(
    'presence_penalty', None, 'Subtract this from every token generated at least once; 0: off.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to resume, evaluate or generate from '
                             '(default: the latest).')


def check_config_overrides(argv) -> str | None:
  """The error for a `--config=` that does not load or the first `--config.a.b=...` key it lacks, or
  None. Runs before absl parses the flags, whose config parser would print a traceback instead."""
  path = None
  for arg in argv[1:]:
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1]
  if path is None:
    return None
  try:
    config = config_lib.load(path)
  except Exception as e:  # pylint: disable=broad-except  (the flag parser reports it again)
    return f'cannot load config {path!r}: {e}'
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      try:
        config_lib.lookup(config, arg[len('--config.'):].split('=', 1)[0])
      except ValueError as e:
        return str(e)
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Generated text owns stdout; logs go to stderr then.
  logging.get_absl_handler().python_handler.stream = (
      sys.stderr if _MODE.value == 'generate' else sys.stdout)
  try:
    if not _MODE.value.startswith('compile'):  # A compile sets up its own (deviceless) backend.
      platform.start(_CONFIG.value.mesh)
    if _MODE.value.startswith('compile') and not _TOPOLOGY.value:
      raise ValueError('--mode=compile needs --topology (e.g. v5p-32, v5e-16, v4-32, v6e-8).')
    if _MODE.value == 'train':
      result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, step=_STEP.value)
      if result['stopped']:
        sys.exit(preemption.EXIT_PREEMPTED)
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
          top_p=_TOP_P.value, seed=_SEED.value, step=_STEP.value,
          repetition_penalty=_REPETITION_PENALTY.value, frequency_penalty=_FREQUENCY_PENALTY.value,
          presence_penalty=_PRESENCE_PENALTY.value)
    else:
      train.evaluate(_CONFIG.value, _WORKDIR.value, step=_STEP.value)
  except ValueError as e:  # Bad configs, data, workdirs or checkpoints: one clear line.
    logging.error('%s', e)
    logging.debug('The traceback:', exc_info=True)  # Shown with --verbosity=1.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(preemption.EXIT_ERROR)


if __name__ == '__main__':
  problem = check_config_overrides(sys.argv)
  if problem:
    print(f'error: {problem}', file=sys.stderr)
    sys.exit(preemption.EXIT_ERROR)
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
