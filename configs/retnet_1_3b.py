r"""RetNet 1.3B as in the paper (§3.1); see configs/retnet_paper.py for the settings.

  python -m retnet_jax.main --config=configs/retnet_1_3b.py --workdir=gs://bucket/retnet_1_3b \
      --config.data.path=/data/tokenized   # the output of python -m retnet_jax.preprocess
"""

from configs import retnet_paper


def get_config(arg=None):
  del arg
  return retnet_paper.get_config('1.3b')
