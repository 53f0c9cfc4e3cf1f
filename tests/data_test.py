"""Tests of retnet_jax/data.py. Small corpora in tmp_path, small rows; the stdlib corpus is read once."""

import json
import os
import types

import ml_collections
import numpy as np
import pytest

from retnet_jax import data
from retnet_jax import tokenizer as tokenizer_lib

TOK = tokenizer_lib.ByteTokenizer()
KEYS = ('inputs', 'targets', 'segment_ids', 'loss_mask')
DTYPES = dict(inputs=np.int32, targets=np.int32, segment_ids=np.int32, loss_mask=np.float32)


def _make(config, *, seq_len=16, global_batch_size=4, seed=0, process_index=0, process_count=1):
  return data.create_datasets(config, tokenizer=TOK, seq_len=seq_len,
                              global_batch_size=global_batch_size, seed=seed,
                              process_index=process_index, process_count=process_count)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _rows(batches, key='inputs'):
  return [tuple(row) for b in batches for row in b[key]]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _check_text_batch(batch, batch_size, seq_len):
  """Format and packing invariants of one batch of a text source."""
  assert sorted(batch) == sorted(KEYS)
  for k in KEYS:
    assert batch[k].shape == (batch_size, seq_len) and batch[k].dtype == DTYPES[k], k
  for inputs, targets, seg, mask in zip(*(batch[k] for k in KEYS)):
    np.testing.assert_array_equal(inputs[1:], targets[:-1])  # Shifted by one inside the row.
    real = inputs != TOK.pad_id
    np.testing.assert_array_equal(seg > 0, real)  # Segment 0 only for padding ...
    assert real[:real.sum()].all()  # ... which is at the end of the row.
    np.testing.assert_array_equal(mask, (targets != TOK.pad_id).astype(np.float32))
    if real[0]:
      assert seg[0] == 1
    step = np.diff(seg[real])
    # A new document (segment + 1) starts exactly after an eos, and nowhere else.
    np.testing.assert_array_equal(step, (inputs[real][:-1] == TOK.eos_id).astype(np.int32))


@pytest.fixture
def corpus(tmp_path):
  """Seven .txt files (one document each) and a .jsonl file of five documents."""
  rng = np.random.default_rng(0)
  docs = {}
  for i in range(7):
    text = f'# file {i} ünïcödé\n' + ''.join(f'x{i} = {rng.integers(1000)}\n' for _ in range(i + 3))
    (tmp_path / f'doc{i}.txt').write_text(text, encoding='utf-8')
    docs[f'doc{i}.txt'] = [text]
  lines = [json.dumps({'text': f'record {j}: ' + 'abc ' * j, 'id': j}) for j in range(5)]
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'records.jsonl').write_text('\n'.join(lines) + '\n\n', encoding='utf-8')
  docs['sub/records.jsonl'] = [json.loads(line)['text'] for line in lines]
  config = dict(source='files', files_glob=f"{tmp_path}/*.txt, {tmp_path}/**/*.jsonl",
                num_eval_batches=100)
  return config, docs


# ----------------------------------------------------------------------------------------------------
# Config.


def test_defaults_and_config_dict():
  assert data.resolve_config(None) == data.DEFAULTS
  config = ml_collections.ConfigDict(data.DEFAULTS)
  config.source = 'mqar'
  assert data.resolve_config(config)['source'] == 'mqar'
  assert data.vocab_size(config, TOK) == config.mqar_vocab_size
  assert data.vocab_size({}, TOK) == TOK.vocab_size


@pytest.mark.parametrize('config, kwargs, message', [
    (dict(source='wikipedia'), {}, r"Unknown data source 'wikipedia'; expected one of \('stdlib'"),
    (dict(tokenizer='bpe'), {}, r"Unknown tokenizer 'bpe'"),
    (dict(batch_size=3), {}, r"Unknown data config keys \['batch_size'\]; allowed keys: \["),
    (dict(val_fraction=0.0), {}, r'val_fraction must be in \(0, 1\)'),
    (dict(num_workers=-1), {}, r'num_workers must be an int >= 0'),
    (dict(source='files'), {}, r'needs data_config.files_glob'),
    (dict(source='files', files_glob='/nonexistent/dir/*.txt'), {},
     r"pattern '/nonexistent/dir/\*.txt' matches no files"),
    ({}, dict(seq_len=0), r'seq_len must be a positive int; got 0'),
    ({}, dict(global_batch_size=0), r'global_batch_size must be a positive int; got 0'),
    ({}, dict(global_batch_size=3, process_count=2),
     r'global_batch_size=3 is not divisible by process_count=2'),
    ({}, dict(process_index=2, process_count=2), r'process_index must be in \[0, 2\)'),
    ({}, dict(seed=-1), r'seed must be an int in \[0, 2\*\*32\)'),
    (dict(source='mqar', mqar_num_kv_pairs=8), dict(seq_len=30), r'needs seq_len \+ 1 >= 4'),
    (dict(source='mqar', mqar_num_kv_pairs=8, mqar_vocab_size=16), {},
     r'mqar_vocab_size=16 is too small for mqar_num_kv_pairs=8'),
])
def test_bad_inputs_raise_clear_errors(config, kwargs, message):
  with pytest.raises(ValueError, match=message):
    _make(config, **kwargs)


def test_bad_files_raise_clear_errors(tmp_path):
  (tmp_path / 'a.txt').write_text('some text', encoding='utf-8')
  (tmp_path / 'empty.txt').write_text(' \n', encoding='utf-8')
  with pytest.raises(ValueError, match=r"empty.txt' is empty"):
    _make(dict(source='files', files_glob=str(tmp_path / '*.txt')))
  (tmp_path / 'bad.jsonl').write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding='utf-8')
  with pytest.raises(ValueError, match=r"bad.jsonl:2 has no string field 'text'"):
    _make(dict(source='files', files_glob=str(tmp_path / 'bad.jsonl')))
  (tmp_path / 'blank.jsonl').write_text('{"text": ""}\n\n', encoding='utf-8')
  with pytest.raises(ValueError, match=r"blank.jsonl' is empty"):
    _make(dict(source='files', files_glob=str(tmp_path / 'blank.jsonl')))
  with pytest.raises(ValueError, match='Need at least 2 documents'):
    _make(dict(source='files', files_glob=str(tmp_path / 'a.txt')))


# ----------------------------------------------------------------------------------------------------
# Text sources.


def test_files_source_reads_txt_and_jsonl_split_by_file(corpus):
  config, docs = corpus
  train, val = data.load_texts(config, 'train'), data.load_texts(config, 'validation')
  assert train and val and not set(train) & set(val)
  assert sorted(train + val) == sorted(d for file_docs in docs.values() for d in file_docs)
  for file_docs in docs.values():  # A file's documents all land in one split.
    assert set(file_docs) <= set(train) or set(file_docs) <= set(val)
  # Deterministic, whatever the order of the listing: the split is a hash of each path.
  data._cached_split.cache_clear()
  assert data.load_texts(config, 'validation') == val
  keys = sorted(docs)
  np.testing.assert_array_equal(data._is_val(keys, 0.3), data._is_val(keys[::-1], 0.3)[::-1])


def test_single_jsonl_file_is_split_by_document(tmp_path):
  texts = [f'document {i} ' * 3 for i in range(40)]
  (tmp_path / 'one.jsonl').write_text(
      '\n'.join(json.dumps({'body': t}) for t in texts), encoding='utf-8')
  config = dict(source='files', files_glob=str(tmp_path / 'one.jsonl'), jsonl_text_field='body',
                val_fraction=0.2)
  train, val = data.load_texts(config, 'train'), data.load_texts(config, 'validation')
  assert train and val and not set(train) & set(val)
  assert sorted(train + val) == sorted(texts)


def test_text_batches_are_packed_rows_of_the_token_stream(corpus):
  config, _ = corpus
  seq_len, batch_size = 16, 4
  tokens = data.tokenize_documents(data.load_texts(config, 'train'), TOK).astype(np.int32)
  num_rows = -(-(len(tokens) - 1) // seq_len)
  train_iter, _ = _make(dict(config, shuffle=False), seq_len=seq_len, global_batch_size=batch_size)
  batches = _take(train_iter, -(-num_rows // batch_size) + 1)
  for b in batches:
    _check_text_batch(b, batch_size, seq_len)
  inputs = np.concatenate([b['inputs'] for b in batches])
  targets = np.concatenate([b['targets'] for b in batches])
  for i in range(num_rows):  # Without shuffling, row i is tokens[i*L : i*L + L + 1], padded.
    row = np.full(seq_len + 1, TOK.pad_id)
    real = tokens[i * seq_len:(i + 1) * seq_len + 1]
    row[:len(real)] = real
    np.testing.assert_array_equal(inputs[i], row[:-1])
    np.testing.assert_array_equal(targets[i], row[1:])
  np.testing.assert_array_equal(inputs[num_rows], inputs[0])  # Then the next epoch.
  # Every token but the first is a scored target exactly once per epoch.
  mask = np.concatenate([b['loss_mask'] for b in batches])[:num_rows]
  assert mask.sum() == len(tokens) - 1
  texts = data.load_texts(config, 'train')
  assert TOK.decode(tokens) == ''.join(texts)  # Decoding skips the eos between documents.
  assert (tokens == TOK.eos_id).sum() == len(texts)


def test_train_epochs_are_reshuffled_permutations(corpus):
  config, _ = corpus
  seq_len = 8
  num_rows = -(-(len(data.tokenize_documents(data.load_texts(config, 'train'), TOK)) - 1) // seq_len)
  train_iter, _ = _make(config, seq_len=seq_len, global_batch_size=1)
  rows = _rows(_take(train_iter, 3 * num_rows))
  ordered_iter, _ = _make(dict(config, shuffle=False), seq_len=seq_len, global_batch_size=1)
  in_order = _rows(_take(ordered_iter, num_rows))
  epochs = [rows[e * num_rows:(e + 1) * num_rows] for e in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == sorted(in_order)
  assert epochs[0] != in_order and epochs[0] != epochs[1] != epochs[2]
  other_seed, _ = _make(config, seq_len=seq_len, global_batch_size=1, seed=1)
  assert _rows(_take(other_seed, num_rows)) != epochs[0]


def test_host_shards_are_disjoint_and_cover_the_data(corpus):
  config, _ = corpus
  config = dict(config, shuffle=False)
  seq_len, global_batch_size, process_count = 8, 6, 3
  all_iter, _ = _make(config, seq_len=seq_len, global_batch_size=global_batch_size)
  num_rows = -(-(len(data.tokenize_documents(data.load_texts(config, 'train'), TOK)) - 1) // seq_len)
  all_rows = _rows(_take(all_iter, -(-num_rows // global_batch_size)))[:num_rows]
  shards = []
  for p in range(process_count):
    host_iter, host_eval = _make(config, seq_len=seq_len, global_batch_size=global_batch_size,
                                 process_index=p, process_count=process_count)
    shard_size = len(range(p, num_rows, process_count))
    batches = _take(host_iter, -(-shard_size // 2))
    assert batches[0]['inputs'].shape == (2, seq_len)
    shards.append(_rows(batches)[:shard_size])
    for b in host_eval():
      _check_text_batch(b, 2, seq_len)
  assert sorted(sum(shards, [])) == sorted(all_rows)
  assert shards[0] == all_rows[0::3] and shards[1] == all_rows[1::3]


def test_state_restores_exactly_after_json_round_trip(corpus):
  config, _ = corpus
  train_iter, _ = _make(config, seq_len=8, global_batch_size=4, seed=3)
  _take(train_iter, 5)
  state = json.loads(json.dumps(train_iter.get_state()))
  expected = _take(train_iter, 30)  # The corpus has ~80 rows: this crosses epochs.
  resumed, _ = _make(config, seq_len=8, global_batch_size=4, seed=3)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 30), expected)


def test_state_restores_exactly_with_worker_processes(corpus):
  config, _ = corpus
  config = dict(config, num_workers=2, prefetch_buffer_size=2)
  train_iter, _ = _make(config, seq_len=8, global_batch_size=4, seed=3)
  reference, _ = _make(dict(config, num_workers=0), seq_len=8, global_batch_size=4, seed=3)
  first = _take(train_iter, 5)
  state = json.loads(json.dumps(train_iter.get_state()))
  expected = _take(train_iter, 6)
  # The workers interleave whole batches: the same batches as without workers.
  _assert_batches_equal(first + expected, _take(reference, 11))
  train_iter.close()
  resumed, _ = _make(config, seq_len=8, global_batch_size=4, seed=3)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 6), expected)
  resumed.close()


def test_eval_batches_cover_validation_split_identically_every_call(corpus):
  config, _ = corpus
  seq_len, batch_size = 8, 4
  tokens = data.tokenize_documents(data.load_texts(config, 'validation'), TOK)
  _, eval_fn = _make(config, seq_len=seq_len, global_batch_size=batch_size)
  first, second = list(eval_fn()), list(eval_fn())
  _, other_seed_fn = _make(config, seq_len=seq_len, global_batch_size=batch_size, seed=7)
  _assert_batches_equal(first, second)
  _assert_batches_equal(first, list(other_seed_fn()))
  num_rows = -(-(len(tokens) - 1) // seq_len)
  assert len(first) == -(-num_rows // batch_size)  # Small split: all of it, last batch padded.
  for b in first:
    _check_text_batch(b, batch_size, seq_len)
  assert sum(b['loss_mask'].sum() for b in first) == len(tokens) - 1
  _, few_fn = _make(dict(config, num_eval_batches=2), seq_len=4, global_batch_size=batch_size)
  few = list(few_fn())
  assert len(few) == 2 and all(b['loss_mask'].all() for b in few)  # Spread, never padded.


def test_stdlib_default_source():
  train, val = data.load_texts({}, 'train'), data.load_texts({}, 'validation')
  val_bytes = sum(len(t.encode('utf-8')) for t in val)
  assert val_bytes > 300_000 and len(val) < len(train) / 10 and not set(val) & set(train)
  root, rel_paths = data._list_stdlib()
  assert list(rel_paths) == sorted(rel_paths) and 'os.py' in rel_paths
  assert not any('site-packages' in p for p in rel_paths)
  # Split by file: the held-out texts are those of the files whose path hashes below val_fraction.
  is_val = data._is_val(list(rel_paths), data.DEFAULTS['val_fraction'])
  val_paths = [p for p, v in zip(rel_paths, is_val) if v]
  assert set(val) <= {data._read_text(os.path.join(root, p)) for p in val_paths}
  assert len(val) >= 0.9 * len(val_paths) - 10  # Only empty or duplicate files are dropped.
  train_iter, eval_fn = _make({}, seq_len=64, global_batch_size=4)
  _check_text_batch(next(train_iter), 4, 64)
  eval_batches = list(eval_fn())
  assert len(eval_batches) == data.DEFAULTS['num_eval_batches']
  for b in eval_batches:
    _check_text_batch(b, 4, 64)
    assert b['loss_mask'].all()


# ----------------------------------------------------------------------------------------------------
# MQAR.


def _check_mqar_batch(batch, num_kv_pairs, vocab_size, seq_len):
  for k in KEYS:
    assert batch[k].shape[1:] == (seq_len,) and batch[k].dtype == DTYPES[k], k
  half = vocab_size // 2
  for inputs, targets, seg, mask in zip(*(batch[k] for k in KEYS)):
    np.testing.assert_array_equal(inputs[1:], targets[:-1])
    keys, values = inputs[0:2 * num_kv_pairs:2], inputs[1:2 * num_kv_pairs:2]
    assert len(set(keys)) == num_kv_pairs and len(set(values)) == num_kv_pairs
    assert keys.min() >= 1 and keys.max() < half and values.min() >= half
    assert values.max() < vocab_size
    binding = dict(zip(keys, values))
    query = np.flatnonzero(mask)
    assert mask[query].tolist() == [1.0] * len(query) and set(np.unique(mask)) <= {0.0, 1.0}
    # Masked targets are exactly the values bound to the query keys, right after the kv section.
    assert query[0] == 2 * num_kv_pairs and (np.diff(query) == 2).all()
    assert [binding[k] for k in inputs[query]] == targets[query].tolist()
    assert set(inputs[query]) == set(keys)  # Every key is queried.
    end = query[-1] + 2
    np.testing.assert_array_equal(seg, (np.arange(seq_len) < end).astype(np.int32))
    assert end >= seq_len  # Queries fill the row; at most one padding token.


def test_mqar_masks_the_values_bound_to_query_keys():
  config = dict(source='mqar', mqar_num_kv_pairs=4, mqar_vocab_size=32)
  train_iter, eval_fn = _make(config, seq_len=24, global_batch_size=8)
  for b in _take(train_iter, 3) + list(eval_fn()):
    _check_mqar_batch(b, 4, 32, 24)
  _, eval_fn = _make(config, seq_len=25, global_batch_size=8)
  _check_mqar_batch(next(iter(eval_fn())), 4, 32, 25)  # Odd leftover: one padding token.
  assert data.vocab_size(config, TOK) == 32


def test_mqar_is_deterministic_per_seed_and_resumes():
  config = dict(source='mqar', num_eval_batches=3)
  kwargs = dict(seq_len=64, global_batch_size=4)
  a, eval_a = _make(config, seed=5, **kwargs)
  b, eval_b = _make(config, seed=5, **kwargs)
  c, eval_c = _make(config, seed=6, **kwargs)
  batches = _take(a, 4)
  _assert_batches_equal(batches, _take(b, 4))
  assert not np.array_equal(batches[0]['inputs'], next(c)['inputs'])
  evals = list(eval_a())
  assert len(evals) == 3
  _assert_batches_equal(evals, list(eval_a()))
  _assert_batches_equal(evals, list(eval_c()))  # Eval does not depend on the run's seed.
  assert not any(np.array_equal(e['inputs'], t['inputs']) for e in evals for t in batches)
  state = json.loads(json.dumps(a.get_state()))
  expected = _take(a, 3)
  b.set_state(state)
  _assert_batches_equal(_take(b, 3), expected)
  host1, _ = _make(config, seed=5, process_index=1, process_count=2, **kwargs)
  single, _ = _make(config, seed=5, seq_len=64, global_batch_size=1)
  examples = np.concatenate([x['inputs'] for x in _take(single, 4)])
  np.testing.assert_array_equal(next(host1)['inputs'], examples[1::2])  # Host 1: examples 1, 3.


# ----------------------------------------------------------------------------------------------------
# Binary input (a files glob over random bytes).


def test_binary_files_are_skipped_with_a_count_and_refused_when_nothing_is_left(tmp_path, caplog):
  rng = np.random.default_rng(0)
  for i in range(3):
    (tmp_path / f'blob{i}.bin').write_bytes(rng.integers(0, 256, 4000, np.uint8).tobytes())
  with pytest.raises(ValueError, match=r'No text input left: all 3 documents .* look binary'):
    _make(dict(source='files', files_glob=str(tmp_path / '*.bin')))
  for i in range(4):
    (tmp_path / f'text{i}.bin').write_text(f'text {i} ' * 50 + 'ünïcödé\n', encoding='utf-8')
  config = dict(source='files', files_glob=str(tmp_path / '*.bin'), num_eval_batches=100)
  with caplog.at_level('WARNING'):
    texts = data.load_texts(config, 'train') + data.load_texts(config, 'validation')
  assert sorted(texts) == sorted((tmp_path / f'text{i}.bin').read_text('utf-8') for i in range(4))
  assert 'Skipped 3 of 7 documents that look binary' in caplog.text


# ----------------------------------------------------------------------------------------------------
# source='arrayrecord': the shards of retnet_jax/preprocess.py.


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  """A preprocessed corpus of 300 numbered documents (several shards, 20% held out)."""
  from retnet_jax import preprocess
  root = tmp_path_factory.mktemp('arrayrecord')
  rng = np.random.default_rng(1)
  docs = [f'<{i}> ' + 'ab cd ' * int(rng.integers(0, 30)) for i in range(300)]
  (root / 'in.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs), 'utf-8')
  preprocess.run(preprocess.Args(input=str(root / 'in.jsonl'), output=str(root / 'out'),
                                 num_workers=0, val_fraction=0.2, shard_mb=0.01, progress_every=1e9))
  split = {'train': [], 'validation': []}
  for d in docs:
    split['validation' if preprocess.text_hash(d) < 0.2 else 'train'].append(d)
  return dict(source='arrayrecord', path=str(root / 'out'), num_eval_batches=100), split


def _documents_in(batches):
  """The documents (text before each eos) of consecutive packed rows, and the rows' real inputs."""
  stream = np.concatenate([row[seg > 0] for b in batches
                           for row, seg in zip(b['inputs'], b['segment_ids'])])
  cuts = np.flatnonzero(stream == TOK.eos_id)
  return [TOK.decode(d) for d in np.split(stream, cuts + 1)[:-1]], stream


def test_arrayrecord_rows_hold_every_document_once_per_epoch(shards):
  config, split = shards
  train_tokens = sum(len(d.encode()) + 1 for d in split['train'])
  seq_len, batch = 37, 4
  it, _ = _make(config, seq_len=seq_len, global_batch_size=batch)
  batches = _take(it, 2 * train_tokens // (seq_len * batch) + 2)
  for b in batches[:3]:
    _check_text_batch(b, batch, seq_len)
  docs, _ = _documents_in(batches)
  first, second = docs[:len(split['train'])], docs[len(split['train']):2 * len(split['train'])]
  assert sorted(first) == sorted(split['train']) == sorted(second)  # None lost, none repeated.
  assert first != second and first != split['train']  # Shuffled, and reshuffled each epoch.
  assert not set(docs) & set(split['validation'])  # Train and validation share no document.
  again, _ = _make(config, seq_len=seq_len, global_batch_size=batch)
  _assert_batches_equal(batches[:5], _take(again, 5))  # Seeded.
  other, _ = _make(config, seq_len=seq_len, global_batch_size=batch, seed=1)
  assert not np.array_equal(next(other)['inputs'], batches[0]['inputs'])


def test_arrayrecord_hosts_read_disjoint_documents_covering_the_split(shards):
  config, split = shards
  per_host = []
  for p in range(2):
    it, _ = _make(config, seq_len=37, global_batch_size=4, process_index=p, process_count=2)
    docs, _ = _documents_in(_take(it, 200))
    per_host.append(docs)
  n = [len(range(p, len(split['train']), 2)) for p in range(2)]
  epoch = [set(per_host[p][:n[p]]) for p in range(2)]
  assert len(epoch[0]) == n[0] and len(epoch[1]) == n[1]
  assert not epoch[0] & epoch[1] and epoch[0] | epoch[1] == set(split['train'])


@pytest.mark.parametrize('num_workers', [0, pytest.param(2, marks=pytest.mark.slow)])
def test_arrayrecord_state_resumes_exactly(shards, num_workers):
  config = {**shards[0], 'num_workers': num_workers}
  it, _ = _make(config, seq_len=37, global_batch_size=4)
  _take(it, 7)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 6)
  restored, _ = _make(config, seq_len=37, global_batch_size=4)
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 6), expected)


def test_arrayrecord_eval_is_fixed_covers_validation_and_matches_across_hosts(shards):
  config, split = shards
  _, eval_fn = _make(config, seq_len=37, global_batch_size=4)
  first, second = list(eval_fn()), list(eval_fn())
  _assert_batches_equal(first, second)
  docs, _ = _documents_in(first)
  assert sorted(docs) == sorted(split['validation'])  # All of it fits in 100 batches: each once.
  for b in first:
    _check_text_batch(b, 4, 37)
  hosts = [list(_make(config, seq_len=37, global_batch_size=4, process_index=p,
                      process_count=2)[1]()) for p in range(2)]
  assert len(hosts[0]) == len(hosts[1])  # The same number of eval steps on every host.
  assert sorted(_documents_in(hosts[0])[0] + _documents_in(hosts[1])[0]) == sorted(split['validation'])


def test_arrayrecord_errors(shards, tmp_path):
  config, _ = shards
  with pytest.raises(ValueError, match=r"needs data_config.path"):
    _make(dict(source='arrayrecord'))
  with pytest.raises(ValueError, match=r"has no metadata.json: run `python -m retnet_jax.preprocess"):
    _make(dict(source='arrayrecord', path=str(tmp_path)))
  other = types.SimpleNamespace(vocab_size=512, pad_id=0, bos_id=1, eos_id=2)
  with pytest.raises(ValueError, match=r'is not the one in .*\(vocab 259, eos 258\)'):
    data.create_datasets(config, tokenizer=other, seq_len=16, global_batch_size=4, seed=0,
                         process_index=0, process_count=1)
  assert isinstance(data.get_tokenizer({**config, 'tokenizer': 'hf:/ignored.json'}),
                    tokenizer_lib.ByteTokenizer)  # The metadata's tokenizer wins.
