r"""RetNet 6.7B as in the paper (§3.1); see configs/retnet_paper.py for the settings.

  python -m retnet_jax.main --config=configs/retnet_6_7b.py --workdir=gs://bucket/retnet_6_7b \
      --config.data.path=/data/tokenized   # the output of python -m retnet_jax.preprocess
"""

from configs import retnet_paper


def get_config(arg=None):
  del arg
  return retnet_paper.get_config('6.7b')
