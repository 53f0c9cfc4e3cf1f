"""The `retnet_jax` lm-eval model through the real lm-evaluation-harness, offline: a task directory
written here (multiple choice, rolling perplexity, generate_until on local JSON), run by
`python -m retnet_jax.lm_eval`'s entry point with --include_path, and every score checked against
log-probabilities summed by hand (float64) from the model's own logits in one parallel pass."""

import glob
import json
import math
import os

import jax
import numpy as np
import pytest

from tests import util

util.require('lm_eval', reason='lm-eval is not installed (the `eval` extra)')

from flax import nnx  # pylint: disable=g-bad-import-order

from retnet_jax import checkpoint  # pylint: disable=g-import-not-at-top
from retnet_jax import lm_eval as rj_lm_eval
from retnet_jax import model as model_lib
from retnet_jax import scoring
from retnet_jax import tokenizer as tokenizer_lib
from retnet_jax import train

SEQ_LEN = 37  # configs.PRESETS['test']'s: the training length (max_length), which no chunk size divides.
MAX_GEN = 10
WORDS = ('alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho '
         'sigma tau upsilon phi chi psi omega').split()


def _sentence(rng, n):
  return ' '.join(rng.choice(WORDS, n))


def write_tasks(root):
  """Three tasks on local JSON lines; some contexts and documents are longer than SEQ_LEN."""
  rng = np.random.default_rng(0)
  data = {
      'mc': [{'question': f'Q{i}: {_sentence(rng, 2 + 5 * i)}?', 'label': int(rng.integers(3)),
              'choices': [_sentence(rng, 1 + (i + j) % 3) for j in range(3)]} for i in range(4)],
      'ppl': [{'text': _sentence(rng, n)} for n in (3, 12, 30)],
      'gen': [{'prompt': f'{_sentence(rng, n)} =', 'answer': _sentence(rng, 1)} for n in (1, 4, 9)],
  }
  common = lambda name: (f'dataset_path: json\ndataset_kwargs:\n  data_files:\n'
                         f'    test: {os.path.join(root, name + ".jsonl")}\n'
                         f'  cache_dir: {os.path.join(root, "hf_cache")}\ntest_split: test\n')
  tasks = {
      'rj_tiny_mc': common('mc') + (
          'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
          'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
          'metric_list:\n  - metric: acc\n'),
      'rj_tiny_ppl': common('ppl') + (
          'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
          'metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n'),
      'rj_tiny_gen': common('gen') + (
          'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
          f'generation_kwargs:\n  until: ["\\n", " ="]\n  max_gen_toks: {MAX_GEN}\n'
          '  do_sample: false\nmetric_list:\n  - metric: exact_match\n'),
  }
  os.makedirs(root, exist_ok=True)
  for name, rows in data.items():
    with open(os.path.join(root, name + '.jsonl'), 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
  for name, text in tasks.items():
    with open(os.path.join(root, name + '.yaml'), 'w') as f:
      f.write(f'task: {name}\n' + text + 'metadata:\n  version: 1.0\n')
  return root, data


@pytest.fixture(scope='module')
def tasks(tmp_path_factory):
  return write_tasks(str(tmp_path_factory.mktemp('tasks')))


def trained(tmp_path_factory, name):
  """A checkpoint of the main job's config (shrunk), trained 2 steps: (workdir, config path)."""
  workdir = str(tmp_path_factory.mktemp(name))
  extra = {'model__value_dim': None} if name == 'transformer_tiny' else {}
  config = util.config(name, total_steps=2, eval_every=2, checkpoint_every=2, **extra)
  train.train_and_evaluate(config, workdir)
  return workdir, config


@pytest.fixture(scope='module')
def retnet(tmp_path_factory):
  return trained(tmp_path_factory, 'retnet_tiny')


@pytest.fixture(scope='module')
def transformer(tmp_path_factory):
  return trained(tmp_path_factory, 'transformer_tiny')


class Hand:
  """log p(t_i | t_<i) for i ≥ 1, float64, from the model's logits in one parallel pass over each
  whole sequence (right-padded to one width, so that one compile serves them all)."""

  WIDTH = 256

  def __init__(self, workdir):
    params, cfg, _ = checkpoint.load_params(workdir)
    graphdef = model_lib.make_setup(cfg).graphdef
    self.fn = jax.jit(lambda p, t: scoring._call(nnx.merge(graphdef, p), t, None, 'parallel')[0])
    self.params = params

  def logits(self, seqs):
    tokens = np.zeros((len(seqs), self.WIDTH), np.int32)
    for i, s in enumerate(seqs):
      assert len(s) <= self.WIDTH
      tokens[i, :len(s)] = s
    return np.asarray(self.fn(self.params, tokens), np.float64)

  def logprobs(self, seqs):
    out = []
    for s, logits in zip(seqs, self.logits([s[:-1] for s in seqs])):
      logits = logits[:len(s) - 1]
      logp = logits - logits.max(-1, keepdims=True)
      logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
      out.append((logp[np.arange(len(s) - 1), s[1:]], logits))
    return out


def run_lm_eval(workdir, task_dir, out, form, capsys):
  rj_lm_eval.main([
      f'--model_args=workdir={workdir},batch_size=2,max_length={SEQ_LEN}'
      + (f',form={form}' if form else ''),
      '--tasks=rj_tiny_mc,rj_tiny_ppl,rj_tiny_gen', f'--include_path={task_dir}',
      f'--output_path={out}', '--log_samples'])
  printed = capsys.readouterr().out
  samples = {}
  for task in ('rj_tiny_mc', 'rj_tiny_ppl', 'rj_tiny_gen'):
    (path,) = glob.glob(os.path.join(out, '**', f'samples_{task}_*.jsonl'), recursive=True)
    with open(path) as f:
      samples[task] = sorted((json.loads(line) for line in f), key=lambda s: s['doc_id'])
  (path,) = glob.glob(os.path.join(out, '**', 'results_*.json'), recursive=True)
  with open(path) as f:
    results = json.load(f)['results']
  return printed, samples, results


def check_scores(workdir, printed, samples, results, *, retnet):
  tok = tokenizer_lib.ByteTokenizer()
  hand = Hand(workdir)
  for task in ('rj_tiny_mc', 'rj_tiny_ppl', 'rj_tiny_gen'):
    assert f'|{task}' in printed.replace(' ', '')  # lm-eval's results table.
  truncated = 0
  # Multiple choice: sum of log p over the continuation, after the context.
  for s in samples['rj_tiny_mc']:
    rows = []
    for args in s['arguments'].values():
      context, continuation = tok.encode(args['arg_0']), tok.encode(args['arg_1'])
      tokens = context + continuation
      if not retnet and len(tokens) > SEQ_LEN + 1:
        tokens, truncated = tokens[-(SEQ_LEN + 1):], truncated + 1
      rows.append((tokens, len(continuation)))
    sums = [logp[-n:].sum() for (logp, _), (_, n) in zip(hand.logprobs([t for t, _ in rows]), rows)]
    np.testing.assert_allclose([float(r[0][0]) for r in s['resps']], sums, rtol=1e-5, atol=1e-4)
    assert s['acc'] == float(int(np.argmax(sums)) == int(s['target']))
  long_contexts = sum(len(s['doc']['question']) > SEQ_LEN for s in samples['rj_tiny_mc'])
  assert long_contexts >= 2  # Chunked with the state carried (RetNet), or truncated.
  if not retnet:
    assert truncated > 0
  # Rolling: the whole document after the prefix (eos); the Transformer in disjoint windows.
  total, nbytes = 0.0, 0
  for s in samples['rj_tiny_ppl']:
    doc = tok.encode(s['doc']['text'])
    padded = [tok.eos_id] + doc
    if retnet:
      expected = hand.logprobs([padded])[0][0].sum()
    else:
      # Targets in blocks of SEQ_LEN; each block sees the SEQ_LEN inputs before its end.
      blocks = [(s, min(s + SEQ_LEN, len(doc))) for s in range(0, len(doc), SEQ_LEN)]
      windows = [padded[max(0, e - SEQ_LEN):e + 1] for _, e in blocks]
      expected = sum(logp[-(e - s):].sum()
                     for (logp, _), (s, e) in zip(hand.logprobs(windows), blocks))
    np.testing.assert_allclose(float(s['resps'][0][0]), expected, rtol=1e-5, atol=1e-4)
    total, nbytes = total + expected, nbytes + len(doc)
  assert max(len(s['doc']['text']) for s in samples['rj_tiny_ppl']) > 3 * SEQ_LEN
  np.testing.assert_allclose(results['rj_tiny_ppl']['bits_per_byte,none'],
                             -total / nbytes / math.log(2), rtol=1e-5)
  # generate_until: greedy decoding by hand, one parallel pass per token, cut at the stop strings.
  prompts = [tok.encode(s['arguments']['gen_args_0']['arg_0']) for s in samples['rj_tiny_gen']]
  if not retnet:
    prompts = [p[-(SEQ_LEN - MAX_GEN):] for p in prompts]
  ids = [list(p) for p in prompts]
  for _ in range(MAX_GEN):
    for row, logits in zip(ids, hand.logits(ids)):
      if row[-1] != tok.eos_id:
        row.append(int(np.argmax(logits[len(row) - 1])))
  for s, prompt, row in zip(samples['rj_tiny_gen'], prompts, ids):
    new = row[len(prompt):]
    text = tok.decode(new[:new.index(tok.eos_id) + 1] if tok.eos_id in new else new)
    for stop in ('\n', ' ='):
      text = text.split(stop)[0]
    assert s['resps'][0][0] == text
    assert s['exact_match'] == float(text == s['target'])


@pytest.mark.slow
def test_retnet_through_lm_eval(retnet, tasks, tmp_path, capsys):
  """The harness once per model kind; the recurrent form is checked at the scorer below."""
  workdir, _ = retnet
  check_scores(workdir, *run_lm_eval(workdir, tasks[0], str(tmp_path), 'chunkwise', capsys),
               retnet=True)


@pytest.mark.slow
def test_transformer_through_lm_eval(transformer, tasks, tmp_path, capsys):
  workdir, _ = transformer
  check_scores(workdir, *run_lm_eval(workdir, tasks[0], str(tmp_path), None, capsys), retnet=False)


def test_scorer_buckets_and_carries_the_state(retnet):
  """Rows of mixed lengths in one batch and rows longer than the chunk: the per-token log-probs of
  one parallel pass, and one trace per (batch, length) bucket."""
  workdir, _ = retnet
  params, cfg, _ = checkpoint.load_params(workdir)
  scorer = scoring.Scorer(model_lib.make_setup(cfg), params, form='chunkwise', chunk=SEQ_LEN,
                             pad_id=256)
  rng = np.random.default_rng(1)
  seqs = [rng.integers(0, 256, n).tolist() for n in (5, 17, 3 * SEQ_LEN + 4, 12, 2, 9)]
  assert scorer.bucket(4) == (16, 16) and scorer.bucket(3 * SEQ_LEN + 3) == (4 * SEQ_LEN, SEQ_LEN)
  scoring.score.clear_cache()  # Other tests in this process may have traced the same buckets.
  scoring.TRACES.clear()
  out = scorer.token_logprobs(seqs, batch_size=2)
  for s, (logp, greedy), (expected, logits) in zip(seqs, out, Hand(workdir).logprobs(seqs)):
    np.testing.assert_allclose(logp, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(greedy, np.argmax(logits, -1) == np.asarray(s[1:]))
  # Batches (by length): [115, 17] -> chunks of 37, [12, 9] and [5, 2] -> bucket 16 (one trace).
  assert scoring.TRACES['score'] == 2
  scorer.token_logprobs(seqs[::-1], batch_size=2)
  assert scoring.TRACES['score'] == 2
  with pytest.raises(ValueError, match='at least 2'):
    scorer.token_logprobs([[1]])


def test_recurrent_scorer_matches_the_parallel_pass(retnet):
  """form='recurrent' (what `form=recurrent` in model_args selects): the same log-probs, rows
  longer than the chunk included."""
  workdir, _ = retnet
  params, cfg, _ = checkpoint.load_params(workdir)
  scorer = scoring.Scorer(model_lib.make_setup(cfg), params, form='recurrent', chunk=SEQ_LEN,
                          pad_id=256)
  rng = np.random.default_rng(2)
  seqs = [rng.integers(0, 256, n).tolist() for n in (6, SEQ_LEN + 9, 3)]
  for (logp, _), (expected, _) in zip(scorer.token_logprobs(seqs, batch_size=2),
                                      Hand(workdir).logprobs(seqs)):
    np.testing.assert_allclose(logp, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# A converted checkpoint: its tokenizer and special ids from the checkpoint's meta.

CONVERTED_WORDS = ['<unk>', '<s>', '</s>'] + WORDS[:13]  # 16 ids: the converted model's vocab.
CONVERTED_SEQ_LEN = 24


def _word_tokenizer(words, path):
  tokenizers = util.require('tokenizers')
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                         unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(path))


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """An fla checkpoint (config.json with bos/eos ids, safetensors, tokenizer.json) converted into
  <root>/ckpt, and <root>/config.json with the training length, as the experiment runners write."""
  safetensors_numpy = util.require('safetensors.numpy')
  from retnet_jax import convert  # pylint: disable=g-import-not-at-top
  from tests.convert_fla_test import fla_config  # pylint: disable=g-import-not-at-top
  from tests.convert_fla_test import fla_state_dict  # pylint: disable=g-import-not-at-top
  src, root = tmp_path_factory.mktemp('fla'), tmp_path_factory.mktemp('converted')
  c = fla_config(vocab_size=len(CONVERTED_WORDS), num_hidden_layers=1)
  safetensors_numpy.save_file({k: np.asarray(v, np.float32) for k, v in fla_state_dict(c).items()},
                              str(src / 'model.safetensors'))
  with open(src / 'config.json', 'w') as f:
    json.dump({**c, 'bos_token_id': 1, 'eos_token_id': 2}, f)
  _word_tokenizer(CONVERTED_WORDS, src / 'tokenizer.json')
  assert convert.main(['--from=fla', f'--input={src}', f'--output={root / "ckpt"}']) == 0
  with open(root / 'config.json', 'w') as f:
    json.dump({'seq_len': CONVERTED_SEQ_LEN}, f)
  return str(root / 'ckpt'), root


def test_converted_checkpoint_brings_its_tokenizer_and_length(converted):
  workdir, root = converted
  lm = rj_lm_eval.RetNetLM(workdir=workdir, batch_size=2)
  assert lm.max_length == CONVERTED_SEQ_LEN  # From config.json beside the checkpoint.
  assert lm.eot_token_id == 2  # The fla config's eos_token_id, kept in the meta.
  assert lm.tok_encode('alpha beta nonsense') == [3, 4, 0]
  assert lm.tok_decode([5, 6]) == 'gamma delta'
  assert rj_lm_eval.RetNetLM(workdir=workdir, max_length=9).max_length == 9  # model_args win.
  # tokenizer= replaces the recorded one: the same words under other ids.
  _word_tokenizer(CONVERTED_WORDS[:3] + CONVERTED_WORDS[3:][::-1], root / 'other.json')
  other = rj_lm_eval.RetNetLM(workdir=workdir, tokenizer=str(root / 'other.json'))
  assert other.tok_encode('alpha beta') == [15, 14]


def test_converted_checkpoint_generate_until_groups_and_a_string_until(converted):
  """Two generation-argument groups interleaved, one with `until` a string (not a list of
  characters): each answer is greedy decoding by hand, cut at its group's stop string."""
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top
  workdir, _ = converted
  lm = rj_lm_eval.RetNetLM(workdir=workdir, batch_size=2)
  hand = Hand(workdir)

  def greedy(context, n):
    ids = lm.tok_encode(context)
    start = len(ids)
    for _ in range(n):
      if len(ids) > start and ids[-1] == lm.eot_token_id:
        break
      ids.append(int(np.argmax(hand.logits([ids])[0][len(ids) - 1])))
    new = ids[start:]
    return lm.tok_decode(new[:new.index(2)] if 2 in new else new)

  contexts = ['alpha beta gamma', 'delta', 'epsilon zeta eta theta', 'iota kappa']
  first = greedy(contexts[0], 6)
  stop = first.split(' ')[min(2, len(first.split(' ')) - 1)]  # A word it produces: cuts there.
  assert len(stop) > 1
  groups = [{'until': stop, 'max_gen_toks': 6, 'do_sample': False},
            {'until': ['\n'], 'max_gen_toks': 3}]
  requests = [Instance('generate_until', {}, (ctx, groups[i % 2]), i)
              for i, ctx in enumerate(contexts)]
  got = lm.generate_until(requests, disable_tqdm=True)
  for i, (ctx, text) in enumerate(zip(contexts, got)):
    g = groups[i % 2]
    want = greedy(ctx, g['max_gen_toks'])
    until = g['until'] if isinstance(g['until'], str) else g['until'][0]
    assert text == (want[:want.index(until)] if until in want else want), (i, text, want)
  assert got[0] == first[:first.index(stop)]
