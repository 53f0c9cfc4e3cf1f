r"""Multi-query associative recall (MQAR, the Zoology setting of Arora et al. 2023) at CPU scale.

Two-layer models on synthetic key-value recall (data.source='mqar', see retnet_jax/data.py): a row
lists N key-value pairs, then queries keys; accuracy is over the queried values (eval 'accuracy').

  python -m retnet_jax.main --config=configs/mqar.py:kind=retnet,kv=16,width=128 --workdir=/tmp/mqar
  python -m experiments.mqar --output_dir=/tmp/mqar_sweep   # the sweep: kv pairs x width x model

Argument keys (comma-separated key=value):
  kind=retnet|transformer   the sequence mixer (default retnet)
  kv=N                      number of key-value pairs per row (default 8; N <= (seq_len + 1) / 4)
  width=D                   model width, embed_dim (default 128)
  gamma=NAME                RetNet decay schedule (default retnet, see decay.SCHEDULES)
"""

import os

from retnet_jax import config_lib

KINDS = ('retnet', 'transformer')


def get_config(arg=None):
  args = config_lib.parse_config_arg(arg, ('kind', 'kv', 'width', 'gamma'))
  kind = args.get('kind', 'retnet')
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}; got {kind!r}.')
  width = int(args.get('width', 128))
  c = config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'retnet_tiny.py'))
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
  return c
