r"""Multi-query associative recall (MQAR, the Zoology setting of Arora et al. 2023) at CPU scale.

Two-layer models on synthetic key-value recall (data.source='mqar', see retnet_jax/data.py): a row
lists N key-value pairs, then queries keys; accuracy is over the queried values (eval 'accuracy').

  python -m retnet_jax.main --config=configs/mqar.py:kind=retnet,kv=16,width=128 --workdir=/tmp/mqar
  python -m experiments.mqar --output_dir=/tmp/mqar_sweep   # the sweep: kv pairs x width x model

Argument (comma-separated key=value and flags):
  kind=retnet|transformer   the sequence mixer (default retnet)
  kv=N                      number of key-value pairs per row (default 8; N <= (seq_len + 1) / 4)
  width=D                   model width, embed_dim (default 128)
  gamma=NAME                RetNet decay schedule (default retnet, see decay.SCHEDULES)
  quick                     the few-minute sweep's runs (PRESETS): 300 steps of 64 × 64 tokens
"""

import configs
from configs import retnet_tiny
from retnet_jax import config_lib

KINDS = ('retnet', 'transformer')
PRESETS = {'quick': {'seq_len': 64, 'batch_size': 64, 'total_steps': 300, 'eval_every': 150,
                     'checkpoint_every': 300, 'log_every': 50}}


def get_config(arg=None):
  args = config_lib.parse_config_arg(arg, ('kind', 'kv', 'width', 'gamma'), tuple(PRESETS))
  kind = args.get('kind', 'retnet')
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}; got {kind!r}.')
  width = int(args.get('width', 128))
  c = retnet_tiny.get_config()
  c.name = f'mqar_{kind}'
  c.total_steps = 1500
  c.batch_size = 32
  c.seq_len = 128
  c.eval_every = 500
  c.checkpoint_every = 500
  c.model.update(dict(
      kind=kind, vocab_size=128, num_layers=2, embed_dim=width, num_heads=2,
      value_dim=2 * width if kind == 'retnet' else None, ffn_dim=2 * width,
      gamma=args.get('gamma', 'retnet'), remat='none'))
  c.data.update(dict(source='mqar', num_eval_batches=8, mqar_num_kv_pairs=int(args.get('kv', 8)),
                     mqar_vocab_size=128))
  c.optim.update(dict(learning_rate=3e-3, warmup_steps=100, weight_decay=0.1, grad_clip=1.0))
  c.checkpoint.max_to_keep = 1
  return configs.apply_preset(c, args, PRESETS)
