"""Weight conversion: torchscale parity (parallel, chunkwise, recurrent), fla mapping, round trips.

The torchscale tests need the `torch` extra and `pip install --no-deps torchscale==0.3.0
fairscale==0.4.13` (they skip otherwise); torchscale imports timm only for drop_path, which
tests/timm_stub.py stands in for. The fla mapping, the NumPy round trip and the error tests run
without torch. The test against fla's own model runs only where fla and a CUDA GPU are present.
"""

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from retnet_jax import checkpoint
from retnet_jax import convert
from retnet_jax.convert import fla as fla_format
from retnet_jax.convert import torchscale as torchscale_format
from retnet_jax import model as model_lib
from tests import timm_stub
from tests import util

T = 37  # The shrunk config's seq_len: no chunk size used here divides it.
TOL = 1e-4


# ------------------------------------------------------------------------------------------------
# Helpers.


# How a model runs is not in a checkpoint: the importer leaves these at ModelConfig's defaults.
EXECUTION_DEFAULTS = {f'model__{k}': getattr(model_lib.ModelConfig, k)
                      for k in ('remat', 'scan_layers', 'retention_impl', 'dtype')}


def torchscale_variant(**overrides):
  """The shrunk real config as the variant that reproduces torchscale (what the importer builds)."""
  kwargs = {**EXECUTION_DEFAULTS, 'model__decay_row_norm': True, 'model__ffn_activation': 'gelu',
            **overrides}
  return util.model_config(**kwargs)


def numpy_params(cfg, seed=0):
  """A model's parameters as a pure dict of NumPy arrays, with norms scales moved off 1."""
  params = nnx.to_pure_dict(nnx.state(model_lib.create(cfg, seed=seed), nnx.Param))
  rng = np.random.default_rng(seed)
  perturb = lambda path, a: (np.asarray(a) + 0.2 * rng.standard_normal(a.shape).astype(np.float32)
                             if 'scale' in jax.tree_util.keystr(path) else np.asarray(a))
  return jax.tree_util.tree_map_with_path(perturb, params)


def jitted(model, mode):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda toks, carry: nnx.merge(graphdef, state)(toks, carry, mode=mode))


def our_logits(params, cfg, toks_BT, mode):
  """Our logits [B, T, vocab] as NumPy; mode 'decode' runs the recurrent form token by token."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model_lib.create(cfg)))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  model = nnx.merge(graphdef, state)
  toks_BT = jnp.asarray(toks_BT)
  if mode != 'decode':
    return np.asarray(jitted(model, mode)(toks_BT, None)[0])
  step, carry, outs = jitted(model, 'recurrent'), model.init_state(toks_BT.shape[0]), []
  for t in range(toks_BT.shape[1]):
    out, carry = step(toks_BT[:, t:t + 1], carry)
    outs.append(np.asarray(out))
  return np.concatenate(outs, axis=1)


def tokens(cfg, B=2, length=T, seed=0):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, length))


# ------------------------------------------------------------------------------------------------
# torchscale (needs torch and torchscale).


@pytest.fixture(scope='module')
def ts():
  """torchscale's (RetNetConfig, RetNetDecoder) classes, or a skip."""
  torch = pytest.importorskip('torch')
  timm_stub.install()
  config = pytest.importorskip('torchscale.architecture.config')
  retnet = pytest.importorskip('torchscale.architecture.retnet')
  torch.manual_seed(0)
  return config.RetNetConfig, retnet.RetNetDecoder


def torchscale_args(cfg):
  """RetNetConfig fields for a ModelConfig's architecture."""
  return dict(decoder_embed_dim=cfg.embed_dim, decoder_value_embed_dim=cfg.values,
              decoder_retention_heads=cfg.num_heads, decoder_ffn_embed_dim=cfg.ffn_dim,
              decoder_layers=cfg.num_layers, vocab_size=cfg.vocab_size,
              activation_fn=cfg.ffn_activation, layernorm_eps=cfg.norm_eps,
              share_decoder_input_output_embed=cfg.tie_embeddings)


def build_torchscale(ts, args, seed=0):
  """A RetNetDecoder with torchscale's own random init, its RMSNorm scales moved off 1."""
  import torch  # pylint: disable=g-import-not-at-top
  RetNetConfig, RetNetDecoder = ts
  torch.manual_seed(seed)
  decoder = RetNetDecoder(RetNetConfig(**args),
                          embed_tokens=torch.nn.Embedding(args['vocab_size'], args['decoder_embed_dim']))
  with torch.no_grad():
    for name, p in decoder.named_parameters():
      if name.endswith('norm.weight'):
        p.add_(0.2 * torch.randn_like(p))
  return decoder.eval()


def torchscale_logits(decoder, toks_BT, decode=False):
  """torchscale's logits [B, T, vocab]: its parallel form, or its recurrent form token by token."""
  import torch  # pylint: disable=g-import-not-at-top
  toks = torch.as_tensor(np.asarray(toks_BT))
  with torch.no_grad():
    if not decode:
      return decoder(toks)[0].numpy()
    state, outs = {}, []
    for t in range(toks.shape[1]):
      outs.append(decoder(toks[:, :t + 1], incremental_state=state)[0].numpy())
  return np.concatenate(outs, axis=1)


def numpy_state_dict(decoder):
  return {k: v.detach().numpy() for k, v in decoder.state_dict().items()}


# name: (config overrides, factor on torchscale's q and k weights). A factor of 8 makes the rows of
# Q Kᵀ ⊙ D sum past 1, so torchscale's parallel form divides them by that sum (its R̃) and its
# recurrent form does not: the two then differ through the per-head norm's eps (see convert.py).
TORCHSCALE_SHAPES = {
    'h1_l1_gelu': (dict(model__num_heads=1, model__num_layers=1), 1.0),
    'h3_l3_swish': (dict(model__num_heads=3, model__num_layers=3, model__ffn_activation='swish'), 1.0),
    'h4_l1_v72_tied': (dict(model__num_heads=4, model__num_layers=1, model__value_dim=72,
                            model__tie_embeddings=True), 1.0),
    'h3_l1_large_qk': (dict(model__num_heads=3, model__num_layers=1), 8.0),
}


@pytest.mark.parametrize('shape', sorted(TORCHSCALE_SHAPES))
def test_torchscale_logits_match(ts, shape):
  overrides, qk_scale = TORCHSCALE_SHAPES[shape]
  want_cfg = torchscale_variant(**overrides)
  assert want_cfg.values != 2 * want_cfg.embed_dim
  args = torchscale_args(want_cfg)
  decoder = build_torchscale(ts, args)
  for layer in decoder.layers:
    layer.retention.q_proj.weight.data.mul_(qk_scale)
    layer.retention.k_proj.weight.data.mul_(qk_scale)
  params, cfg = torchscale_format.from_torchscale(numpy_state_dict(decoder), args)
  assert cfg == dataclasses.replace(want_cfg, chunk_size=cfg.chunk_size)
  cfg = dataclasses.replace(cfg, chunk_size=want_cfg.chunk_size)  # 16: T = 37 is uneven.
  toks = tokens(cfg)
  ref = torchscale_logits(decoder, toks)
  ref_decode = torchscale_logits(decoder, toks, decode=True)
  ours = {mode: our_logits(params, cfg, toks, mode) for mode in ('parallel', 'chunkwise', 'decode')}
  errors = {mode: util.rel_err(out, ref) for mode, out in ours.items()}
  errors['decode_vs_torchscale_decode'] = util.rel_err(ours['decode'], ref_decode)
  errors['torchscale_decode_vs_parallel'] = util.rel_err(ref_decode, ref)
  print(shape, {k: f'{v:.2e}' for k, v in errors.items()})
  assert max(errors.values()) <= TOL, errors


def test_torchscale_needs_decay_row_norm_for_exact_parity(ts):
  """Without D̃ our per-head RMSNorm sees eps where torchscale's sees eps·Σγ^i: a visible gap."""
  cfg = torchscale_variant()
  args = torchscale_args(cfg)
  decoder = build_torchscale(ts, args)
  params, cfg = torchscale_format.from_torchscale(numpy_state_dict(decoder), args)
  toks = tokens(cfg)
  ref = torchscale_logits(decoder, toks)
  assert util.rel_err(our_logits(params, cfg, toks, 'parallel'), ref) <= TOL
  no_norm = dataclasses.replace(cfg, decay_row_norm=False)
  assert util.rel_err(our_logits(params, no_norm, toks, 'parallel'), ref) > 1e-3


def test_torchscale_chunkwise_differs_from_its_parallel(ts):
  """DOCUMENTS A TORCHSCALE DEFECT (issue 77): its chunkwise form does not match its parallel form.

  It divides each row by √(Σγ^i) over the position inside the chunk instead of over the sequence;
  the per-head RMSNorm cancels that scalar only up to eps, so the logits differ (visibly at eps
  1e-6; with eps 1e-12 the gap closes, which pins the cause). Ours match at any chunk size.
  """
  import torch  # pylint: disable=g-import-not-at-top
  RetNetConfig, RetNetDecoder = ts
  cfg = torchscale_variant(model__chunk_size=8)
  args = torchscale_args(cfg)
  decoder = build_torchscale(ts, args)
  toks = tokens(cfg)

  def torchscale_chunkwise(eps):
    chunked = RetNetDecoder(RetNetConfig(**{**args, 'layernorm_eps': eps}, chunkwise_recurrent=True,
                                         recurrent_chunk_size=cfg.chunk_size),
                            embed_tokens=torch.nn.Embedding(cfg.vocab_size, cfg.embed_dim))
    chunked.load_state_dict(decoder.state_dict())
    return torchscale_logits(chunked.eval(), toks)

  ref = torchscale_logits(decoder, toks)
  theirs = util.rel_err(torchscale_chunkwise(args['layernorm_eps']), ref)
  params, cfg = torchscale_format.from_torchscale(numpy_state_dict(decoder), args)
  ours = util.rel_err(our_logits(params, dataclasses.replace(cfg, chunk_size=8), toks, 'chunkwise'),
                      ref)
  print(f'torchscale chunkwise vs its parallel {theirs:.2e}; ours chunkwise vs it {ours:.2e}')
  assert theirs > TOL and ours <= TOL

  tiny_eps = build_torchscale(ts, {**args, 'layernorm_eps': 1e-12})
  tiny_eps.load_state_dict(decoder.state_dict())
  assert util.rel_err(torchscale_chunkwise(1e-12), torchscale_logits(tiny_eps, toks)) <= TOL


def test_torchscale_fairseq_checkpoint_cli(ts, tmp_path, capsys):
  """A fairseq checkpoint ('model' with 'decoder.' names, args in 'cfg'), scaled and shared embedding."""
  import torch  # pylint: disable=g-import-not-at-top
  cfg = torchscale_variant(model__ffn_activation='swish', model__num_layers=1)
  args = {**torchscale_args(cfg), 'no_scale_embedding': False,
          'share_decoder_input_output_embed': True}
  decoder = build_torchscale(ts, args)
  ckpt = {'model': {f'decoder.{k}': v for k, v in decoder.state_dict().items()},
          'cfg': {'model': args}}
  torch.save(ckpt, tmp_path / 'checkpoint_best.pt')
  out = tmp_path / 'orbax'
  rc = convert.main(['--from=torchscale', f'--input={tmp_path / "checkpoint_best.pt"}',
                     f'--output={out}'])
  assert rc == 0
  params, loaded_cfg, meta = checkpoint.load_params(str(out))
  assert meta['source']['format'] == 'torchscale' and 'tokenizer' not in meta
  assert not loaded_cfg.tie_embeddings  # √D scales the input embedding, not the head.
  toks = tokens(loaded_cfg)
  ref = torchscale_logits(decoder, toks)
  assert util.rel_err(our_logits(params, loaded_cfg, toks, 'parallel'), ref) <= TOL

  # Older fairseq pickles its args as an argparse.Namespace: only --trust_pickle reads it.
  torch.save({'model': ckpt['model'], 'args': argparse.Namespace(**args)}, tmp_path / 'old.pt')
  old = ['--from=torchscale', f'--input={tmp_path / "old.pt"}', f'--output={tmp_path / "old"}']
  assert convert.main(old) == 1
  assert '--trust_pickle' in capsys.readouterr().err
  assert convert.main(old + ['--trust_pickle']) == 0
  params, _, _ = checkpoint.load_params(str(tmp_path / 'old'))
  assert util.rel_err(our_logits(params, loaded_cfg, toks, 'parallel'), ref) <= TOL


def test_torchscale_export_round_trip_cli(ts, tmp_path):
  """Ours -> orbax -> --to=torchscale (.pt + .json) -> RetNetDecoder: same logits; and back again."""
  import torch  # pylint: disable=g-import-not-at-top
  RetNetConfig, RetNetDecoder = ts
  cfg = torchscale_variant(arg='gamma=lm')  # Not torchscale's schedule: travels in the decay buffer.
  params = numpy_params(cfg, seed=3)
  checkpoint.save_params(str(tmp_path / 'ours'), params, cfg)
  pt = tmp_path / 'export' / 'retnet.pt'
  assert convert.main(['--to=torchscale', f'--input={tmp_path / "ours"}', f'--output={pt}']) == 0
  with open(tmp_path / 'export' / 'retnet.json') as f:
    args = json.load(f)
  decoder = RetNetDecoder(RetNetConfig(**args),
                          embed_tokens=torch.nn.Embedding(args['vocab_size'], args['decoder_embed_dim']))
  decoder.load_state_dict(torch.load(pt, weights_only=True))  # strict: every name, every shape.
  toks = tokens(cfg)
  ref = our_logits(params, cfg, toks, 'parallel')
  assert util.rel_err(torchscale_logits(decoder.eval(), toks), ref) <= TOL
  assert util.rel_err(torchscale_logits(decoder, toks[:, :12], decode=True), ref[:, :12]) <= TOL

  assert convert.main(['--from=torchscale', f'--input={pt}', f'--output={tmp_path / "back"}']) == 0
  back, back_cfg, _ = checkpoint.load_params(str(tmp_path / 'back'))
  assert back_cfg.gamma == 'custom'
  np.testing.assert_allclose(back_cfg.gammas(), cfg.gammas(), rtol=1e-6)
  assert dataclasses.replace(back_cfg, gamma=cfg.gamma, gamma_values=(), chunk_size=cfg.chunk_size) == cfg
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, back), params)


# ------------------------------------------------------------------------------------------------
# Round trip and errors without torch.


@pytest.mark.parametrize('tied', [False, True])
def test_torchscale_layout_round_trip_numpy(tied):
  cfg = torchscale_variant(model__tie_embeddings=tied)
  params = numpy_params(cfg, seed=1)
  state_dict, args = torchscale_format.to_torchscale(params, cfg)
  back, back_cfg = torchscale_format.from_torchscale(state_dict, args)
  assert back_cfg == dataclasses.replace(cfg, chunk_size=back_cfg.chunk_size)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_torchscale_bf16_state_dict():
  """A bf16 checkpoint rounds the rotary and decay buffers too: still torchscale's schedule."""
  cfg = torchscale_variant()
  state_dict, args = torchscale_format.to_torchscale(numpy_params(cfg), cfg)
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in state_dict.items()}
  params, back_cfg = torchscale_format.from_torchscale(bf16, args)
  assert back_cfg == dataclasses.replace(cfg, chunk_size=back_cfg.chunk_size)
  assert params['embed'].dtype == np.float32
  np.testing.assert_array_equal(params['embed'], bf16['embed_tokens.weight'].astype(np.float32))


def test_export_rejects_what_torchscale_lacks():
  with pytest.raises(convert.ConversionError, match="rotary='half'"):
    torchscale_format.to_torchscale({}, util.model_config(model__rotary='half'))
  with pytest.raises(convert.ConversionError, match='swish_gate'):
    torchscale_format.to_torchscale({}, util.model_config(arg='ablation=no_gate'))


def test_torchscale_errors_name_tensors():
  cfg = torchscale_variant()
  state_dict, args = torchscale_format.to_torchscale(numpy_params(cfg), cfg)
  bad = dict(state_dict)
  del bad['layers.1.ffn.gate.weight']
  bad['layers.0.retention.q_proj.bias'] = np.zeros(48, np.float32)
  bad['layers.0.retention.v_proj.weight'] = np.zeros((60, 47), np.float32)
  with pytest.raises(convert.ConversionError) as e:
    torchscale_format.from_torchscale(bad, args)
  msg = str(e.value)
  assert 'missing tensors (1): layers.1.ffn.gate.weight' in msg
  assert 'unexpected tensors (1): layers.0.retention.q_proj.bias' in msg
  assert 'layers.0.retention.v_proj.weight: expected shape (60, 48), got (60, 47)' in msg
  with pytest.raises(convert.ConversionError, match='deepnorm'):
    torchscale_format.from_torchscale(state_dict, {**args, 'deepnorm': True})
  with pytest.raises(convert.ConversionError, match='args say decoder_layers=3'):
    torchscale_format.from_torchscale(state_dict, {**args, 'decoder_layers': 3})
  with pytest.raises(convert.ConversionError, match='use --from=fla'):
    torchscale_format.from_torchscale(fla_state_dict(fla_config()), {})


# ------------------------------------------------------------------------------------------------
# fla: a synthetic state dict with fla's names, checked against fla's equations in NumPy.


def fla_config(**overrides):
  """An fla config.json for the shrunk config's sizes (hidden 48, 3 heads, value dim 60)."""
  cfg = util.model_config()
  c = {'model_type': 'retnet', 'hidden_size': cfg.embed_dim, 'num_heads': cfg.num_heads,
       'expand_k': 1, 'expand_v': cfg.values / cfg.embed_dim, 'num_hidden_layers': cfg.num_layers,
       'intermediate_size': cfg.ffn_dim, 'vocab_size': cfg.vocab_size, 'norm_eps': 1e-6,
       'hidden_act': 'swish', 'tie_word_embeddings': False, 'elementwise_affine': True,
       'fuse_norm': True, 'use_output_gate': True, 'use_short_conv': False, 'attn': None}
  return {**c, **overrides}


def fla_state_dict(c, seed=0, dtype=np.float32):
  """Random weights under fla's names and shapes (RetNetForCausalLM.state_dict())."""
  s = fla_format.fla_settings(c)
  D, H, L, vocab = c['hidden_size'], c['num_heads'], c['num_hidden_layers'], c['vocab_size']
  V, F = s['value_dim'], s['intermediate_size']
  rng = np.random.default_rng(seed)
  linear = lambda o, i: rng.standard_normal((o, i)) * i**-0.5
  norm = lambda n: 1.0 + 0.2 * rng.standard_normal(n)
  sd = {'model.embeddings.weight': rng.standard_normal((vocab, D)), 'model.norm.weight': norm(D)}
  if not c['tie_word_embeddings']:
    sd['lm_head.weight'] = linear(vocab, D)
  g_norm = 'g_norm_swish_gate' if s['use_output_gate'] and s['fuse_norm'] else 'g_norm'
  for i in range(L):
    p = f'model.layers.{i}.'
    sd.update({p + 'attn_norm.weight': norm(D), p + 'mlp_norm.weight': norm(D),
               p + 'attn.q_proj.weight': linear(D, D), p + 'attn.k_proj.weight': linear(D, D),
               p + 'attn.v_proj.weight': linear(V, D), p + 'attn.o_proj.weight': linear(D, V),
               p + 'mlp.gate_proj.weight': linear(F, D), p + 'mlp.up_proj.weight': linear(F, D),
               p + 'mlp.down_proj.weight': linear(D, F)})
    if s['use_output_gate']:
      sd[p + 'attn.g_proj.weight'] = linear(V, D)
    if s['elementwise_affine']:
      sd[p + f'attn.{g_norm}.weight'] = norm(V // H)
  return {k: v.astype(dtype) for k, v in sd.items()}


def fla_reference_logits(sd, c, toks_T):
  """fla's RetNetForCausalLM on one sequence, in float64 NumPy, from its layer equations.

  Half-split rotary with θ_i = 10000^(−2i/K); o_t = Σ_{s≤t} γ^{t−s} (K^−½ q_t·k_s) v_s with
  γ_h = 1 − 2^(−5−h) and no normalisation; FusedRMSNormGated: rmsnorm(o)·w·swish(g);
  GatedMLP: down(swish(gate x) ⊙ up x); pre-norm residual blocks; final RMSNorm; lm_head.
  """
  s = fla_format.fla_settings(c)
  w = lambda name: np.asarray(sd[name], np.float64)
  D, H, L, eps = c['hidden_size'], c['num_heads'], c['num_hidden_layers'], c['norm_eps']
  K, Vh, n = D // H, s['value_dim'] // H, len(toks_T)
  rms = lambda x, g: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g
  silu = lambda x: x / (1.0 + np.exp(-x))
  angle = np.arange(n)[:, None] * 10000.0 ** -(np.arange(0, K, 2) / K)  # [T, K/2]
  cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]

  def rope(x_THK):
    x1, x2 = x_THK[..., :K // 2], x_THK[..., K // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  gamma = 1.0 - 2.0 ** (-5.0 - np.arange(H))
  diff = np.arange(n)[:, None] - np.arange(n)[None, :]
  decay_HTS = np.where(diff >= 0, gamma[:, None, None] ** np.maximum(diff, 0), 0.0)
  g_norm = 'g_norm_swish_gate' if s['use_output_gate'] and s['fuse_norm'] else 'g_norm'
  x = w('model.embeddings.weight')[toks_T]
  for i in range(L):
    p = f'model.layers.{i}.'
    h = rms(x, w(p + 'attn_norm.weight'))
    q = rope((h @ w(p + 'attn.q_proj.weight').T).reshape(n, H, K))
    k = rope((h @ w(p + 'attn.k_proj.weight').T).reshape(n, H, K))
    v = (h @ w(p + 'attn.v_proj.weight').T).reshape(n, H, Vh)
    scores = np.einsum('thk,shk->hts', q * K**-0.5, k) * decay_HTS
    o = np.einsum('hts,shv->thv', scores, v)
    o = rms(o, w(p + f'attn.{g_norm}.weight') if s['elementwise_affine'] else 1.0)
    if s['use_output_gate']:
      o = o * silu((h @ w(p + 'attn.g_proj.weight').T).reshape(n, H, Vh))
    x = x + o.reshape(n, H * Vh) @ w(p + 'attn.o_proj.weight').T
    h = rms(x, w(p + 'mlp_norm.weight'))
    x = x + (silu(h @ w(p + 'mlp.gate_proj.weight').T) * (h @ w(p + 'mlp.up_proj.weight').T)) @ w(
        p + 'mlp.down_proj.weight').T
  x = rms(x, w('model.norm.weight'))
  head = w('model.embeddings.weight') if c['tie_word_embeddings'] else w('lm_head.weight')
  return x @ head.T


FLA_VARIANTS = {
    'default': {},
    'tied_unfused_hidden_ratio': {'tie_word_embeddings': True, 'fuse_norm': False,
                                  'intermediate_size': None, 'hidden_ratio': 2},
    'no_gate_no_affine': {'use_output_gate': False, 'elementwise_affine': False,
                          'num_hidden_layers': 1},
}


@pytest.mark.parametrize('variant', sorted(FLA_VARIANTS))
def test_fla_mapping_matches_fla_equations(variant):
  c = fla_config(**FLA_VARIANTS[variant])
  sd = fla_state_dict(c)
  params, cfg = fla_format.from_fla(sd, c)
  assert (cfg.rotary, cfg.rotary_freqs, cfg.decay_row_norm) == ('half', 'standard', False)
  toks = tokens(cfg, B=2)
  ref = np.stack([fla_reference_logits(sd, c, t) for t in toks])
  for mode in ('parallel', 'chunkwise', 'decode'):
    if mode == 'decode' and variant != 'default':
      continue
    assert util.rel_err(our_logits(params, cfg, toks, mode), ref) <= TOL, mode


def test_fla_directory_cli_bf16_safetensors_and_tokenizer(tmp_path):
  """A hub-like directory: config.json, bf16 sharded safetensors, tokenizer.json; no torch."""
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  c = fla_config()
  sd = fla_state_dict(c, seed=5, dtype=ml_dtypes.bfloat16)
  names = sorted(sd)
  shards = {'model-00001-of-00002.safetensors': names[:7], 'model-00002-of-00002.safetensors': names[7:]}
  for file, keys in shards.items():
    safetensors_numpy.save_file({k: sd[k] for k in keys}, str(tmp_path / file))
  with open(tmp_path / 'model.safetensors.index.json', 'w') as f:
    json.dump({'weight_map': {k: file for file, keys in shards.items() for k in keys}}, f)
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump({**c, 'bos_token_id': 1, 'eos_token_id': 2}, f)
  tokenizers = pytest.importorskip('tokenizers')
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({'<unk>': 0, '<s>': 1, '</s>': 2, 'hi': 3},
                                                         unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / 'tokenizer.json'))

  out = tmp_path / 'orbax'
  assert convert.main(['--from=fla', f'--input={tmp_path}', f'--output={out}',
                       '--param_dtype=bfloat16']) == 0
  params, cfg, meta = checkpoint.load_params(str(out))
  assert cfg.param_dtype == 'bfloat16' and params['embed'].dtype == jnp.bfloat16
  assert meta['tokenizer']['vocab_size'] == 4 and meta['tokenizer']['eos_token_id'] == 2
  assert convert.load_tokenizer(meta).encode('hi there').ids == [3, 0]
  toks = tokens(cfg, B=1)
  ref = fla_reference_logits(sd, c, toks[0])[None]
  assert util.rel_err(our_logits(params, cfg, toks, 'chunkwise'), ref) <= TOL
  assert convert.main(['--from=fla', f'--input={tmp_path}', f'--output={out}']) == 1  # Not empty.


def test_fla_rejects_unsupported_features():
  sd = fla_state_dict(fla_config())
  for overrides, words in (({'use_short_conv': True}, 'use_short_conv'),
                           ({'num_kv_heads': 1}, 'num_kv_heads=1'),
                           ({'attn': {'layers': [1], 'num_heads': 3}}, 'hybrid'),
                           ({'feature_map': 'relu'}, 'feature_map'),
                           ({'expand_k': 0.5}, 'expand_k')):
    with pytest.raises(convert.ConversionError, match=words):
      fla_format.from_fla(sd, fla_config(**overrides))


def test_fla_errors_name_tensors():
  c = fla_config()
  sd = fla_state_dict(c)
  del sd['model.layers.1.attn.g_norm_swish_gate.weight']
  sd['model.layers.0.attn.q_conv1d.weight'] = np.zeros((48, 4), np.float32)
  sd['model.layers.0.mlp.up_proj.weight'] = np.zeros((81, 48), np.float32)
  with pytest.raises(convert.ConversionError) as e:
    fla_format.from_fla(sd, c)
  msg = str(e.value)
  assert 'missing tensors (1): model.layers.1.attn.g_norm_swish_gate.weight' in msg
  assert 'unexpected tensors (1): model.layers.0.attn.q_conv1d.weight' in msg
  assert 'model.layers.0.mlp.up_proj.weight: expected shape (80, 48), got (81, 48)' in msg


def test_cli_rejects_unknown_format_and_missing_config(tmp_path, capsys):
  with pytest.raises(SystemExit):
    convert.main(['--from=hf', '--input=x', f'--output={tmp_path / "o"}'])
  assert "invalid choice: 'hf'" in capsys.readouterr().err
  with pytest.raises(convert.ConversionError, match='unknown source'):
    convert.import_checkpoint('hf', 'x', str(tmp_path / 'o'))
  pytest.importorskip('safetensors')
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(fla_state_dict(fla_config()), str(tmp_path / 'model.safetensors'))
  assert convert.main(['--from=fla', f'--input={tmp_path / "model.safetensors"}',
                       f'--output={tmp_path / "o"}']) == 1
  assert 'config.json' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# fla's own model (GPU machines with fla installed).


@pytest.mark.parametrize('length', [20, 100])  # fla decodes T ≤ 64 with fused_recurrent, else chunk.
def test_fla_model_logits_match_on_gpu(length):
  torch = pytest.importorskip('torch')
  if not torch.cuda.is_available():
    pytest.skip('needs a CUDA GPU (fla kernels are Triton)')
  fla_models = pytest.importorskip('fla.models')
  c = fla_config(num_hidden_layers=2, fuse_cross_entropy=False)
  torch.manual_seed(0)
  model = fla_models.RetNetForCausalLM(fla_models.RetNetConfig(**c)).cuda().float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (0.2 if 'norm' in name else p.shape[-1]**-0.5)
              + (1.0 if 'norm' in name else 0.0))
  sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
  params, cfg = fla_format.from_fla(sd, c)
  toks = tokens(cfg, B=2, length=length)
  with torch.no_grad():
    ref = model(torch.as_tensor(toks).cuda()).logits.float().cpu().numpy()
  assert util.rel_err(our_logits(params, cfg, toks, 'chunkwise'), ref) <= TOL
