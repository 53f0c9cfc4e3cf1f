"""Tests of retnet_jax/preprocess.py: every input format, splits, resume, bad input, tokenizer specs,
and training from the output through the real training entry."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from retnet_jax import data as data_lib
from retnet_jax import preprocess
from retnet_jax import tokenizer as tokenizer_lib
from tests import util

WORDS = ['def', 'return', 'self', 'import', 'class', 'for', 'in', 'if', 'else', 'None', 'héllo',
         '日本', 'value', '(', ')', ':', '=', '+', '42', '\n', '\t', 'ß→∑']
FORMATS = ('txt', 'jsonl', 'jsonl.gz', 'jsonl.zst', 'parquet')


def make_docs(n, seed=0, prefix='doc'):
  rng = np.random.default_rng(seed)
  return [f'{prefix} {i}: ' + ' '.join(rng.choice(WORDS, int(rng.integers(1, 60)))) for i in range(n)]


def write(directory, fmt, docs, name='part', field='text'):
  """Writes `docs` in format `fmt` under `directory`; returns the glob that matches them."""
  os.makedirs(directory, exist_ok=True)
  if fmt == 'txt':
    for i, d in enumerate(docs):
      with open(os.path.join(directory, f'{name}{i:04d}.txt'), 'w', encoding='utf-8') as f:
        f.write(d)
    return os.path.join(directory, f'{name}*.txt')
  path = os.path.join(directory, f'{name}.{fmt}')
  if fmt == 'parquet':
    pa = util.require('pyarrow')
    import pyarrow.parquet as pq
    pq.write_table(pa.table({field: docs, 'id': list(range(len(docs)))}), path, row_group_size=7)
    return path
  lines = ''.join(json.dumps({field: d, 'id': i}) + '\n' for i, d in enumerate(docs)).encode()
  if fmt == 'jsonl.gz':
    lines = gzip.compress(lines)
  elif fmt == 'jsonl.zst':
    zstandard = util.require('zstandard')
    lines = zstandard.ZstdCompressor().compress(lines)
  with open(path, 'wb') as f:
    f.write(lines)
  return path


def read_split(directory, split):
  """The token arrays of a split, in shard order, and the metadata."""
  from array_record.python.array_record_module import ArrayRecordReader
  with open(os.path.join(directory, preprocess.METADATA)) as f:
    meta = json.load(f)
  out = []
  for shard in meta['splits'][split]['shards']:
    reader = ArrayRecordReader(os.path.join(directory, shard['path']))
    out += [np.frombuffer(r, meta['dtype']) for r in reader.read_all()]
    reader.close()
  return out, meta


def args(inputs, output, **kw):
  return preprocess.Args(input=inputs, output=str(output), num_workers=0, progress_every=1e9, **kw)


@pytest.mark.parametrize('fmt', FORMATS)
def test_each_format_is_tokenized_once_split_by_hash(tmp_path, fmt):
  docs = make_docs(60, seed=FORMATS.index(fmt))
  meta = preprocess.run(args(write(tmp_path / 'in', fmt, docs), tmp_path / 'out', val_fraction=0.2))
  tok = tokenizer_lib.ByteTokenizer()
  expected = {'train': [], 'validation': []}
  for d in docs:
    expected['validation' if preprocess.text_hash(d) < 0.2 else 'train'].append(d)
  assert expected['train'] and expected['validation']
  for split in ('train', 'validation'):
    records, _ = read_split(tmp_path / 'out', split)
    assert all(r[-1] == tok.eos_id and tok.eos_id not in r[:-1] for r in records)
    assert sorted(tok.decode(r) for r in records) == sorted(expected[split])  # Each once, exactly.
    info = meta['splits'][split]
    assert info['documents'] == len(records)
    assert info['tokens'] == sum(len(r) for r in records)  # eos counted.
  assert meta['dtype'] == 'uint16' and meta['vocab_size'] == 259
  assert meta['special_ids'] == {'pad': 256, 'bos': 257, 'eos': 258}
  assert meta['tokenizer']['spec'] == 'byte' and meta['skipped'] == {}
  assert len(meta['inputs']['files']) == (60 if fmt == 'txt' else 1)
  assert meta['version'] and meta['format'] == preprocess.FORMAT


def test_workers_give_the_same_shards_and_long_txt_is_cut(tmp_path):
  docs = make_docs(300, seed=1)
  inputs = write(tmp_path / 'in', 'jsonl', docs)
  long_text = ''.join(f'line {i} of a long text file\n' for i in range(400))  # ~11 kB.
  (tmp_path / 'in' / 'long.txt').write_text(long_text, encoding='utf-8')
  inputs += f",{tmp_path / 'in' / 'long.txt'}"
  kw = dict(val_fraction=0.1, shard_mb=0.004, max_document_mb=0.003)
  one = preprocess.run(args(inputs, tmp_path / 'w0', **kw))
  two = preprocess.run(preprocess.Args(input=inputs, output=str(tmp_path / 'w2'), num_workers=2,
                                       progress_every=1e9, **kw))
  assert len(one['splits']['train']['shards']) > 3
  for split in ('train', 'validation'):
    a, _ = read_split(tmp_path / 'w0', split)
    b, _ = read_split(tmp_path / 'w2', split)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert one['splits'][split] == two['splits'][split]
  train, _ = read_split(tmp_path / 'w0', 'train')
  val, _ = read_split(tmp_path / 'w0', 'validation')
  pieces = [t for t in (tokenizer_lib.ByteTokenizer().decode(r) for r in train + val)
            if t.startswith('line ')]
  assert len(pieces) >= 4 and all(len(p) <= 3000 and p.endswith('\n') for p in pieces)
  assert ''.join(sorted(pieces, key=lambda p: int(p.split()[1]))) == long_text


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
  docs = make_docs(400, seed=2)
  inputs = write(tmp_path / 'in', 'jsonl', docs[:200], name='a') + ',' + write(
      tmp_path / 'in', 'jsonl.gz', docs[200:], name='b')
  kw = dict(val_fraction=0.1, shard_mb=0.003)
  straight = preprocess.run(args(inputs, tmp_path / 'straight', **kw))
  assert len(straight['splits']['train']['shards']) >= 5

  finish, calls = preprocess._Shard.finish, []

  def interrupted(self, *a):
    if len(calls) == 3:
      raise KeyboardInterrupt  # Killed while writing the fourth shard.
    calls.append(self.index)
    return finish(self, *a)

  monkeypatch.setattr(preprocess._Shard, 'finish', interrupted)
  with pytest.raises(KeyboardInterrupt):
    preprocess.run(args(inputs, tmp_path / 'resumed', **kw))
  assert not os.path.exists(tmp_path / 'resumed' / preprocess.METADATA)
  monkeypatch.setattr(preprocess._Shard, 'finish', finish)
  tokenized = []
  encode = tokenizer_lib.ByteTokenizer.encode_array
  monkeypatch.setattr(tokenizer_lib.ByteTokenizer, 'encode_array',
                      lambda self, t: (tokenized.append(t), encode(self, t))[1])
  resumed = preprocess.run(args(inputs, tmp_path / 'resumed', **kw))
  assert 'resuming after 3 complete shards' in capsys.readouterr().err
  redone = len(docs) - sum(json.loads((tmp_path / 'resumed' / 'progress' / f'shard-{i:05d}.json')
                                      .read_text())['records'] for i in range(3))
  assert len(tokenized) == redone < len(docs)  # The complete shards were not redone.
  for key in ('splits', 'skipped', 'vocab_size', 'dtype'):
    assert resumed[key] == straight[key]
  for split in ('train', 'validation'):
    a, _ = read_split(tmp_path / 'straight', split)
    b, _ = read_split(tmp_path / 'resumed', split)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
  # Again: already complete. Other settings: refused.
  assert preprocess.run(args(inputs, tmp_path / 'resumed', **kw))['splits'] == straight['splits']
  with pytest.raises(ValueError, match=r'other settings \(val_fraction differ\)'):
    preprocess.run(args(inputs, tmp_path / 'resumed', val_fraction=0.2, shard_mb=0.003))


def test_max_docs_stops_early(tmp_path):
  docs = make_docs(50)
  meta = preprocess.run(args(write(tmp_path / 'in', 'jsonl', docs), tmp_path / 'out', max_docs=20))
  assert meta['splits']['train']['documents'] + meta['splits']['validation']['documents'] == 20


def test_bad_input_is_counted_reported_and_never_fatal(tmp_path, capsys):
  d = tmp_path / 'in'
  d.mkdir()
  good = make_docs(30)
  lines = [json.dumps({'text': t}) for t in good[:20]]
  lines[3:3] = ['{"text": "unterminated', json.dumps({'body': 'no text field'}),
                json.dumps({'text': 7}), json.dumps(['a list']), json.dumps({'text': '  \n '}), '',
                json.dumps({'text': os.urandom(400).decode('latin-1').encode('latin-1')
                            .decode('utf-8', errors='replace')})]
  (d / 'a.jsonl').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  (d / 'binary.txt').write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
  (d / 'empty.txt').write_text('', encoding='utf-8')
  whole = gzip.compress(''.join(json.dumps({'text': t}) + '\n' for t in good[20:]).encode())
  (d / 'truncated.jsonl.gz').write_bytes(whole[:len(whole) // 2])
  pa = util.require('pyarrow')
  import pyarrow.parquet as pq
  pq.write_table(pa.table({'body': ['x', 'y']}), str(d / 'nocolumn.parquet'))
  pq.write_table(pa.table({'text': ['a parquet doc', None]}), str(d / 'nulls.parquet'))
  meta = preprocess.run(args(str(d / '*'), tmp_path / 'out'))
  err = capsys.readouterr().err
  assert meta['skipped'] == {'binary': 2, 'blank_lines': 1, 'empty_documents': 2, 'invalid_json': 1,
                             'no_text_field': 4, 'no_text_column': 1, 'unreadable_files': 1}
  assert 'preprocess: skipped 2 binary, 1 blank_lines' in err and 'a.jsonl:4: invalid_json' in err
  docs = sum(meta['splits'][s]['documents'] for s in ('train', 'validation'))
  assert 21 <= docs < 30  # a.jsonl's 20, the parquet one, and what the truncated file gave.


@pytest.mark.parametrize('name, content, message', [
    (None, None, r"pattern '.*none\*.jsonl' matches no files"),
    ('x.csv', 'a,b', r'unknown input format'),
    ('x.jsonl', '\n{"a": 1}\n',
     r"no documents in the input .*skipped: \{'blank_lines': 1, 'no_text_field': 1\}"),
    ('e.txt', '', r'no documents in the input'),
])
def test_empty_or_unusable_inputs_are_errors(tmp_path, name, content, message):
  if name is None:
    inputs = str(tmp_path / 'none*.jsonl')
  else:
    (tmp_path / name).write_text(content)
    inputs = str(tmp_path / name)
  with pytest.raises(ValueError, match=message):
    preprocess.run(args(inputs, tmp_path / 'out'))


def test_output_must_be_new_or_a_preprocess_run(tmp_path):
  inputs = write(tmp_path / 'in', 'jsonl', make_docs(5))
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'other.txt').write_text('x')
  with pytest.raises(ValueError, match='not empty and holds no preprocess run'):
    preprocess.run(args(inputs, tmp_path / 'out'))
  with pytest.raises(ValueError, match=r"Unknown tokenizer 'gpt2'"):
    preprocess.run(args(inputs, tmp_path / 'o2', tokenizer='gpt2'))
  with pytest.raises(ValueError, match=r"Tokenizer file '.*missing.model' does not exist"):
    preprocess.run(args(inputs, tmp_path / 'o3', tokenizer='sentencepiece:/missing.model'))


def test_sample_is_bounded_and_spans_every_file(tmp_path):
  for i in range(4):
    write(tmp_path, 'jsonl', make_docs(200, seed=i, prefix=f'file{i}'), name=f'f{i}')
  paths = preprocess.list_inputs(str(tmp_path / '*.jsonl'))
  sample = list(preprocess.sample_texts(paths, 'text', 8000, 1 << 20))
  assert sum(len(t.encode()) for t in sample) <= 8000
  assert {t.split()[0] for t in sample} == {'file0', 'file1', 'file2', 'file3'}


@pytest.mark.parametrize('kind', ['sentencepiece', 'bpe'])
def test_trained_and_given_tokenizers(tmp_path, kind):
  util.require('sentencepiece' if kind == 'sentencepiece' else 'tokenizers')
  docs = make_docs(300, seed=3)
  inputs = write(tmp_path / 'in', 'jsonl', docs)
  meta = preprocess.run(args(inputs, tmp_path / 'trained', train_tokenizer=kind, vocab_size=320,
                             sample_mb=0.02, val_fraction=0.1))
  name = 'tokenizer.model' if kind == 'sentencepiece' else 'tokenizer.json'
  assert meta['tokenizer']['spec'] == f"{'sentencepiece' if kind == 'sentencepiece' else 'hf'}:{name}"
  tok = tokenizer_lib.from_spec(meta['tokenizer']['spec'], base_dir=str(tmp_path / 'trained'))
  assert tok.vocab_size == meta['vocab_size'] == 320
  assert meta['special_ids'] == {'pad': tok.pad_id, 'bos': tok.bos_id, 'eos': tok.eos_id}
  records, _ = read_split(tmp_path / 'trained', 'train')
  texts = sorted(tok.decode(r) for r in records)
  assert texts == sorted(d for d in docs if preprocess.text_hash(d) >= 0.1)  # Lossless.
  assert sum(len(r) for r in records) < 0.8 * sum(len(t.encode()) for t in texts)  # Merges.
  # The same model given as a spec from elsewhere: copied into the output, same tokens.
  spec = f"{'sentencepiece' if kind == 'sentencepiece' else 'hf'}:{tmp_path / 'trained' / name}"
  given = preprocess.run(args(inputs, tmp_path / 'given', tokenizer=spec, val_fraction=0.1))
  assert given['tokenizer'] == {'spec': meta['tokenizer']['spec'], 'source': spec}
  again, _ = read_split(tmp_path / 'given', 'train')
  assert all(np.array_equal(a, b) for a, b in zip(records, again))
  assert (tmp_path / 'given' / name).read_bytes() == (tmp_path / 'trained' / name).read_bytes()


def test_command_line_with_workers_and_one_line_errors(tmp_path):
  inputs = write(tmp_path / 'in', 'jsonl.zst', make_docs(100))
  env = {**os.environ, 'PYTHONPATH': util.ROOT}
  cmd = [sys.executable, '-m', 'retnet_jax.preprocess', f'--input={inputs}',
         f"--output={tmp_path / 'out'}", '--num_workers=2', '--val_fraction=0.1',
         '--progress_every=0']
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
  assert done.returncode == 0, done.stderr
  progress = [l for l in done.stderr.splitlines() if ' MB (' in l]
  assert progress and all('/s) |' in l and 'MB/s' in l and 'ETA' in l for l in progress)
  assert 'wrote ' in done.stderr
  meta = json.loads((tmp_path / 'out' / preprocess.METADATA).read_text())
  assert meta['splits']['train']['documents'] + meta['splits']['validation']['documents'] == 100
  bad = subprocess.run(cmd[:3] + [f"--input={tmp_path / 'nothing*.jsonl'}",
                                  f"--output={tmp_path / 'o2'}"],
                       capture_output=True, text=True, env=env, timeout=120)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines() == [
      f"error: --input pattern '{tmp_path / 'nothing*.jsonl'}' matches no files."]


# ----------------------------------------------------------------------------------------------------
# Training from the output, through the real entry.


@pytest.mark.slow
def test_train_from_preprocessed_shards_and_resume(tmp_path):
  """Two pieces of a 4-step run; the data state checkpointed at each piece's end is the state of a
  fresh iterator after as many batches (so resume reads on where the run stopped)."""
  from retnet_jax import train
  docs = make_docs(400, seed=4)
  out = tmp_path / 'data'
  preprocess.run(args(write(tmp_path / 'in', 'parquet', docs), out, val_fraction=0.1))
  config = util.config(data__source='arrayrecord', data__path=str(out), total_steps=4, log_every=1,
                       eval_every=4, checkpoint_every=2)
  workdir = tmp_path / 'w'
  first = train.train_and_evaluate(config, str(workdir), max_steps=2)
  second = train.train_and_evaluate(config, str(workdir))
  assert (first['step'], second['step']) == (2, 4) and np.isfinite(second['eval']['loss'])
  assert 0 < second['eval']['bits_per_byte'] < 10
  tok = data_lib.get_tokenizer(config.data)
  it, _ = data_lib.create_datasets(config.data, tokenizer=tok, seq_len=config.seq_len,
                               global_batch_size=config.batch_size, seed=config.seed)
  for step in (2, 4):
    next(it), next(it)
    saved = json.loads((workdir / 'checkpoints' / str(step) / 'data' / 'process_0-of-1.json').read_text())
    assert saved == json.loads(json.dumps(it.get_state()))
  with pytest.raises(ValueError, match=r'needs 259 token ids but model.vocab_size is 200'):
    train.train_and_evaluate(util.config(data__source='arrayrecord', data__path=str(out),
                                         model__vocab_size=200), str(tmp_path / 'small_vocab'))


def test_paper_configs_read_preprocessed_shards(tmp_path):
  from retnet_jax import config_lib
  path = os.path.join(util.ROOT, 'configs', 'retnet_paper.py')
  with open(path) as f:
    text = f.read()
  assert 'python -m retnet_jax.preprocess --input=' in text and '--config.data.path=' in text
  c = config_lib.load(path + ':1.3b')
  assert c.data.source == 'arrayrecord'
  data_lib.resolve_config(c.data)  # Valid without data (ahead-of-time compiles read none) ...
  with pytest.raises(ValueError, match='needs data_config.path'):
    data_lib.get_tokenizer(c.data)  # ... but a run must name it.
  preprocess.run(args(write(tmp_path / 'in', 'jsonl', make_docs(50)), tmp_path / 'out'))
  c.data.path = str(tmp_path / 'out')
  assert data_lib.vocab_size(c.data, data_lib.get_tokenizer(c.data)) == 259 <= c.model.vocab_size


@pytest.mark.parametrize('fmt', ['txt', 'jsonl.zst', 'parquet'])
def test_read_records_resumes_at_any_record(tmp_path, fmt):
  docs = make_docs(2100 if fmt == 'parquet' else 30, seed=5)  # Parquet: over two read batches.
  pattern = write(tmp_path, fmt, docs)
  paths = preprocess.list_inputs(pattern)

  def texts(start):
    out = []
    for p in paths:
      for kind, payload, _ in preprocess.read_records(p, 'text', 1 << 20, start if p == paths[-1] else 0):
        out.append(preprocess._text_of(kind, payload, 'text')[0])
    return out

  whole = texts(0)
  assert whole == docs
  if fmt == 'txt':
    assert texts(1) == whole[:-1]  # One record a file: skipping 1 in the last file drops it.
  else:
    for start in (1, 1023, 1025, len(docs) - 1):
      if start < len(docs):
        assert texts(start) == whole[start:]
