"""torchscale weights in and out: parity with torchscale 0.3.0's own code (parallel, chunkwise,
recurrent), fairseq checkpoints, round trips, errors.

The torchscale tests need the `torch` extra and `pip install --no-deps torchscale==0.3.0
fairscale==0.4.13` (they skip otherwise); torchscale imports timm only for drop_path, which
tests/timm_stub.py stands in for. The NumPy round trip and the error tests run without torch.
"""

import argparse
import dataclasses
import json

import jax
import ml_dtypes
import numpy as np
import pytest

from retnet_jax import checkpoint
from retnet_jax import convert
from retnet_jax.convert import torchscale as torchscale_format
from tests import timm_stub
from tests import util
from tests.convert_util import EXECUTION_DEFAULTS
from tests.convert_util import numpy_params
from tests.convert_util import our_logits
from tests.convert_util import tokens
from tests.convert_util import TOL


def torchscale_variant(**overrides):
  """The shrunk real config as the variant that reproduces torchscale (what the importer builds)."""
  kwargs = {**EXECUTION_DEFAULTS, 'model__decay_row_norm': True, 'model__ffn_activation': 'gelu',
            **overrides}
  return util.model_config(**kwargs)


# ------------------------------------------------------------------------------------------------
# torchscale (needs torch and torchscale).


@pytest.fixture(scope='module')
def ts():
  """torchscale's (RetNetConfig, RetNetDecoder) classes, or a skip."""
  torch = util.require('torch')
  timm_stub.install()
  config = util.require('torchscale.architecture.config')
  retnet = util.require('torchscale.architecture.retnet')
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
# recurrent form does not: the two then differ through the per-head norm's eps (see convert/torchscale.py).
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
    torchscale_format.from_torchscale({'model.layers.0.attn.q_proj.weight': np.zeros((48, 48))}, {})


