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

import ml_collections

KINDS = ('retnet', 'transformer')


def parse_arg(arg):
  """'a=1,b=x' -> {'a': '1', 'b': 'x'}."""
  out = {}
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'config argument {item!r} is not key=value.')
    out[key.strip()] = value.strip()
  return out


def get_config(arg=None):
  args = parse_arg(arg)
  unknown = set(args) - {'kind', 'kv', 'width', 'gamma'}
  if unknown:
    raise ValueError(f'unknown config argument(s) {sorted(unknown)}; use kind, kv, width, gamma.')
  kind = args.get('kind', 'retnet')
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}; got {kind!r}.')
  width = int(args.get('width', 128))
  c = ml_collections.ConfigDict()
  c.name = f'mqar_{kind}'
  c.seed = 0
  c.total_steps = 1500
  c.batch_size = 32
  c.seq_len = 128
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.reset_at_doc_boundaries = True

  c.model = ml_collections.ConfigDict(dict(
      kind=kind, vocab_size=128, num_layers=2, embed_dim=width, num_heads=2,
      value_dim=2 * width if kind == 'retnet' else None, ffn_dim=2 * width,
      ffn_activation='swish', gamma=args.get('gamma', 'retnet'), gamma_value=None,
      gamma_values=(), gamma_init='retnet', form='chunkwise', chunk_size=64,
      rotary='interleaved', rotary_freqs='torchscale', rotary_base=10000.0, swish_gate=True,
      group_norm=True, group_norm_affine=False, decay_row_norm=False, norm_eps=1e-6, dropout=0.0,
      tie_embeddings=False, dtype='float32', param_dtype='float32', scan_layers=True,
      remat='none'))

  c.data = ml_collections.ConfigDict(dict(
      source='mqar', tokenizer='byte', sp_vocab_size=4096, files_glob='', jsonl_text_field='text',
      val_fraction=0.03, shuffle=True, num_workers=0, prefetch_buffer_size=8, num_eval_batches=8,
      mqar_num_kv_pairs=int(args.get('kv', 8)), mqar_vocab_size=128))

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=100, schedule='cosine', end_lr_fraction=0.1, b1=0.9,
      b2=0.98, eps=1e-8, weight_decay=0.1, grad_clip=1.0, grad_accum_steps=1))

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, tensor=1,
      rules=ml_collections.ConfigDict(dict(
          batch=('data', 'fsdp'), length=None, embed='fsdp', heads='tensor', kv=None,
          mlp='tensor', vocab='tensor', layers=None)),
      coordinator_address=None, num_processes=None, process_id=None))

  c.checkpoint = ml_collections.ConfigDict(dict(max_to_keep=1, save_on_sigterm=True))
  return c
