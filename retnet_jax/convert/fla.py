r"""flash-linear-attention's RetNet (`fla.models.RetNetForCausalLM`) in.

A directory with config.json and *.safetensors (or one file, with --config_json). Torch Linear
weights are [out, in]:

    model.embeddings.weight [vocab, D]               embed
    lm_head.weight [vocab, D]                        head (ignored when tie_word_embeddings)
    model.layers.i.attn.{q,k,v,g,o}_proj.weight      as for torchscale
    model.layers.i.attn.g_norm_swish_gate.weight     blocks.retention.norm.scale (g_norm without fuse)
    model.layers.i.mlp.{gate,up,down}_proj.weight    blocks.ffn.{w_gate,w_up,w_down}
    model.layers.i.{attn_norm,mlp_norm}.weight       blocks.{mixer_norm,ffn_norm}.scale
    model.norm.weight                                final_norm.scale

The variant: half-split rotary with standard frequencies, per-head RMSNorm with affine, SwiGLU,
no retention normalisation; fla scales q by K^−½ inside its kernel, we scale k: the same product.
"""

from __future__ import annotations

import os

import numpy as np

from retnet_jax import model as model_lib
from retnet_jax.convert import checks
from retnet_jax.convert import layout
from retnet_jax.convert import reading
from retnet_jax.convert.checks import check_names_and_shapes
from retnet_jax.convert.checks import ConversionError

# fla's RetNetConfig defaults for what a config.json may leave out.
FLA_DEFAULTS = {
    'expand_k': 1.0, 'expand_v': 2.0, 'hidden_ratio': 2, 'intermediate_size': None,
    'num_kv_heads': None, 'feature_map': None, 'hidden_act': 'swish', 'use_short_conv': False,
    'use_output_gate': True, 'elementwise_affine': True, 'norm_eps': 1e-6, 'attn': None,
    'tie_word_embeddings': False, 'fuse_norm': True, 'attnres_block_size': None,
}


def fla_settings(hf_config: dict) -> dict:
  """fla RetNetConfig defaults <- config.json, checked for what this model supports."""
  c = {**FLA_DEFAULTS, **hf_config}
  if c.get('model_type', 'retnet') != 'retnet':
    raise ConversionError(f"config.json model_type is {c['model_type']!r}, not 'retnet'.")
  for key in ('hidden_size', 'num_heads', 'num_hidden_layers', 'vocab_size'):
    if key not in c:
      raise ConversionError(f'config.json lacks {key!r}.')
  problems = []
  if c['use_short_conv']:
    problems.append('use_short_conv (short convolutions on q, k, v)')
  if c['feature_map'] is not None:
    problems.append(f"feature_map={c['feature_map']!r}")
  if c['num_kv_heads'] not in (None, c['num_heads']):
    problems.append(f"num_kv_heads={c['num_kv_heads']} != num_heads={c['num_heads']} (grouped keys)")
  if c['attn']:
    problems.append('attn (hybrid softmax-attention layers)')
  if float(c['expand_k']) != 1.0:
    problems.append(f"expand_k={c['expand_k']} (this model's q-k width is hidden_size)")
  if c['hidden_act'] != 'swish':
    problems.append(f"hidden_act={c['hidden_act']!r} (needs swish)")
  if c['attnres_block_size'] is not None:
    problems.append('attnres_block_size (attention residuals)')
  if problems:
    raise ConversionError('fla features this model does not have: ' + '; '.join(problems) + '.')
  D = int(c['hidden_size'])
  if c['intermediate_size'] is None:  # fla's GatedMLP rule.
    ratio = 4 if c['hidden_ratio'] is None else c['hidden_ratio']
    c['intermediate_size'] = 256 * ((int(D * ratio * 2 / 3) + 255) // 256)
  c['value_dim'] = int(D * float(c['expand_v']))
  return c


def from_fla(state_dict: dict, hf_config: dict, param_dtype: str = 'float32'):
  """(params pure dict, ModelConfig) from an fla RetNetForCausalLM state dict and its config.json."""
  c = fla_settings(hf_config)
  where = 'fla state dict'
  if 'embed_tokens.weight' in state_dict or 'decoder.embed_tokens.weight' in state_dict:
    raise ConversionError(f"{where}: names like embed_tokens.* are torchscale's: use --from=torchscale.")
  D, H, L, vocab = (int(c[k]) for k in ('hidden_size', 'num_heads', 'num_hidden_layers', 'vocab_size'))
  V, F = c['value_dim'], int(c['intermediate_size'])
  gate, affine, tied = c['use_output_gate'], bool(c['elementwise_affine']), bool(c['tie_word_embeddings'])
  norm_name = 'g_norm_swish_gate' if gate and c['fuse_norm'] else 'g_norm'
  if D % H or V % H:
    raise ConversionError(f'{where}: {H} heads must divide hidden {D} and value dim {V}.')
  expected = {'model.embeddings.weight': (vocab, D), 'model.norm.weight': (D,),
              'lm_head.weight': (vocab, D)}
  for i in range(L):
    p = f'model.layers.{i}.'
    expected.update({
        p + 'attn_norm.weight': (D,), p + 'mlp_norm.weight': (D,),
        p + 'attn.q_proj.weight': (D, D), p + 'attn.k_proj.weight': (D, D),
        p + 'attn.v_proj.weight': (V, D), p + 'attn.o_proj.weight': (D, V),
        p + 'mlp.gate_proj.weight': (F, D), p + 'mlp.up_proj.weight': (F, D),
        p + 'mlp.down_proj.weight': (D, F)})
    if gate:
      expected[p + 'attn.g_proj.weight'] = (V, D)
    if affine:
      expected[p + f'attn.{norm_name}.weight'] = (V // H,)
  check_names_and_shapes(state_dict, expected, where, ('lm_head.weight',) if tied else ())

  cfg = model_lib.ModelConfig(
      kind='retnet', vocab_size=vocab, num_layers=L, embed_dim=D, num_heads=H, value_dim=V,
      ffn_dim=F, ffn_activation='swish', gamma='retnet', rotary='half', rotary_freqs='standard',
      rotary_base=10000.0, swish_gate=bool(gate), group_norm=True, group_norm_affine=affine,
      decay_row_norm=False, norm_eps=float(c['norm_eps']), tie_embeddings=tied,
      param_dtype=param_dtype)
  sd, t = state_dict, 'model.layers.{}.'
  retention = {
      'wq': layout.stack(sd, t + 'attn.q_proj.weight', L, lambda w: layout.in_heads(w, H)),
      'wk': layout.stack(sd, t + 'attn.k_proj.weight', L, lambda w: layout.in_heads(w, H)),
      'wv': layout.stack(sd, t + 'attn.v_proj.weight', L, lambda w: layout.in_heads(w, H)),
      'wo': layout.stack(sd, t + 'attn.o_proj.weight', L, lambda w: layout.out_heads(w, H)),
  }
  if gate:
    retention['wg'] = layout.stack(sd, t + 'attn.g_proj.weight', L, lambda w: layout.in_heads(w, H))
  if affine:
    retention['norm'] = {'scale': layout.stack(sd, t + f'attn.{norm_name}.weight', L, np.asarray)}
  params = {
      'embed': sd['model.embeddings.weight'],
      'blocks': {
          'retention': retention,
          'ffn': {'w_gate': layout.stack(sd, t + 'mlp.gate_proj.weight', L, layout.dense),
                  'w_up': layout.stack(sd, t + 'mlp.up_proj.weight', L, layout.dense),
                  'w_down': layout.stack(sd, t + 'mlp.down_proj.weight', L, layout.dense)},
          'mixer_norm': {'scale': layout.stack(sd, t + 'attn_norm.weight', L, np.asarray)},
          'ffn_norm': {'scale': layout.stack(sd, t + 'mlp_norm.weight', L, np.asarray)},
      },
      'final_norm': {'scale': sd['model.norm.weight']},
  }
  if not tied:
    params['head'] = layout.dense(sd['lm_head.weight'])
  params = layout.cast(params, param_dtype)
  checks.check_params(params, cfg)
  return params, cfg


def import_weights(input_path: str, config_json: str | None = None, param_dtype: str = 'float32',
                   trust_pickle: bool = False):
  """(params, ModelConfig, config.json) from an fla directory or weights file."""
  directory = input_path if os.path.isdir(input_path) else os.path.dirname(os.path.abspath(input_path))
  path = config_json or os.path.join(directory, 'config.json')
  if not os.path.isfile(path):
    raise ConversionError(f'fla weights need their config.json (looked for {path!r}; pass '
                          '--config_json).')
  hf_config = reading.read_json(path)
  state_dict, _ = reading.read_state_dict(input_path, trust_pickle)
  params, cfg = from_fla(state_dict, hf_config, param_dtype)
  return params, cfg, hf_config
