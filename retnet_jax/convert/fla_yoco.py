r"""flash-linear-attention's YOCO (`fla.models.YOCOForCausalLM`, model_type 'yoco') in and out.

`--from=fla` reads it when config.json says model_type 'yoco' (convert/fla.py hands it here). With
L_s = num_self_decoder_layers, L_c = num_hidden_layers − L_s, H heads, Hkv = num_kv_heads, K = D / H
and torch Linear weights [out, in]:

    model.embeddings.weight [vocab, D]                       embed
    model.self_layers.i.attn.{q,k,v,g}_proj.weight [D, D]    self_blocks.retention.w{q,k,v,g} [L_s, D, H, K]
    model.self_layers.i.attn.gk_proj.weight [H, D]           self_blocks.retention.wgamma [L_s, D, H]
    model.self_layers.i.attn.o_proj.weight [D, D]            self_blocks.retention.wo [L_s, H, K, D]
    model.{self,cross}_layers.i.{attn_norm,mlp_norm}.weight  {self,cross}_blocks.{mixer_norm,ffn_norm}.scale
    model.{self,cross}_layers.i.mlp.{gate,up,down}_proj      {self,cross}_blocks.ffn.{w_gate,w_up,w_down}
    model.shared_kv_builder.kv_norm.weight [D]               kv.norm.scale
    model.shared_kv_builder.{k,v}_proj.weight [Hkv·K, D]     kv.{wk,wv} [D, Hkv, K]
    model.cross_layers.i.attn.q_proj.weight [D, D]           cross_blocks.wq [L_c, D, H, K]
    model.cross_layers.i.attn.o_proj.weight [D, D]           cross_blocks.wo [L_c, H, K, D]
    model.norm.weight, lm_head.weight                        final_norm.scale, head

The variant: gated retention with log γ_t = logsigmoid(x W_γ) / gate_logit_normalizer, a per-head
RMSNorm without scale times swish(g), value width D; interleaved rotary everywhere, with
rope_inv_freq 'fla' = rotary_freqs 'standard' (θ_i = base^(−2i/K)) and 'yoco' = 'torchscale'
(base^(−linspace(0, 1, K/2))); embeddings times √D (the YOCO model does it always).

A sliding-window self-decoder (self_decoder_attn type 'swa', fla's `Attention` with `window_size`)
imports as self_decoder='swa' with attention_window = window_size (both attend to the last W
positions, the token's own included):

    model.self_layers.i.attn.{q,o}_proj.weight [D, D]      self_blocks.attention.w{q,o}
    model.self_layers.i.attn.{k,v}_proj.weight [Gs·K, D]   self_blocks.attention.w{k,v} [L_s, D, H, K]

fla rotates that layer's q and k in half-split pairs (j, j + K/2) at the standard frequencies, the
rest of YOCO in interleaved pairs (2j, 2j + 1): the same rotation once q's and k's features are
reordered j -> 2j, j + K/2 -> 2j + 1 in every head (q·k is unchanged by one reordering of both), so
the import reorders them (`swa_order`) and the export reverses it. Its Gs kv heads are repeated to H
heads on import (query head h reads kv head h // (H / Gs), as fla's attention does); the export
writes H.
"""

from __future__ import annotations

import numpy as np

from retnet_jax import model as model_lib
from retnet_jax import yoco
from retnet_jax.convert import checks
from retnet_jax.convert import layout
from retnet_jax.convert.checks import check_names_and_shapes
from retnet_jax.convert.checks import ConversionError

DEFAULTS = {
    'num_self_decoder_layers': 10, 'hidden_ratio': 4, 'intermediate_size': None,
    'hidden_act': 'swish', 'num_hidden_layers': 21, 'norm_eps': 1e-6, 'tie_word_embeddings': False,
    'attnres_block_size': None, 'self_decoder_attn': None, 'cross_decoder_attn': None,
}
SELF_DEFAULTS = {'type': 'gated_deltanet', 'num_heads': 6, 'rope_theta': 10000.0,
                 'rope_inv_freq': 'fla', 'gate_logit_normalizer': 16.0, 'qkv_bias': False}
CROSS_DEFAULTS = {'num_heads': 32, 'num_kv_heads': None, 'qkv_bias': False, 'qk_norm': False,
                  'rope_theta': 10000.0, 'rope_inv_freq': 'fla'}
ROTARY_FREQS = {'fla': 'standard', 'yoco': 'torchscale'}


def settings(hf_config: dict) -> dict:
  """fla YOCOConfig defaults <- config.json, refused by name where this model differs."""
  c = {**DEFAULTS, **hf_config}
  for key in ('hidden_size', 'vocab_size'):
    if key not in c:
      raise ConversionError(f'config.json lacks {key!r}.')
  s = {**SELF_DEFAULTS, **(c['self_decoder_attn'] or {})}
  x = {**CROSS_DEFAULTS, **(c['cross_decoder_attn'] or {})}
  x['num_kv_heads'] = x['num_heads'] if x['num_kv_heads'] is None else x['num_kv_heads']
  problems = []
  if s['type'] not in ('gated_retention', 'swa'):
    problems.append(f"self_decoder_attn.type={s['type']!r} (imports: 'gated_retention', 'swa')")
  if s['type'] == 'swa':
    s['num_v_heads'] = s.get('num_v_heads') or s['num_heads']
    if not s.get('window_size'):
      problems.append('self_decoder_attn.type=swa without window_size (full attention)')
    if s['qkv_bias']:
      problems.append('self_decoder_attn.qkv_bias (biases on q, k, v)')
    if x['rope_inv_freq'] != 'fla':  # fla's Attention rotates at the standard frequencies.
      problems.append(f"cross_decoder_attn.rope_inv_freq={x['rope_inv_freq']!r} with a swa "
                      "self-decoder (its attention rotates at 'fla' frequencies)")
    s['rope_inv_freq'] = x['rope_inv_freq']  # fla's Attention has no such option.
  if int(s['num_heads']) != int(x['num_heads']):
    problems.append(f"self_decoder_attn.num_heads={s['num_heads']} != cross_decoder_attn.num_heads="
                    f"{x['num_heads']} (one head count here)")
  for key in ('rope_theta', 'rope_inv_freq'):
    if s[key] != x[key]:
      problems.append(f'self_decoder_attn.{key}={s[key]!r} != cross_decoder_attn.{key}={x[key]!r}')
  if s['rope_inv_freq'] not in ROTARY_FREQS:
    problems.append(f"rope_inv_freq={s['rope_inv_freq']!r}")
  if x['qkv_bias']:
    problems.append('cross_decoder_attn.qkv_bias (biases on q, k, v)')
  if x['qk_norm']:
    problems.append('cross_decoder_attn.qk_norm (a norm on the queries)')
  if c['hidden_act'] != 'swish':
    problems.append(f"hidden_act={c['hidden_act']!r} (needs swish)")
  if c['attnres_block_size'] is not None:
    problems.append('attnres_block_size (attention residuals)')
  if not 0 < int(c['num_self_decoder_layers']) < int(c['num_hidden_layers']):
    problems.append(f"num_self_decoder_layers={c['num_self_decoder_layers']} of "
                    f"num_hidden_layers={c['num_hidden_layers']} (needs both halves)")
  if problems:
    raise ConversionError('fla YOCO features this model does not have: ' + '; '.join(problems) + '.')
  D, H = int(c['hidden_size']), int(x['num_heads'])
  if s['type'] == 'swa' and H % int(s['num_v_heads']):
    raise ConversionError(f"config.json: self_decoder_attn.num_v_heads={s['num_v_heads']} must divide "
                          f'num_heads={H}.')
  if D % H or H % int(x['num_kv_heads']):
    raise ConversionError(f"config.json: num_heads={H} must divide hidden_size={D} and be a multiple "
                          f"of num_kv_heads={x['num_kv_heads']}.")
  if c['intermediate_size'] is None:  # fla's GatedMLP rule.
    ratio = 4 if c['hidden_ratio'] is None else c['hidden_ratio']
    c['intermediate_size'] = 256 * ((int(D * ratio * 2 / 3) + 255) // 256)
  c['self_decoder_attn'], c['cross_decoder_attn'] = s, x
  return c


def expected_shapes(c: dict) -> dict[str, tuple]:
  D, vocab, F = int(c['hidden_size']), int(c['vocab_size']), int(c['intermediate_size'])
  H, Hkv = int(c['cross_decoder_attn']['num_heads']), int(c['cross_decoder_attn']['num_kv_heads'])
  Ls, L = int(c['num_self_decoder_layers']), int(c['num_hidden_layers'])
  K = D // H
  out = {'model.embeddings.weight': (vocab, D), 'model.norm.weight': (D,), 'lm_head.weight': (vocab, D),
         'model.shared_kv_builder.kv_norm.weight': (D,),
         'model.shared_kv_builder.k_proj.weight': (Hkv * K, D),
         'model.shared_kv_builder.v_proj.weight': (Hkv * K, D)}
  mlp = {'attn_norm.weight': (D,), 'mlp_norm.weight': (D,), 'mlp.gate_proj.weight': (F, D),
         'mlp.up_proj.weight': (F, D), 'mlp.down_proj.weight': (D, F)}
  s = c['self_decoder_attn']
  for i in range(Ls):
    p = f'model.self_layers.{i}.'
    out.update({p + k: v for k, v in mlp.items()})
    if s['type'] == 'swa':
      Gs = int(s['num_v_heads'])
      out.update({p + 'attn.q_proj.weight': (D, D), p + 'attn.o_proj.weight': (D, D),
                  p + 'attn.k_proj.weight': (Gs * K, D), p + 'attn.v_proj.weight': (Gs * K, D)})
      continue
    out.update({p + f'attn.{n}_proj.weight': (D, D) for n in ('q', 'k', 'v', 'g', 'o')})
    out[p + 'attn.gk_proj.weight'] = (H, D)
  for i in range(L - Ls):
    p = f'model.cross_layers.{i}.'
    out.update({p + k: v for k, v in mlp.items()})
    out.update({p + 'attn.q_proj.weight': (D, D), p + 'attn.o_proj.weight': (D, D)})
  return out


def swa_order(K: int) -> np.ndarray:
  """Feature j of a half-split rotary pair goes to 2j, feature j + K/2 to 2j + 1."""
  return np.stack([np.arange(K // 2), np.arange(K // 2) + K // 2], -1).reshape(-1)


def from_fla(state_dict: dict, hf_config: dict, param_dtype: str = 'float32'):
  """(params pure dict, ModelConfig) from an fla YOCOForCausalLM state dict and its config.json."""
  c = settings(hf_config)
  tied = bool(c['tie_word_embeddings'])
  check_names_and_shapes(state_dict, expected_shapes(c), 'fla YOCO state dict',
                         ('lm_head.weight',) if tied else ())
  s, x = c['self_decoder_attn'], c['cross_decoder_attn']
  D, H, Hkv = int(c['hidden_size']), int(x['num_heads']), int(x['num_kv_heads'])
  Ls, L = int(c['num_self_decoder_layers']), int(c['num_hidden_layers'])
  swa = s['type'] == 'swa'
  cfg = model_lib.ModelConfig(
      kind='yoco', num_layers=L, num_self_decoder_layers=Ls, self_decoder=s['type'],
      attention_window=int(s['window_size']) if swa else None, num_kv_heads=Hkv,
      vocab_size=int(c['vocab_size']), embed_dim=D, num_heads=H, value_dim=D,
      ffn_dim=int(c['intermediate_size']), ffn_activation='swish', gamma='gated',
      gate_temperature=float(s['gate_logit_normalizer']), rotary='interleaved',
      rotary_freqs=ROTARY_FREQS[s['rope_inv_freq']], rotary_base=float(s['rope_theta']),
      swish_gate=True, group_norm=True, group_norm_affine=False, decay_row_norm=False,
      norm_eps=float(c['norm_eps']), tie_embeddings=tied, param_dtype=param_dtype)
  sd = state_dict
  heads = lambda w: layout.in_heads(w, H)
  out_heads = lambda w: layout.out_heads(w, H)

  def block(prefix, n):
    return {'mixer_norm': {'scale': layout.stack(sd, prefix + 'attn_norm.weight', n)},
            'ffn_norm': {'scale': layout.stack(sd, prefix + 'mlp_norm.weight', n)},
            'ffn': {w: layout.stack(sd, prefix + f'mlp.{t}_proj.weight', n, layout.dense)
                    for w, t in (('w_gate', 'gate'), ('w_up', 'up'), ('w_down', 'down'))}}

  t_self, t_cross = 'model.self_layers.{}.', 'model.cross_layers.{}.'
  self_blocks = block(t_self, Ls)
  if swa:
    order, Gs = swa_order(D // H), int(s['num_v_heads'])
    kv_heads = lambda w: layout.xp(w).repeat(layout.in_heads(w, Gs), H // Gs, axis=1)
    rotated = lambda w: w[..., order]
    self_blocks['attention'] = {
        'wq': layout.stack(sd, t_self + 'attn.q_proj.weight', Ls, lambda w: rotated(heads(w))),
        'wk': layout.stack(sd, t_self + 'attn.k_proj.weight', Ls, lambda w: rotated(kv_heads(w))),
        'wv': layout.stack(sd, t_self + 'attn.v_proj.weight', Ls, kv_heads),
        'wo': layout.stack(sd, t_self + 'attn.o_proj.weight', Ls, out_heads)}
  else:
    self_blocks['retention'] = {
        **{f'w{n}': layout.stack(sd, t_self + f'attn.{n}_proj.weight', Ls, heads) for n in 'qkvg'},
        'wgamma': layout.stack(sd, t_self + 'attn.gk_proj.weight', Ls, layout.dense),
        'wo': layout.stack(sd, t_self + 'attn.o_proj.weight', Ls, out_heads)}
  cross_blocks = block(t_cross, L - Ls)
  cross_blocks['wq'] = layout.stack(sd, t_cross + 'attn.q_proj.weight', L - Ls, heads)
  cross_blocks['wo'] = layout.stack(sd, t_cross + 'attn.o_proj.weight', L - Ls, out_heads)
  kv = 'model.shared_kv_builder.'
  params = {
      'embed': sd['model.embeddings.weight'],
      'self_blocks': self_blocks,
      'kv': {'norm': {'scale': sd[kv + 'kv_norm.weight']},
             'wk': layout.in_heads(sd[kv + 'k_proj.weight'], Hkv),
             'wv': layout.in_heads(sd[kv + 'v_proj.weight'], Hkv)},
      'cross_blocks': cross_blocks,
      'final_norm': {'scale': sd['model.norm.weight']},
  }
  if not tied:
    params['head'] = layout.dense(sd['lm_head.weight'])
  params = layout.cast(params, param_dtype)
  checks.check_params(params, cfg)
  return params, cfg


def to_fla(params, cfg: model_lib.ModelConfig) -> tuple[dict, dict]:
  """(fla YOCOForCausalLM state dict of NumPy arrays, its config.json) of our YOCO's parameters."""
  problems = []
  swa = cfg.self_decoder == 'swa'
  if swa and cfg.rotary_freqs != 'standard':
    problems.append(f"rotary_freqs={cfg.rotary_freqs!r} with a swa self-decoder (fla's attention "
                    "rotates at the standard frequencies)")
  if not swa and (cfg.gamma != 'gated' or cfg.gate_floor is not None):
    problems.append(f"gamma={cfg.gamma!r}, gate_floor={cfg.gate_floor} (fla: gated, no floor)")
  if cfg.rotary != 'interleaved' or cfg.rotary_freqs not in ROTARY_FREQS.values():
    problems.append(f'rotary={cfg.rotary!r} (fla YOCO: interleaved)')
  if not swa and (cfg.values != cfg.embed_dim or not (cfg.swish_gate and cfg.group_norm)
                  or cfg.group_norm_affine):
    problems.append('value_dim, swish_gate, group_norm (fla: value width D, gate and a norm without scale)')
  if (not swa and cfg.decay_row_norm) or cfg.ffn_activation != 'swish':
    problems.append('decay_row_norm or a non-swish FFN')
  if problems:
    raise ConversionError('fla YOCO cannot express: ' + '; '.join(problems) + '.')
  p = {k: v for k, v in params.items()}
  Ls, L = cfg.num_self_decoder_layers, cfg.num_layers
  sd = {'model.embeddings.weight': np.asarray(p['embed']),
        'model.norm.weight': np.asarray(p['final_norm']['scale'])}
  if not cfg.tie_embeddings:
    sd['lm_head.weight'] = layout.dense(np.asarray(p['head']))

  def block(prefix, b, n):
    for i in range(n):
      q = prefix.format(i)
      sd[q + 'attn_norm.weight'] = np.asarray(b['mixer_norm']['scale'][i])
      sd[q + 'mlp_norm.weight'] = np.asarray(b['ffn_norm']['scale'][i])
      for w, t in (('w_gate', 'gate'), ('w_up', 'up'), ('w_down', 'down')):
        sd[q + f'mlp.{t}_proj.weight'] = layout.dense(np.asarray(b['ffn'][w][i]))

  sb, cb = p['self_blocks'], p['cross_blocks']
  block('model.self_layers.{}.', sb, Ls)
  block('model.cross_layers.{}.', cb, L - Ls)
  if swa:
    a, back = sb['attention'], np.argsort(swa_order(cfg.head_dim))
    for i in range(Ls):
      q = f'model.self_layers.{i}.attn.'
      for n in 'qk':
        sd[q + f'{n}_proj.weight'] = layout.from_in_heads(np.asarray(a[f'w{n}'][i])[..., back])
      sd[q + 'v_proj.weight'] = layout.from_in_heads(a['wv'][i])
      sd[q + 'o_proj.weight'] = layout.from_out_heads(a['wo'][i])
  else:
    r = sb['retention']
    for i in range(Ls):
      q = f'model.self_layers.{i}.attn.'
      for n in 'qkvg':
        sd[q + f'{n}_proj.weight'] = layout.from_in_heads(r[f'w{n}'][i])
      sd[q + 'gk_proj.weight'] = layout.dense(np.asarray(r['wgamma'][i]))
      sd[q + 'o_proj.weight'] = layout.from_out_heads(r['wo'][i])
  for i in range(L - Ls):
    q = f'model.cross_layers.{i}.attn.'
    sd[q + 'q_proj.weight'] = layout.from_in_heads(cb['wq'][i])
    sd[q + 'o_proj.weight'] = layout.from_out_heads(cb['wo'][i])
  kv = 'model.shared_kv_builder.'
  sd[kv + 'kv_norm.weight'] = np.asarray(p['kv']['norm']['scale'])
  sd[kv + 'k_proj.weight'] = layout.from_in_heads(p['kv']['wk'])
  sd[kv + 'v_proj.weight'] = layout.from_in_heads(p['kv']['wv'])
  freqs = {v: k for k, v in ROTARY_FREQS.items()}[cfg.rotary_freqs]
  rope = {'rope_theta': cfg.rotary_base, 'rope_inv_freq': freqs}
  config = {
      'model_type': 'yoco', 'architectures': ['YOCOForCausalLM'], 'hidden_size': cfg.embed_dim,
      'num_hidden_layers': L, 'num_self_decoder_layers': Ls, 'vocab_size': cfg.vocab_size,
      'intermediate_size': cfg.ffn_dim, 'hidden_act': 'swish', 'norm_eps': cfg.norm_eps,
      'tie_word_embeddings': cfg.tie_embeddings,
      'self_decoder_attn': (
          {'type': 'swa', 'num_heads': cfg.num_heads, 'num_v_heads': cfg.num_heads,
           'window_size': cfg.attention_window, 'rope_theta': cfg.rotary_base, 'qkv_bias': False}
          if swa else {'type': 'gated_retention', 'num_heads': cfg.num_heads,
                       'gate_logit_normalizer': cfg.gate_temperature, **rope}),
      'cross_decoder_attn': {'num_heads': cfg.num_heads, 'num_kv_heads': yoco.kv_heads(cfg), **rope},
  }
  sd = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in sd.items()}
  return sd, config
