"""Input pipeline: packed text (the Python stdlib, or local files) or synthetic MQAR, served by grain.

    tok = get_tokenizer(config.data, workdir)
    train_iter, eval_batches_fn = create_datasets(config.data, tokenizer=tok, seq_len=256,
                                                  global_batch_size=16, seed=0)

`get_tokenizer(data_config, workdir)` picks the tokenizer (tokenizer.py) from the data config:
`data_config.tokenizer` is a spec, or 'sentencepiece' (trained on the source's train split, saved to
<workdir>/tokenizer.model); for source='arrayrecord' it is the tokenizer recorded in
`<data.path>/metadata.json`.

Every batch is a dict of numpy arrays [global_batch_size // process_count, seq_len]:
  inputs       int32    token ids
  targets      int32    the next token (inputs shifted left by one inside the row)
  segment_ids  int32    1, 2, ... for the documents of the row, in order; 0 for padding
  loss_mask    float32  1 where the target is a real token to score, else 0

Text sources. Each document is tokenized and ends with eos; the documents of a split are concatenated
into one token array, cached in memory, that is cut into rows of seq_len + 1 tokens overlapping by one
(row i = tokens[i*L : i*L + L + 1], so every token but the first is a target exactly once). A row
starts in the middle of whatever document covers it (segment 1) and a new segment begins after each
eos. Only the very last row of a split is padded (pad_id, segment 0). Every real target is scored,
including the one at an eos, which predicts the first token of the next document: the model sees the
boundary through segment_ids (reset the recurrent state where they change) and learns where documents
begin, as in usual LM packing. Train rows are shuffled (seeded, reshuffled each epoch with seed + epoch)
and repeated forever. Eval rows are not shuffled: all of them in order when they fit in
`num_eval_batches` batches (the last one padded with empty rows), else as many as fit, evenly spread
over the split.

Sources (`source`):
  'stdlib'  the `.py` files of this Python's standard library, test suites included (site-packages
            skipped; ~1,800 files, ~31 MB on CPython 3.11), read as UTF-8 with errors='replace'.
  'files'   comma-separated globs `files_glob` (`**` allowed). A `.jsonl` file holds one document per
            line, its text in field `jsonl_text_field`; any other file is one plain-text document.
  'arrayrecord'  the ArrayRecord shards that `python -m retnet_jax.preprocess` wrote to `path` (one
            record per tokenized document, eos included; see preprocess.py). The tokenizer is the
            one in `<path>/metadata.json` (`tokenizer` is ignored). Documents are read by index in a
            seeded global shuffle (grain's index shuffle, no buffer; reshuffled each epoch) and
            packed on the fly into rows with the same rule as above (concatenated, rows overlapping
            by one token, segment ids from the eos). Host p of P reads documents p::P; with
            num_workers > 0 worker w packs every num_workers-th of those. Evaluation packs the
            validation documents in a fixed shuffled order (seed 0, every run the same), and
            gives the same number of batches on every host (padding rows where a host runs out).
            Nothing is held in memory but the shard indices and the batches in flight.
  'mqar'    synthetic multi-query associative recall (Zoology, Arora et al. 2023), see `_MqarRows`.
            The token ids are the data: the tokenizer is unused and the model's vocab must be at
            least `mqar_vocab_size` (see `vocab_size`).

Binary input ('files'): a document whose text is over `BINARY_FRACTION` U+FFFD (invalid UTF-8) or
NUL characters is skipped, with a warning counting them; if no document is left, an error.

Train/validation split: by file, on a hash of each file's path (relative to the stdlib directory, or to
the common directory of the matched files), so it does not depend on listing order: a file is held out
when its hash, read as a number in [0, 1), is below `val_fraction`. A single file is split the same way
by document index. Each split gets at least one unit. Exact duplicate documents are kept once (the
first, in path order), so no text is in both splits.

Multi-host: host `process_index` of `process_count` reads rows process_index::process_count (train and
eval), so hosts read disjoint data and together cover all of it.

Config keys and defaults (`DEFAULTS`; a missing key takes its default, an unknown key is an error):
  source='stdlib'; tokenizer='byte' (a spec: 'byte' | 'sentencepiece' (trained on the train
  split) | 'sentencepiece:PATH' | 'hf:PATH', see tokenizer.py); sp_vocab_size=4096;
  files_glob=''; jsonl_text_field='text'; path='' (source='arrayrecord': the preprocess output);
  val_fraction=0.03 (stdlib on CPython 3.11: 44 non-empty files, 0.74 MB held out);
  shuffle=True (train only);
  num_workers=0 (> 0: that many grain worker processes through mp_prefetch);
  prefetch_buffer_size=8 (batches prefetched by a background thread, and per worker; 0: none);
  num_eval_batches=16 (at most; a split with fewer rows gives fewer, the last one padded);
  mqar_num_kv_pairs=8; mqar_vocab_size=256.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import sysconfig
import tempfile

from absl import flags
from absl import logging
import grain
import numpy as np

from retnet_jax import preprocess
from retnet_jax import recall
from retnet_jax import tokenizer as tokenizer_lib

DEFAULTS = dict(
    source='stdlib',
    tokenizer='byte',
    sp_vocab_size=4096,
    files_glob='',
    jsonl_text_field='text',
    path='',
    val_fraction=0.03,
    shuffle=True,
    num_workers=0,
    prefetch_buffer_size=8,
    num_eval_batches=16,
    mqar_num_kv_pairs=8,
    mqar_vocab_size=256,
    **recall.DATA_DEFAULTS,  # source='recall': see recall.py
)
SOURCES = ('stdlib', 'files', 'arrayrecord', 'mqar', 'recall')
SPLITS = ('train', 'validation')
BINARY_FRACTION = preprocess.BINARY_FRACTION
_MQAR_EVAL_SEED = 0  # MQAR eval examples do not depend on the run's seed, so runs compare.


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def resolve_config(data_config) -> dict:
  """`data_config` (ConfigDict, dict or None) with defaults filled in, validated. Returns a dict."""
  data_config = {} if data_config is None else data_config
  unknown = sorted(set(data_config.keys()) - set(DEFAULTS))
  if unknown:
    raise ValueError(f'Unknown data config keys {unknown}; allowed keys: {sorted(DEFAULTS)}.')
  cfg = {k: data_config.get(k, v) for k, v in DEFAULTS.items()}
  if cfg['source'] not in SOURCES:
    raise ValueError(f"Unknown data source {cfg['source']!r}; expected one of {SOURCES}.")
  tokenizer_lib.parse_spec(cfg['tokenizer'])
  if not isinstance(cfg['val_fraction'], (int, float)) or not 0.0 < cfg['val_fraction'] < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1); got {cfg['val_fraction']}.")
  for key, low in [('sp_vocab_size', 1), ('num_workers', 0), ('prefetch_buffer_size', 0),
                   ('num_eval_batches', 1), ('mqar_num_kv_pairs', 1), ('mqar_vocab_size', 1)]:
    if not _is_int(cfg[key]) or cfg[key] < low:
      raise ValueError(f'{key} must be an int >= {low}; got {cfg[key]!r}.')
  if cfg['source'] == 'files' and not str(cfg['files_glob']).strip(' ,'):
    raise ValueError("source='files' needs data_config.files_glob (comma-separated globs).")
  if cfg['source'] == 'mqar':
    n, v = cfg['mqar_num_kv_pairs'], cfg['mqar_vocab_size']
    if v // 2 - 1 < n:  # Keys come from [1, v/2) without replacement; 0 is padding.
      raise ValueError(f'mqar_vocab_size={v} is too small for mqar_num_kv_pairs={n}: '
                       f'need mqar_vocab_size >= 2 * (mqar_num_kv_pairs + 1) = {2 * (n + 1)}.')
  return cfg


def vocab_size(data_config, tokenizer) -> int:
  """Number of token ids the model's embedding must cover for this source."""
  cfg = resolve_config(data_config)
  if cfg['source'] == 'arrayrecord':
    return max(tokenizer.vocab_size, read_metadata(cfg['path'])['vocab_size'])
  return cfg['mqar_vocab_size'] if cfg['source'] == 'mqar' else tokenizer.vocab_size


def read_metadata(path: str) -> dict:
  """`<path>/metadata.json` of a finished preprocess run, its shard paths made absolute."""
  if not str(path).strip():  # Checked here, not in resolve_config: compiling needs no data.
    raise ValueError("source='arrayrecord' needs data_config.path (a preprocess output directory).")
  meta_path = os.path.join(os.path.expanduser(path), preprocess.METADATA)
  if not os.path.isfile(meta_path):
    raise ValueError(f'data.path {path!r} has no {preprocess.METADATA}: run '
                     f'`python -m retnet_jax.preprocess --output={path} ...` first (or let it finish).')
  try:
    with open(meta_path, encoding='utf-8') as f:
      meta = json.load(f)
    for split in SPLITS:
      meta['splits'][split]['paths'] = [
          os.path.join(os.path.dirname(meta_path), s['path'])
          for s in meta['splits'][split]['shards']]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{meta_path} is not a preprocess metadata file: {e!r}') from e
  return meta


def metadata_tokenizer(path: str):
  """The tokenizer a preprocess output was written with (its model file is copied beside it)."""
  meta = read_metadata(path)
  tok = tokenizer_lib.from_spec(meta['tokenizer']['spec'], base_dir=os.path.expanduser(path))
  if tok.vocab_size != meta['vocab_size']:
    raise ValueError(f"the tokenizer in {path!r} has {tok.vocab_size} ids but its metadata says "
                     f"{meta['vocab_size']}.")
  return tok


# ----------------------------------------------------------------------------------------------------
# Documents.


def _path_hash(path: str) -> float:
  """Stable hash of a document's path ('file' or 'file#index') to [0, 1)."""
  return int.from_bytes(hashlib.sha256(path.encode('utf-8')).digest()[:8], 'little') / 2.0**64


def _is_val(keys: list[str], val_fraction: float) -> np.ndarray:
  """Which documents (by path) are held out; both splits get at least one. [len(keys)] bool."""
  if len(keys) < 2:
    raise ValueError(f'Need at least 2 documents to make a train/validation split; got {len(keys)}.')
  h = np.array([_path_hash(k) for k in keys])
  is_val = h < val_fraction
  if not is_val.any():
    is_val[np.argmin(h)] = True
  if is_val.all():
    is_val[np.argmax(h)] = False
  return is_val


def _read_text(path: str) -> str:
  with open(path, 'rb') as f:
    return f.read().decode('utf-8', errors='replace')


def _list_stdlib() -> tuple[str, tuple[str, ...]]:
  """(stdlib directory, sorted relative posix paths of its .py files, site-packages skipped)."""
  root = sysconfig.get_paths()['stdlib']
  rel_paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in ('site-packages', 'dist-packages', '__pycache__')]
    for name in filenames:
      if name.endswith('.py'):
        rel_paths.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, '/'))
  if not rel_paths:
    raise ValueError(f'No .py files found in the stdlib directory {root!r}.')
  return root, tuple(sorted(rel_paths))


def _glob_files(files_glob: str) -> list[str]:
  """Sorted absolute paths matched by comma-separated globs; each glob must match a file."""
  paths = set()
  for pattern in (p.strip() for p in files_glob.split(',')):
    if not pattern:
      continue
    matched = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
    if not matched:
      raise ValueError(f'files_glob pattern {pattern!r} matches no files.')
    paths.update(os.path.abspath(p) for p in matched)
  return sorted(paths)


def _read_documents(path: str, text_field: str) -> list[str]:
  """A file's documents: one per line of a .jsonl file, else the whole file. Errors if none."""
  if not path.endswith('.jsonl'):
    text = _read_text(path)
    if not text.strip():
      raise ValueError(f'Data file {path!r} is empty.')
    return [text]
  docs = []
  for line_number, line in enumerate(_read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{line_number} is not valid JSON: {e}') from e
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
      raise ValueError(f'{path}:{line_number} has no string field {text_field!r} '
                       '(set data_config.jsonl_text_field).')
    if record[text_field].strip():
      docs.append(record[text_field])
  if not docs:
    raise ValueError(f'Data file {path!r} is empty: no non-empty {text_field!r} documents.')
  return docs


def _list_files(cfg) -> tuple[str, tuple[str, ...]]:
  """(root directory, sorted relative posix paths) of a text source's files."""
  if cfg['source'] == 'stdlib':
    return _list_stdlib()
  paths = _glob_files(cfg['files_glob'])
  root = os.path.commonpath([os.path.dirname(p) for p in paths])
  return root, tuple(os.path.relpath(p, root).replace(os.sep, '/') for p in paths)


def _drop_binary(root: str, rel_paths: list[str], per_file: list[list[str]]):
  """(rel_paths, per_file) without the documents that look binary, and without files left empty;
  a warning counts what went. Raises ValueError when no document is left."""
  kept_paths, kept_docs, skipped, where = [], [], 0, []
  for rel_path, docs in zip(rel_paths, per_file):
    text_docs = [d for d in docs if not preprocess.looks_binary(d)]
    if len(text_docs) < len(docs):
      skipped += len(docs) - len(text_docs)
      where.append(rel_path)
    if text_docs:
      kept_paths.append(rel_path)
      kept_docs.append(text_docs)
  total = sum(len(d) for d in per_file)
  what = f'(over {BINARY_FRACTION:.0%} invalid UTF-8 or NUL characters)'
  if not kept_paths:
    raise ValueError(f'No text input left: all {total} documents under {root!r} look binary {what}, '
                     f'e.g. {where[0]!r}.')
  if skipped:
    logging.warning('Skipped %d of %d documents that look binary %s, in %d files: %s%s', skipped,
                    total, what, len(where), ', '.join(where[:5]), ', ...' if len(where) > 5 else '')
  return kept_paths, kept_docs


@functools.lru_cache(maxsize=4)
def _cached_split(source: str, root: str, files: tuple, text_field: str,
                  val_fraction: float) -> dict[str, tuple[str, ...]]:
  """{'train': texts, 'validation': texts}, in file order. `files` holds (rel_path, mtime, size)."""
  rel_paths = [f[0] for f in files]
  per_file = []
  for rel_path in rel_paths:
    path = os.path.join(root, rel_path)
    if source == 'stdlib':  # Keep every file, even empty ones (many __init__.py): no error here.
      per_file.append([_read_text(path)])
    else:
      per_file.append(_read_documents(path, text_field))
  if source == 'files':
    rel_paths, per_file = _drop_binary(root, rel_paths, per_file)
  if len(rel_paths) == 1:  # Split one file by document.
    docs = per_file[0]
    is_val = _is_val([f'{rel_paths[0]}#{i}' for i in range(len(docs))], val_fraction)
  else:  # Split by file: a file's documents stay together.
    docs = [d for file_docs in per_file for d in file_docs]
    is_val = np.repeat(_is_val(rel_paths, val_fraction), [len(d) for d in per_file])
  splits, seen = {'train': [], 'validation': []}, set()
  for doc, val in zip(docs, is_val):
    if doc.strip() and doc not in seen:  # Exact duplicates (a few in the stdlib) are kept once.
      seen.add(doc)
      splits['validation' if val else 'train'].append(doc)
  return {k: tuple(v) for k, v in splits.items()}


def load_texts(data_config, split: str) -> tuple[str, ...]:
  """The documents of a text source's split ('train' or 'validation'), cached in memory."""
  cfg = resolve_config(data_config)
  if cfg['source'] in ('mqar', 'arrayrecord'):
    raise ValueError(f"source={cfg['source']!r} has no text documents in memory.")
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; expected one of {SPLITS}.')
  root, rel_paths = _list_files(cfg)
  stats = [os.stat(os.path.join(root, p)) for p in rel_paths]
  files = tuple((p, s.st_mtime_ns, s.st_size) for p, s in zip(rel_paths, stats))
  return _cached_split(cfg['source'], root, files, cfg['jsonl_text_field'],
                       float(cfg['val_fraction']))[split]


def tokenize_documents(texts, tokenizer) -> np.ndarray:
  """Each document's tokens followed by eos, concatenated. [num_tokens] uint16 (int32 if the vocab
  needs it)."""
  encode = getattr(tokenizer, 'encode_array', None) or (lambda t: np.asarray(tokenizer.encode(t)))
  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
  eos = np.array([tokenizer.eos_id], dtype)
  return np.concatenate([a for t in texts for a in (encode(t).astype(dtype, copy=False), eos)]
                        or [np.zeros(0, dtype)])


# ----------------------------------------------------------------------------------------------------
# Rows. Each maps a row index to one example: a dict of [seq_len] arrays. Module-level classes, so
# that grain can pickle them into worker processes.


def _text_example(row: np.ndarray, num_real: int, eos_id: int) -> dict[str, np.ndarray]:
  """Example from a row [seq_len + 1] int32 whose first `num_real` tokens are real."""
  inputs, targets = row[:-1], row[1:]
  position = np.arange(len(inputs))
  is_eos = (inputs == eos_id).astype(np.int32)
  segment_ids = 1 + np.cumsum(is_eos) - is_eos  # 1 + number of eos strictly before the token.
  return dict(inputs=inputs, targets=targets,
              segment_ids=np.where(position < num_real, segment_ids, 0).astype(np.int32),
              loss_mask=(position < num_real - 1).astype(np.float32))


class _TextRows:
  """Row i = tokens[i*L : i*L + L + 1], padded; rows past the end are all padding."""

  def __init__(self, tokens: np.ndarray, seq_len: int, pad_id: int, eos_id: int):
    self.tokens, self.seq_len, self.pad_id, self.eos_id = tokens, seq_len, pad_id, eos_id
    self.num_rows = max(1, -(-(len(tokens) - 1) // seq_len))

  def __call__(self, index) -> dict[str, np.ndarray]:
    index, seq_len = int(index), self.seq_len
    row = np.full(seq_len + 1, self.pad_id, np.int32)
    if index < self.num_rows:
      real = self.tokens[index * seq_len: index * seq_len + seq_len + 1]
      row[:len(real)] = real
      num_real = len(real)
    else:
      num_real = 0
    return _text_example(row, num_real, self.eos_id)


class _MqarRows:
  """Multi-query associative recall (Zoology, Arora et al. 2023), one example per index.

  Row [seq_len + 1]: k1 v1 k2 v2 ... kN vN, then query pairs k v filling the rest (an odd leftover
  token is padding, id 0). Keys are drawn without replacement from [1, V/2) and values from [V/2, V)
  (V = mqar_vocab_size). The queries go through the N keys in a fresh random order, again and again,
  so every key is queried (seq_len + 1 >= 4N is required). loss_mask is 1 exactly where the input is
  a query key, whose target is its bound value. Unlike Zoology, which queries each key once at
  random later positions among noise tokens, and shows no value after a query, the queries here are
  dense, and a repeated key may also be answered from its previous query.
  Example i comes from np.random.default_rng((seed, split, i)): deterministic, nothing stored.
  """

  def __init__(self, seq_len: int, num_kv_pairs: int, vocab_size: int, seed: int, split: int):
    self.seq_len, self.num_kv_pairs, self.vocab_size = seq_len, num_kv_pairs, vocab_size
    self.seed, self.split = seed, split
    self.num_queries = (seq_len + 1 - 2 * num_kv_pairs) // 2
    if self.num_queries < num_kv_pairs:
      raise ValueError(f'MQAR with mqar_num_kv_pairs={num_kv_pairs} needs seq_len + 1 >= '
                       f'4 * mqar_num_kv_pairs = {4 * num_kv_pairs}; got seq_len={seq_len}.')

  def __call__(self, index) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((self.seed, self.split, int(index)))
    n, half, num_queries = self.num_kv_pairs, self.vocab_size // 2, self.num_queries
    keys = 1 + rng.permutation(half - 1)[:n]
    values = half + rng.permutation(self.vocab_size - half)[:n]
    rounds = -(-num_queries // n)
    order = rng.permuted(np.tile(np.arange(n), (rounds, 1)), axis=1).reshape(-1)[:num_queries]
    row = np.zeros(self.seq_len + 1, np.int32)
    row[0:2 * n:2], row[1:2 * n:2] = keys, values
    end = 2 * n + 2 * num_queries
    row[2 * n:end:2], row[2 * n + 1:end:2] = keys[order], values[order]
    position = np.arange(self.seq_len)
    loss_mask = np.zeros(self.seq_len, np.float32)
    loss_mask[2 * n:end:2] = 1.0
    return dict(inputs=row[:-1], targets=row[1:],
                segment_ids=(position < end).astype(np.int32), loss_mask=loss_mask)


class _Decode:
  """An ArrayRecord record (bytes) -> its token ids [num_tokens] in the stored dtype."""

  def __init__(self, dtype: str):
    self.dtype = np.dtype(dtype)

  def __call__(self, record: bytes) -> np.ndarray:
    return np.frombuffer(record, self.dtype)


class _PackIterDataset(grain.IterDataset):
  """Documents (token arrays, each ending with eos) -> packed rows, as `_TextRows` cuts them."""

  def __init__(self, parent, seq_len: int, pad_id: int, eos_id: int):
    super().__init__(parent)
    self.seq_len, self.pad_id, self.eos_id = seq_len, pad_id, eos_id

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), self.seq_len, self.pad_id, self.eos_id)


class _PackIterator(grain.DatasetIterator):
  """Row i = stream[i*L : i*L + L + 1] of the concatenated documents; the last row is padded.

  The state is where the next row starts: the parent's state before the document holding that
  token, and the token's offset in it (the document is read again on restore), so resume is exact.
  """

  def __init__(self, parent, seq_len: int, pad_id: int, eos_id: int):
    super().__init__(parent)
    self.seq_len, self.pad_id, self.eos_id = seq_len, pad_id, eos_id
    self._doc, self._doc_state, self._offset, self._done = None, parent.get_state(), 0, False

  def __next__(self):
    if self._done:
      raise StopIteration
    need, pieces, n = self.seq_len + 1, [], 0
    doc, doc_state, offset = self._doc, self._doc_state, self._offset
    while n < need:
      if doc is None:  # Read the document that starts at doc_state (after a restore: skip offset).
        try:
          doc = next(self._parent)
        except StopIteration:
          break
      elif offset >= len(doc):
        doc_state, doc, offset = self._parent.get_state(), None, 0
        continue
      take = min(need - n, len(doc) - offset)
      pieces.append(doc[offset:offset + take])
      n, offset = n + take, offset + take
    if n < need:  # The stream ended: a last padded row, unless only the overlap token is left.
      self._done = True
      if n <= 1:
        raise StopIteration
    else:  # The next row starts at this row's last token.
      self._doc, self._doc_state, self._offset = doc, doc_state, offset - 1
    row = np.full(need, self.pad_id, np.int32)
    if n:
      row[:n] = np.concatenate(pieces)
    return _text_example(row, n, self.eos_id)

  def get_state(self):
    return {'parent': self._doc_state, 'offset': self._offset, 'done': self._done}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._doc, self._doc_state = None, state['parent']
    self._offset, self._done = int(state['offset']), bool(state['done'])


def _arrayrecord_source(meta: dict, split: str):
  paths = meta['splits'][split]['paths']
  if not paths or not meta['splits'][split]['documents']:
    raise ValueError(f'the {split} split of the preprocess output has no documents; preprocess '
                     'with more data or another --val_fraction.')
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise ValueError(f'shard {missing[0]!r} listed in the metadata is missing.')
  return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))


def _arrayrecord_datasets(cfg, tokenizer, seq_len, global_batch_size, batch_size, seed, shard):
  """(train IterDataset of batches, eval_batches_fn) for source='arrayrecord'."""
  meta = read_metadata(cfg['path'])
  if tokenizer.vocab_size != meta['vocab_size'] or tokenizer.eos_id != meta['special_ids']['eos']:
    raise ValueError(f"the tokenizer given ({tokenizer!r}) is not the one in {cfg['path']!r} "
                     f"(vocab {meta['vocab_size']}, eos {meta['special_ids']['eos']}); use "
                     'data.get_tokenizer(data_config).')
  decode = _Decode(meta['dtype'])
  pack = functools.partial(_PackIterDataset, seq_len=seq_len, pad_id=tokenizer.pad_id,
                           eos_id=tokenizer.eos_id)
  options = grain.ReadOptions(num_threads=2 if cfg['prefetch_buffer_size'] else 0,
                              prefetch_buffer_size=max(cfg['prefetch_buffer_size'], 1) * 16)
  train_docs = _arrayrecord_source(meta, 'train')
  if len(train_docs) < shard.step:
    raise ValueError(f'The train split has {len(train_docs)} documents, fewer than '
                     f'process_count={shard.step}.')
  train_docs = train_docs[shard]
  if cfg['shuffle']:
    train_docs = train_docs.shuffle(seed)  # Epoch e is shuffled with seed + e.
  train = pack(train_docs.repeat(None).map(decode).to_iter_dataset(options))
  train = train.batch(batch_size, drop_remainder=True)

  val_docs = _arrayrecord_source(meta, 'validation')
  eval_docs = val_docs[shard].shuffle(_MQAR_EVAL_SEED).map(decode)
  num_batches = cfg['num_eval_batches']
  itemsize = np.dtype(meta['dtype']).itemsize
  if meta['splits']['validation']['tokens'] <= num_batches * global_batch_size * seq_len:
    # It may all fit: count each host's rows (reading no more than one evaluation reads).
    lengths = np.array([len(r) // itemsize for r in val_docs], np.int64)
    rows = [max(-(-(int(lengths[p::shard.step].sum()) - 1) // seq_len), 0) for p in range(shard.step)]
    num_batches = min(num_batches, max(1, -(-max(rows) // batch_size)))
  empty = _text_example(np.full(seq_len + 1, tokenizer.pad_id, np.int32), 0, tokenizer.eos_id)

  def eval_batches_fn():
    rows = iter(pack(eval_docs.to_iter_dataset(options)))
    for _ in range(num_batches):
      examples = [next(rows, empty) for _ in range(batch_size)]
      yield {k: np.stack([e[k] for e in examples]) for k in examples[0]}

  return train, eval_batches_fn


# ----------------------------------------------------------------------------------------------------
# Pipelines.


def _read_options(cfg) -> grain.ReadOptions:
  # The rows are cheap numpy slices of data in memory: one background thread is plenty.
  buffer_size = cfg['prefetch_buffer_size']
  return grain.ReadOptions(num_threads=1 if buffer_size else 0, prefetch_buffer_size=buffer_size)


def _with_workers(train, cfg):
  """`train` run in `num_workers` grain worker processes (none: unchanged)."""
  if cfg['num_workers'] == 0:
    return train
  # grain 0.2.18 reads an absl flag when it starts workers, which fails in a script that did not
  # parse flags (not an absl app, pytest): google/grain#1355. The flags then keep their defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return train.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=cfg['num_workers'], per_worker_buffer_size=max(1, cfg['prefetch_buffer_size'])))


def _eval_rows(num_rows: int, num_batches: int, global_batch_size: int) -> np.ndarray:
  """Row indices of the eval batches: evenly spread over the split if it has more rows than needed,
  else all of them, then indices >= num_rows (padding rows) to fill the last batch."""
  num_batches = min(num_batches, -(-num_rows // global_batch_size))
  total = num_batches * global_batch_size
  if total <= num_rows:
    return np.arange(total) * num_rows // total
  return np.arange(total)


def create_datasets(data_config, *, tokenizer, seq_len: int, global_batch_size: int, seed: int,
                    process_index: int | None = None, process_count: int | None = None):
  """Returns (train_iter, eval_batches_fn) for this host.

  train_iter: infinite grain DatasetIterator of batches (see the module docstring), each array
    [global_batch_size // process_count, seq_len]. `get_state()` is a JSON-serialisable dict (its
    layout depends on num_workers); `set_state(state)` on an iterator built with the same arguments
    and config resumes exactly: the next batches are those the original produced after get_state.
  eval_batches_fn(): a fresh finite iterable of at most `num_eval_batches` batches of the held-out
    split, the same on every call and for every seed.
  process_index / process_count default to jax.process_index() / jax.process_count().
  """
  cfg = resolve_config(data_config)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (lazy: grain workers need not import jax)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  for name, value in [('seq_len', seq_len), ('global_batch_size', global_batch_size),
                      ('process_count', process_count)]:
    if not _is_int(value) or value < 1:
      raise ValueError(f'{name} must be a positive int; got {value!r}.')
  if not _is_int(process_index) or not 0 <= process_index < process_count:
    raise ValueError(f'process_index must be in [0, {process_count}); got {process_index!r}.')
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not divisible by '
                     f'process_count={process_count}.')
  if not _is_int(seed) or not 0 <= seed < 2**32:
    raise ValueError(f'seed must be an int in [0, 2**32); got {seed!r}.')
  batch_size = global_batch_size // process_count
  shard = slice(process_index, None, process_count)

  if cfg['source'] == 'arrayrecord':
    train, eval_batches_fn = _arrayrecord_datasets(cfg, tokenizer, seq_len, global_batch_size,
                                                   batch_size, seed, shard)
    return iter(_with_workers(train, cfg)), eval_batches_fn
  if cfg['source'] == 'mqar':
    args = (seq_len, cfg['mqar_num_kv_pairs'], cfg['mqar_vocab_size'])
    train_rows, eval_rows = _MqarRows(*args, seed, 0), _MqarRows(*args, _MQAR_EVAL_SEED, 1)
    # Every index is a new random example: 2**62 of them is endless, nothing to shuffle or repeat.
    train = grain.MapDataset.range(2**62)[shard]
    eval_indices = np.arange(cfg['num_eval_batches'] * global_batch_size)
  elif cfg['source'] == 'recall':  # stdlib rows mixed with synthetic recall rows (recall.py).
    text = lambda split: _TextRows(tokenize_documents(load_texts(
        {**cfg, 'source': 'stdlib'}, split), tokenizer), seq_len, tokenizer.pad_id, tokenizer.eos_id)
    train_rows, eval_rows = recall.mixed_rows(cfg, tokenizer, seq_len, seed, text)
    train = grain.MapDataset.range(2**62)[shard]
    eval_indices = np.arange(cfg['num_eval_batches'] * global_batch_size)
  else:
    def rows(split):
      tokens = tokenize_documents(load_texts(cfg, split), tokenizer)
      return _TextRows(tokens, seq_len, tokenizer.pad_id, tokenizer.eos_id)
    train_rows, eval_rows = rows('train'), rows('validation')
    if train_rows.num_rows < process_count:
      raise ValueError(f'The train split has {train_rows.num_rows} rows of seq_len={seq_len}, '
                       f'fewer than process_count={process_count}.')
    train = grain.MapDataset.range(train_rows.num_rows)[shard]
    if cfg['shuffle']:
      train = train.shuffle(seed)  # Epoch e is shuffled with seed + e.
    train = train.repeat(None)
    eval_indices = _eval_rows(eval_rows.num_rows, cfg['num_eval_batches'], global_batch_size)

  train = train.map(train_rows).batch(batch_size, drop_remainder=True)
  train = _with_workers(train.to_iter_dataset(_read_options(cfg)), cfg)
  eval_ds = grain.MapDataset.source(eval_indices)[shard].map(eval_rows).batch(batch_size)
  eval_ds = eval_ds.to_iter_dataset(_read_options(cfg))

  def eval_batches_fn():
    return eval_ds

  return iter(train), eval_batches_fn


def carried_tokenizer(data_config, meta: dict):
  """The tokenizer a checkpoint's metadata carries (a converted model's, or that of a run
  warm-started from one), unless the data config names one other than 'byte'; else None."""
  if meta.get('tokenizer') and resolve_config(data_config)['tokenizer'] == 'byte':
    return tokenizer_lib.from_checkpoint_meta(meta['tokenizer'])
  return None


def get_tokenizer(data_config, workdir: str | None = None):
  """The tokenizer the data config names (see the module docstring).

  'sentencepiece' alone is trained once on the train split of `data_config` (vocab `sp_vocab_size`)
  and saved to <workdir>/tokenizer.model; a model already there is loaded instead. Without a workdir
  it is trained every call and not saved. With several hosts, train it before the run starts: each
  host would otherwise train its own copy (identical in our checks, as SentencePiece training is
  deterministic for the same data, but wasted work, and hosts race to write the file).
  """
  cfg = resolve_config(data_config)
  if cfg['source'] == 'arrayrecord':
    return metadata_tokenizer(cfg['path'])
  kind, path = tokenizer_lib.parse_spec(cfg['tokenizer'])
  if kind == 'byte':
    return tokenizer_lib.ByteTokenizer()
  if cfg['source'] == 'mqar':
    raise ValueError(f"tokenizer={cfg['tokenizer']!r} needs a text source; MQAR's token ids are the "
                     "data (use tokenizer='byte', which MQAR ignores).")
  if path is not None:
    return tokenizer_lib.from_spec(cfg['tokenizer'])
  if workdir is not None:
    model_path = os.path.join(workdir, 'tokenizer.model')
    if os.path.exists(model_path):
      return tokenizer_lib.SentencePieceTokenizer.load(model_path)
  else:
    model_path = os.path.join(tempfile.mkdtemp(), 'tokenizer.model')
  texts = load_texts(data_config, 'train')
  return tokenizer_lib.SentencePieceTokenizer.train(texts, cfg['sp_vocab_size'], model_path)
