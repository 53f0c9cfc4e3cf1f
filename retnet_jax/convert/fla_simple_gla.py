r"""One layer of flash-linear-attention's `fla.layers.simple_gla.SimpleGatedLinearAttention` as our
gated `MultiScaleRetention` (gamma='gated', gate_bias=True, rotary='none').

`settings` are the fla layer's constructor arguments (fla's defaults fill the rest). With D =
hidden_size, H = num_heads, Hkv = num_kv_heads, G = H / Hkv, fla's q-k head width Kf = D·expand_k / H,
our q-k head width K = D / H (fixed by the model), Vh = D·expand_v / H, and torch Linear weights
[out, in]:

    q_proj.weight [H·Kf, D]              wq [D, H, K]     heads zero-padded Kf -> K, times √(K / Kf)
    k_proj.weight [Hkv·Kf, D]            wk [D, H, K]     kv head h // G for head h, zero-padded
    v_proj.weight [Hkv·Vh, D]            wv [D, H, Vh]    kv head h // G for head h
    g_proj.weight [H·Vh, D]              wg [D, H, Vh]
    gk_proj.weight [H, D], .bias [H]     wgamma [D, H], bgamma [H]
    {g_norm,g_norm_swish_gate}.weight    norm.scale [Vh]  (only with elementwise_affine)
    o_proj.weight [D, H·Vh]              wo [H, Vh, D]

fla computes log γ_t = logsigmoid(x W_γ + b_γ) / gate_logit_normalizer, o_t = Kf^−½ q_t S_t with
S_t = γ_t S_{t−1} + k_tᵀ v_t, then a per-head RMSNorm (eps norm_eps) times swish(x W_g), then o_proj;
no rotary. We scale k by K^−½, so the √(K / Kf) on wq restores fla's Kf^−½; the padded features are
zero in q and k and add nothing to q·k. fla repeats each of its Hkv key/value heads G times (head h
reads kv head h // G); the import repeats them the same way.

Refused (a ConversionError naming the setting): use_short_conv (fla's default is True), a
feature_map, a gate_fn other than swish, Kf > K (expand_k > 1: a q-k head wider than D / H), and
head widths that are not whole numbers.
"""

from __future__ import annotations

import math

import numpy as np

from retnet_jax.convert import layout
from retnet_jax.convert.checks import check_names_and_shapes
from retnet_jax.convert.checks import ConversionError

# fla.layers.simple_gla.SimpleGatedLinearAttention's constructor defaults.
DEFAULTS = {
    'hidden_size': 1024, 'expand_k': 1.0, 'expand_v': 1.0, 'num_heads': 4, 'num_kv_heads': None,
    'feature_map': None, 'use_short_conv': True, 'gate_fn': 'swish', 'elementwise_affine': True,
    'norm_eps': 1e-5, 'gate_logit_normalizer': 16, 'fuse_norm': True,
}
NORM_NAMES = ('g_norm_swish_gate', 'g_norm')


def _settings(settings: dict) -> dict:
  """fla's defaults <- settings, with D, H, Hkv, Kf, K, Vh; refuses what our layer cannot express."""
  c = {**DEFAULTS, **settings}
  problems = []
  if c['use_short_conv']:
    problems.append('use_short_conv=True (short convolutions on q, k, v)')
  if c['feature_map'] is not None:
    problems.append(f"feature_map={c['feature_map']!r} (a feature map on q and k)")
  if c['gate_fn'] != 'swish':
    problems.append(f"gate_fn={c['gate_fn']!r} (needs swish)")
  D, H = int(c['hidden_size']), int(c['num_heads'])
  Hkv = H if c['num_kv_heads'] is None else int(c['num_kv_heads'])
  key_dim, value_dim = D * float(c['expand_k']), D * float(c['expand_v'])
  if (not math.isclose(key_dim, round(key_dim)) or not math.isclose(value_dim, round(value_dim))
      or round(key_dim) % H or round(value_dim) % H or D % H or H % Hkv):
    problems.append(f'hidden_size={D}, expand_k={c["expand_k"]}, expand_v={c["expand_v"]}, '
                    f'num_heads={H}, num_kv_heads={Hkv} (head widths must be whole numbers)')
  elif round(key_dim) // H > D // H:
    problems.append(f"expand_k={c['expand_k']} (a q-k head of {round(key_dim) // H} > hidden_size / "
                    f'num_heads = {D // H}, the widest this model has)')
  if problems:
    raise ConversionError('fla SimpleGLA features this model does not have: ' + '; '.join(problems) + '.')
  c.update(D=D, H=H, Hkv=Hkv, Kf=round(key_dim) // H, K=D // H, Vh=round(value_dim) // H)
  return c


def model_overrides(settings: dict) -> dict:
  """The ModelConfig fields this layer implies (embed_dim, num_heads, value_dim, the gate, the norm)."""
  c = _settings(settings)
  return {
      'embed_dim': c['D'], 'num_heads': c['H'], 'value_dim': c['H'] * c['Vh'], 'gamma': 'gated',
      'gate_bias': True, 'gate_temperature': float(c['gate_logit_normalizer']), 'gate_floor': None,
      'rotary': 'none', 'swish_gate': True, 'group_norm': True,
      'group_norm_affine': bool(c['elementwise_affine']), 'decay_row_norm': False,
      'norm_eps': float(c['norm_eps']),
  }


def expected_shapes(c: dict, norm_name: str) -> dict[str, tuple]:
  D, H, Hkv, Kf, Vh = c['D'], c['H'], c['Hkv'], c['Kf'], c['Vh']
  out = {'q_proj.weight': (H * Kf, D), 'k_proj.weight': (Hkv * Kf, D), 'v_proj.weight': (Hkv * Vh, D),
         'g_proj.weight': (H * Vh, D), 'gk_proj.weight': (H, D), 'gk_proj.bias': (H,),
         'o_proj.weight': (D, H * Vh)}
  if c['elementwise_affine']:
    out[f'{norm_name}.weight'] = (Vh,)
  return out


def layer_params(state_dict: dict[str, np.ndarray], settings: dict) -> dict:
  """Our MultiScaleRetention's parameters (NumPy float32) from the fla layer's state dict (names
  relative to the layer: 'q_proj.weight', ...): wq, wk [D, H, K], wv, wg [D, H, Vh], wo [H, Vh, D],
  wgamma [D, H], bgamma [H], and norm {'scale': [Vh]} with elementwise_affine."""
  c = _settings(settings)
  norm_name = next((n for n in NORM_NAMES if f'{n}.weight' in state_dict),
                   'g_norm_swish_gate' if c['fuse_norm'] else 'g_norm')
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  check_names_and_shapes(sd, expected_shapes(c, norm_name), 'fla SimpleGLA layer state dict')
  H, G, Kf, K = c['H'], c['H'] // c['Hkv'], c['Kf'], c['K']
  pad = lambda w_DHX: np.pad(w_DHX, ((0, 0), (0, 0), (0, K - Kf)))
  kv_heads = lambda w: np.repeat(layout.in_heads(w, c['Hkv']), G, axis=1)
  params = {
      'wq': pad(layout.in_heads(sd['q_proj.weight'], H)) * np.float32(math.sqrt(K / Kf)),
      'wk': pad(kv_heads(sd['k_proj.weight'])),
      'wv': kv_heads(sd['v_proj.weight']),
      'wg': layout.in_heads(sd['g_proj.weight'], H),
      'wo': layout.out_heads(sd['o_proj.weight'], H),
      'wgamma': layout.dense(sd['gk_proj.weight']),
      'bgamma': sd['gk_proj.bias'],
  }
  if c['elementwise_affine']:
    params['norm'] = {'scale': sd[f'{norm_name}.weight']}
  return {k: (v if isinstance(v, dict) else np.ascontiguousarray(v, np.float32))
          for k, v in params.items()}
