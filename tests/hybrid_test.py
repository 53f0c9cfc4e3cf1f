"""Hybrid retention–attention stacks (model.layer_pattern): the parameter tree, bad patterns, one
decoding state, and the hybrid's logits equal in the parallel and chunkwise forms and in
prefill-then-decode, on one device and on meshes of the 8 virtual CPU devices."""

import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
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


@pytest.mark.parametrize('window', [None, 4])
def test_generate_with_a_hybrid_equals_greedy_argmax(window):
  """generate()'s greedy tokens (two left-padded prompts, the longer one past the window) are the
  argmax of the parallel form over each growing sequence."""
  cfg = _cfg(attention_window=window)
  setup, params = model_lib.make_setup(cfg), model_lib.init_params(cfg, jax.random.key(2))
  prompts = [[5, 17, 3, 9, 40, 2, 11], [8, 1, 30]]
  outs = generate.generate(setup, params, prompts, max_new_tokens=6)
  # One compiled parallel forward at a fixed length: the model is causal, so the tokens after
  # position t (zeros here) cannot change its logits.
  forward = jax.jit(lambda x: model_lib.apply_model(setup, params, x, form='parallel')[0])
  for prompt, out in zip(prompts, outs):
    seq = list(prompt)
    for _ in range(6):
      padded = jnp.asarray([seq + [0] * (max(map(len, prompts)) + 6 - len(seq))])
      seq.append(int(jnp.argmax(forward(padded)[0, len(seq) - 1])))
    assert out == seq[len(prompt):]


@pytest.mark.slow
def test_command_line_trains_evaluates_and_generates_a_hybrid(tmp_path):
  shrink = [f'--config.{k}={v}' for k, v in configs.PRESETS['test'].items()]
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


# ------------------------------------------------------------------------------------------------
# fla's RetNet with hybrid attention layers (fla's own model code on CPU, tests/fla_torch.py).

FLA_HYBRIDS = {
    'one_in_two_kv_grouped': dict(num_hidden_layers=4, num_heads=4, expand_v=2.0,
                                  attn={'layers': [1, 3], 'num_heads': 4, 'num_kv_heads': 2}),
    'irregular_windowed': dict(num_hidden_layers=3,
                               attn={'layers': [1], 'num_heads': 3, 'window_size': 5}),
}


@pytest.mark.parametrize('name', sorted(FLA_HYBRIDS))
def test_fla_hybrid_imports_at_logits_parity_and_exports_back(name, tmp_path):
  pytest.importorskip('torch')
  pytest.importorskip('fla.models')
  from fla import models

  from retnet_jax.convert import fla as fla_format
  from tests import convert_fla_test as fla_test
  from tests import convert_util
  from tests import fla_torch
  with fla_torch.patch():
    fla = (models, 'cpu')
    c = fla_test.fla_config(**FLA_HYBRIDS[name])
    model = fla_test.build_fla(fla, c)
    params, cfg = fla_test.import_cli(model, tmp_path)
    toks = convert_util.tokens(cfg)
    ref, _ = fla_test.fla_logits(fla, model, toks)
  attn = c['attn']
  mixers = ['attention' if i in attn['layers'] else 'retention' for i in range(cfg.num_layers)]
  assert list(cfg.layer_mixers) == mixers and cfg.attention_window == attn.get('window_size')
  for form in ('parallel', 'chunkwise', 'decode'):
    assert util.rel_err(convert_util.our_logits(params, cfg, toks, form), ref) <= convert_util.TOL, form
  sd, config = fla_format.to_fla(params, cfg)
  original = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  assert set(sd) == set(original)
  assert config['attn']['layers'] == attn['layers']
  assert config['attn']['window_size'] == attn.get('window_size')
  if attn.get('num_kv_heads', attn['num_heads']) == attn['num_heads']:  # Repeated heads stay repeated.
    for key, value in sd.items():
      np.testing.assert_allclose(value, original[key], rtol=1e-6, err_msg=key)


def test_fla_hybrid_options_without_a_counterpart_are_refused_by_name():
  from retnet_jax.convert import ConversionError
  from retnet_jax.convert import fla as fla_format
  from tests import convert_fla_test as fla_test
  sd = fla_test.fla_state_dict(fla_test.fla_config())
  for attn, words in (({'layers': [1], 'num_heads': 3, 'qkv_bias': True}, 'qkv_bias'),
                      ({'layers': [1], 'num_heads': 1}, 'attn num_heads=1'),
                      ({'layers': [1], 'num_heads': 3, 'rope_theta': 5e5}, 'rope_theta=500000'),
                      ([{'layers': [0], 'num_heads': 3}, {'layers': [1], 'num_heads': 3,
                                                          'window_size': 8}], '2 specs')):
    with pytest.raises(ConversionError, match=words):
      fla_format.from_fla(sd, fla_test.fla_config(attn=attn))


# ------------------------------------------------------------------------------------------------
# The TPU ahead-of-time compile (libtpu on this host, no TPU needed).


@pytest.mark.slow
@pytest.mark.skipif(__import__('importlib').util.find_spec('libtpu') is None,
                    reason='the TPU compiler (libtpu) is not installed')
@pytest.mark.parametrize('pattern', ['attention', 'retention,attention'])
def test_tpu_train_step_compiles_with_the_splash_kernel(pattern, tmp_path):
  """The Transformer's and the hybrid's train step on v5e-4 call the splash-attention kernel (and
  the hybrid the retention kernels too), as compile.json reports."""
  from retnet_jax import aot
  kind = 'transformer' if pattern == 'attention' else 'retnet'
  c = util.config('retnet_tiny', model__kind=kind, model__layer_pattern=pattern,
                  model__num_layers=2, model__embed_dim=256, model__num_heads=2,
                  model__value_dim=512 if kind == 'retnet' else None, model__ffn_dim=512,
                  model__chunk_size=64, model__dtype='bfloat16', model__attention_window=64,
                  seq_len=256, batch_size=8, mesh__data=2, mesh__fsdp=2)
  report = aot.compile_train(c, str(tmp_path), 'v5e-4')
  attn = report['attention_impl_in_step']
  assert attn['impl'] == 'splash' and attn['window'] == 64, attn
  assert any(k.startswith('splash_mha_fwd') for k in attn['kernel_calls_in_step']), attn
  assert any(k.startswith(('splash_mha_dq', 'splash_mha_dkv')) for k in attn['kernel_calls_in_step'])
  retention = report['retention_impl_in_step']
  assert retention['impl'] == ('pallas' if kind == 'retnet' else 'none'), retention


# ------------------------------------------------------------------------------------------------
# The benchmark runner.


@pytest.mark.slow
def test_hybrid_benchmark_writes_tables_and_resumes(tmp_path):
  from experiments import hybrid
  tiny = ('model.embed_dim=32', 'model.value_dim=64', 'model.ffn_dim=64', 'seq_len=32',
          'batch_size=4', 'data.num_eval_batches=1', 'log_every=1', 'mesh.data=1')
  kwargs = dict(quick=True, steps=2, names=('retnet', 'hybrid_1in2_window'), overrides=tiny,
                contexts=(16, 48))
  rows = hybrid.run(str(tmp_path), **kwargs)
  assert [r['model'] for r in rows] == ['retnet', 'hybrid_1in2_window']
  assert all(np.isfinite(r['final_eval_loss']) for r in rows)
  decode = (tmp_path / 'decode.md').read_text()
  assert 'hybrid_1in2_window | 48 |' in decode and (tmp_path / 'decode.png').exists()
  # The windowed hybrid's state does not grow with context; retention's never does.
  with open(tmp_path / 'decode.csv') as f:
    states = {(r['model'], r['context']): int(r['state_bytes']) for r in __import__('csv').DictReader(f)}
  assert states[('hybrid_1in2_window', '16')] == states[('hybrid_1in2_window', '48')]
  metrics = (tmp_path / 'runs' / 'retnet' / 'metrics.jsonl').stat().st_mtime
  hybrid.run(str(tmp_path), **kwargs)  # Finished runs are skipped.
  assert (tmp_path / 'runs' / 'retnet' / 'metrics.jsonl').stat().st_mtime == metrics


@pytest.mark.slow
@pytest.mark.parametrize('mesh', ['data2_fsdp2_tensor2', 'data2_sequence4'])
def test_hybrid_training_on_a_mesh_matches_one_device(mesh, tmp_path):
  """Training losses of a windowed 1-in-2 hybrid with document resets, on 8 devices and on one."""
  base = dict(model__layer_pattern='retention,attention', model__attention_window=12,
              model__num_heads=4, model__value_dim=64, model__chunk_size=8, seq_len=64,
              batch_size=8, total_steps=3, log_every=1, eval_every=3, checkpoint_every=100,
              reset_at_doc_boundaries=True)
  one = util.trained_losses(util.config(**base), tmp_path / 'one')
  sizes = {f'mesh__{a}': n for a, n in MESHES[mesh].items()}
  got = util.trained_losses(util.config(**base, **sizes), tmp_path / 'mesh')
  assert len(got) == len(one) == 3
  np.testing.assert_allclose(got, one, rtol=1e-5)
