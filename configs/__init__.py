"""Experiment configs: one file per family of runs, each with `get_config(arg=None)` (docs/configs.md).

The presets below shrink a run of the tiny family; such a config takes their names as flags in its
argument (`--config=configs/retnet_tiny.py:quick`, `...:gamma=lm,test`) and applies the preset last.
"""

from retnet_jax import config_lib

PRESETS = {
    # A few-minute CPU run (the experiments' --quick): 2 layers of width 128, 400 steps of 8 × 128
    # tokens, about 1.5 minutes on 2 busy CPU cores, compile included.
    'quick': {
        'model.num_layers': 2, 'model.embed_dim': 128, 'model.value_dim': 256,
        'model.ffn_dim': 256, 'model.remat': 'none', 'seq_len': 128, 'batch_size': 8,
        'total_steps': 400, 'log_every': 50, 'eval_every': 100, 'checkpoint_every': 100,
        'data.num_eval_batches': 8, 'optim.warmup_steps': 40,
    },
    # The unit tests' size: small, and uneven on purpose (3 heads, a sequence length no chunk size
    # divides).
    'test': {
        'model.num_layers': 2, 'model.embed_dim': 48, 'model.num_heads': 3, 'model.value_dim': 60,
        'model.ffn_dim': 80, 'model.chunk_size': 16, 'seq_len': 37, 'batch_size': 4,
        'total_steps': 6, 'log_every': 2, 'eval_every': 3, 'checkpoint_every': 3,
        'data.num_eval_batches': 2, 'mesh.data': 1,
    },
    # The GPU check (experiments/gpu_check*): the model-forms comparison, and the timed train step
    # (about 361M parameters: 20 layers of width 1024, K = 128, V = 256, a 32k vocabulary); the
    # `_dry` ones are the CPU dry run's, which checks the plumbing, not the numbers.
    'gpu_model': {
        'model.num_layers': 2, 'model.embed_dim': 256, 'model.num_heads': 2,
        'model.value_dim': 512, 'model.ffn_dim': 512, 'model.chunk_size': 64,
    },
    'gpu_train': {
        'model.num_layers': 20, 'model.embed_dim': 1024, 'model.num_heads': 8,
        'model.value_dim': 2048, 'model.ffn_dim': 2048, 'model.vocab_size': 32768,
        'model.chunk_size': 64, 'model.dtype': 'bfloat16', 'model.remat': 'dots_no_batch',
        'reset_at_doc_boundaries': False,
    },
    'gpu_model_dry': {
        'model.num_layers': 1, 'model.embed_dim': 64, 'model.num_heads': 2,
        'model.value_dim': 128, 'model.ffn_dim': 128, 'model.chunk_size': 16,
    },
    'gpu_train_dry': {
        'model.num_layers': 1, 'model.embed_dim': 64, 'model.num_heads': 2,
        'model.value_dim': 128, 'model.ffn_dim': 128, 'model.chunk_size': 16,
        'model.dtype': 'bfloat16', 'model.remat': 'dots_no_batch',
        'reset_at_doc_boundaries': False,
    },
}


def apply_preset(config, args: dict, presets: dict = PRESETS):
  """The config with the preset named among `args` (flags of parse_config_arg) applied, if any."""
  chosen = [name for name in presets if args.get(name) is True]
  if len(chosen) > 1:
    raise ValueError(f'config arguments {chosen} exclude each other; give one.')
  if not chosen:
    return config
  values = dict(presets[chosen[0]])
  if config.model.get('kind') == 'transformer':
    values.pop('model.value_dim', None)  # Attention's value width is embed_dim (value_dim None).
  return config_lib.update(config, values)
