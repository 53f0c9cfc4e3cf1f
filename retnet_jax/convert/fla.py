r"""flash-linear-attention's RetNet (`fla.models.RetNetForCausalLM`) in and out.

A directory with config.json and *.safetensors (what `save_pretrained` writes and fla-hub
publishes; or one weights file with --config_json). Torch Linear weights are [out, in]; with H heads,
Hkv = num_kv_heads (default H), K = D / H, Vh = V / H:

    model.embeddings.weight [vocab, D]                embed
    lm_head.weight [vocab, D]                         head [D, vocab] (absent or ignored when tied)
    model.layers.i.attn.q_proj.weight [D, D]          blocks.retention.wq [L, D, H, K]
    model.layers.i.attn.k_proj.weight [Hkv·K, D]      blocks.retention.wk, each kv head repeated
    model.layers.i.attn.v_proj.weight [Hkv·Vh, D]     blocks.retention.wv    H / Hkv times (fla's
                                                                               `(h g)` order)
    model.layers.i.attn.g_proj.weight [V, D]          blocks.retention.wg (use_output_gate)
    model.layers.i.attn.o_proj.weight [D, V]          blocks.retention.wo [L, H, Vh, D]
    model.layers.i.attn.g_norm_swish_gate.weight [Vh] blocks.retention.norm.scale (elementwise_affine;
                                                      named g_norm without fuse_norm or gate)
    model.layers.i.mlp.{gate,up,down}_proj.weight     blocks.ffn.{w_gate,w_up,w_down}
    model.layers.i.{attn_norm,mlp_norm}.weight        blocks.{mixer_norm,ffn_norm}.scale
    model.norm.weight                                 final_norm.scale

The variant: half-split rotary with standard frequencies (base 10000), γ_h = 1 − 2^(−5−h) (the
'retnet' schedule, fixed), per-head RMSNorm (with affine when elementwise_affine) times swish(g),
SwiGLU, no retention normalisation (decay_row_norm=False); fla scales q by K^−½ inside its kernel, we
scale k: the same product. Grouped keys and values (num_kv_heads < num_heads) import exactly as
repeated heads; fla options with no counterpart here (short convolutions, feature maps,
expand_k != 1, attention residuals, activations other than swish) are refused by name.

Hybrids: fla's `attn={'layers': [...], 'num_heads': H, 'num_kv_heads': ..., 'window_size': ...}`
builds those layers as softmax attention (fla.layers.attn.Attention: q, k, v [·, D] with grouped kv
heads, o [D, D], the same half-split rotary); they import as `attention` layers of the shortest
`layer_pattern` that repeats to the layer list (blocks/<position>/attention/wq [R, D, H, K], kv heads
repeated), `window_size` as `attention_window`. Refused by name: attention heads other than the
model's, qkv_bias, qk_norm, rope_theta other than 10000, and specs that differ in heads or window.

Exporting writes DIR/config.json (an fla RetNetConfig), DIR/model.safetensors (in the checkpoint's
param dtype) and, when the checkpoint's meta holds a Hugging Face tokenizer, DIR/tokenizer.json and
tokenizer_config.json: `fla.models.RetNetForCausalLM.from_pretrained(DIR)` loads it. Only what fla
can express exports; anything else is refused with the reason.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np

from retnet_jax import decay
from retnet_jax import model as model_lib
from retnet_jax.convert import checks
from retnet_jax.convert import fla_yoco
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
MAX_HEAD_DIM = 256  # fla's rotary kernel asserts head_k_dim <= 256.


def fla_settings(hf_config: dict) -> dict:
  """fla RetNetConfig defaults <- config.json, checked for what this model supports.

  Adds 'value_dim' (V), 'intermediate_size' (fla's GatedMLP rule when absent) and 'num_kv_heads'.
  """
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
    problems.append(f"feature_map={c['feature_map']!r} (a feature map on q and k)")
  if c['attn']:
    problems += _attention_problems(c)
  if float(c['expand_k']) != 1.0:
    problems.append(f"expand_k={c['expand_k']} (this model's q-k width is hidden_size)")
  if c['hidden_act'] != 'swish':
    problems.append(f"hidden_act={c['hidden_act']!r} (needs swish)")
  if c['attnres_block_size'] is not None:
    problems.append('attnres_block_size (attention residuals)')
  if problems:
    raise ConversionError('fla features this model does not have: ' + '; '.join(problems) + '.')
  D, H = int(c['hidden_size']), int(c['num_heads'])
  if c['intermediate_size'] is None:  # fla's GatedMLP rule.
    ratio = 4 if c['hidden_ratio'] is None else c['hidden_ratio']
    c['intermediate_size'] = 256 * ((int(D * ratio * 2 / 3) + 255) // 256)
  value_dim = D * float(c['expand_v'])
  c['value_dim'] = round(value_dim)
  c['num_kv_heads'] = H if c['num_kv_heads'] is None else int(c['num_kv_heads'])
  if not math.isclose(value_dim, c['value_dim']) or D % H or c['value_dim'] % H:
    raise ConversionError(f"config.json: {H} heads must divide hidden_size {D} and "
                          f"hidden_size * expand_v = {value_dim}.")
  if H % c['num_kv_heads']:
    raise ConversionError(f"config.json: num_kv_heads={c['num_kv_heads']} must divide num_heads={H}.")
  return c


def _attention_specs(c: dict) -> list[dict]:
  """fla's `attn` setting as a list of specs, with fla's defaults filled in."""
  specs = [c['attn']] if isinstance(c['attn'], dict) else list(c['attn'] or [])
  return [{'num_kv_heads': None, 'qkv_bias': False, 'window_size': None, 'rope_theta': 10000.0,
           **spec} for spec in specs]


def _attention_problems(c: dict) -> list[str]:
  """What of fla's hybrid attention layers this model cannot express (empty: all of it)."""
  problems, specs = [], _attention_specs(c)
  H = int(c['num_heads'])
  settings = {(s['num_heads'], s['num_kv_heads'] or s['num_heads'], s['window_size'])
              for s in specs}
  if len(settings) > 1:
    problems.append(f'attn with {len(specs)} specs of different heads or windows (one attention '
                    'layer kind per model)')
  for s in specs:
    if s['num_heads'] != H:
      problems.append(f"attn num_heads={s['num_heads']} (attention layers use the model's "
                      f'num_heads={H})')
    if s['num_heads'] % (s['num_kv_heads'] or s['num_heads']):
      problems.append(f"attn num_kv_heads={s['num_kv_heads']} (must divide num_heads)")
    if s['qkv_bias']:
      problems.append('attn qkv_bias (biases on q, k, v)')
    if float(s['rope_theta']) != 10000.0:
      problems.append(f"attn rope_theta={s['rope_theta']} (one rotary base, 10000, for every layer)")
    if s.get('qk_norm'):
      problems.append('attn qk_norm (norms on q and k)')
  return problems


def attention_layers(hf_config: dict) -> tuple[set[int], int, int | None]:
  """(the layers fla builds as softmax attention, their kv heads, their window) of a config."""
  c = {**FLA_DEFAULTS, **hf_config}
  specs = _attention_specs(c)
  layers = {int(i) for s in specs for i in s['layers']}
  if not specs:
    return layers, int(c['num_heads']), None
  return layers, int(specs[0]['num_kv_heads'] or specs[0]['num_heads']), specs[0]['window_size']


def layer_pattern(mixers: list[str]) -> str:
  """The shortest pattern whose repeats give `mixers` (at worst all of them)."""
  L = len(mixers)
  for P in range(1, L + 1):
    if L % P == 0 and all(mixers[i] == mixers[i % P] for i in range(L)):
      return ','.join(mixers[:P])
  return ','.join(mixers)


def _norm_name(state_dict: dict, gate: bool, fuse_norm: bool) -> str:
  """The per-head norm's module name: fla calls it g_norm_swish_gate when it fuses norm and gate,
  else g_norm (older checkpoints may use either; both are the same RMSNorm times swish(g))."""
  for name in ('g_norm_swish_gate', 'g_norm'):
    if f'model.layers.0.attn.{name}.weight' in state_dict:
      return name
  return 'g_norm_swish_gate' if gate and fuse_norm else 'g_norm'


def expected_shapes(hf_config: dict, norm_name: str | None = None) -> dict[str, tuple]:
  """Every tensor name of an fla RetNetForCausalLM state dict with its shape."""
  c = fla_settings(hf_config)
  D, H, L, vocab = (int(c[k]) for k in ('hidden_size', 'num_heads', 'num_hidden_layers', 'vocab_size'))
  V, F, G = c['value_dim'], int(c['intermediate_size']), H // c['num_kv_heads']
  gate = bool(c['use_output_gate'])
  norm_name = norm_name or ('g_norm_swish_gate' if gate and c['fuse_norm'] else 'g_norm')
  expected = {'model.embeddings.weight': (vocab, D), 'model.norm.weight': (D,),
              'lm_head.weight': (vocab, D)}
  attn_layers, attn_kv, _ = attention_layers(c)
  for i in range(L):
    p = f'model.layers.{i}.'
    expected.update({
        p + 'attn_norm.weight': (D,), p + 'mlp_norm.weight': (D,),
        p + 'mlp.gate_proj.weight': (F, D), p + 'mlp.up_proj.weight': (F, D),
        p + 'mlp.down_proj.weight': (D, F)})
    if i in attn_layers:  # fla.layers.attn.Attention: head dim D / H, kv heads attn_kv.
      Ga = H // attn_kv
      expected.update({p + 'attn.q_proj.weight': (D, D), p + 'attn.k_proj.weight': (D // Ga, D),
                       p + 'attn.v_proj.weight': (D // Ga, D), p + 'attn.o_proj.weight': (D, D)})
      continue
    expected.update({
        p + 'attn.q_proj.weight': (D, D), p + 'attn.k_proj.weight': (D // G, D),
        p + 'attn.v_proj.weight': (V // G, D), p + 'attn.o_proj.weight': (D, V)})
    if gate:
      expected[p + 'attn.g_proj.weight'] = (V, D)
    if c['elementwise_affine']:
      expected[p + f'attn.{norm_name}.weight'] = (V // H,)
  return expected


def from_fla(state_dict: dict, hf_config: dict, param_dtype: str = 'float32'):
  """(params pure dict, ModelConfig) from an fla RetNetForCausalLM state dict and its config.json.

  state_dict: name -> array (NumPy; or abstract arrays inside jax.eval_shape, for shape checks).
  """
  c = fla_settings(hf_config)
  where = 'fla state dict'
  if 'embed_tokens.weight' in state_dict or 'decoder.embed_tokens.weight' in state_dict:
    raise ConversionError(f"{where}: names like embed_tokens.* are torchscale's: use --from=torchscale.")
  D, H, L, vocab = (int(c[k]) for k in ('hidden_size', 'num_heads', 'num_hidden_layers', 'vocab_size'))
  V, F, Hkv = c['value_dim'], int(c['intermediate_size']), c['num_kv_heads']
  gate, affine = bool(c['use_output_gate']), bool(c['elementwise_affine'])
  tied = bool(c['tie_word_embeddings'])
  norm_name = _norm_name(state_dict, gate, c['fuse_norm'])
  check_names_and_shapes(state_dict, expected_shapes(c, norm_name), where,
                         ('lm_head.weight',) if tied else ())
  if D // H > MAX_HEAD_DIM:
    raise ConversionError(f'{where}: head dim {D // H} is above fla\'s limit of {MAX_HEAD_DIM}.')

  attn_layers, attn_kv, window = attention_layers(c)
  mixers = ['attention' if i in attn_layers else 'retention' for i in range(L)]
  pattern = layer_pattern(mixers)
  cfg = model_lib.ModelConfig(
      kind='retnet', layer_pattern='' if pattern == 'retention' else pattern,
      attention_window=window, vocab_size=vocab, num_layers=L, embed_dim=D, num_heads=H,
      value_dim=V if 'retention' in mixers else None,
      ffn_dim=F, ffn_activation='swish', gamma='retnet', rotary='half', rotary_freqs='standard',
      rotary_base=10000.0, swish_gate=gate, group_norm=True, group_norm_affine=affine,
      decay_row_norm=False, norm_eps=float(c['norm_eps']), tie_embeddings=tied,
      param_dtype=param_dtype)

  def grouped(kv_heads):  # [Hkv·X, D] -> [D, H, X]: kv head j serves heads j·G .. j·G + G − 1.
    def one(w):
      w_DHX = layout.in_heads(w, kv_heads)
      return w_DHX if kv_heads == H else layout.xp(w_DHX).repeat(w_DHX, H // kv_heads, axis=1)
    return one

  sd, t = state_dict, 'model.layers.{}.'

  def stack(name, layers, fn=lambda a: a):
    arrays = [fn(sd[(t + name).format(i)]) for i in layers]
    return layout.xp(arrays[0]).stack(arrays)

  def block(mixer, layers):
    """One pattern position's Block, stacked over `layers`."""
    kv = Hkv if mixer == 'retention' else attn_kv
    out = {'wq': stack('attn.q_proj.weight', layers, lambda w: layout.in_heads(w, H)),
           'wk': stack('attn.k_proj.weight', layers, grouped(kv)),
           'wv': stack('attn.v_proj.weight', layers, grouped(kv)),
           'wo': stack('attn.o_proj.weight', layers, lambda w: layout.out_heads(w, H))}
    if mixer == 'retention' and gate:
      out['wg'] = stack('attn.g_proj.weight', layers, lambda w: layout.in_heads(w, H))
    if mixer == 'retention' and affine:
      out['norm'] = {'scale': stack(f'attn.{norm_name}.weight', layers)}
    return {
        mixer: out,
        'ffn': {'w_gate': stack('mlp.gate_proj.weight', layers, layout.dense),
                'w_up': stack('mlp.up_proj.weight', layers, layout.dense),
                'w_down': stack('mlp.down_proj.weight', layers, layout.dense)},
        'mixer_norm': {'scale': stack('attn_norm.weight', layers)},
        'ffn_norm': {'scale': stack('mlp_norm.weight', layers)},
    }

  P = len(cfg.pattern)
  blocks = [block(m, range(p, L, P)) for p, m in enumerate(cfg.pattern)]
  params = {
      'embed': sd['model.embeddings.weight'],
      'blocks': blocks[0] if P == 1 else dict(enumerate(blocks)),
      'final_norm': {'scale': sd['model.norm.weight']},
  }
  if not tied:
    params['head'] = layout.dense(sd['lm_head.weight'])
  params = layout.cast(params, param_dtype)
  checks.check_params(params, cfg)
  return params, cfg


def _fixed_log_gamma(params, cfg: model_lib.ModelConfig) -> np.ndarray:
  """log γ [L, H] float64 of a RetNet's parameters."""
  if cfg.gamma != 'learnable':
    return np.tile(np.log(cfg.gammas()), (cfg.num_layers, 1))
  P = len(cfg.pattern)
  rates = [np.asarray((params['blocks'] if P == 1 else params['blocks'][p])['retention']
                      ['decay_log_rate'], np.float64) for p, m in enumerate(cfg.pattern)
           if m == 'retention']
  return -np.exp(np.concatenate(rates))


def to_fla(params, cfg: model_lib.ModelConfig) -> tuple[dict[str, np.ndarray], dict]:
  """(RetNetForCausalLM state dict in the param dtype, its config.json) of our parameters."""
  problems = []
  if cfg.kind != 'retnet':
    problems.append(f'kind={cfg.kind!r} (needs retnet)')
  elif unknown := sorted(set(cfg.pattern) - {'retention', 'attention'}):
    problems.append(f'mixers {unknown} (fla\'s RetNet has retention and attention layers)')
  else:
    if (cfg.rotary, cfg.rotary_freqs, cfg.rotary_base) != ('half', 'standard', 10000.0):
      problems.append(f'rotary={cfg.rotary!r}, rotary_freqs={cfg.rotary_freqs!r}, rotary_base='
                      f"{cfg.rotary_base} (fla rotates half-split pairs at base 10000's standard "
                      'frequencies)')
    retnet = np.log(decay.gammas('retnet', cfg.num_heads))
    if not np.allclose(_fixed_log_gamma(params, cfg), retnet[None], rtol=1e-6, atol=0):
      problems.append(f'gamma={cfg.gamma!r} (fla fixes γ_h = 1 − 2^(−5−h), the retnet schedule)')
    if not cfg.group_norm:
      problems.append('group_norm=False (fla always norms each head)')
    if cfg.decay_row_norm:
      problems.append('decay_row_norm=True (fla does not divide rows by sqrt(sum of γ^i))')
    if cfg.ffn_activation != 'swish':
      problems.append(f'ffn_activation={cfg.ffn_activation!r} (fla uses one hidden_act, swish, for '
                      'the FFN and the gate)')
    if cfg.head_dim > MAX_HEAD_DIM:
      problems.append(f'head dim {cfg.head_dim} (fla allows at most {MAX_HEAD_DIM})')
  if problems:
    raise ConversionError('cannot export to fla: ' + '; '.join(problems) + '.')
  D, H, L, V = cfg.embed_dim, cfg.num_heads, cfg.num_layers, cfg.values
  dtype = layout.NP_DTYPES[cfg.param_dtype]
  as_np = lambda a: np.asarray(a).astype(dtype)
  P = len(cfg.pattern)
  norm_name = 'g_norm_swish_gate' if cfg.swish_gate else 'g_norm'
  sd = {'model.embeddings.weight': as_np(params['embed']),
        'model.norm.weight': as_np(params['final_norm']['scale'])}
  if not cfg.tie_embeddings:
    sd['lm_head.weight'] = layout.dense(as_np(params['head']))
  for i, mixer in enumerate(cfg.layer_mixers):
    blocks, r = (params['blocks'] if P == 1 else params['blocks'][i % P]), i // P
    mix = blocks[mixer]
    p = f'model.layers.{i}.'
    gate = (('wg', 'g_proj'),) if mixer == 'retention' and cfg.swish_gate else ()
    for ours, theirs in (('wq', 'q_proj'), ('wk', 'k_proj'), ('wv', 'v_proj')) + gate:
      sd[p + f'attn.{theirs}.weight'] = layout.from_in_heads(as_np(mix[ours][r]))
    sd[p + 'attn.o_proj.weight'] = layout.from_out_heads(as_np(mix['wo'][r]))
    if mixer == 'retention' and cfg.group_norm_affine:
      sd[p + f'attn.{norm_name}.weight'] = as_np(mix['norm']['scale'][r])
    sd[p + 'attn_norm.weight'] = as_np(blocks['mixer_norm']['scale'][r])
    sd[p + 'mlp_norm.weight'] = as_np(blocks['ffn_norm']['scale'][r])
    sd[p + 'mlp.gate_proj.weight'] = layout.dense(as_np(blocks['ffn']['w_gate'][r]))
    sd[p + 'mlp.up_proj.weight'] = layout.dense(as_np(blocks['ffn']['w_up'][r]))
    sd[p + 'mlp.down_proj.weight'] = layout.dense(as_np(blocks['ffn']['w_down'][r]))
  attn_layers = [i for i, m in enumerate(cfg.layer_mixers) if m == 'attention']
  attn = None if not attn_layers else {
      'layers': attn_layers, 'num_heads': H, 'num_kv_heads': H, 'qkv_bias': False,
      'window_size': cfg.attention_window, 'rope_theta': 10000.0}
  config = {
      'architectures': ['RetNetForCausalLM'], 'model_type': 'retnet', 'attn_mode': 'chunk',
      'hidden_size': D, 'num_hidden_layers': L, 'num_heads': H, 'num_kv_heads': None,
      'expand_k': 1, 'expand_v': V / D, 'intermediate_size': cfg.ffn_dim, 'hidden_act': 'swish',
      'use_output_gate': cfg.swish_gate, 'elementwise_affine': cfg.group_norm_affine,
      'norm_eps': cfg.norm_eps, 'vocab_size': cfg.vocab_size,
      'tie_word_embeddings': cfg.tie_embeddings, 'use_short_conv': False, 'feature_map': None,
      'attn': attn, 'fuse_norm': True, 'fuse_swiglu': True, 'fuse_cross_entropy': True,
      'use_cache': True, 'dtype': cfg.param_dtype,
  }
  return sd, config


def _write_tokenizer(meta: dict, output: str, config: dict) -> bool:
  """tokenizer.json and tokenizer_config.json from an imported Hugging Face tokenizer, if any."""
  info = (meta or {}).get('tokenizer')
  if not info or info.get('kind') != 'huggingface':
    return False
  path = os.path.join(output, 'tokenizer.json')
  if 'json' in info:
    with open(path, 'w') as f:
      f.write(info['json'])
  elif os.path.isfile(info.get('path', '')):
    shutil.copyfile(info['path'], path)
  else:
    return False
  tok_config = {'tokenizer_class': 'PreTrainedTokenizerFast'}
  try:
    tok = reading.load_hf_tokenizer({'tokenizer': {'path': path}})
  except ImportError:
    tok = None
  for key in ('bos', 'eos', 'pad'):
    token_id = info.get(f'{key}_token_id')
    if token_id is not None:
      config[f'{key}_token_id'] = token_id
      token = None if tok is None else tok.id_to_token(token_id)
      if token is not None:
        tok_config[f'{key}_token'] = token
  with open(os.path.join(output, 'tokenizer_config.json'), 'w') as f:
    json.dump(tok_config, f, indent=2)
  return True


def export_weights(params, cfg: model_lib.ModelConfig, output: str, meta: dict | None = None) -> str:
  """Writes the directory `output` (see the module docstring); returns what it wrote."""
  try:
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError('exporting to fla needs the safetensors package.') from e
  state_dict, config = (fla_yoco.to_fla if cfg.kind == 'yoco' else to_fla)(params, cfg)
  checks.check_output_dir(output)
  os.makedirs(output, exist_ok=True)
  with_tokenizer = _write_tokenizer(meta, output, config)
  save_file(state_dict, os.path.join(output, 'model.safetensors'), metadata={'format': 'pt'})
  with open(os.path.join(output, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  return f'{output} (config.json, model.safetensors' + (', tokenizer' if with_tokenizer else '') + ')'


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
  importer = fla_yoco.from_fla if hf_config.get('model_type') == 'yoco' else from_fla
  params, cfg = importer(state_dict, hf_config, param_dtype)
  return params, cfg, hf_config
