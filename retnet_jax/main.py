r"""Entry point: flags in, `train.train_and_evaluate(config, workdir)` out.

  python -m retnet_jax.main --config=configs/retnet_tiny.py --workdir=/tmp/retnet_tiny
  python -m retnet_jax.main --config=configs/retnet_tiny.py:gamma=lm --config.total_steps=100 ...
  python -m retnet_jax.main --config=configs/retnet_tiny.py --workdir=/tmp/retnet_tiny --mode=eval
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from retnet_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path.py[:arg]).',
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'What to do.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().python_handler.stream = sys.stdout
  try:
    if _MODE.value == 'train':
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    else:
      train.evaluate(_CONFIG.value, _WORKDIR.value)
  except ValueError as e:  # Bad configs, data, workdirs or checkpoints: one clear line.
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
