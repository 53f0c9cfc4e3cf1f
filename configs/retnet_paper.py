r"""The paper's language-model sizes (§3.1), on the tiny config's keys. Not for CPU.

  python -m retnet_jax.preprocess --input='/data/corpus/**/*.jsonl.zst,/data/corpus/**/*.parquet' \
      --train_tokenizer=sentencepiece --vocab_size=32000 --sample_mb=1000 --output=/data/tokenized
  python -m retnet_jax.main --config=configs/retnet_paper.py:1.3b --workdir=gs://bucket/retnet_1_3b \
      --config.data.path=/data/tokenized

Sizes (layers / hidden / FFN / heads; q-k head dim 256, value head dim 512; with the gated FFN and a
32k vocabulary they count 1.54B, 3.10B and 7.78B parameters):
  1.3b: 24 / 2048 / 4096 / 8      2.7b: 32 / 2560 / 5120 / 10      6.7b: 32 / 4096 / 8192 / 16
Optimisation as the paper: AdamW β = (0.9, 0.98), weight decay 0.05, gradient clip 2.0, 375 warm-up
steps, dropout 0.1, learning rate 6e-4 (1.3B) or 3e-4; 4M tokens a step (2048 × 2048) for 25k steps
(about 100B tokens). Data: the ArrayRecord shards of `retnet_jax.preprocess` (`data.path`,
required), tokenized once with a 32k SentencePiece model trained on a sample of the corpus. Parameters are FSDP-sharded over every device; bfloat16 compute.

Options after the size (comma-separated key=value):
  --config=configs/retnet_paper.py:1.3b,slice=v5e-32       the settings that fit that TPU slice
                                                           (SLICES; docs/planning.md)
  --config=configs/retnet_paper.py:1.3b,kind=transformer   the Transformer of equal size (§3.4)
Check a slice before renting it (compiles on any machine with the TPU library, no TPU needed):
  python -m retnet_jax.main --config=configs/retnet_paper.py:1.3b,slice=v5e-32 --mode=compile \
      --topology=v5e-32 --workdir=/tmp/aot_1_3b
"""

from configs import retnet_tiny
from configs import transformer_tiny
from retnet_jax import config_lib

SIZES = {
    #        layers, hidden, ffn, heads, learning rate
    '1.3b': (24, 2048, 4096, 8, 6e-4),
    '2.7b': (32, 2560, 5120, 10, 3e-4),
    '6.7b': (32, 4096, 8192, 16, 3e-4),
}


# Per (size, slice): what makes the paper's 4M-token step fit, from real compiles for that slice
# (python -m retnet_jax.main ... --mode=compile; the table in docs/planning.md). The batch stays
# 2048 × 2048; micro-batches of batch_size / grad_accum_steps sequences run one after another.
SLICES = {
    ('1.3b', 'v5p-32'): {'optim.grad_accum_steps': 16},  # 8 sequences per chip at a time
    ('1.3b', 'v5e-32'): {'optim.grad_accum_steps': 32},  # 2
    ('1.3b', 'v4-32'): {'optim.grad_accum_steps': 32},  # 4
    ('2.7b', 'v5p-64'): {'optim.grad_accum_steps': 8},  # 8
    ('6.7b', 'v5p-128'): {'optim.grad_accum_steps': 8},  # 4
    ('6.7b', 'v4-256'): {'optim.grad_accum_steps': 16},  # 1
}


def _parse(arg):
  size, _, rest = (arg or '1.3b').partition(',')
  if '=' in size:  # 'size=1.3b,...'
    rest, size = ','.join(filter(None, (size, rest))), ''
  options = config_lib.parse_config_arg(rest, ('size', 'kind', 'slice'))
  size = options.pop('size', size) or '1.3b'
  if size not in SIZES:
    raise ValueError(f'unknown size {size!r}; one of {sorted(SIZES)}.')
  kind = options.get('kind', 'retnet')
  if kind not in ('retnet', 'transformer'):
    raise ValueError(f"kind must be 'retnet' or 'transformer'; got {kind!r}.")
  slice_ = options.get('slice')
  if slice_ is not None and (size, slice_) not in SLICES:
    known = sorted(s for z, s in SLICES if z == size)
    raise ValueError(f'no settings for {size} on {slice_!r}; planned slices for {size}: {known}.')
  return size, kind, slice_


def get_config(arg='1.3b'):
  size, kind, slice_ = _parse(arg)
  arg = size
  layers, hidden, ffn, heads, lr = SIZES[arg]
  c = retnet_tiny.get_config()
  c.name = f'retnet_{arg}'
  c.total_steps = 25_000
  c.batch_size = 2048
  c.seq_len = 2048
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.model.update(dict(
      vocab_size=32_768, num_layers=layers, embed_dim=hidden, num_heads=heads, value_dim=2 * hidden,
      ffn_dim=ffn, gamma='retnet', dropout=0.1, chunk_size=256, dtype='bfloat16', remat='dots_no_batch'))
  # The tokenizer is the one stored with the shards in data.path ('sentencepiece': a model that
  # only the data provides, so a run that reads no data builds none).
  c.data.update(dict(source='arrayrecord', path='', tokenizer='sentencepiece', num_workers=8,
                     num_eval_batches=64))
  # 16 micro-batches of 128 × 2048 tokens (1.3B on v5p-32 fits with 68 GiB to spare); SLICES.
  c.optim.update(dict(learning_rate=lr, warmup_steps=375, schedule='linear', end_lr_fraction=0.0,
                      grad_accum_steps=16))
  c.mesh.update(dict(data=1, fsdp=-1, sequence=1, tensor=1))
  if kind == 'transformer':
    # Same layers, width and heads; the FFN widened to equal parameters.
    transformer_tiny.to_transformer(c)
  return config_lib.update(c, SLICES.get((size, slice_), {}))
