r"""torchscale's RetNet (`torchscale.architecture.retnet.RetNetDecoder`) in and out.

A torch `.pt` file: a plain state dict, or a fairseq checkpoint with the state dict under 'model',
keys prefixed 'decoder.', and the args under 'cfg' / 'args'. Torch Linear weights are [out, in].
With H heads, K = D / H, Vh = V / H:

    embed_tokens.weight [vocab, D]                   embed            (× √D unless no_scale_embedding)
    output_projection.weight [vocab, D]              head [D, vocab]  (None when tied)
    layers.i.retention.{q,k}_proj.weight [D, D]      blocks.retention.w{q,k} [L, D, H, K]
    layers.i.retention.{v,g}_proj.weight [V, D]      blocks.retention.w{v,g} [L, D, H, Vh]
    layers.i.retention.out_proj.weight [D, V]        blocks.retention.wo [L, H, Vh, D]
    layers.i.ffn.{fc1,gate,fc2}.weight               blocks.ffn.{w_gate,w_up,w_down}
    layers.i.{retention_layer_norm,final_layer_norm}.weight   blocks.{mixer_norm,ffn_norm}.scale
    layer_norm.weight                                final_norm.scale
    retnet_rel_pos.{angle,decay}                     checked against rotary_freqs; log γ per head

The variant: interleaved rotary with torchscale's frequencies, per-head RMSNorm without affine,
GLU FFN with `activation_fn` (RetNetConfig's default 'gelu', exact erf), and decay_row_norm=True:
torchscale divides each retention row by √(Σ_{i≤t} γ^i) before the per-head RMSNorm, which cancels
it only up to eps (ε/s² instead of ε inside the norm); applying the same D̃ makes the recurrent and
parallel forms match torchscale's to float32 precision. Its parallel form also divides each row by
max(1, |Σ_s R_ts|) (R̃, §2.2), which its recurrent form does not: where that clamp is active the two
torchscale forms themselves differ through eps, and ours follow its recurrent form. Its chunkwise
form (chunkwise_recurrent=True) divides rows by √(Σγ^i) over the position inside the chunk, so
it too differs from its parallel form through eps (microsoft/torchscale#77); ours do not.

What the state dict does not show comes from the checkpoint's args, else `--config_json` (a JSON
object of RetNetConfig fields), else `<input without extension>.json` beside it, else
RetNetConfig's defaults: activation_fn, layernorm_eps, no_scale_embedding,
share_decoder_input_output_embed, decoder_retention_heads (also read from the decay buffer).

Exporting writes `retnet.pt` (a plain RetNetDecoder state dict, float tensors) and `retnet.json`
(the RetNetConfig fields to build it with): `RetNetDecoder(RetNetConfig(**json), embed_tokens=
nn.Embedding(vocab_size, D)).load_state_dict(torch.load('retnet.pt'))`.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import logging
import numpy as np

from retnet_jax import decay
from retnet_jax import model as model_lib
from retnet_jax.convert import checks
from retnet_jax.convert import layout
from retnet_jax.convert import reading
from retnet_jax.convert.checks import check_names_and_shapes
from retnet_jax.convert.checks import ConversionError

# RetNetConfig's defaults for what a state dict does not show.
TORCHSCALE_DEFAULTS = {
    'activation_fn': 'gelu', 'layernorm_eps': 1e-6, 'no_scale_embedding': True,
    'share_decoder_input_output_embed': False, 'layernorm_embedding': False, 'deepnorm': False,
    'decoder_normalize_before': True, 'moe_freq': 0, 'multiway': False,
}


def torchscale_args(checkpoint_args: dict, config_json: dict | None = None) -> dict:
  """RetNetConfig defaults <- the checkpoint's args <- config_json, checked for support."""
  args = {**TORCHSCALE_DEFAULTS, **(checkpoint_args or {}), **(config_json or {})}
  unsupported = {
      'deepnorm': args['deepnorm'], 'layernorm_embedding': args['layernorm_embedding'],
      'moe_freq': args['moe_freq'], 'multiway': args['multiway'],
      'decoder_normalize_before=False': not args['decoder_normalize_before'],
  }
  bad = [k for k, v in unsupported.items() if v]
  if bad:
    raise ConversionError(f'torchscale features this model does not have: {bad}.')
  if args['activation_fn'] not in ('gelu', 'swish'):
    raise ConversionError(f"activation_fn {args['activation_fn']!r}: only 'gelu' and 'swish' are "
                          'supported.')
  return args


def from_torchscale(state_dict: dict, args: dict | None = None, param_dtype: str = 'float32'):
  """(params pure dict, ModelConfig) from a torchscale RetNetDecoder state dict.

  state_dict: name -> array, with or without fairseq's 'decoder.' prefix. args: RetNetConfig fields
  (see `torchscale_args`); missing ones take RetNetConfig's defaults.
  """
  args = torchscale_args(args or {})
  where = 'torchscale state dict'
  if any(k.startswith('decoder.') for k in state_dict):
    state_dict = {k[len('decoder.'):]: v for k, v in state_dict.items() if k.startswith('decoder.')}
  if any(k.startswith('model.layers.') for k in state_dict):
    raise ConversionError(f'{where}: names like model.layers.* are fla\'s: use --from=fla.')
  embed = checks.need(state_dict, 'embed_tokens.weight', where)
  vocab, D = embed.shape
  L = checks.layer_count(state_dict, r'layers\.(\d+)\.', where)
  if 'retnet_rel_pos.decay' in state_dict:
    H = int(state_dict['retnet_rel_pos.decay'].shape[0])
  elif 'decoder_retention_heads' in args:
    H = int(args['decoder_retention_heads'])
  else:
    raise ConversionError(f'{where}: no retnet_rel_pos.decay buffer, so the number of heads is '
                          'unknown: give decoder_retention_heads in --config_json.')
  if D % H:
    raise ConversionError(f'{where}: {H} heads do not divide embed dim {D}.')
  V = checks.need(state_dict, 'layers.0.retention.v_proj.weight', where).shape[0]
  F = checks.need(state_dict, 'layers.0.ffn.fc1.weight', where).shape[0]
  for key, value in (('decoder_embed_dim', D), ('decoder_value_embed_dim', V),
                     ('decoder_ffn_embed_dim', F), ('decoder_layers', L),
                     ('decoder_retention_heads', H), ('vocab_size', vocab)):
    if key in args and args[key] not in (None, -1) and int(args[key]) != value:
      raise ConversionError(f'{where}: args say {key}={args[key]} but the weights give {value}.')
  K = D // H

  expected = {'embed_tokens.weight': (vocab, D), 'output_projection.weight': (vocab, D),
              'layer_norm.weight': (D,), 'retnet_rel_pos.angle': (K,),
              'retnet_rel_pos.decay': (H,)}
  for i in range(L):
    p = f'layers.{i}.'
    expected.update({
        p + 'retention.q_proj.weight': (D, D), p + 'retention.k_proj.weight': (D, D),
        p + 'retention.v_proj.weight': (V, D), p + 'retention.g_proj.weight': (V, D),
        p + 'retention.out_proj.weight': (D, V), p + 'retention_layer_norm.weight': (D,),
        p + 'final_layer_norm.weight': (D,), p + 'ffn.fc1.weight': (F, D),
        p + 'ffn.gate.weight': (F, D), p + 'ffn.fc2.weight': (D, F)})
  optional = ('retnet_rel_pos.angle', 'retnet_rel_pos.decay')
  head_w = state_dict.get('output_projection.weight')
  # Tied when the args say so, when there is no head, or when the head is the embedding itself.
  tied = (bool(args['share_decoder_input_output_embed']) or head_w is None
          or (head_w.shape == embed.shape and np.array_equal(head_w, embed)))
  if tied:
    optional += ('output_projection.weight',)
  check_names_and_shapes(state_dict, expected, where, optional)
  if tied and head_w is not None and not np.array_equal(head_w, embed):
    raise ConversionError(f'{where}: share_decoder_input_output_embed is set but '
                          'output_projection.weight differs from embed_tokens.weight.')

  log_gamma = state_dict.get('retnet_rel_pos.decay')
  if log_gamma is None:
    log_gamma = np.log(decay.gammas('retnet', H))
  cfg = model_lib.ModelConfig(
      kind='retnet', vocab_size=vocab, num_layers=L, embed_dim=D, num_heads=H, value_dim=V,
      ffn_dim=F, ffn_activation=args['activation_fn'], **layout.gamma_fields(log_gamma),
      rotary='interleaved', rotary_freqs='torchscale', rotary_base=10000.0, swish_gate=True,
      group_norm=True, group_norm_affine=False, decay_row_norm=True,
      norm_eps=float(args['layernorm_eps']), tie_embeddings=False, param_dtype=param_dtype)
  if 'retnet_rel_pos.angle' in state_dict:
    angle = state_dict['retnet_rel_pos.angle']
    rtol, angle = layout.rtol(angle), np.asarray(angle, np.float64)
    for freqs in ('torchscale', 'standard'):
      trial = dataclasses.replace(cfg, rotary_freqs=freqs)
      if np.allclose(angle, np.repeat(layout.inv_freq(trial), 2), rtol=rtol, atol=0):
        cfg = trial
        break
    else:
      raise ConversionError(f'{where}: retnet_rel_pos.angle {angle[:4].tolist()}... matches neither '
                            "torchscale's nor the standard rotary frequencies (base 10000).")

  scale = 1.0 if args['no_scale_embedding'] else float(np.sqrt(D))
  embed32 = np.asarray(embed, np.float32)
  if tied and scale == 1.0:
    cfg = dataclasses.replace(cfg, tie_embeddings=True)
    head = None
  else:  # A scaled input embedding is no longer the head: untie.
    head = layout.dense(np.asarray(embed if head_w is None else head_w, np.float32))
  sd, t = state_dict, 'layers.{}.'
  retention = {
      'wq': layout.stack(sd, t + 'retention.q_proj.weight', L, lambda w: layout.in_heads(w, H)),
      'wk': layout.stack(sd, t + 'retention.k_proj.weight', L, lambda w: layout.in_heads(w, H)),
      'wv': layout.stack(sd, t + 'retention.v_proj.weight', L, lambda w: layout.in_heads(w, H)),
      'wg': layout.stack(sd, t + 'retention.g_proj.weight', L, lambda w: layout.in_heads(w, H)),
      'wo': layout.stack(sd, t + 'retention.out_proj.weight', L, lambda w: layout.out_heads(w, H)),
  }
  params = {
      'embed': embed32 * np.float32(scale),
      'blocks': {
          'retention': retention,
          'ffn': {'w_gate': layout.stack(sd, t + 'ffn.fc1.weight', L, layout.dense),
                  'w_up': layout.stack(sd, t + 'ffn.gate.weight', L, layout.dense),
                  'w_down': layout.stack(sd, t + 'ffn.fc2.weight', L, layout.dense)},
          'mixer_norm': {'scale': layout.stack(sd, t + 'retention_layer_norm.weight', L, np.asarray)},
          'ffn_norm': {'scale': layout.stack(sd, t + 'final_layer_norm.weight', L, np.asarray)},
      },
      'final_norm': {'scale': np.asarray(sd['layer_norm.weight'])},
  }
  if head is not None:
    params['head'] = head
  params = layout.cast(params, param_dtype)
  checks.check_params(params, cfg)
  return params, cfg


def _log_gamma_per_layer(params, cfg: model_lib.ModelConfig) -> np.ndarray:
  """log γ [H] float64 of a RetNet's parameters (the same in every layer, or an error)."""
  if cfg.gamma != 'learnable':
    return np.log(cfg.gammas())
  theta_LH = np.asarray(params['blocks']['retention']['decay_log_rate'], np.float64)
  log_gamma_LH = -np.exp(theta_LH)
  if not np.allclose(log_gamma_LH, log_gamma_LH[:1], rtol=1e-6, atol=0):
    raise ConversionError('torchscale shares one γ per head across layers; this model learned '
                          'different γ per layer.')
  return log_gamma_LH[0]


def to_torchscale(params, cfg: model_lib.ModelConfig) -> tuple[dict[str, np.ndarray], dict]:
  """(RetNetDecoder state dict as float32 NumPy arrays, RetNetConfig fields) of our parameters."""
  problems = []
  if cfg.kind != 'retnet':
    problems.append(f'kind={cfg.kind!r} (needs retnet)')
  if cfg.rotary != 'interleaved':
    problems.append(f'rotary={cfg.rotary!r} (torchscale rotates interleaved pairs)')
  if not cfg.group_norm or cfg.group_norm_affine:
    problems.append('the per-head norm must be an RMSNorm without affine (group_norm=True, '
                    'group_norm_affine=False)')
  if not cfg.swish_gate:
    problems.append('swish_gate=False (torchscale always gates)')
  if problems:
    raise ConversionError('cannot export to torchscale: ' + '; '.join(problems) + '.')
  if not cfg.decay_row_norm:
    logging.warning('decay_row_norm=False: torchscale divides retention rows by sqrt(sum of γ^i) '
                    'before its per-head RMSNorm, so logits agree only up to eps effects.')
  H, L = cfg.num_heads, cfg.num_layers
  f32 = lambda a: np.asarray(a, np.float32)
  blocks = params['blocks']
  ret = blocks['retention']
  sd = {'embed_tokens.weight': f32(params['embed'])}
  sd['output_projection.weight'] = sd['embed_tokens.weight'] if cfg.tie_embeddings else layout.dense(
      f32(params['head']))
  sd['layer_norm.weight'] = f32(params['final_norm']['scale'])
  sd['retnet_rel_pos.angle'] = np.repeat(layout.inv_freq(cfg), 2).astype(np.float32)
  sd['retnet_rel_pos.decay'] = _log_gamma_per_layer(params, cfg).astype(np.float32)
  in_heads = lambda w: layout.from_in_heads(f32(w))
  out_heads = lambda w: layout.from_out_heads(f32(w))
  for i in range(L):
    p = f'layers.{i}.'
    for ours, theirs in (('wq', 'q_proj'), ('wk', 'k_proj'), ('wv', 'v_proj'), ('wg', 'g_proj')):
      sd[p + f'retention.{theirs}.weight'] = in_heads(ret[ours][i])
    sd[p + 'retention.out_proj.weight'] = out_heads(ret['wo'][i])
    sd[p + 'retention_layer_norm.weight'] = f32(blocks['mixer_norm']['scale'][i])
    sd[p + 'final_layer_norm.weight'] = f32(blocks['ffn_norm']['scale'][i])
    sd[p + 'ffn.fc1.weight'] = layout.dense(f32(blocks['ffn']['w_gate'][i]))
    sd[p + 'ffn.gate.weight'] = layout.dense(f32(blocks['ffn']['w_up'][i]))
    sd[p + 'ffn.fc2.weight'] = layout.dense(f32(blocks['ffn']['w_down'][i]))
  args = {
      'decoder_embed_dim': cfg.embed_dim, 'decoder_value_embed_dim': cfg.values,
      'decoder_retention_heads': H, 'decoder_ffn_embed_dim': cfg.ffn_dim, 'decoder_layers': L,
      'activation_fn': cfg.ffn_activation, 'layernorm_eps': cfg.norm_eps,
      'vocab_size': cfg.vocab_size, 'share_decoder_input_output_embed': cfg.tie_embeddings,
      'no_scale_embedding': True, 'dropout': 0.0, 'activation_dropout': 0.0,
      'drop_path_rate': 0.0,
  }
  return sd, args


def import_weights(input_path: str, config_json: str | None = None, param_dtype: str = 'float32',
                   trust_pickle: bool = False):
  """(params, ModelConfig, None) from a torchscale `.pt` file (see the module docstring)."""
  state_dict, ckpt_args = reading.read_state_dict(input_path, trust_pickle)
  sidecar = config_json or os.path.splitext(input_path)[0] + '.json'
  extra = reading.read_json(sidecar) if (config_json or os.path.isfile(sidecar)) else {}
  params, cfg = from_torchscale(state_dict, {**ckpt_args, **extra}, param_dtype)
  return params, cfg, None


def export_weights(params, cfg: model_lib.ModelConfig, output: str, meta: dict | None = None) -> str:
  """Writes `output` (a .pt state dict) and its .json RetNetConfig fields; returns what it wrote."""
  del meta  # torchscale has no tokenizer files.
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError('exporting to torchscale needs torch (pip install -e ".[torch]").') from e
  state_dict, args = to_torchscale(params, cfg)
  tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
  if cfg.tie_embeddings:
    tensors['output_projection.weight'] = tensors['embed_tokens.weight']
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  torch.save(tensors, output)
  sidecar = os.path.splitext(output)[0] + '.json'
  with open(sidecar, 'w') as f:
    json.dump(args, f, indent=2)
  return f'{output} and {sidecar}'
