r"""Tokenize a text corpus once into ArrayRecord shards, for `data.source='arrayrecord'`.

  python -m retnet_jax.preprocess --input='/data/corpus/**/*.jsonl.zst,/data/books/*.parquet' \
      --tokenizer=sentencepiece:/models/tokenizer.model --output=/data/tokenized [--num_workers=8]
  python -m retnet_jax.preprocess --input=... --output=... \
      --train_tokenizer=sentencepiece --vocab_size=32000 --sample_mb=200      # or =bpe

Inputs (`--input`, comma-separated globs, `**` allowed; sorted, each glob must match a file):
  .txt                            one document per file (a file over --max_document_mb is cut into
                                  documents of about that size at line ends)
  .jsonl, .jsonl.gz, .jsonl.zst   one JSON object a line, its text in field --text_field
  .parquet                        one document a row, its text in column --text_field
All are streamed: memory stays bounded whatever the corpus size (one batch of lines per worker in
flight, and the shard writers).

Output (`--output=DIR`):
  train-NNNNN.array_record, validation-NNNNN.array_record   one record per document: its token ids
      followed by eos, in the smallest unsigned dtype that holds the vocabulary (uint8/16/32),
      written with group_size 1 (and snappy) so that grain reads any document by index
  tokenizer.model or tokenizer.json   a copy of the tokenizer's model file (absent for 'byte')
  metadata.json   {format, version, tokenizer: {spec (relative to DIR), source}, vocab_size, dtype,
      special_ids: {pad, bos, eos}, inputs: {patterns, text_field, files: [{path, bytes}]},
      val_fraction, skipped: {reason: count}, splits: {train: {documents, tokens, shards: [{path,
      documents, tokens}]}, validation: {...}}}; `tokens` counts every token written, eos included.
  progress/   per-shard completion records; a rerun of the same command resumes after the last
      complete shard (settings that differ from the interrupted run's are an error).

Train/validation: a document is held out when the hash of its text, read as a number in [0, 1), is
below --val_fraction: deterministic, independent of file order and worker count, and exact
duplicates land in the same split. A shard covers a run of input records of about --shard_mb MB;
its two files hold that run's train and validation documents, in input order.

Bad input is counted under `skipped` in the metadata and reported at the end, never fatal nor
dropped silently: lines that are not JSON, records without a string text field, empty documents,
documents that look binary (over BINARY_FRACTION invalid-UTF-8 or NUL characters), parquet files
without the column, and unreadable (e.g. truncated) files, with a few examples as path:line.
No document at all is an error. Workers are separate processes that parse and tokenize.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import hashlib
import importlib.metadata
import io
import json
import multiprocessing
import os
import sys
import threading
import time

from absl import app
from absl import flags
import numpy as np

from retnet_jax import metrics as metrics_lib
from retnet_jax import tokenizer as tokenizer_lib

METADATA = 'metadata.json'
FORMAT = 'retnet_jax.preprocess/1'
SUFFIXES = ('.txt', '.jsonl', '.jsonl.gz', '.jsonl.zst', '.parquet')
SPLITS = ('train', 'validation')
BINARY_FRACTION = 0.1  # Random bytes decode to ~45% U+FFFD; UTF-8 text to none.
_CHUNK_BYTES = 1 << 20  # Input bytes per task sent to a worker.
# One record per chunk (random access by index); snappy: the single writer is the serial part, and
# it wrote 20 MB of byte tokens 4x faster than the default brotli (zstd:1: 2x; uncompressed: 6x size).
_WRITER_OPTIONS = 'group_size:1,snappy'
_MAX_EXAMPLES = 5


def looks_binary(text: str) -> bool:
  """Whether over BINARY_FRACTION of the characters are U+FFFD (invalid UTF-8 decoded) or NUL."""
  if not text:
    return False
  return (text.count('\ufffd') + text.count('\x00')) > BINARY_FRACTION * len(text)


def text_hash(text: str) -> float:
  """Stable hash of a document's text to [0, 1): the train/validation split of its content."""
  digest = hashlib.blake2b(text.encode('utf-8', errors='surrogatepass'), digest_size=8).digest()
  return int.from_bytes(digest, 'little') / 2.0**64


def version() -> str:
  try:
    return importlib.metadata.version('retnet_jax')
  except Exception:  # Not installed: running from a checkout.
    return 'unknown'


def list_inputs(patterns: str) -> list[str]:
  """Sorted absolute paths of comma-separated globs; each must match, every file a known format."""
  paths = set()
  globs = [p.strip() for p in patterns.split(',') if p.strip()]
  if not globs:
    raise ValueError('--input is empty: give comma-separated globs of input files.')
  for pattern in globs:
    matched = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
    if not matched:
      raise ValueError(f'--input pattern {pattern!r} matches no files.')
    paths.update(os.path.abspath(p) for p in matched)
  for path in sorted(paths):
    if not path.endswith(SUFFIXES):
      raise ValueError(f'{path!r}: unknown input format; expected one of {SUFFIXES}.')
  return sorted(paths)


# ----------------------------------------------------------------------------------------------------
# Reading: each input file is a stream of records (a line, a row, or a piece of a .txt file).


def _open_lines(path: str, raw):
  """Line iterator over an input file opened in binary mode as `raw`."""
  if path.endswith('.gz'):
    return gzip.GzipFile(fileobj=raw)
  if path.endswith('.zst'):
    import zstandard  # pylint: disable=g-import-not-at-top
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
  return raw


def read_records(path: str, text_field: str, max_document_bytes: int, start: int = 0):
  """Yields (kind, payload, file_bytes_read) for each record of `path` from record `start` on.

  kind 'json' (payload: a line's bytes), 'text' (bytes) or 'str' (a parquet value, str or None).
  file_bytes_read: bytes of the file on disk consumed so far (for progress).
  """
  if path.endswith('.parquet'):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
      raise _BadFile('no_text_column', f'no column {text_field!r} (columns: {pf.schema_arrow.names})')
    size, rows, index = os.path.getsize(path), max(pf.metadata.num_rows, 1), 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
      if index + batch.num_rows > start:
        values = batch.column(0).to_pylist()
        for j in range(max(start - index, 0), len(values)):
          yield 'str', values[j], size * (index + j + 1) // rows
      index += batch.num_rows
    return
  with open(path, 'rb') as raw:
    if path.endswith('.txt'):  # Whole, or cut at the last line end before max_document_bytes.
      index, buf = 0, b''
      if os.fstat(raw.fileno()).st_size == 0:  # An empty file is an empty document (counted).
        if start == 0:
          yield 'text', b'', 0
        return
      while True:
        block = raw.read(max_document_bytes)
        buf += block
        while len(buf) >= max_document_bytes or (not block and buf):
          cut = buf.rfind(b'\n', 0, max_document_bytes) + 1 if len(buf) >= max_document_bytes else 0
          cut = cut or min(len(buf), max_document_bytes)
          if index >= start:
            yield 'text', buf[:cut], raw.tell() - len(buf) + cut
          buf, index = buf[cut:], index + 1
        if not block:
          return
    lines = _open_lines(path, raw)
    for index, line in enumerate(lines):
      if index >= start:
        yield 'json', line, raw.tell()


class _BadFile(Exception):
  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


# ----------------------------------------------------------------------------------------------------
# Workers: records -> (split, token bytes) per document, and counts of what was skipped.

_worker = {}


def _init_worker(spec: str, base_dir: str | None, text_field: str, val_fraction: float):
  tok = tokenizer_lib.from_spec(spec, base_dir=base_dir)
  _worker.update(tok=tok, text_field=text_field, val_fraction=val_fraction,
                 dtype=tokenizer_lib.smallest_dtype(tok.vocab_size))


def _text_of(kind: str, payload, text_field: str):
  """(text, None) or (None, skip reason)."""
  if kind == 'str':
    if not isinstance(payload, str):
      return None, 'no_text_field'
    text = payload
  elif kind == 'text':
    text = payload.decode('utf-8', errors='replace')
  else:
    line = payload.strip()
    if not line:
      return None, 'blank_lines'
    try:
      record = json.loads(line.decode('utf-8', errors='replace'))
    except ValueError:
      return None, 'invalid_json'
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
      return None, 'no_text_field'
    text = record[text_field]
  if not text.strip():
    return None, 'empty_documents'
  if looks_binary(text):
    return None, 'binary'
  return text, None


def _tokenize_chunk(task):
  """task: (file_index, first record index, [(kind, payload)]) -> (documents, skipped, examples)."""
  file_index, first, records = task
  tok, dtype = _worker['tok'], _worker['dtype']
  eos = np.array([tok.eos_id], dtype)
  docs, skipped, examples = [], collections.Counter(), []
  for i, (kind, payload) in enumerate(records):
    text, reason = _text_of(kind, payload, _worker['text_field'])
    if reason is not None:
      skipped[reason] += 1
      if reason != 'blank_lines' and len(examples) < _MAX_EXAMPLES:
        examples.append((reason, file_index, first + i))
      continue
    ids = np.concatenate([tok.encode_array(text).astype(dtype, copy=False), eos])
    docs.append((text_hash(text) < _worker['val_fraction'], ids.tobytes(), len(ids)))
  return docs, dict(skipped), examples


# ----------------------------------------------------------------------------------------------------
# Writing.


@dataclasses.dataclass
class _Shard:
  """The two ArrayRecord files of one shard, written to .tmp names and renamed when complete."""
  directory: str
  index: int

  def __post_init__(self):
    self.writers, self.documents, self.tokens = {}, dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    self.skipped = collections.Counter()

  def name(self, split):
    return f'{split}-{self.index:05d}.array_record'

  def write(self, split: str, record: bytes, num_tokens: int):
    if split not in self.writers:
      from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
      path = os.path.join(self.directory, self.name(split) + '.tmp')
      self.writers[split] = ArrayRecordWriter(path, _WRITER_OPTIONS)
    self.writers[split].write(record)
    self.documents[split] += 1
    self.tokens[split] += num_tokens

  def finish(self, end: tuple[int, int], bytes_read: int, records: int) -> dict:
    """Closes and renames the files, then records the shard as complete. Returns the record."""
    shards = {}
    for split in SPLITS:
      if split in self.writers:
        self.writers[split].close()
        os.replace(os.path.join(self.directory, self.name(split) + '.tmp'),
                   os.path.join(self.directory, self.name(split)))
        shards[split] = {'path': self.name(split), 'documents': self.documents[split],
                         'tokens': self.tokens[split]}
    record = {'index': self.index, 'end': list(end), 'bytes_read': bytes_read,
              'records': records, 'shards': shards,
              'skipped': dict(self.skipped)}
    _write_json(os.path.join(self.directory, 'progress', f'shard-{self.index:05d}.json'), record)
    return record


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _completed(directory: str) -> list[dict]:
  """The shard records of an interrupted run, 0, 1, ... while contiguous."""
  done = []
  while True:
    path = os.path.join(directory, 'progress', f'shard-{len(done):05d}.json')
    if not os.path.isfile(path):
      return done
    with open(path, encoding='utf-8') as f:
      done.append(json.load(f))


class _Progress:
  """A log line every `every` seconds: documents/s, MB/s of input and the ETA."""

  def __init__(self, total_bytes: int, every: float = 5.0, stream=sys.stderr, docs: int = 0,
               bytes_read: int = 0):
    self.total, self.every, self.stream = max(total_bytes, 1), every, stream
    self.t0 = self.last = time.perf_counter()
    self.docs = self.docs0 = docs  # Rates count this run's work only (not a resumed run's).
    self.bytes = self.bytes0 = bytes_read

  def update(self, docs: int, bytes_read: int, force: bool = False):
    self.docs, self.bytes = docs, bytes_read
    now = time.perf_counter()
    if force or now - self.last >= self.every:
      self.last = now
      elapsed = max(now - self.t0, 1e-9)
      rate = (bytes_read - self.bytes0) / elapsed
      eta = (self.total - bytes_read) / rate if rate > 0 else float('inf')
      print(f'preprocess: {docs:,} documents ({(docs - self.docs0) / elapsed:,.0f}/s) | '
            f'{bytes_read / 1e6:,.1f} of {self.total / 1e6:,.1f} MB ({rate / 1e6:.2f} MB/s) | '
            f'ETA {metrics_lib.duration(eta)}', file=self.stream, flush=True)

  def rates(self) -> dict:
    elapsed = max(time.perf_counter() - self.t0, 1e-9)
    return {'seconds': elapsed, 'documents_per_second': (self.docs - self.docs0) / elapsed,
            'mb_per_second': (self.bytes - self.bytes0) / elapsed / 1e6}


# ----------------------------------------------------------------------------------------------------
# The tokenizer: given, or trained on a bounded sample.


def sample_texts(paths: list[str], text_field: str, sample_bytes: int, max_document_bytes: int):
  """Yields documents from the head of each input file, about sample_bytes / len(paths) bytes of
  text per file (a file that has less gives all it has), so the sample spans every file."""
  per_file = max(sample_bytes // max(len(paths), 1), 1)
  for path in paths:
    taken = 0
    try:
      for kind, payload, _ in read_records(path, text_field, max_document_bytes):
        text, reason = _text_of(kind, payload, text_field)
        if reason is None:
          encoded = text.encode('utf-8')[:per_file - taken]
          taken += len(encoded)
          yield encoded.decode('utf-8', errors='ignore')  # A character cut in two is dropped.
          if taken >= per_file:
            break
    except (_BadFile, OSError, EOFError, ValueError):
      continue  # Counted and reported by the main pass.


def _prepare_tokenizer(a, paths: list[str], output: str):
  """(spec relative to `output`, source spec): the tokenizer copied into, or trained into, output."""
  if a.train_tokenizer:
    if a.train_tokenizer not in tokenizer_lib.TRAINERS:
      raise ValueError(f'--train_tokenizer must be one of {sorted(tokenizer_lib.TRAINERS)}; '
                       f'got {a.train_tokenizer!r}.')
    kind = 'sentencepiece' if a.train_tokenizer == 'sentencepiece' else 'hf'
    name = tokenizer_lib.MODEL_FILES[kind]
    source = f'trained:{a.train_tokenizer}:vocab_size={a.vocab_size}:sample_mb={a.sample_mb}'
    if not os.path.isfile(os.path.join(output, name)):  # Else trained by the interrupted run.
      print(f'preprocess: training a {a.train_tokenizer} tokenizer (vocab {a.vocab_size}) on up to '
            f'{a.sample_mb} MB of the input', file=sys.stderr, flush=True)
      texts = sample_texts(paths, a.text_field, int(a.sample_mb * 1e6), int(a.max_document_mb * 1e6))
      tokenizer_lib.TRAINERS[a.train_tokenizer](texts, a.vocab_size, os.path.join(output, name))
    return f'{kind}:{name}', source
  kind, path = tokenizer_lib.parse_spec(a.tokenizer)
  if kind == 'byte':
    return 'byte', 'byte'
  if path is None:
    raise ValueError("--tokenizer=sentencepiece needs a model file ('sentencepiece:/path/m.model'); "
                     'or train one with --train_tokenizer=sentencepiece.')
  tok = tokenizer_lib.from_spec(a.tokenizer)  # Loads: a bad file fails here, before any work.
  name = tokenizer_lib.MODEL_FILES[kind]
  with open(os.path.join(output, name), 'wb') as f:
    f.write(tok.model_bytes)
  return f'{kind}:{name}', a.tokenizer


# ----------------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class Args:
  """The command-line flags, as a value (tests call `run(Args(...))`)."""
  input: str
  output: str
  tokenizer: str = 'byte'
  num_workers: int = 1
  val_fraction: float = 0.005
  max_docs: int = 0
  text_field: str = 'text'
  shard_mb: float = 256.0
  max_document_mb: float = 16.0
  train_tokenizer: str = ''
  vocab_size: int = 32_000
  sample_mb: float = 100.0
  progress_every: float = 5.0


def _mp_context():
  """fork where it is safe (no other thread, no JAX backend started): workers start at once and
  need not import the caller's main module; spawn otherwise."""
  # jax's check is private (and may go): where it is absent, assume a backend has started.
  check = getattr(sys.modules.get('jax._src.xla_bridge'), 'backends_are_initialized', None)
  started = 'jax' in sys.modules and (check is None or check())
  if sys.platform == 'linux' and threading.active_count() == 1 and not started:
    return multiprocessing.get_context('fork')
  return multiprocessing.get_context('spawn')


def _check(a: Args):
  if not 0.0 <= a.val_fraction < 1.0:
    raise ValueError(f'--val_fraction must be in [0, 1); got {a.val_fraction}.')
  for name in ('num_workers', 'max_docs'):
    if getattr(a, name) < 0:
      raise ValueError(f'--{name} must be >= 0; got {getattr(a, name)}.')
  for name in ('shard_mb', 'max_document_mb', 'sample_mb'):
    if getattr(a, name) <= 0:
      raise ValueError(f'--{name} must be > 0; got {getattr(a, name)}.')
  if not a.output:
    raise ValueError('--output is required.')


def run(a: Args) -> dict:
  """Preprocesses (or resumes, or finds already done) and returns the metadata."""
  _check(a)
  paths = list_inputs(a.input)
  output = os.path.abspath(os.path.expanduser(a.output))
  os.makedirs(output, exist_ok=True)
  settings = {'inputs': [[p, os.path.getsize(p)] for p in paths], 'tokenizer': a.tokenizer,
              'train_tokenizer': [a.train_tokenizer, a.vocab_size, a.sample_mb] if a.train_tokenizer
              else None, 'text_field': a.text_field, 'val_fraction': a.val_fraction,
              'max_docs': a.max_docs, 'shard_mb': a.shard_mb, 'max_document_mb': a.max_document_mb}
  settings_path = os.path.join(output, 'progress', 'settings.json')
  if os.path.isfile(settings_path):
    with open(settings_path, encoding='utf-8') as f:
      previous = json.load(f)
    differ = sorted(k for k in settings if previous.get(k) != settings[k])
    if differ:
      raise ValueError(f'{output} holds a preprocess run with other settings ({", ".join(differ)} '
                       'differ); use another --output, or delete it to start over.')
    if os.path.isfile(os.path.join(output, METADATA)):
      print(f'preprocess: {output} is already complete.', file=sys.stderr)
      with open(os.path.join(output, METADATA), encoding='utf-8') as f:
        return json.load(f)
  elif os.listdir(output):
    raise ValueError(f'--output {output} is not empty and holds no preprocess run; use an empty or '
                     'new directory.')
  else:
    _write_json(settings_path, settings)

  spec, source = _prepare_tokenizer(a, paths, output)
  tok = tokenizer_lib.from_spec(spec, base_dir=output)
  done = _completed(output)
  if done:
    print(f'preprocess: resuming after {len(done)} complete shards', file=sys.stderr, flush=True)
  start_file, start_record = done[-1]['end'] if done else (0, 0)
  documents = sum(s['documents'] for r in done for s in r['shards'].values())
  records_read = sum(r.get('records', 0) for r in done)
  bytes_done = done[-1]['bytes_read'] if done else 0

  sizes = [os.path.getsize(p) for p in paths]
  shard_bytes = int(a.shard_mb * 1e6)
  progress = _Progress(sum(sizes), a.progress_every, docs=documents, bytes_read=bytes_done)
  examples = []

  def events():
    """('chunk', task, file bytes done) for each batch of records, ('bad', reason, message) for a
    file that cannot be read, ('end', shard index, end position, file bytes done, records) when a
    shard is complete."""
    nonlocal records_read
    shard, in_shard, records, offset = len(done), 0, 0, sum(sizes[:start_file])
    for fi in range(start_file, len(paths)):
      first = start_record if fi == start_file else 0
      index, chunk, chunk_bytes, read = first, [], 0, 0
      try:
        for kind, payload, read in read_records(paths[fi], a.text_field,
                                                int(a.max_document_mb * 1e6), first):
          chunk.append((kind, payload))
          size = len(payload) if isinstance(payload, (bytes, str)) else 8
          chunk_bytes, in_shard, index, records = chunk_bytes + size, in_shard + size, index + 1, records + 1
          records_read += 1
          limit = a.max_docs and records_read >= a.max_docs
          if chunk_bytes >= _CHUNK_BYTES or in_shard >= shard_bytes or limit:
            yield 'chunk', (fi, index - len(chunk), chunk), offset + read
            chunk, chunk_bytes = [], 0
          if in_shard >= shard_bytes or limit:
            yield 'end', shard, (fi, index), offset + read, records
            shard, in_shard, records = shard + 1, 0, 0
          if limit:
            return
      except Exception as e:  # pylint: disable=broad-except  (a bad file is counted, not fatal)
        if chunk:
          yield 'chunk', (fi, index - len(chunk), chunk), offset + read
          chunk = []
        yield 'bad', getattr(e, 'reason', 'unreadable_files'), f'{paths[fi]}: {e}'
      if chunk:
        yield 'chunk', (fi, index - len(chunk), chunk), offset + read
      offset += sizes[fi]
    yield 'end', shard, (len(paths), 0), offset, records

  init = (spec, output, a.text_field, a.val_fraction)
  if a.num_workers:
    pool = _mp_context().Pool(a.num_workers, _init_worker, init)
    submit = lambda t: pool.apply_async(_tokenize_chunk, (t,))
    result = lambda r: r.get()
  else:
    pool = None
    _init_worker(*init)
    submit, result = _tokenize_chunk, lambda r: r
  in_flight = collections.deque()
  finished = list(done)
  writer = _Shard(output, len(done))
  bytes_read = bytes_done

  def drain_one():
    nonlocal writer, documents, bytes_read
    event = in_flight.popleft()
    if event[0] == 'end':
      _, shard, end, bytes_read, records = event
      finished.append(writer.finish(end, bytes_read, records))
      writer = _Shard(output, shard + 1)
    elif event[0] == 'bad':
      writer.skipped[event[1]] += 1
      if len(examples) < _MAX_EXAMPLES:
        examples.append(event[2])
    else:
      docs, skipped, bad = result(event[1])
      bytes_read = event[2]
      for is_val, ids, n in docs:
        writer.write('validation' if is_val else 'train', ids, n)
      documents += len(docs)
      writer.skipped.update(skipped)
      for reason, fi, index in bad:
        if len(examples) < _MAX_EXAMPLES:
          examples.append(f'{paths[fi]}:{index + 1}: {reason}')
    progress.update(documents, bytes_read)

  try:
    for event in events():
      if event[0] == 'chunk':
        event = ('chunk', submit(event[1]), event[2])
      in_flight.append(event)
      while len(in_flight) > 2 * max(a.num_workers, 1) + 1:
        drain_one()
    while in_flight:
      drain_one()
  finally:
    if pool is not None:
      pool.terminate()
  progress.update(documents, sum(sizes), force=True)

  skipped = collections.Counter()
  for r in finished:
    skipped.update(r['skipped'])
  splits = {}
  for split in SPLITS:
    shards = [r['shards'][split] for r in finished if split in r['shards']]
    splits[split] = {'documents': sum(s['documents'] for s in shards),
                     'tokens': sum(s['tokens'] for s in shards), 'shards': shards}
  total_docs = sum(s['documents'] for s in splits.values())
  if skipped:
    print('preprocess: skipped ' + ', '.join(f'{n:,} {k}' for k, n in sorted(skipped.items())) +
          (' (e.g. ' + '; '.join(examples) + ')' if examples else ''), file=sys.stderr, flush=True)
  if not total_docs:
    raise ValueError(f'no documents in the input {a.input!r}' +
                     (f" (skipped: {dict(skipped)})" if skipped else '') + '.')
  meta = {
      'format': FORMAT, 'version': version(),
      'tokenizer': {'spec': spec, 'source': source},
      'vocab_size': tok.vocab_size, 'dtype': tokenizer_lib.smallest_dtype(tok.vocab_size).name,
      'special_ids': {'pad': tok.pad_id, 'bos': tok.bos_id, 'eos': tok.eos_id},
      'inputs': {'patterns': a.input, 'text_field': a.text_field,
                 'files': [{'path': p, 'bytes': s} for p, s in zip(paths, sizes)]},
      'val_fraction': a.val_fraction, 'max_docs': a.max_docs,
      'skipped': dict(sorted(skipped.items())), 'splits': splits,
      'seconds': progress.rates()['seconds'],
  }
  _write_json(os.path.join(output, METADATA), meta)
  print(f"preprocess: wrote {splits['train']['documents']:,} train and "
        f"{splits['validation']['documents']:,} validation documents "
        f"({splits['train']['tokens']:,} + {splits['validation']['tokens']:,} tokens) to {output}",
        file=sys.stderr, flush=True)
  return meta


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  F = _flags()
  try:
    run(Args(**{f.name: getattr(F, f.name) for f in dataclasses.fields(Args)}))
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


def _flags():
  return flags.FLAGS


def _define_flags():
  d = Args('', '')
  flags.DEFINE_string('input', None, 'Comma-separated globs of .txt/.jsonl[.gz|.zst]/.parquet files.')
  flags.DEFINE_string('output', None, 'Output directory (new or empty; or an interrupted run).')
  flags.DEFINE_string('tokenizer', d.tokenizer, "'byte', 'sentencepiece:PATH' or 'hf:PATH'.")
  flags.DEFINE_integer('num_workers', max(1, (os.cpu_count() or 2) - 1), 'Tokenizing processes; '
                       '0: in this process.')
  flags.DEFINE_float('val_fraction', d.val_fraction, 'Fraction of documents held out (by hash).')
  flags.DEFINE_integer('max_docs', d.max_docs, 'Stop after this many input records; 0: all.')
  flags.DEFINE_string('text_field', d.text_field, 'The text field of jsonl / column of parquet.')
  flags.DEFINE_float('shard_mb', d.shard_mb, 'Input MB per output shard.')
  flags.DEFINE_float('max_document_mb', d.max_document_mb, '.txt files are cut into documents of '
                     'about this size.')
  flags.DEFINE_string('train_tokenizer', d.train_tokenizer, "'sentencepiece' or 'bpe': train one "
                      'on a sample of the input instead of --tokenizer.')
  flags.DEFINE_integer('vocab_size', d.vocab_size, 'Vocabulary of a trained tokenizer.')
  flags.DEFINE_float('sample_mb', d.sample_mb, 'MB of text to train the tokenizer on.')
  flags.DEFINE_float('progress_every', d.progress_every, 'Seconds between progress lines.')


if __name__ == '__main__':
  # Through the imported module, so that spawned workers find the same functions.
  from retnet_jax import preprocess as _preprocess  # pylint: disable=g-import-self
  _preprocess._define_flags()  # pylint: disable=protected-access
  flags.mark_flags_as_required(['input', 'output'])
  app.run(_preprocess.main)
