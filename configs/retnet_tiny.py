r"""A tiny byte-level RetNet that trains on 2 CPU cores in under ten minutes: the main job.

Data: the Python standard library's own source files (every Python has them; nothing to download).

  python -m retnet_jax.main --config=configs/retnet_tiny.py --workdir=/tmp/retnet_tiny

Variants through the argument (comma-separated key=value and flags; docs/configs.md):
  --config=configs/retnet_tiny.py:gamma=lm           any decay schedule of decay.SCHEDULES
  --config=configs/retnet_tiny.py:form=parallel      retention form used for training
  --config=configs/retnet_tiny.py:ablation=no_gate   a Table 6 ablation (see ABLATIONS)
  --config=configs/retnet_tiny.py:quick              a few-minute CPU run (configs.PRESETS)
  --config=configs/retnet_tiny.py:gamma=lm,test      the unit tests' size
"""

import ml_collections

import configs
from retnet_jax import config_lib

# The paper's Table 6 ablations, as overrides of the model config.
ABLATIONS = {
    'none': {},
    'no_gate': {'swish_gate': False},  # − swish gate
    'no_groupnorm': {'group_norm': False, 'decay_row_norm': True},  # − GroupNorm
    'no_decay': {'gamma': 'none'},  # − γ decay
    'no_multiscale': {'gamma': 'uniform'},  # − multi-scale decay
    'small_head': {'num_heads': 8},  # head dimension 64 -> 32 (the paper: 256 -> 64)
}

KEYS = ('gamma', 'form', 'ablation')


def get_config(arg=None):
  args = config_lib.parse_config_arg(arg, KEYS, tuple(configs.PRESETS))
  return configs.apply_preset(base_config(args), args)


def base_config(args: dict):
  """The config of the parsed argument `args`, before any preset."""
  c = ml_collections.ConfigDict()
  c.name = 'retnet_tiny'
  c.seed = 0
  c.total_steps = 400
  c.batch_size = 16
  c.seq_len = 256
  c.log_every = 50
  c.eval_every = 200
  c.checkpoint_every = 200
  c.reset_at_doc_boundaries = True

  # ModelConfig's defaults (retnet_jax/model.py) but for the size: q-k head dim 64, value head dim 128.
  c.model = config_lib.model_defaults(
      num_layers=4, embed_dim=256, value_dim=512, ffn_dim=512, remat='dots_no_batch')
  if 'gamma' in args:
    c.model.gamma = args['gamma']
    if args['gamma'] == 'custom':
      c.model.gamma_values = (0.9, 0.97, 0.99, 0.999)
  if 'form' in args:
    c.model.form = args['form']
  if 'ablation' in args:
    if args['ablation'] not in ABLATIONS:
      raise ValueError(f"unknown ablation {args['ablation']!r}; one of {sorted(ABLATIONS)}.")
    c.model.update(ABLATIONS[args['ablation']])

  c.data = ml_collections.ConfigDict(dict(
      source='stdlib', tokenizer='byte', sp_vocab_size=4096, files_glob='', jsonl_text_field='text',
      path='',  # source='arrayrecord': a `python -m retnet_jax.preprocess` output directory
      val_fraction=0.03, shuffle=True, num_workers=0, prefetch_buffer_size=8, num_eval_batches=16,
      mqar_num_kv_pairs=8, mqar_vocab_size=256,
      # source='recall' (retnet_jax/recall.py): stdlib text mixed with synthetic recall rows.
      recall_fraction=0.75, recall_tasks='passkey,associative', recall_num_pairs=4,
      recall_passkey_digits=5, recall_loss='all'))  # 'answers': recall rows score their answers

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=2e-3, warmup_steps=50, schedule='cosine', end_lr_fraction=0.1, b1=0.9,
      b2=0.98, eps=1e-8, weight_decay=0.05, grad_clip=2.0, grad_accum_steps=1,
      trainable=''))  # a regex over parameter paths: only those train ('': all)

  # Warm start (docs/warm-start.md): step 0 from the parameters of a converted checkpoint or a
  # workdir, at init_from_step (default the latest).
  c.init_from = ''
  c.init_from_step = ml_collections.config_dict.placeholder(int)
  c.init_from_strict = True
  # The loss over chunks of this many positions per sequence (docs/throughput.md); 0: whole.
  c.loss_chunk_size = 512

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, sequence=1, tensor=1,
      rules=ml_collections.ConfigDict(dict(
          batch=('data', 'fsdp'), length='sequence', embed='fsdp', heads='tensor', kv=None,
          mlp='tensor', vocab='tensor', layers=None)),
      coordinator_address=None, num_processes=None, process_id=None))

  # fallback_to_intact: resume (eval, generate) from the newest intact step when the latest is
  # damaged, instead of stopping. on_nonfinite: 'stop' or 'skip' the update when the loss or the
  # gradient norm is NaN or Inf.
  c.checkpoint = ml_collections.ConfigDict(dict(max_to_keep=3, save_on_sigterm=True,
                                                fallback_to_intact=False, on_nonfinite='stop'))

  # `--mode=generate` settings (config_lib.GENERATE); the main flags override them.
  c.generate = ml_collections.ConfigDict(config_lib.GENERATE)
  return c
