"""Generation: greedy decoding is the parallel form's argmax, padding never leaks, sampling knobs, stop
tokens, shape buckets compile once, the matched Transformer config, and the CLI."""

import functools
import importlib.util
import io
import json
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from configs import transformer_tiny
from retnet_jax import config_lib
from retnet_jax import generate
from retnet_jax import model as model_lib
from retnet_jax import tokenizer as tokenizer_lib
from retnet_jax import train
from tests import util

PROMPTS = [[5, 17, 99], list(range(40, 51)), [300, 2, 7, 7, 120, 64, 1]]  # Lengths 3, 11, 7.
NEW = 12


def build(kind='retnet', **overrides):
  extra = {'model__value_dim': None} if kind == 'transformer' else {}
  cfg = util.model_config(model__kind=kind, **{**extra, **overrides})
  setup = model_lib.make_setup(cfg)
  return setup, model_lib.init_params(cfg, jax.random.key(1))


@pytest.fixture(scope='module', params=['retnet', 'transformer'])
def model(request):
  setup, params = build(request.param)
  greedy = generate.generate(setup, params, PROMPTS, max_new_tokens=NEW)
  return setup, params, greedy


@pytest.fixture(scope='module')
def retnet():
  setup, params = build('retnet')  # The same shapes as `model`'s: no new compiles.
  return setup, params, generate.generate(setup, params, PROMPTS, max_new_tokens=NEW)


@functools.partial(jax.jit, static_argnums=0)
def _parallel_logits(graphdef, params, toks_BT):
  return nnx.merge(graphdef, params)(toks_BT, form='parallel')[0]


def parallel_logits(setup, params, seqs):
  """Parallel-form logits [B, T, V] of token lists, right-padded: causal, so position t sees <= t."""
  toks = np.zeros((len(seqs), len(PROMPTS[1]) + NEW), np.int32)
  for i, s in enumerate(seqs):
    toks[i, :len(s)] = s
  return np.asarray(_parallel_logits(setup.graphdef, params, toks))


def test_greedy_is_parallel_argmax_token_by_token(model):
  """Each new token is the argmax of the parallel-form logits of prompt + the tokens before it."""
  setup, params, greedy = model
  assert [len(g) for g in greedy] == [NEW] * len(PROMPTS)
  logits = parallel_logits(setup, params, [p + g for p, g in zip(PROMPTS, greedy)])
  for i, (p, g) in enumerate(zip(PROMPTS, greedy)):
    argmax = np.argmax(logits[i], axis=-1)
    np.testing.assert_array_equal(argmax[len(p) - 1:len(p) - 1 + NEW], g, err_msg=f'row {i}')


def test_mixed_lengths_equal_each_alone(model):
  setup, params, greedy = model
  for p, g in zip(PROMPTS, greedy):
    assert generate.generate(setup, params, [p], max_new_tokens=NEW) == [g]


def test_sampling_seeded_and_limits(retnet):
  setup, params, greedy = retnet
  run = lambda **kw: generate.generate(setup, params, PROMPTS, max_new_tokens=NEW, **kw)
  a = run(temperature=1.0, seed=3)
  assert a == run(temperature=1.0, seed=3)
  assert a != run(temperature=1.0, seed=4)
  assert a != greedy
  assert run(temperature=1.0, top_k=1, seed=5) == greedy
  assert run(temperature=1.0, top_p=1e-6, seed=5) == greedy
  # top_k = 2: every sampled token is one of the two most likely at its step.
  two = run(temperature=5.0, top_k=2, seed=6)
  seqs = [p + g for p, g in zip(PROMPTS, two)]
  for p, s, logits in zip(PROMPTS, seqs, parallel_logits(setup, params, seqs)):
    top2 = np.argsort(-logits, axis=-1)[:, :2]
    for t in range(len(p), len(s)):
      assert s[t] in top2[t - 1]
  assert two != greedy


def test_stream_equals_generate(retnet):
  setup, params, _ = retnet
  kw = dict(max_new_tokens=NEW - 1, temperature=0.8, top_p=0.9, seed=2)
  blocks = list(generate.generate_stream(setup, params, PROMPTS, block_size=4, **kw))
  assert len(blocks) == 3 and all(len(b) == len(PROMPTS) for b in blocks)
  joined = [sum((b[i] for b in blocks), []) for i in range(len(PROMPTS))]
  assert joined == generate.generate(setup, params, PROMPTS, **kw)


def test_stop_tokens_and_max_length(retnet):
  setup, params, greedy = retnet
  stop = greedy[0][3]
  tokens, lengths = generate.generate_arrays(setup, params, PROMPTS, max_new_tokens=NEW,
                                             stop_tokens=(stop,), pad_id=383)
  assert tokens.shape == (len(PROMPTS), NEW)
  for row, n, g in zip(tokens, lengths, greedy):
    expected = g.index(stop) + 1 if stop in g else NEW
    assert n == expected and row[:n].tolist() == g[:n]
    assert np.all(row[n:] == 383)  # Padded after the stop.
  assert lengths[0] == 4
  short = generate.generate(setup, params, PROMPTS, max_new_tokens=5)
  assert short == [g[:5] for g in greedy]


def test_prefill_forms_agree(retnet):
  setup, params, greedy = retnet
  for form in ('parallel', 'recurrent'):
    assert generate.generate(setup, params, PROMPTS, max_new_tokens=NEW, prefill_form=form) == greedy


def test_one_compile_per_bucket():
  setup, params = build(model__num_layers=1)  # A model no other test compiled.
  before = dict(generate.TRACES)
  delta = lambda: {k: generate.TRACES[k] - before.get(k, 0) for k in ('prefill', 'decode')}
  generate.generate(setup, params, [[1, 2, 3], [4] * 9], max_new_tokens=5)
  assert delta() == {'prefill': 1, 'decode': 1}
  # Same buckets (prompt <= 16, batch 2, <= 16 new tokens); other knobs, seeds and stop tokens.
  generate.generate(setup, params, [[7] * 12, [8]], max_new_tokens=9, temperature=0.5, top_k=3,
                    seed=4, stop_tokens=(1, 2))
  assert delta() == {'prefill': 1, 'decode': 1}
  # A longer prompt: a new prefill bucket; RetNet's decode state has no length, no new decode.
  generate.generate(setup, params, [[7] * 20, [8]], max_new_tokens=16)
  assert delta() == {'prefill': 2, 'decode': 1}


def test_bad_inputs_raise():
  setup, params = build(model__num_layers=1)
  with pytest.raises(ValueError, match='prompt 1 is empty'):
    generate.generate(setup, params, [[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match='no prompts'):
    generate.generate(setup, params, [], max_new_tokens=2)
  with pytest.raises(ValueError, match='outside'):
    generate.generate(setup, params, [[10**6]], max_new_tokens=2)
  with pytest.raises(ValueError, match='max_new_tokens'):
    generate.generate(setup, params, [[1]], max_new_tokens=0)
  with pytest.raises(ValueError, match='top_p'):
    generate.generate(setup, params, [[1]], max_new_tokens=2, top_p=0.0)


def test_text_stream_holds_back_partial_utf8():
  tok = tokenizer_lib.ByteTokenizer()
  text = 'x = "é€😀"\n'
  stream, pieces = generate.TextStream(tok), []
  for b in tok.encode(text) + [tok.eos_id]:
    pieces.append(stream.feed([b]))
  pieces.append(stream.flush())
  assert ''.join(pieces) == text and all('\ufffd' not in p for p in pieces)


def test_read_prompts(tmp_path):
  jsonl = tmp_path / 'p.jsonl'
  jsonl.write_text('"def f():\\n"\n{"prompt": "import os"}\n\n{"text": "class A:"}\n')
  assert generate.read_prompts(['x'], str(jsonl)) == ['x', 'def f():\n', 'import os', 'class A:']
  txt = tmp_path / 'p.txt'
  txt.write_text('a b\nc\n')
  assert generate.read_prompts(None, str(txt)) == ['a b', 'c']
  with pytest.raises(ValueError, match='no prompt'):
    generate.read_prompts(None, None)
  with pytest.raises(ValueError, match='empty'):
    generate.read_prompts([''], None)


def test_transformer_tiny_matches_retnet_tiny_in_size():
  retnet = config_lib.load(os.path.join(util.ROOT, 'configs', 'retnet_tiny.py'))
  trans = config_lib.load(os.path.join(util.ROOT, 'configs', 'transformer_tiny.py'))
  config_lib.validate(trans)
  assert trans.model.kind == 'transformer' and trans.model.value_dim is None
  assert {k: v for k, v in trans.model.items() if k not in ('kind', 'value_dim', 'ffn_dim')} == {
      k: v for k, v in retnet.model.items() if k not in ('kind', 'value_dim', 'ffn_dim')}
  n_r = transformer_tiny.count_params(retnet.model.to_dict())
  n_t = transformer_tiny.count_params(trans.model.to_dict())
  assert abs(n_t / n_r - 1) < 0.05, (n_r, n_t)
  # It follows retnet_tiny's sizes: a changed (here shrunk) RetNet gets a matched Transformer too.
  shrunk = util.config(model__embed_dim=96, model__value_dim=192, model__num_heads=2)
  n_r = transformer_tiny.count_params(shrunk.model.to_dict())
  n_t = transformer_tiny.count_params(transformer_tiny.to_transformer(shrunk).model.to_dict())
  assert abs(n_t / n_r - 1) < 0.05, (n_r, n_t)


TRAINED = dict(total_steps=2, log_every=1, eval_every=2, checkpoint_every=1, seq_len=16,
               batch_size=2, model__num_layers=1, data__num_eval_batches=1)


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('trained'))
  train.train_and_evaluate(util.config(**TRAINED), workdir)
  return workdir


def _main(*args):
  return subprocess.run([sys.executable, '-m', 'retnet_jax.main',
                         f'--config={os.path.join(util.ROOT, "configs", "retnet_tiny.py")}', *args],
                        cwd=util.ROOT, capture_output=True, text=True, timeout=300)


def test_cli_generate_prints_text(trained_workdir):
  prompt = 'def main():\n'
  result = _main(f'--workdir={trained_workdir}', '--mode=generate', f'--prompt={prompt}',
                 '--max_new_tokens=24', '--temperature=0.8', '--seed=1')
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith(prompt) and len(result.stdout) > len(prompt) + 1
  # The library call streams the same text the CLI printed (same config defaults and flags).
  out = io.StringIO()
  texts = generate.generate_text(config_lib.load(os.path.join(util.ROOT, 'configs', 'retnet_tiny.py')),
                                 trained_workdir, [prompt], max_new_tokens=24, temperature=0.8, seed=1,
                                 out=out)
  assert out.getvalue() == result.stdout == prompt + texts[0] + '\n'


def test_cli_errors(tmp_path):
  result = _main(f'--workdir={tmp_path}', '--mode=generate', '--prompt=x')
  assert result.returncode == 1 and 'error:' in result.stderr and 'checkpoint' in result.stderr
  result = _main(f'--workdir={tmp_path}', '--mode=generate')
  assert result.returncode == 1 and 'no prompt' in result.stderr
  with pytest.raises(ValueError, match='empty prompt'):
    generate.generate_text(util.config(), str(tmp_path), [''])


# ------------------------------------------------------------------------------------------------
# The sampler on crafted logits: which tokens can be drawn, and how often.

NUCLEUS_PROBS = np.array([0.5, 0.3, 0.15, 0.05, 0.0, 0.0])  # Tokens 4, 5 can never be drawn.
DRAWS = 4000


def draw(probs, *, temperature=1.0, top_k=0, top_p=1.0, seed=0):
  """Frequencies [V] of DRAWS independent draws (one a row) from logits log(probs)."""
  logits = np.where(probs > 0, np.log(np.maximum(probs, 1e-30)), -1e9)
  logits_BV = jnp.asarray(np.tile(logits, (DRAWS, 1)), jnp.float32)
  tokens = jax.jit(generate.sample)(logits_BV, jax.random.key(seed), temperature, top_k, top_p)
  return np.bincount(np.asarray(tokens), minlength=len(probs)) / DRAWS


def expected(probs, keep, temperature=1.0):
  """probs ** (1/temperature) renormalised over the tokens in `keep`."""
  p = np.where(np.isin(np.arange(len(probs)), keep), probs ** (1.0 / temperature), 0.0)
  return p / p.sum()


def assert_frequencies(freq, want):
  assert set(np.flatnonzero(freq)) == set(np.flatnonzero(want)), (freq, want)
  sigma = np.sqrt(want * (1 - want) / DRAWS)
  assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-9), (freq, want)


@pytest.mark.parametrize('top_p, keep', [
    (0.45, [0]), (0.6, [0, 1]), (0.9, [0, 1, 2]), (0.97, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])])
def test_nucleus_keeps_the_smallest_set_reaching_top_p(top_p, keep):
  """At p = 0.9 tokens 0-2 (mass 0.95) can be drawn and token 3 never; in proportion to their
  probabilities renormalised over the nucleus."""
  assert_frequencies(draw(NUCLEUS_PROBS, top_p=top_p), expected(NUCLEUS_PROBS, keep))


def test_top_k_then_top_p():
  """top_p applies to the probabilities renormalised over the top_k tokens: with k = 3 the
  nucleus at 0.82 is {0, 1} (0.5/0.95 + 0.3/0.95 > 0.82); without k it is {0, 1, 2}."""
  assert_frequencies(draw(NUCLEUS_PROBS, top_k=3, top_p=0.82), expected(NUCLEUS_PROBS, [0, 1]))
  assert_frequencies(draw(NUCLEUS_PROBS, top_p=0.82), expected(NUCLEUS_PROBS, [0, 1, 2]))
  assert_frequencies(draw(NUCLEUS_PROBS, top_k=2), expected(NUCLEUS_PROBS, [0, 1]))


@pytest.mark.parametrize('temperature', [0.5, 2.0])
def test_temperature_sharpens_or_flattens_before_the_cut(temperature):
  """Frequencies ∝ p^(1/temperature); the nucleus is taken on the tempered probabilities (at 0.5
  and p = 0.9 it is {0, 1}: 0.685 + 0.247 > 0.9)."""
  assert_frequencies(draw(NUCLEUS_PROBS, temperature=temperature),
                     expected(NUCLEUS_PROBS, [0, 1, 2, 3], temperature))
  if temperature == 0.5:
    assert_frequencies(draw(NUCLEUS_PROBS, temperature=0.5, top_p=0.9),
                       expected(NUCLEUS_PROBS, [0, 1], 0.5))
  greedy = draw(NUCLEUS_PROBS, temperature=0.0, top_p=0.9)
  assert greedy[0] == 1.0


# ------------------------------------------------------------------------------------------------
# The command line's other modes, on the trained fixture (copied where a run writes to it).


def _trained_flags(**overrides):
  """--config.* flags that make retnet_tiny the fixture's config (util.config(**TRAINED))."""
  keys = {**configs.PRESETS['test'], **{k.replace('__', '.'): v for k, v in {**TRAINED, **overrides}.items()}}
  return [f'--config.{k}={v}' for k, v in keys.items()]


def _copy(workdir, tmp_path):
  import shutil
  return shutil.copytree(workdir, tmp_path / 'copy')


def test_cli_eval_restores_and_reports(trained_workdir, tmp_path):
  workdir = _copy(trained_workdir, tmp_path)
  result = _main(f'--workdir={workdir}', '--mode=eval', *_trained_flags())
  assert result.returncode == 0, result.stderr[-2000:]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    evals = [r for r in map(json.loads, f) if r['split'] == 'eval']
  # Training evaluated step 2; the eval mode appends the same numbers for the same checkpoint.
  assert [r['step'] for r in evals] == [2, 2]
  assert evals[1]['loss'] == pytest.approx(evals[0]['loss'], rel=1e-6)
  assert evals[1]['bits_per_byte'] == pytest.approx(evals[0]['bits_per_byte'], rel=1e-6)


def test_cli_step_resumes_from_an_earlier_checkpoint(trained_workdir, tmp_path):
  """--step=1 trains on from checkpoint 1 (not the latest, 2) and replaces step 2."""
  workdir = _copy(trained_workdir, tmp_path)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    first = [r for r in map(json.loads, f) if r['split'] == 'train']
  result = _main(f'--workdir={workdir}', '--step=1', *_trained_flags())
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'Resumed from the checkpoint at step 1' in result.stdout + result.stderr
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    again = [r for r in map(json.loads, f) if r['split'] == 'train'][len(first):]
  assert [r['step'] for r in again] == [2]
  assert again[0]['loss'] == first[1]['loss']  # The same step from the same state and data.
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2']
  result = _main(f'--workdir={workdir}', '--step=7', '--mode=eval', *_trained_flags())
  assert result.returncode == 1 and result.stderr.count('error:') == 1 and '7' in result.stderr


def test_cli_prompt_file_with_several_prompts(trained_workdir, tmp_path):
  prompts = ['def f(x):', 'import os', 'class A:']
  path = tmp_path / 'prompts.jsonl'
  path.write_text('\n'.join([json.dumps(prompts[0]), json.dumps({'prompt': prompts[1]}), '',
                             json.dumps({'text': prompts[2]})]) + '\n')
  result = _main(f'--workdir={trained_workdir}', '--mode=generate', f'--prompt_file={path}',
                 '--max_new_tokens=6', '--temperature=0')
  assert result.returncode == 0, result.stderr[-2000:]
  config = config_lib.load(os.path.join(util.ROOT, 'configs', 'retnet_tiny.py'))
  out = io.StringIO()
  texts = generate.generate_text(config, trained_workdir, prompts, max_new_tokens=6,
                                 temperature=0.0, out=out)
  assert len(texts) == 3 and result.stdout == out.getvalue()
  assert result.stdout == '\n'.join(f'=== prompt {i + 1}/3 ===\n{p}{t}\n'
                                    for i, (p, t) in enumerate(zip(prompts, texts)))


def test_cli_compile_needs_a_topology(tmp_path):
  for mode in ('compile', 'compile_generate'):
    result = _main(f'--workdir={tmp_path}', f'--mode={mode}')
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'needs --topology' in errors[0], result.stderr[-2000:]


_needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None and not util.IN_CI,
                                   reason="the TPU compiler (libtpu) is not installed: the tpu extra")


@_needs_libtpu
@pytest.mark.slow
def test_cli_compile_modes_on_a_tiny_config(tmp_path):
  """--mode=compile writes its report; --mode=compile_generate parses --decode_batch, --prompt_len
  and --max_new_tokens into the runs it compiles."""
  flags = [f'--config.{k}={v}' for k, v in configs.PRESETS['test'].items()]
  result = _main(f'--workdir={tmp_path / "train"}', '--mode=compile', '--topology=v5e-1', *flags)
  assert result.returncode == 0, result.stderr[-2000:]
  with open(tmp_path / 'train' / 'compile.json') as f:
    report = json.load(f)
  assert report['num_devices'] == 1 and report['batch_size'] == configs.PRESETS['test']['batch_size']
  result = _main(f'--workdir={tmp_path / "gen"}', '--mode=compile_generate', '--topology=v5e-1',
                 '--decode_batch=2,4', '--prompt_len=20', '--max_new_tokens=5', *flags)
  assert result.returncode == 0, result.stderr[-2000:]
  with open(tmp_path / 'gen' / 'generate_compile.json') as f:
    runs = json.load(f)['runs']
  assert [r['batch_size'] for r in runs] == [2, 4]
  assert all(r['prompt_len'] == 32 and r['decode_out_len'] == 16 for r in runs)
