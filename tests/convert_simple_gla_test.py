"""fla's SimpleGatedLinearAttention layer (its Triton calls on torch references) imported into our gated
MultiScaleRetention (retnet_jax/convert/fla_simple_gla.py): the layer outputs agree."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax import model as model_lib
from retnet_jax.convert import fla_simple_gla
from retnet_jax.convert.checks import ConversionError
from tests import util

B, T, D = 2, 37, 64


def _simple_gla(q, k, v, g=None, initial_state=None, output_final_state=False, state_v_first=False,
                cu_seqlens=None, **unused):
  """chunk_simple_gla / fused_recurrent_simple_gla as fla's naive_recurrent_simple_gla."""
  from fla.ops.simple_gla.naive import naive_recurrent_simple_gla  # pylint: disable=g-import-not-at-top
  assert initial_state is None and cu_seqlens is None and not unused, unused
  o, state = naive_recurrent_simple_gla(q, k, v, g, output_final_state=output_final_state)
  return o, (state.transpose(-1, -2) if state is not None and state_v_first else state)


@pytest.fixture(scope='module')
def fla_layers():
  util.require('torch')
  layers = util.require('fla.layers.simple_gla')
  import torch  # pylint: disable=g-import-not-at-top

  from tests import fla_torch  # pylint: disable=g-import-not-at-top
  # The unfused gate is ACT2FN['swish'] (a Triton kernel), looked up when the layer is built.
  act2fn = {**layers.ACT2FN, 'swish': torch.nn.functional.silu}
  patches = {**fla_torch.PATCHES, 'fla.layers.simple_gla': {
      'chunk_simple_gla': _simple_gla, 'fused_recurrent_simple_gla': _simple_gla, 'ACT2FN': act2fn}}
  with fla_torch.patch(patches):
    yield layers


def build_fla(layers, seed, **settings):
  """fla's layer, weights redrawn at unit scale, a nonzero gk_proj bias, norm scales off 1."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  layer = layers.SimpleGatedLinearAttention(**settings)
  with torch.no_grad():
    for name, p in layer.named_parameters():
      if 'norm' in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name == 'gk_proj.bias':
        p.copy_(2.0 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * p.shape[-1]**-0.5)
  return layer.eval()


def our_layer(params, settings):
  """Our MultiScaleRetention holding the imported parameters (chunk size 8 < T, not dividing it)."""
  cfg = model_lib.ModelConfig(**fla_simple_gla.model_overrides(settings), chunk_size=8)
  layer = model_lib.MultiScaleRetention(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(layer, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(layer, state)
  return layer, cfg


@pytest.mark.parametrize('settings', [
    dict(expand_k=0.5, expand_v=1.0, elementwise_affine=True, fuse_norm=False),
    dict(expand_k=0.5, expand_v=1.0, elementwise_affine=False, fuse_norm=False),
    dict(expand_k=1.0, expand_v=2.0, elementwise_affine=True, fuse_norm=True, norm_eps=1e-6,
         gate_logit_normalizer=4),
    dict(expand_k=0.5, expand_v=1.0, elementwise_affine=True, fuse_norm=False, num_kv_heads=2),
], ids=['expand_k_half_affine', 'expand_k_half_no_affine', 'fused_norm_wide_values', 'two_kv_heads'])
def test_fla_simple_gla_layer_output_parity(fla_layers, settings):
  import torch  # pylint: disable=g-import-not-at-top
  settings = dict(hidden_size=D, num_heads=4, use_short_conv=False, **settings)
  layer = build_fla(fla_layers, seed=0, **settings)
  x = np.random.default_rng(1).standard_normal((B, T, D)).astype(np.float32)
  with torch.no_grad():
    theirs = layer(torch.as_tensor(x))[0].float().numpy()
  sd = {k: v.detach().numpy() for k, v in layer.state_dict().items()}
  ours, cfg = our_layer(fla_simple_gla.layer_params(sd, settings), settings)
  assert cfg.rotary == 'none' and cfg.gate_bias and cfg.gamma == 'gated'
  for form in ('parallel', 'chunkwise'):
    y, _ = ours(jnp.asarray(x), None, positions=jnp.arange(T), segment_ids=None, prev_segment=None,
                form=form)
    err = util.rel_err(y, theirs)
    print(form, f'{err:.1e}')
    assert err <= 1e-5, (form, err)


@pytest.mark.parametrize('setting, named', [
    ({'use_short_conv': True}, 'use_short_conv'),
    ({'feature_map': 'relu'}, "feature_map='relu'"),
    ({'gate_fn': 'sigmoid'}, "gate_fn='sigmoid'"),
    ({'expand_k': 2.0}, 'expand_k=2.0'),
])
def test_unrepresentable_settings_are_refused_in_one_line(setting, named):
  settings = {'hidden_size': D, 'num_heads': 4, 'use_short_conv': False, **setting}
  for call in (fla_simple_gla.model_overrides, lambda s: fla_simple_gla.layer_params({}, s)):
    with pytest.raises(ConversionError) as e:
      call(settings)
    assert named in str(e.value) and '\n' not in str(e.value), str(e.value)
