"""The layers against float64 references written from the definitions (tests/reference.py): the
retention layer under each Table 6 switch, the γ schedules from the paper's formulas, and the
Transformer baseline's causal attention with segment masks."""

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax import decay
from retnet_jax import model as model_lib
from tests import reference
from tests import util

B, T = 2, 29
CUTS = (0, 11, 12, 29)  # Three documents in row 0, one of them a single token.


def segments():
  seg = np.ones((B, T), np.int32)
  for i, (a, b) in enumerate(zip(CUTS[:-1], CUTS[1:])):
    seg[0, a:b] = i + 1
  return seg


def resets(seg):
  return np.concatenate([np.zeros((B, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)


def test_vectorised_reference_equals_the_loop():
  """The vectorised float64 reference against its term-by-term form (small T), state and resets."""
  q, k, v, state = util.retention_inputs(0, 3, 23, 2, 4, 5)
  reset = np.zeros((3, 23), bool)
  reset[0, [0, 7, 8]] = True
  reset[2, 22] = True
  g = reference.gammas('custom', 2, (0.7, 1.0))
  for args in ((None, None), (state, None), (state, reset)):
    o, s = reference.retention(q, k, v, g, *args)
    o_loop, s_loop = reference.retention_loop(q, k, v, g, *args)
    np.testing.assert_allclose(o, o_loop, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s, s_loop, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('H', [1, 3, 8])
@pytest.mark.parametrize('schedule', ['retnet', 'lm', 'uniform', 'none'])
def test_gamma_schedules_are_the_papers(schedule, H):
  np.testing.assert_allclose(decay.gammas(schedule, H), reference.gammas(schedule, H), rtol=1e-15)


@pytest.mark.parametrize('arg, schedule', [('gamma=lm', 'lm'), ('gamma=custom', 'custom'),
                                           ('ablation=no_multiscale', 'uniform'),
                                           ('ablation=no_decay', 'none'), (None, 'retnet')])
def test_the_layer_uses_its_configs_schedule(arg, schedule):
  """The γ a layer of each config actually applies (its log_gamma()) is the paper's formula."""
  cfg = util.model_config(arg=arg, model__num_heads=4)
  layer = model_lib.MultiScaleRetention(cfg, rngs=nnx.Rngs(0))
  want = reference.gammas(schedule, 4, (0.9, 0.97, 0.99, 0.999))
  np.testing.assert_allclose(np.exp(np.asarray(layer.log_gamma(), np.float64)), want, rtol=1e-6)


# What each Table 6 row switches, written from the paper: (config arg, heads, reference keywords).
TABLE6 = {
    'retnet': (None, 3, dict(schedule='retnet')),
    'no_gate': ('ablation=no_gate', 3, dict(schedule='retnet', gate=False)),
    'no_groupnorm': ('ablation=no_groupnorm', 3,
                     dict(schedule='retnet', group_norm=False, row_norm=True)),
    'no_decay': ('ablation=no_decay', 3, dict(schedule='none')),
    'no_multiscale': ('ablation=no_multiscale', 3, dict(schedule='uniform')),
    'small_head': ('ablation=small_head', 6, dict(schedule='retnet')),
}


@pytest.mark.parametrize('form', ['parallel', 'chunkwise'])
@pytest.mark.parametrize('row', sorted(TABLE6))
def test_table6_switches_on_the_retention_layer(row, form):
  """The layer's output under each ablation against MSR (eq. 8) with that part removed, on packed
  documents; compared row by row (each token scaled by its own size)."""
  arg, H, kw = TABLE6[row]
  kw = dict(kw)
  cfg = util.model_config(arg=arg, model__num_heads=H)
  layer = model_lib.MultiScaleRetention(cfg, rngs=nnx.Rngs(3))
  rng = np.random.default_rng(4)
  x = rng.standard_normal((B, T, cfg.embed_dim))
  seg = segments()
  y, _ = layer(jnp.asarray(x, jnp.float32), None, positions=jnp.arange(T),
               segment_ids=jnp.asarray(seg), prev_segment=jnp.asarray(seg[:, 0]), form=form)
  w = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  assert ('wg' in w) == kw.get('gate', True)
  schedule = kw.pop('schedule')
  ref = reference.multi_scale_retention(
      x, {n: w.get(n) for n in ('wq', 'wk', 'wv', 'wg', 'wo')}, reference.gammas(schedule, H),
      reset=resets(seg), eps=cfg.norm_eps, **kw)
  assert util.rel_err_rows(y, ref) <= 1e-5, util.rel_err_rows(y, ref)
  # And the switch matters: the full layer's reference is far from this one.
  if row not in ('retnet', 'small_head'):
    full = reference.multi_scale_retention(
        x, {n: w.get(n) for n in ('wq', 'wk', 'wv', 'wo')} | {'wg': w.get('wg', w['wv'])},
        reference.gammas('retnet', H), reset=resets(seg), eps=cfg.norm_eps)
    assert util.rel_err_rows(y, full) > 1e-2


def test_transformer_attention_matches_float64_definition():
  """The Transformer baseline's attention: causal softmax within each segment (packed rows)."""
  cfg = util.model_config('transformer_tiny', model__value_dim=None)
  layer = model_lib.Attention(cfg, rngs=nnx.Rngs(5))
  x = np.random.default_rng(6).standard_normal((B, T, cfg.embed_dim))
  seg = segments()
  y, _ = layer(jnp.asarray(x, jnp.float32), None, positions=jnp.arange(T),
               segment_ids=jnp.asarray(seg), prev_segment=jnp.asarray(seg[:, 0]))
  w = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  ref = reference.causal_attention(x, w, seg, base=cfg.rotary_base, freqs=cfg.rotary_freqs,
                                   style=cfg.rotary)
  assert util.rel_err_rows(y, ref) <= 1e-5, util.rel_err_rows(y, ref)
  # The first token of each document sees only itself: its output is its own value projected.
  v0 = np.einsum('d,dhk,hke->e', x[0, 11], w['wv'], w['wo'])
  np.testing.assert_allclose(np.asarray(y[0, 11]), v0, rtol=1e-4, atol=1e-5)
