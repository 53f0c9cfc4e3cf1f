r"""YOCO at retnet_tiny's size: a gated-retention self-decoder (the first half of the layers), one
shared KV cache of grouped heads, and a cross-decoder (the second half) that attends to it.

  python -m retnet_jax.main --config=configs/yoco_tiny.py --workdir=/tmp/yoco_tiny

Same data, optimiser and training as retnet_tiny. The argument is retnet_tiny's (`:quick`, `:test`,
`:form=...`), plus `self_decoder=swa` (sliding-window attention in the self-decoder, window 64).
The value width is embed_dim (fla's YOCO), and half of the heads serve as kv heads.
"""

import configs
from configs import retnet_tiny
from retnet_jax import config_lib

KEYS = retnet_tiny.KEYS + ('self_decoder',)


def get_config(arg=None):
  args = config_lib.parse_config_arg(arg, KEYS, tuple(configs.PRESETS))
  c = retnet_tiny.base_config({k: v for k, v in args.items() if k != 'self_decoder'})
  c.name = 'yoco_tiny'
  c.model.update(kind='yoco', gamma='gated', value_dim=None, self_decoder='gated_retention',
                 num_kv_heads=2)
  if args.get('self_decoder', 'gated_retention') == 'swa':
    c.model.update(self_decoder='swa', attention_window=64)
  c = configs.apply_preset(c, args)
  c.model.value_dim = None  # The presets set RetNet's 2·D; YOCO's self-decoder uses D.
  if c.model.num_heads % c.model.num_kv_heads:
    c.model.num_kv_heads = 1
  c.model.num_self_decoder_layers = c.model.num_layers // 2
  return c
