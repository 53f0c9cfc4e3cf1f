"""Hybrid retention–attention stacks (model.layer_pattern): the parameter tree, bad patterns, one
decoding state, and the hybrid's logits equal in the parallel and chunkwise forms and in
prefill-then-decode, on one device and on meshes of the 8 virtual CPU devices."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retnet_jax import generate
from retnet_jax import model as model_lib
from retnet_jax import scoring
from retnet_jax import sharding
from tests import util

RULES = {'batch': ('data', 'fsdp'), 'length': 'sequence', 'embed': 'fsdp', 'heads': 'tensor',
         'kv': None, 'mlp': 'tensor', 'vocab': 'tensor', 'layers': None}
MESHES = {'one_device': None, 'data2_fsdp2_tensor2': dict(data=2, fsdp=2, tensor=2),
          'data2_sequence4': dict(data=2, sequence=4)}
HYBRID = 'retention,retention,attention'


def _cfg(pattern=HYBRID, **overrides):
  base = dict(vocab_size=97, num_layers=6, embed_dim=32, num_heads=4, value_dim=48, ffn_dim=40,
              chunk_size=8, layer_pattern=pattern)
  return model_lib.ModelConfig(**{**base, **overrides})


def _paths(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_bad_patterns_are_one_line_naming_them():
  with pytest.raises(ValueError, match=r"layer_pattern 'retention,mamba' names \['mamba'\]") as e:
    _cfg('retention,mamba', num_layers=4)
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match=r"layer_pattern 'retention,retention,attention' has 3 "
                                       r"layers, which does not divide num_layers=4") as e:
    _cfg(num_layers=4)
  assert '\n' not in str(e.value)


def test_uniform_models_keep_their_parameter_paths():
  """kind='retnet' / 'transformer' (and the same one-mixer pattern) stack Blocks over all layers:
  'blocks/retention/wq' [L, D, H, K] as checkpoints and the converters expect."""
  for kind, mixer in (('retnet', 'retention'), ('transformer', 'attention')):
    extra = {} if kind == 'retnet' else {'value_dim': None}
    by_kind = _paths(model_lib.abstract_params(_cfg('', kind=kind, **extra)))
    by_pattern = _paths(model_lib.abstract_params(_cfg(mixer, kind=kind, **extra)))
    assert by_kind == by_pattern
    assert by_kind[f'blocks/{mixer}/wq'] == (6, 32, 4, 8)
    assert by_kind['blocks/ffn/w_up'] == (6, 32, 40)
  hybrid = _paths(model_lib.abstract_params(_cfg()))
  assert hybrid['blocks/0/retention/wq'] == hybrid['blocks/1/retention/wq'] == (2, 32, 4, 8)
  assert hybrid['blocks/2/attention/wq'] == (2, 32, 4, 8)
  assert not any(p.startswith('blocks/2/retention') for p in hybrid)


def test_one_state_type_and_what_it_answers():
  full, windowed = _cfg(), _cfg(attention_window=5)
  assert full.layer_mixers == ('retention', 'retention', 'attention') * 2
  assert full.state_grows and not windowed.state_grows and not _cfg('retention').state_grows
  # Retention's state is constant; full attention's grows with context, a window's does not.
  assert full.state_bytes(1, 2048) - full.state_bytes(1, 1024) == \
      2 * 1024 * (2 * 4 * 8 * 4 + 4) + 2 * 1024 * 4
  assert windowed.state_bytes(1, 2048) == windowed.state_bytes(1, 1024)
  model = model_lib.create(windowed)
  state = model.init_state(3, max_len=1000)
  assert isinstance(state, model_lib.DecodeState) and len(state.layers) == 3
  assert state.layers[0].shape == (2, 3, 4, 8, 12)
  assert state.layers[2].k.shape == (2, 3, 4, 8, 5)  # A ring of 5 slots, whatever max_len.
  with pytest.raises(ValueError, match='needs max_len'):
    model_lib.create(full).init_state(3)
  assert scoring.Scorer(model_lib.make_setup(windowed), nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                        chunk=8).carries


def _tokens(B, T, vocab, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (B, T)).astype(np.int32)
  segments = np.stack([1 + np.cumsum(rng.random(T) < 0.06) for _ in range(B)]).astype(np.int32)
  return tokens, segments


def _forms_and_decoding(cfg, params, tokens, segments, prompt, mesh=None):
  """Logits of the parallel and chunkwise forms, and of a chunkwise prefill of `prompt` tokens
  followed by one recurrent step per token. Under `mesh`, the forms and the prefill run on it and
  the steps on one device; a `sequence` axis runs only the chunkwise form, over the prompt."""
  setup = model_lib.make_setup(cfg)
  run = jax.jit(lambda p, t, s, form: model_lib.apply_model(setup, p, t, form=form, segment_ids=s)[0],
                static_argnames='form')
  B, T = tokens.shape

  @jax.jit
  def prefill(p, t, s):
    model = nnx.merge(setup.graphdef, p)
    return model(t, model.init_state(B, T), form='chunkwise', segment_ids=s)

  @jax.jit
  def step(p, state, t, s):
    return nnx.merge(setup.graphdef, p)(t, state, form='recurrent', segment_ids=s)

  sequence = bool(mesh) and mesh.get('sequence', 1) > 1
  with sharding.use_rules(sharding.make_mesh({'data': 1, **mesh}), RULES) if mesh else _nothing():
    forms = {}
    if not sequence:
      forms['parallel'] = run(params, tokens, segments, 'parallel')
      forms['chunkwise'] = run(params, tokens, segments, 'chunkwise')
    else:
      forms['chunkwise'] = run(params, tokens[:, :prompt], segments[:, :prompt], 'chunkwise')
    logits, state = prefill(params, tokens[:, :prompt], segments[:, :prompt])
  state, logits = jax.device_get((state, logits))  # Decode on one device.
  decoded = [logits]
  for t in range(prompt, T):
    logits, state = step(params, state, tokens[:, t:t + 1], segments[:, t:t + 1])
    decoded.append(logits)
  forms['decoded'] = jnp.concatenate(decoded, axis=1)
  return forms


class _nothing:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


@pytest.mark.parametrize('window', [None, 6])
@pytest.mark.parametrize('mesh', list(MESHES))
def test_hybrid_logits_agree_in_every_form_and_mesh(mesh, window):
  """Parallel, chunkwise and prefill-then-decode to 1e-4 of one device's parallel form."""
  cfg = _cfg(attention_window=window)
  params = model_lib.init_params(cfg, jax.random.key(0))
  tokens, segments = _tokens(4, 40, cfg.vocab_size)
  ref = _forms_and_decoding(cfg, params, tokens, segments, prompt=32)['parallel']
  got = _forms_and_decoding(cfg, params, tokens, segments, prompt=32, mesh=MESHES[mesh])
  for name, x in got.items():
    assert util.rel_err(x, ref[:, :x.shape[1]]) <= 1e-4, name


def test_windowed_decoding_runs_past_the_window_in_constant_memory():
  """A prompt longer than the ring, then many more tokens than it holds: each step's logits equal
  the parallel form's, and the state keeps its shape."""
  cfg = _cfg('retention,attention', num_layers=2, attention_window=4, chunk_size=4)
  params = model_lib.init_params(cfg, jax.random.key(1))
  tokens, segments = _tokens(2, 27, cfg.vocab_size, seed=4)
  forms = _forms_and_decoding(cfg, params, tokens, segments, prompt=9)
  assert util.rel_err(forms['decoded'], forms['parallel']) <= 1e-4


def test_generate_with_a_hybrid_equals_greedy_argmax():
  """generate()'s greedy tokens are the argmax of the parallel form over the growing sequence."""
  cfg = _cfg(attention_window=None)
  setup, params = model_lib.make_setup(cfg), model_lib.init_params(cfg, jax.random.key(2))
  prompt = [5, 17, 3, 9, 40, 2, 11]
  out = generate.generate(setup, params, [prompt], max_new_tokens=6)[0]
  seq = list(prompt)
  for _ in range(6):
    logits, _ = model_lib.apply_model(setup, params, jnp.asarray([seq]), form='parallel')
    seq.append(int(jnp.argmax(logits[0, -1])))
  assert out == seq[len(prompt):]


@pytest.mark.slow
def test_command_line_trains_evaluates_and_generates_a_hybrid(tmp_path):
  shrink = [f'--config.{k}={v}' for k, v in util.SHRINK.items()]
  base = [sys.executable, '-m', 'retnet_jax.main', '--config=configs/retnet_tiny.py',
          f'--workdir={tmp_path}', '--config.model.layer_pattern=retention,attention',
          '--config.model.attention_window=8', *shrink]
  env = dict(os.environ, PYTHONPATH=util.ROOT)
  for extra in ([], ['--mode=eval'], ['--mode=generate', '--prompt=def f(x):', '--max_new_tokens=8']):
    proc = subprocess.run(base + extra, cwd=util.ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(util.train_losses(str(tmp_path))) >= 2
  assert proc.stdout.strip()
