"""The recall generators' properties, the `recall` data source, the shipped lm-eval task folder on a
tiny trained model, and experiments/recall.py's quick path."""

import glob
import json
import os
import re

import numpy as np
import pytest

import configs
from retnet_jax import data
from retnet_jax import recall
from retnet_jax import tokenizer as tokenizer_lib
from tests import util

TASK_DIR = os.path.join(util.ROOT, 'retnet_jax', 'lm_eval_tasks', 'recall')


@pytest.mark.parametrize('length', [80, 137, 1001])
@pytest.mark.parametrize('depth', [0.0, 0.3, 0.5, 1.0])
def test_passkey_length_depth_and_single_answer(length, depth):
  ex = recall.passkey(length * 7 + int(depth * 10), length, depth, digits=5)
  assert len(ex.text) == length
  assert ex.text.isascii()
  answer = ex.answer()
  assert re.fullmatch(r'[1-9]\d{4}', answer)
  prompt = ex.prompt()
  assert prompt.endswith(recall.PASSKEY_QUESTION)
  assert prompt.count(answer) == 1 and len(re.findall(r'\d', prompt)) == 5  # Stated once.
  needle = f' The pass key is:{answer}.'
  filler_chars = length - len(needle) - len(recall.PASSKEY_QUESTION) - 6
  assert prompt.index(needle) == ex.needles[0] == round(depth * filler_chars)
  assert ex.text[ex.spans[0][1]:] == '.'


def test_passkey_is_deterministic_per_seed():
  a, b = recall.passkey(5, 300, 0.4), recall.passkey(5, 300, 0.4)
  assert a == b
  others = {recall.passkey(s, 300, 0.4).answer() for s in range(6, 16)}
  assert len(others) > 5  # Seeds give different keys.


@pytest.mark.parametrize('length,pairs', [(64, 2), (129, 4), (997, 7)])
def test_associative_recall_pairs_spread_and_queried_once(length, pairs):
  ex = recall.associative_recall(length * 3 + pairs, length, pairs)
  assert len(ex.text) == length
  context, queries = ex.text.split(recall.RECALL_HEADER)
  found = re.findall(r' ([A-Z])(\d\d)\.', context)
  assert len(found) == pairs
  bound = dict(found)
  assert len(bound) == pairs and set(bound) <= set(recall.KEYS)
  for key in bound:  # Each key is in the context exactly once.
    assert context.count(key) == 1
  asked = re.findall(r' ([A-Z])(\d\d)\.', queries)
  assert sorted(k for k, _ in asked) == sorted(bound)
  for i, (key, value) in enumerate(asked):
    assert ex.answer(i) == value == bound[key]
    assert ex.prompt(i).endswith(' ' + key)
    # The needle's depth: pair i sits in the i-th of `pairs` equal slices of the filler.
    assert ex.text[ex.needles[i]:ex.needles[i] + 5] == f' {key}{value}.'
  order = np.argsort([ex.needles[i] for i in range(pairs)])
  slices = np.floor(np.asarray(ex.depths)[order] * pairs)
  np.testing.assert_array_equal(slices, np.arange(pairs))
  assert ex == recall.associative_recall(length * 3 + pairs, length, pairs)


def test_too_short_and_bad_arguments_are_one_line_errors():
  with pytest.raises(ValueError, match='needs length'):
    recall.passkey(0, 20, 0.5)
  with pytest.raises(ValueError, match='depth'):
    recall.passkey(0, 200, 1.5)
  with pytest.raises(ValueError, match='num_pairs'):
    recall.associative_recall(0, 200, 0)
  with pytest.raises(ValueError, match='recall_tasks'):
    recall.parse_tasks('passkey,nope')


def test_encode_spans_match_characters_for_bytes():
  tok = tokenizer_lib.ByteTokenizer()
  ex = recall.associative_recall(3, 211, 5)
  tokens, spans = recall.encode(ex, tok)
  assert len(tokens) == 211
  assert spans == list(ex.spans)
  assert tok.decode(tokens) == ex.text


def _rows(fraction, seed=0, seq_len=97, **extra):
  tok = tokenizer_lib.ByteTokenizer()
  train_iter, eval_fn = data.create_datasets(
      dict(source='recall', recall_fraction=fraction, num_eval_batches=1, prefetch_buffer_size=0,
           **extra),
      tokenizer=tok, seq_len=seq_len, global_batch_size=6, seed=seed, process_index=0,
      process_count=1)
  return tok, next(train_iter), next(iter(eval_fn()))


def test_recall_source_rows_are_synthetic_at_the_training_length():
  tok, batch, evals = _rows(1.0)
  for b in (batch, evals):
    assert b['inputs'].shape == (6, 97)
    np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
    assert (b['segment_ids'] == 1).all() and (b['loss_mask'] == 1).all()
  for row, target in zip(batch['inputs'], batch['targets']):
    text = tok.decode(np.append(row, target[-1]))
    assert len(text) == 98 and ('pass key is:' in text or recall.RECALL_HEADER in text)
  again = _rows(1.0)[1]
  np.testing.assert_array_equal(again['inputs'], batch['inputs'])  # Deterministic per seed.
  assert not np.array_equal(_rows(1.0, seed=1)[1]['inputs'], batch['inputs'])


def test_recall_loss_on_answers_scores_exactly_the_answer_tokens():
  """recall_loss='answers': a recall row's loss mask is 1 where the target is an answer token (the
  passkey's digits, each queried value's digits) and 0 elsewhere; the same rows otherwise."""
  tok, batch, _ = _rows(1.0, recall_loss='answers')
  _, every = _rows(1.0)[:2]
  np.testing.assert_array_equal(batch['inputs'], every['inputs'])
  for row, target, mask in zip(batch['inputs'], batch['targets'], batch['loss_mask']):
    text = tok.decode(np.append(row, target[-1]))
    if 'pass key is:' in text:
      expected = [text[-6:-1]]  # The 5 digits before the closing '.'.
    else:
      expected = [pair.strip()[1:3] for pair in text.split(recall.RECALL_HEADER)[1].split('.')[:-1]]
    assert tok.decode(target[mask > 0]) == ''.join(expected), text
  with pytest.raises(ValueError, match='recall_loss must be one of'):
    _rows(1.0, recall_loss='needles')


def test_recall_source_mixes_in_stdlib_text():
  tok, batch, _ = _rows(0.0)
  texts = [tok.decode(r) for r in batch['inputs']]
  assert not any('pass key is:' in t or recall.RECALL_HEADER in t for t in texts)
  with pytest.raises(ValueError, match='recall_fraction'):
    _rows(1.5)
  with pytest.raises(ValueError, match="seq_len=40 is too short for recall_tasks='passkey'"):
    _rows(0.5, seq_len=40)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """A tiny byte-level RetNet trained 4 steps on the recall source: its workdir."""
  from retnet_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('recall_run'))
  config = util.config('retnet_tiny', total_steps=4, eval_every=4, checkpoint_every=4,
                       data__source='recall', seq_len=83)
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow
def test_lm_eval_task_folder_scores_a_trained_model(tiny_run, tmp_path, capsys):
  pytest.importorskip('lm_eval', reason='lm-eval is not installed (the `eval` extra)')
  from retnet_jax import lm_eval as rj_lm_eval  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'out')
  rj_lm_eval.main([
      f'--model_args=workdir={tiny_run},batch_size=4,max_length=83',
      '--tasks=recall_passkey,recall_associative', f'--include_path={TASK_DIR}',
      '--metadata={"lengths": [83, 130], "num_examples": 1, "depths": [0, 1]}',
      f'--output_path={out}', '--log_samples'])
  printed = capsys.readouterr().out
  assert 'recall_passkey' in printed and 'exact_match' in printed
  (path,) = glob.glob(os.path.join(out, '**', 'results_*.json'), recursive=True)
  with open(path) as f:
    results = json.load(f)['results']
  for task, docs in (('recall_passkey', 4), ('recall_associative', 2)):
    score = results[task]['exact_match,none']
    assert 0.0 <= score <= 1.0
    (path,) = glob.glob(os.path.join(out, '**', f'samples_{task}_*.jsonl'), recursive=True)
    with open(path) as f:
      samples = [json.loads(line) for line in f]
    assert len(samples) == docs
    assert {s['doc']['length'] for s in samples} == {83, 130}
    # The score is the mean of per-document exact matches of the generated text.
    matches = [float(s['filtered_resps'][0].strip() == s['target']) for s in samples]
    assert score == pytest.approx(np.mean(matches))


@pytest.mark.slow
def test_experiment_quick_path(tmp_path, capsys):
  from experiments import recall as experiment  # pylint: disable=g-import-not-at-top
  shrink = [f'{k}={v}' for k, v in configs.PRESETS['test'].items() if k not in ('total_steps', 'seq_len')]
  shrink += ['seq_len=47', 'data.recall_num_pairs=3']  # A 3-digit passkey example needs 42 tokens.
  kwargs = dict(quick=True, steps=2, seeds='0,1', examples=1, overrides=shrink,
                architectures=('retnet', 'gated'))
  # Two at a time: the runs train and are evaluated in worker processes.
  rows = experiment.run(str(tmp_path), processes=2, **kwargs)
  printed = capsys.readouterr().out
  assert {r['model'] for r in rows} == {'retnet', 'gated'}
  for r in rows:
    assert 0.0 <= r['accuracy'] <= 1.0 and set(r['values']) == {0, 1}
  for name in ('table.md', 'results.csv', 'results_seeds.csv', 'heatmap_passkey.png',
               'heatmap_associative.png'):
    assert os.path.getsize(tmp_path / name) > 0
  table = (tmp_path / 'table.md').read_text()
  assert '1/(1 − γ)' in table and '| retnet |' in table
  assert 'recall: retnet: 1/(1-gamma) per head' in printed
  # The gated runs' gates on needles and on filler, every value a log γ <= 0.
  for label in ('needle', 'filler'):
    assert f'- gated seed 1, {label}: mean -' in table
  # Rerunning trains nothing and evaluates nothing: the cached evaluation is read back.
  mtime = os.path.getmtime(tmp_path / 'runs' / 'retnet_seed0' / 'recall_eval.json')
  experiment.run(str(tmp_path), **kwargs)
  assert os.path.getmtime(tmp_path / 'runs' / 'retnet_seed0' / 'recall_eval.json') == mtime


def test_every_architecture_builds_at_the_quick_settings():
  """The entries not trained above (the lm schedule, the hybrid, the Transformer) validate, the
  Transformer parameter-matched to RetNet."""
  from experiments import common  # pylint: disable=g-import-not-at-top
  from experiments import recall as experiment  # pylint: disable=g-import-not-at-top
  overrides = experiment.SHARED + experiment.QUICK
  counts = {}
  for name in experiment.ARCHITECTURES:
    variant, why = experiment.available(name, overrides, quick=True)
    assert variant is not None, (name, why)
    counts[name] = common.param_count(common.build_config(variant, overrides))
  assert abs(counts['transformer'] / counts['retnet'] - 1) < 0.01, counts


def test_recall_distance_is_where_passkey_accuracy_halves():
  from experiments import recall as experiment  # pylint: disable=g-import-not-at-top
  rec = lambda d, c: dict(task='passkey', distance=d, correct=c)
  # Bins 8, 64, 256, 512: accuracy 1, 1, 0.25, 0 -> fails from the 256 bin on.
  records = [rec(9, 1), rec(70, 1), rec(300, 1), rec(301, 0), rec(302, 0), rec(303, 0), rec(600, 0)]
  assert experiment.recall_distance(records) == 256
  assert experiment.recall_distance([rec(9, 1), rec(700, 1)]) == float('inf')
  assert experiment.recall_distance([rec(9, 0), rec(700, 0)]) == 0.0  # Never recalls.
