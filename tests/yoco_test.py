"""YOCO: fla's YOCOForCausalLM (its Triton calls on torch, tests/fla_yoco_torch.py) imported with the
command line at logits parity in every form and in cached decoding; our own decoding paths; export."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax import checkpoint
from retnet_jax import convert
from retnet_jax import generate
from retnet_jax import model as model_lib
from retnet_jax.convert import fla_yoco
from retnet_jax.convert.checks import ConversionError
from tests import util
from tests.convert_util import build
from tests.convert_util import jitted
from tests.convert_util import TOL

T = 13  # Not a multiple of the chunk size 4.
FLA_CONFIG = dict(
    model_type='yoco', hidden_size=32, num_hidden_layers=4, num_self_decoder_layers=2, vocab_size=61,
    intermediate_size=48, norm_eps=1e-6, fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False,
    self_decoder_attn={'type': 'gated_retention', 'num_heads': 4, 'rope_inv_freq': 'fla'},
    cross_decoder_attn={'num_heads': 4, 'num_kv_heads': 2, 'rope_inv_freq': 'fla'})


@pytest.fixture(scope='module')
def fla():
  pytest.importorskip('torch')
  models = pytest.importorskip('fla.models')
  from tests import fla_yoco_torch  # pylint: disable=g-import-not-at-top
  with fla_yoco_torch.patch():
    yield models


def build_fla(models, seed=0, **overrides):
  """fla's YOCOForCausalLM, weights redrawn at unit scale, norms moved off 1."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = models.YOCOForCausalLM(models.YOCOConfig(**{**FLA_CONFIG, **overrides}))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif 'embeddings' in name:
        p.copy_(0.3 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * p.shape[-1]**-0.5)
  return model.eval()


def fla_run(model, toks_BT, **kwargs):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    out = model(torch.as_tensor(np.asarray(toks_BT)), **kwargs)
  return out.logits.float().numpy(), out.past_key_values


def import_cli(model, tmp_path):
  """save_pretrained -> python -m retnet_jax.convert --from=fla -> (params, ModelConfig)."""
  model.save_pretrained(tmp_path / 'hf')
  assert convert.main(['--from=fla', f'--input={tmp_path / "hf"}', f'--output={tmp_path / "ours"}']) == 0
  params, cfg, _ = checkpoint.load_params(str(tmp_path / 'ours'))
  return jax.tree.map(np.asarray, params), dataclasses.replace(cfg, chunk_size=4)


def toks(B=2, length=T, seed=0):
  return np.random.default_rng(seed).integers(0, FLA_CONFIG['vocab_size'], (B, length))


def forms_and_cached_errors(model, ours, x, prompt=9):
  """Relative errors against fla's whole-sequence logits: our parallel and chunkwise forms, and our
  prefill of `prompt` tokens then single tokens against fla's cache run the same way (fla appends
  one entry per token). Returns (errors, our final state)."""
  theirs, _ = fla_run(model, x)
  errors = {form: util.rel_err(jitted(ours, form)(jnp.asarray(x), None)[0], theirs)
            for form in ('parallel', 'chunkwise')}
  cached, cache = fla_run(model, x[:, :prompt], use_cache=True)
  pieces = [cached]
  for t in range(prompt, x.shape[1]):
    logits, cache = fla_run(model, x[:, t:t + 1], past_key_values=cache, use_cache=True)
    pieces.append(logits)
  fla_cached = np.concatenate(pieces, 1)
  logits, state = jitted(ours, 'chunkwise')(jnp.asarray(x[:, :prompt]), ours.init_state(x.shape[0], 16))
  outs = [np.asarray(logits)]
  step = jitted(ours, 'recurrent')
  for t in range(prompt, x.shape[1]):
    logits, state = step(jnp.asarray(x[:, t:t + 1]), state)
    outs.append(np.asarray(logits))
  errors['decode_vs_fla_cached'] = util.rel_err(np.concatenate(outs, 1), fla_cached)
  errors['fla_cached_vs_fla_whole'] = util.rel_err(fla_cached, theirs)
  print({k: f'{v:.1e}' for k, v in errors.items()})
  return errors, state


def test_simple_gla_stand_in_matches_fla_naive(fla):
  """The stand-in against fla's own naive recurrence, whole and split with the state carried."""
  del fla
  from fla.ops.simple_gla.naive import naive_recurrent_simple_gla  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from tests import fla_yoco_torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(0)
  q, k = (torch.randn(2, 11, 3, 8, generator=g, dtype=torch.float64) for _ in range(2))
  v = torch.randn(2, 11, 3, 6, generator=g, dtype=torch.float64)
  gate = torch.nn.functional.logsigmoid(torch.randn(2, 11, 3, generator=g, dtype=torch.float64))
  ref_o, ref_s = naive_recurrent_simple_gla(q, k, v, gate, output_final_state=True)
  o1, s1 = fla_yoco_torch.simple_gla(q[:, :5], k[:, :5], v[:, :5], gate[:, :5], output_final_state=True,
                                     state_v_first=True)
  o2, s2 = fla_yoco_torch.simple_gla(q[:, 5:], k[:, 5:], v[:, 5:], gate[:, 5:], initial_state=s1,
                                     output_final_state=True, state_v_first=True)
  # fla's naive computes in float32 (and our carried state is float32): float32 rounding only.
  assert util.rel_err(torch.cat([o1, o2], 1).numpy(), ref_o.numpy()) < 1e-6
  assert util.rel_err(s2.transpose(-1, -2).numpy(), ref_s.numpy()) < 1e-6


def test_fla_yoco_import_logits_and_cached_decoding(fla, tmp_path):
  """Parallel and chunkwise forms; fla's cache (prefill, then single tokens) against our state."""
  model = build_fla(fla)
  params, cfg = import_cli(model, tmp_path)
  assert (cfg.kind, cfg.num_self_decoder_layers, cfg.num_kv_heads, cfg.gamma) == ('yoco', 2, 2, 'gated')
  errors, state = forms_and_cached_errors(model, build(params, cfg), toks())
  assert max(errors.values()) <= TOL, errors
  assert int(state.offset) == T and state.layers[1].k.shape == (2, 2, 8, 16)  # One cache, Hkv heads.


def test_generate_matches_fla_cached_greedy_loop(fla, tmp_path):
  """Our generate (left-padded prefill, shared cache, decode loop) against a greedy loop over fla's
  cache: a prefill that skips the cross-decoder but for the last token, then one token per step."""
  import torch  # pylint: disable=g-import-not-at-top
  model = build_fla(fla, seed=1)
  params, cfg = import_cli(model, tmp_path)
  prompt = toks(B=1, length=7, seed=1)
  theirs = []
  with torch.no_grad():
    out = model(torch.as_tensor(prompt), use_cache=True, skip_cross_decoder=True)
    for _ in range(5):
      theirs.append(int(out.logits[0, -1].argmax()))
      out = model(torch.tensor([[theirs[-1]]]), past_key_values=out.past_key_values, use_cache=True)
  setup = model_lib.make_setup(cfg)
  ours, _ = generate.generate_arrays(setup, jax.tree.map(jnp.asarray, params), [list(prompt[0])],
                                     max_new_tokens=5)
  np.testing.assert_array_equal(np.asarray(ours)[0, :5], theirs)


def test_export_to_fla_loads_and_matches(fla, tmp_path):
  """--to=fla writes what YOCOForCausalLM.from_pretrained loads, with our logits."""
  cfg = model_lib.ModelConfig(kind='yoco', num_layers=3, num_self_decoder_layers=1, vocab_size=50,
                              embed_dim=32, num_heads=4, num_kv_heads=1, ffn_dim=40, gamma='gated',
                              rotary_freqs='torchscale', chunk_size=4)
  from tests.convert_util import numpy_params  # pylint: disable=g-import-not-at-top
  params = numpy_params(cfg, seed=2)
  checkpoint.save_params(str(tmp_path / 'ours'), params, cfg)
  assert convert.main(['--to=fla', f'--input={tmp_path / "ours"}', f'--output={tmp_path / "out"}']) == 0
  model = fla.YOCOForCausalLM.from_pretrained(str(tmp_path / 'out'), fuse_norm=False,
                                              fuse_swiglu=False, fuse_cross_entropy=False).eval()
  x = toks(length=9, seed=2) % 50
  theirs, _ = fla_run(model, x)
  mine = jitted(build(params, cfg), 'chunkwise')(jnp.asarray(x), None)[0]
  assert util.rel_err(mine, theirs) <= TOL


SWA = {'type': 'swa', 'num_heads': 4, 'num_v_heads': 2, 'window_size': 5}


def test_fla_yoco_with_sliding_window_self_decoder_imports_and_exports(fla, tmp_path):
  """A swa self-decoder (fla's Attention: half-split rotary, 2 kv heads, window 5 < T): logits in
  both forms, prefill then single tokens against fla's cache; then exported back, fla's logits."""
  model = build_fla(fla, seed=3, self_decoder_attn=SWA)
  params, cfg = import_cli(model, tmp_path)
  assert (cfg.self_decoder, cfg.attention_window, cfg.rotary) == ('swa', 5, 'interleaved')
  x = toks(seed=3)
  errors, _ = forms_and_cached_errors(model, build(params, cfg), x)
  assert max(errors.values()) <= TOL, errors
  # Back to fla: H kv heads in the self-decoder, the same logits.
  assert convert.main(['--to=fla', f'--input={tmp_path / "ours"}', f'--output={tmp_path / "back"}']) == 0
  back = fla.YOCOForCausalLM.from_pretrained(str(tmp_path / 'back'), fuse_norm=False,
                                             fuse_swiglu=False, fuse_cross_entropy=False).eval()
  assert back.config.self_decoder_attn['window_size'] == 5
  assert util.rel_err(fla_run(back, x)[0], fla_run(model, x)[0]) <= TOL


@pytest.mark.parametrize('override, named', [
    ({'self_decoder_attn': {'type': 'swa', 'num_heads': 4}}, 'swa without window_size'),
    ({'self_decoder_attn': {**SWA, 'qkv_bias': True}}, 'self_decoder_attn.qkv_bias'),
    ({'self_decoder_attn': SWA, 'cross_decoder_attn': {'num_heads': 4, 'rope_inv_freq': 'yoco'}},
     "rope_inv_freq='yoco' with a swa"),
    ({'self_decoder_attn': {'type': 'gated_deltanet', 'num_heads': 4}}, "type='gated_deltanet'"),
    ({'self_decoder_attn': {'type': 'gated_retention', 'num_heads': 2}}, 'num_heads=2'),
    ({'cross_decoder_attn': {'num_heads': 4, 'qk_norm': True}}, 'qk_norm'),
    ({'cross_decoder_attn': {'num_heads': 4, 'qkv_bias': True}}, 'qkv_bias'),
    ({'attnres_block_size': 2}, 'attnres_block_size'),
    ({'num_self_decoder_layers': 4}, 'needs both halves'),
])
def test_import_refuses_by_name(override, named):
  with pytest.raises(ConversionError, match=named.replace('(', r'\(')):
    fla_yoco.settings({**FLA_CONFIG, **override})


def small(**overrides):
  base = dict(kind='yoco', num_layers=4, num_self_decoder_layers=2, vocab_size=40, embed_dim=24,
              num_heads=4, num_kv_heads=2, ffn_dim=40, gamma='gated', chunk_size=4)
  return model_lib.ModelConfig(**{**base, **overrides})


@pytest.mark.parametrize('self_decoder', ['gated_retention', 'swa'])
def test_prefill_then_decode_equals_parallel_with_segments(self_decoder):
  """Left-padded rows (segment 0 is padding): a chunkwise prefill, then one token at a time."""
  cfg = small(self_decoder=self_decoder, attention_window=5 if self_decoder == 'swa' else None)
  model = model_lib.create(cfg, seed=3)
  x = jnp.asarray(np.random.default_rng(3).integers(0, 40, (2, 11)))
  seg = jnp.asarray(np.array([[0, 0, 0] + [1] * 8, [1] * 11]))
  whole, _ = model(x, form='parallel', segment_ids=seg)
  state = model.init_state(2, 16)
  # The prefill runs the cross-decoder at its last position only (the generation prefill's call).
  first, state = model(x[:, :6], state, form='chunkwise', segment_ids=seg[:, :6], last_only=True)
  assert first.shape == (2, 1, 40)
  outs = [first]
  for t in range(6, 11):
    logits, state = model(x[:, t:t + 1], state, form='recurrent', segment_ids=seg[:, t:t + 1])
    outs.append(logits)
  assert util.rel_err(jnp.concatenate(outs, 1), whole[:, 5:]) <= TOL


def test_answers_and_bad_configs():
  cfg = small()
  assert cfg.state_grows and cfg.quadratic('chunkwise')
  # Two self-decoder states [B, H, K, V] and one shared cache of 2 kv heads over 10 positions.
  assert cfg.state_bytes(3, 10) == 2 * 4 * 3 * 4 * 6 * 6 + 3 * 10 * (2 * 2 * 6 * 4 + 4) + 4 * 10
  for bad, msg in [({'num_self_decoder_layers': 4}, 'num_self_decoder_layers'),
                   ({'num_kv_heads': 3}, 'num_kv_heads'), ({'self_decoder': 'swa'}, 'attention_window'),
                   ({'self_decoder': 'mamba'}, 'self_decoder'), ({'layer_pattern': 'retention'}, 'layer_pattern')]:
    with pytest.raises(ValueError, match=msg):
      small(**bad)
  with pytest.raises(ValueError, match='max_len'):
    model_lib.create(cfg).init_state(1)


@pytest.mark.slow
def test_yoco_tiny_trains_evaluates_and_generates(tmp_path):
  """configs/yoco_tiny.py (shrunk by its `test` argument): what `python -m retnet_jax.main` runs in
  its train, eval and generate modes, with the scoring path of eval and the generation loop."""
  import io  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  from retnet_jax import config_lib  # pylint: disable=g-import-not-at-top
  from retnet_jax import train  # pylint: disable=g-import-not-at-top
  config = config_lib.load(os.path.join(util.ROOT, 'configs', 'yoco_tiny.py') + ':test')
  assert config_lib.model_config(config).kind == 'yoco'
  workdir = str(tmp_path / 'w')
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == config.total_steps
  evaluated = train.evaluate(config, workdir)
  assert evaluated['step'] == config.total_steps and np.isfinite(evaluated['eval']['loss'])
  texts = generate.generate_text(config, workdir, ['def f('], max_new_tokens=6, out=io.StringIO())
  assert len(texts) == 1 and texts[0]


@pytest.mark.parametrize('mesh', ['data2_fsdp2_tensor2', 'data2_sequence4'])
def test_logits_on_meshes_equal_one_device(mesh):
  """Parallel, chunkwise and prefill-then-decode on a mesh of the 8 virtual CPU devices, to 1e-4 of
  one device's parallel form (tests/hybrid_test.py's harness and rules)."""
  from tests import hybrid_test  # pylint: disable=g-import-not-at-top
  cfg = small(vocab_size=97, embed_dim=32, chunk_size=8)
  params = model_lib.init_params(cfg, jax.random.key(0))
  tokens, segments = hybrid_test._tokens(4, 40, cfg.vocab_size)  # pylint: disable=protected-access
  run = hybrid_test._forms_and_decoding  # pylint: disable=protected-access
  ref = run(cfg, params, tokens, segments, prompt=32)['parallel']
  got = run(cfg, params, tokens, segments, prompt=32, mesh=hybrid_test.MESHES[mesh])
  for name, x in got.items():
    assert util.rel_err(x, ref[:, :x.shape[1]]) <= TOL, name


@pytest.mark.slow
@pytest.mark.skipif(__import__('importlib').util.find_spec('libtpu') is None,
                    reason='the TPU compiler (libtpu) is not installed')
def test_train_step_and_decoding_compile_for_tpu(tmp_path):
  """--mode=compile and --mode=compile_generate of yoco_tiny:test on v5e-4 (batch over 4 chips):
  the decoding state per chip is the self-decoder's states and the one shared cache, split by batch."""
  import os  # pylint: disable=g-import-not-at-top

  from retnet_jax import aot  # pylint: disable=g-import-not-at-top
  from retnet_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load(os.path.join(util.ROOT, 'configs', 'yoco_tiny.py') + ':test',
                           ['mesh.data=4'])
  report = aot.compile_train(config, str(tmp_path / 'train'), 'v5e-4')
  assert report['fits'] and report['attention_impl_in_step']['impl'] == 'xla'
  report = aot.compile_generate(config, str(tmp_path / 'gen'), 'v5e-4', batch_sizes=(8,),
                                prompt_len=100, max_new_tokens=20)
  (run,) = report['runs']
  cfg = config_lib.model_config(config)
  per_chip = cfg.state_bytes(8, run['prompt_len'] + run['decode_out_len']) / 4
  assert 0.9 * per_chip <= run['decode_state_bytes_per_device'] <= per_chip + 4096
  assert run['decode']['fits'] and run['prefill']['fits']
