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
"""

import os

from retnet_jax import config_lib

SIZES = {
    #        layers, hidden, ffn, heads, learning rate
    '1.3b': (24, 2048, 4096, 8, 6e-4),
    '2.7b': (32, 2560, 5120, 10, 3e-4),
    '6.7b': (32, 4096, 8192, 16, 3e-4),
}


def get_config(arg='1.3b'):
  if arg not in SIZES:
    raise ValueError(f'unknown size {arg!r}; one of {sorted(SIZES)}.')
  layers, hidden, ffn, heads, lr = SIZES[arg]
  c = config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'retnet_tiny.py'))
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
  c.optim.update(dict(learning_rate=lr, warmup_steps=375, schedule='linear', end_lr_fraction=0.0,
                      grad_accum_steps=1))
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  return c
