r"""Import torchscale and flash-linear-attention (fla) RetNet weights; export to torchscale.

  python -m retnet_jax.convert --from=torchscale --input=retnet.pt --output=/tmp/ts [--config_json=args.json]
  python -m retnet_jax.convert --from=fla --input=/path/to/retnet-1.3B-100B --output=/tmp/fla
  python -m retnet_jax.convert --to=torchscale --input=/tmp/ts --output=retnet.pt

The output of an import is a params-only orbax checkpoint (`checkpoint.load_params(dir)` reads it);
its meta holds the ModelConfig variant that reproduces the source architecture, 'source' (format
and input path) and, when a `tokenizer.json` lies beside the input, 'tokenizer':
{'kind': 'huggingface', 'path', 'json' (the tokenizer file's text, when the `tokenizers` package is
importable), 'vocab_size', 'bos_token_id'?, 'eos_token_id'?, 'pad_token_id'?}; `load_tokenizer(meta)`
rebuilds it.

torchscale (`torchscale.architecture.retnet.RetNetDecoder`; torch `.pt`: a plain state dict, or a
fairseq checkpoint with the state dict under 'model', keys prefixed 'decoder.', and the args under
'cfg' / 'args'). Torch Linear weights are [out, in]. With H heads, K = D / H, Vh = V / H:

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
  it too differs from its parallel form through eps (torchscale issue 77); ours do not.

  What the state dict does not show comes from the checkpoint's args, else `--config_json` (a JSON
  object of RetNetConfig fields), else `<input without extension>.json` beside it, else
  RetNetConfig's defaults: activation_fn, layernorm_eps, no_scale_embedding,
  share_decoder_input_output_embed, decoder_retention_heads (also read from the decay buffer).

fla (`fla.models.RetNetForCausalLM`; a directory with config.json and *.safetensors, or one file):

    model.embeddings.weight [vocab, D]               embed
    lm_head.weight [vocab, D]                        head (ignored when tie_word_embeddings)
    model.layers.i.attn.{q,k,v,g,o}_proj.weight      as for torchscale
    model.layers.i.attn.g_norm_swish_gate.weight     blocks.retention.norm.scale (g_norm without fuse)
    model.layers.i.mlp.{gate,up,down}_proj.weight    blocks.ffn.{w_gate,w_up,w_down}
    model.layers.i.{attn_norm,mlp_norm}.weight       blocks.{mixer_norm,ffn_norm}.scale
    model.norm.weight                                final_norm.scale

  The variant: half-split rotary with standard frequencies, per-head RMSNorm with affine, SwiGLU,
  no retention normalisation; fla scales q by K^−½ inside its kernel, we scale k: the same product.

Exporting writes `retnet.pt` (a plain RetNetDecoder state dict, float tensors) and `retnet.json`
(the RetNetConfig fields to build it with): `RetNetDecoder(RetNetConfig(**json), embed_tokens=
nn.Embedding(vocab_size, D)).load_state_dict(torch.load('retnet.pt'))`.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import sys

from absl import logging
import jax
import ml_dtypes
import numpy as np

from retnet_jax import checkpoint
from retnet_jax import decay
from retnet_jax import model as model_lib

SOURCES = ('torchscale', 'fla')
TARGETS = ('torchscale',)
NP_DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}
# RetNetConfig's defaults for what a state dict does not show.
TORCHSCALE_DEFAULTS = {
    'activation_fn': 'gelu', 'layernorm_eps': 1e-6, 'no_scale_embedding': True,
    'share_decoder_input_output_embed': False, 'layernorm_embedding': False, 'deepnorm': False,
    'decoder_normalize_before': True, 'moe_freq': 0, 'multiway': False,
}
# fla's RetNetConfig defaults for what a config.json may leave out.
FLA_DEFAULTS = {
    'expand_k': 1.0, 'expand_v': 2.0, 'hidden_ratio': 2, 'intermediate_size': None,
    'num_kv_heads': None, 'feature_map': None, 'hidden_act': 'swish', 'use_short_conv': False,
    'use_output_gate': True, 'elementwise_affine': True, 'norm_eps': 1e-6, 'attn': None,
    'tie_word_embeddings': False, 'fuse_norm': True, 'attnres_block_size': None,
}
IGNORED_KEYS = ('version',)  # fairseq bookkeeping, not weights.


class ConversionError(ValueError):
  """A checkpoint that does not fit the expected layout, or an unsupported feature."""


# ------------------------------------------------------------------------------------------------
# Reading checkpoints.


def _torch_to_numpy(t):
  import torch  # pylint: disable=g-import-not-at-top
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.float().numpy().astype(ml_dtypes.bfloat16)
  return t.numpy()


def _torch_load(path: str, trust_pickle: bool = False):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f'reading {path!r} needs torch (pip install -e ".[torch]").') from e
  try:
    return torch.load(path, map_location='cpu', weights_only=not trust_pickle)
  except Exception as e:  # pickle errors come in many types.
    hint = '' if trust_pickle else (
        ' If it is a fairseq checkpoint (its args are pickled objects) from a source you trust, '
        'pass --trust_pickle.')
    raise ConversionError(f'cannot read {path!r}: {type(e).__name__}: {e}.{hint}') from e


def _tensors_to_numpy(tree, where):
  out = {}
  for name, value in tree.items():
    if hasattr(value, 'detach'):
      out[name] = _torch_to_numpy(value)
    elif isinstance(value, np.ndarray):
      out[name] = value
    else:
      raise ConversionError(f'{where}: entry {name!r} is a {type(value).__name__}, not a tensor.')
  return out


def _safetensors_files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    return [os.path.join(path, s) for s in shards]
  return sorted(glob.glob(os.path.join(path, '*.safetensors')))


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file, or of a directory's shards, as NumPy arrays (no torch)."""
  try:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError('reading .safetensors needs the safetensors package '
                          '(pip install -e ".[convert]").') from e
  files = _safetensors_files(path)
  if not files:
    raise ConversionError(f'no .safetensors file in {path!r}.')
  out = {}
  for f in files:
    try:
      tensors = load_file(f)
    except Exception as e:  # safetensors raises its own error types.
      raise ConversionError(f'cannot read {f!r}: {type(e).__name__}: {e}') from e
    for name in set(out) & set(tensors):
      raise ConversionError(f'tensor {name!r} appears in two shards (the second: {f!r}).')
    out.update(tensors)
  return out


def read_state_dict(path: str, trust_pickle: bool = False) -> tuple[dict[str, np.ndarray], dict]:
  """(state dict as NumPy arrays, args found in the checkpoint) from a file or a directory.

  .safetensors (or a directory of them) needs no torch; .pt / .bin files need it. A fairseq
  checkpoint's weights are under 'model' and its args under 'cfg'['model'] or 'args'.
  """
  if not os.path.exists(path):
    raise ConversionError(f'input {path!r} does not exist.')
  if os.path.isdir(path) or path.endswith('.safetensors'):
    if _safetensors_files(path):
      return read_safetensors(path), {}
    bins = sorted(glob.glob(os.path.join(path, '*.bin')) + glob.glob(os.path.join(path, '*.pt')))
    if not bins:
      raise ConversionError(f'no .safetensors, .bin or .pt weights in directory {path!r}.')
    merged = {}
    for b in bins:
      sd, _ = read_state_dict(b, trust_pickle)
      merged.update(sd)
    return merged, {}
  raw = _torch_load(path, trust_pickle)
  if not isinstance(raw, dict):
    raise ConversionError(f'{path!r} holds a {type(raw).__name__}, not a state dict.')
  args = {}
  if isinstance(raw.get('model'), dict):  # fairseq
    cfg = raw.get('cfg')
    model_args = cfg.get('model') if hasattr(cfg, 'get') else None
    if model_args is None:
      model_args = raw.get('args')
    if model_args is not None:
      args = dict(model_args.items()) if hasattr(model_args, 'items') else dict(vars(model_args))
    raw = raw['model']
  return _tensors_to_numpy(raw, path), args


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConversionError(f'cannot read JSON {path!r}: {e}') from e
  if not isinstance(value, dict):
    raise ConversionError(f'{path!r} must hold a JSON object.')
  return value


def read_tokenizer(directory: str, hf_config: dict | None = None) -> dict | None:
  """The meta entry for `<directory>/tokenizer.json` (see the module docstring), or None."""
  path = os.path.join(directory, 'tokenizer.json')
  if not os.path.isfile(path):
    return None
  info = {'kind': 'huggingface', 'path': os.path.abspath(path)}
  for key in ('bos_token_id', 'eos_token_id', 'pad_token_id'):
    if (hf_config or {}).get(key) is not None:
      info[key] = hf_config[key]
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning('%s found but the tokenizers package is not installed: meta keeps its path only.',
                    path)
    return info
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises plain Exception for bad files.
    raise ConversionError(f'cannot load tokenizer {path!r}: {e}') from e
  info['vocab_size'] = tok.get_vocab_size()
  info['json'] = tok.to_str()
  return info


def load_tokenizer(meta: dict):
  """The `tokenizers.Tokenizer` stored in a converted checkpoint's meta, or None if there is none."""
  info = meta.get('tokenizer')
  if not info:
    return None
  import tokenizers  # pylint: disable=g-import-not-at-top
  if 'json' in info:
    return tokenizers.Tokenizer.from_str(info['json'])
  return tokenizers.Tokenizer.from_file(info['path'])


# ------------------------------------------------------------------------------------------------
# Checking names and shapes.


def check_names_and_shapes(state_dict: dict, expected: dict[str, tuple], where: str,
                           optional: tuple[str, ...] = ()) -> None:
  """Raises one ConversionError listing every missing, unexpected and misshapen tensor."""
  problems = []
  missing = [n for n in expected if n not in state_dict and n not in optional]
  unexpected = [n for n in state_dict if n not in expected and n.split('.')[-1] not in IGNORED_KEYS]
  if missing:
    problems.append(f'missing tensors ({len(missing)}): {", ".join(missing[:12])}'
                    + (' ...' if len(missing) > 12 else ''))
  if unexpected:
    problems.append(f'unexpected tensors ({len(unexpected)}): {", ".join(sorted(unexpected)[:12])}'
                    + (' ...' if len(unexpected) > 12 else ''))
  for name, shape in expected.items():
    if name in state_dict and tuple(state_dict[name].shape) != tuple(shape):
      problems.append(f'{name}: expected shape {tuple(shape)}, got {tuple(state_dict[name].shape)}')
  if problems:
    raise ConversionError(f'{where} does not fit the expected layout:\n  ' + '\n  '.join(problems))


def _layer_count(state_dict: dict, pattern: str, where: str) -> int:
  indices = {int(m.group(1)) for n in state_dict if (m := re.match(pattern, n))}
  if not indices:
    raise ConversionError(f'{where}: no layer tensors (names like {pattern!r}).')
  if indices != set(range(max(indices) + 1)):
    raise ConversionError(f'{where}: layer indices {sorted(indices)} are not 0..{max(indices)}.')
  return len(indices)


def _need(state_dict: dict, name: str, where: str, hint: str = '') -> np.ndarray:
  if name not in state_dict:
    some = ', '.join(sorted(state_dict)[:6])
    raise ConversionError(f'{where}: missing tensor {name!r}{hint} (it has: {some} ...).')
  return state_dict[name]


def _check_params(params, cfg: model_lib.ModelConfig) -> None:
  """The converted tree must be exactly the model's parameter tree."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  abstract = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(model_lib.create(cfg), nnx.Param)))
  want = jax.tree.map(lambda a: tuple(a.shape), abstract)
  got = jax.tree.map(lambda a: tuple(a.shape), params)
  if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
    raise ConversionError(f'internal: converted parameters {got} do not fit the model {want}.')


# ------------------------------------------------------------------------------------------------
# Layout changes (all on NumPy arrays; L layers stacked on axis 0).


def _in_heads(w_out_in, heads):
  """torch Linear weight [H·X, D] -> kernel [D, H, X]."""
  d = w_out_in.shape[1]
  return np.ascontiguousarray(w_out_in.T.reshape(d, heads, -1))


def _out_heads(w_out_in, heads):
  """torch Linear weight [D, H·X] -> kernel [H, X, D]."""
  d = w_out_in.shape[0]
  return np.ascontiguousarray(w_out_in.T.reshape(heads, -1, d))


def _dense(w_out_in):
  """torch Linear weight [out, in] -> kernel [in, out]."""
  return np.ascontiguousarray(w_out_in.T)


def _stack(state_dict, template, num_layers, fn):
  return np.stack([fn(state_dict[template.format(i)]) for i in range(num_layers)])


def _cast(params, dtype: str):
  np_dtype = NP_DTYPES[dtype]
  return jax.tree.map(lambda a: np.asarray(a, np.float32).astype(np_dtype), params)


def _rtol(array) -> float:
  """Relative tolerance for comparing a stored buffer with a formula: float32, or the buffer's own."""
  return max(1e-5, 2.0 * float(ml_dtypes.finfo(array.dtype).eps))


def _gamma_fields(log_gamma_H) -> dict:
  """ModelConfig gamma fields for these decays: 'retnet' when they are its schedule (to the
  buffer's precision: a bf16 checkpoint rounds it), else 'custom' with the stored values."""
  rtol = _rtol(np.asarray(log_gamma_H))
  log_gamma_H = np.asarray(log_gamma_H, np.float64)
  retnet = np.log(decay.gammas('retnet', len(log_gamma_H)))
  if np.allclose(log_gamma_H, retnet, rtol=rtol, atol=0):
    return {'gamma': 'retnet'}
  return {'gamma': 'custom', 'gamma_values': tuple(float(g) for g in np.exp(log_gamma_H))}


def _inv_freq(cfg: model_lib.ModelConfig) -> np.ndarray:
  K = cfg.head_dim
  if cfg.rotary_freqs == 'torchscale':
    return cfg.rotary_base ** -np.linspace(0.0, 1.0, K // 2)
  return cfg.rotary_base ** -(np.arange(0, K, 2) / K)


# ------------------------------------------------------------------------------------------------
# torchscale.


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
  embed = _need(state_dict, 'embed_tokens.weight', where)
  vocab, D = embed.shape
  L = _layer_count(state_dict, r'layers\.(\d+)\.', where)
  if 'retnet_rel_pos.decay' in state_dict:
    H = int(state_dict['retnet_rel_pos.decay'].shape[0])
  elif 'decoder_retention_heads' in args:
    H = int(args['decoder_retention_heads'])
  else:
    raise ConversionError(f'{where}: no retnet_rel_pos.decay buffer, so the number of heads is '
                          'unknown: give decoder_retention_heads in --config_json.')
  if D % H:
    raise ConversionError(f'{where}: {H} heads do not divide embed dim {D}.')
  V = _need(state_dict, 'layers.0.retention.v_proj.weight', where).shape[0]
  F = _need(state_dict, 'layers.0.ffn.fc1.weight', where).shape[0]
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
      ffn_dim=F, ffn_activation=args['activation_fn'], **_gamma_fields(log_gamma),
      rotary='interleaved', rotary_freqs='torchscale', rotary_base=10000.0, swish_gate=True,
      group_norm=True, group_norm_affine=False, decay_row_norm=True,
      norm_eps=float(args['layernorm_eps']), tie_embeddings=False, param_dtype=param_dtype)
  if 'retnet_rel_pos.angle' in state_dict:
    angle = state_dict['retnet_rel_pos.angle']
    rtol, angle = _rtol(angle), np.asarray(angle, np.float64)
    for freqs in ('torchscale', 'standard'):
      trial = dataclasses.replace(cfg, rotary_freqs=freqs)
      if np.allclose(angle, np.repeat(_inv_freq(trial), 2), rtol=rtol, atol=0):
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
    head = _dense(np.asarray(embed if head_w is None else head_w, np.float32))
  sd, t = state_dict, 'layers.{}.'
  retention = {
      'wq': _stack(sd, t + 'retention.q_proj.weight', L, lambda w: _in_heads(w, H)),
      'wk': _stack(sd, t + 'retention.k_proj.weight', L, lambda w: _in_heads(w, H)),
      'wv': _stack(sd, t + 'retention.v_proj.weight', L, lambda w: _in_heads(w, H)),
      'wg': _stack(sd, t + 'retention.g_proj.weight', L, lambda w: _in_heads(w, H)),
      'wo': _stack(sd, t + 'retention.out_proj.weight', L, lambda w: _out_heads(w, H)),
  }
  params = {
      'embed': embed32 * np.float32(scale),
      'blocks': {
          'retention': retention,
          'ffn': {'w_gate': _stack(sd, t + 'ffn.fc1.weight', L, _dense),
                  'w_up': _stack(sd, t + 'ffn.gate.weight', L, _dense),
                  'w_down': _stack(sd, t + 'ffn.fc2.weight', L, _dense)},
          'mixer_norm': {'scale': _stack(sd, t + 'retention_layer_norm.weight', L, np.asarray)},
          'ffn_norm': {'scale': _stack(sd, t + 'final_layer_norm.weight', L, np.asarray)},
      },
      'final_norm': {'scale': np.asarray(sd['layer_norm.weight'])},
  }
  if head is not None:
    params['head'] = head
  params = _cast(params, param_dtype)
  _check_params(params, cfg)
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
  sd['output_projection.weight'] = sd['embed_tokens.weight'] if cfg.tie_embeddings else _dense(
      f32(params['head']))
  sd['layer_norm.weight'] = f32(params['final_norm']['scale'])
  sd['retnet_rel_pos.angle'] = np.repeat(_inv_freq(cfg), 2).astype(np.float32)
  sd['retnet_rel_pos.decay'] = _log_gamma_per_layer(params, cfg).astype(np.float32)
  in_heads = lambda w: np.ascontiguousarray(f32(w).reshape(w.shape[0], -1).T)  # [D, H, X] -> [HX, D]
  out_heads = lambda w: np.ascontiguousarray(f32(w).reshape(-1, w.shape[-1]).T)  # [H, X, D] -> [D, HX]
  for i in range(L):
    p = f'layers.{i}.'
    for ours, theirs in (('wq', 'q_proj'), ('wk', 'k_proj'), ('wv', 'v_proj'), ('wg', 'g_proj')):
      sd[p + f'retention.{theirs}.weight'] = in_heads(ret[ours][i])
    sd[p + 'retention.out_proj.weight'] = out_heads(ret['wo'][i])
    sd[p + 'retention_layer_norm.weight'] = f32(blocks['mixer_norm']['scale'][i])
    sd[p + 'final_layer_norm.weight'] = f32(blocks['ffn_norm']['scale'][i])
    sd[p + 'ffn.fc1.weight'] = _dense(f32(blocks['ffn']['w_gate'][i]))
    sd[p + 'ffn.gate.weight'] = _dense(f32(blocks['ffn']['w_up'][i]))
    sd[p + 'ffn.fc2.weight'] = _dense(f32(blocks['ffn']['w_down'][i]))
  args = {
      'decoder_embed_dim': cfg.embed_dim, 'decoder_value_embed_dim': cfg.values,
      'decoder_retention_heads': H, 'decoder_ffn_embed_dim': cfg.ffn_dim, 'decoder_layers': L,
      'activation_fn': cfg.ffn_activation, 'layernorm_eps': cfg.norm_eps,
      'vocab_size': cfg.vocab_size, 'share_decoder_input_output_embed': cfg.tie_embeddings,
      'no_scale_embedding': True, 'dropout': 0.0, 'activation_dropout': 0.0,
      'drop_path_rate': 0.0,
  }
  return sd, args


# ------------------------------------------------------------------------------------------------
# fla.


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
      'wq': _stack(sd, t + 'attn.q_proj.weight', L, lambda w: _in_heads(w, H)),
      'wk': _stack(sd, t + 'attn.k_proj.weight', L, lambda w: _in_heads(w, H)),
      'wv': _stack(sd, t + 'attn.v_proj.weight', L, lambda w: _in_heads(w, H)),
      'wo': _stack(sd, t + 'attn.o_proj.weight', L, lambda w: _out_heads(w, H)),
  }
  if gate:
    retention['wg'] = _stack(sd, t + 'attn.g_proj.weight', L, lambda w: _in_heads(w, H))
  if affine:
    retention['norm'] = {'scale': _stack(sd, t + f'attn.{norm_name}.weight', L, np.asarray)}
  params = {
      'embed': sd['model.embeddings.weight'],
      'blocks': {
          'retention': retention,
          'ffn': {'w_gate': _stack(sd, t + 'mlp.gate_proj.weight', L, _dense),
                  'w_up': _stack(sd, t + 'mlp.up_proj.weight', L, _dense),
                  'w_down': _stack(sd, t + 'mlp.down_proj.weight', L, _dense)},
          'mixer_norm': {'scale': _stack(sd, t + 'attn_norm.weight', L, np.asarray)},
          'ffn_norm': {'scale': _stack(sd, t + 'mlp_norm.weight', L, np.asarray)},
      },
      'final_norm': {'scale': sd['model.norm.weight']},
  }
  if not tied:
    params['head'] = _dense(sd['lm_head.weight'])
  params = _cast(params, param_dtype)
  _check_params(params, cfg)
  return params, cfg


# ------------------------------------------------------------------------------------------------
# Whole conversions (what the command runs).


def _check_output_dir(output: str) -> None:
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise ConversionError(f'output {output!r} exists and is not an empty directory.')


def import_checkpoint(source: str, input_path: str, output: str, config_json: str | None = None,
                      param_dtype: str = 'float32', trust_pickle: bool = False):
  """Converts `input_path` from `source` ('torchscale' | 'fla') into an orbax dir `output`.

  Returns (params, ModelConfig, extra_meta).
  """
  if source not in SOURCES:
    raise ConversionError(f'unknown source {source!r}; expected one of {SOURCES}.')
  if param_dtype not in NP_DTYPES:
    raise ConversionError(f'param_dtype must be one of {sorted(NP_DTYPES)}; got {param_dtype!r}.')
  _check_output_dir(output)
  directory = input_path if os.path.isdir(input_path) else os.path.dirname(os.path.abspath(input_path))
  state_dict, ckpt_args = read_state_dict(input_path, trust_pickle)
  if source == 'torchscale':
    sidecar = config_json or os.path.splitext(input_path)[0] + '.json'
    extra = _read_json(sidecar) if (config_json or os.path.isfile(sidecar)) else {}
    args = {**ckpt_args, **extra}
    params, cfg = from_torchscale(state_dict, args, param_dtype)
    hf_config = None
  else:
    path = config_json or os.path.join(directory, 'config.json')
    if not os.path.isfile(path):
      raise ConversionError(f'fla weights need their config.json (looked for {path!r}; pass '
                            '--config_json).')
    hf_config = _read_json(path)
    params, cfg = from_fla(state_dict, hf_config, param_dtype)
  meta = {'source': {'format': source, 'input': os.path.abspath(input_path)}}
  tokenizer = read_tokenizer(directory, hf_config)
  if tokenizer is not None:
    if tokenizer.get('vocab_size', 0) > cfg.vocab_size:
      logging.warning('tokenizer has %d ids but the model only %d embeddings.',
                      tokenizer['vocab_size'], cfg.vocab_size)
    meta['tokenizer'] = tokenizer
  checkpoint.save_params(output, params, cfg, extra_meta=meta)
  return params, cfg, meta


def export_checkpoint(target: str, input_dir: str, output: str):
  """Writes the orbax checkpoint `input_dir` as `output` (.pt state dict) and its .json args."""
  if target not in TARGETS:
    raise ConversionError(f'unknown target {target!r}; expected one of {TARGETS}.')
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError('exporting to torchscale needs torch (pip install -e ".[torch]").') from e
  params, cfg, _ = checkpoint.load_params(input_dir)
  params = jax.tree.map(np.asarray, params)
  state_dict, args = to_torchscale(params, cfg)
  tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
  if cfg.tie_embeddings:
    tensors['output_projection.weight'] = tensors['embed_tokens.weight']
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  torch.save(tensors, output)
  with open(os.path.splitext(output)[0] + '.json', 'w') as f:
    json.dump(args, f, indent=2)
  return state_dict, args


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m retnet_jax.convert',
      description='Import torchscale / fla RetNet weights into an orbax checkpoint, or export one '
                  'to torchscale.')
  parser.add_argument('--from', dest='source', choices=SOURCES, help='import from this format')
  parser.add_argument('--to', dest='target', choices=TARGETS, help='export to this format')
  parser.add_argument('--input', required=True,
                      help='import: .pt / .safetensors / directory; export: orbax directory')
  parser.add_argument('--output', required=True, help='import: new orbax directory; export: .pt file')
  parser.add_argument('--config_json', default=None,
                      help='torchscale: JSON of RetNetConfig fields; fla: its config.json')
  parser.add_argument('--param_dtype', default='float32', choices=sorted(NP_DTYPES))
  parser.add_argument('--trust_pickle', action='store_true',
                      help='let torch unpickle arbitrary objects (fairseq args); trusted files only')
  a = parser.parse_args(argv)
  if (a.source is None) == (a.target is None):
    parser.error('give exactly one of --from and --to.')
  try:
    if a.source:
      _, cfg, meta = import_checkpoint(a.source, a.input, a.output, a.config_json, a.param_dtype,
                                       a.trust_pickle)
      print(f'wrote {a.output}: {cfg}' + (' with tokenizer' if 'tokenizer' in meta else ''))
    else:
      export_checkpoint(a.target, a.input, a.output)
      print(f'wrote {a.output} and {os.path.splitext(a.output)[0]}.json')
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
