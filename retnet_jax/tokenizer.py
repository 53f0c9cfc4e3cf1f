"""Tokenizers: UTF-8 bytes (the default), SentencePiece and Hugging Face `tokenizers`.

All expose the same small interface:

    encode(text) -> list[int]        no special tokens added
    encode_array(text) -> np.ndarray the same ids as an array (what the data pipeline uses)
    decode(ids) -> str               special ids skipped; invalid UTF-8 decoded with errors='replace'
    pad_id, bos_id, eos_id, vocab_size
    token_bytes [vocab_size] int32   UTF-8 bytes each token stands for (0 for special tokens), so a
                                     loss summed over targets divides by token_bytes[targets].sum()
                                     to give bits per byte.
    spec                             the spec string that loads it again (see `from_spec`)
    model_bytes                      the model file's contents (None for 'byte'), copied by preprocess

Tokenizer specs (`from_spec`; preprocessing, training, generation and evaluation take the same):
  'byte'                          UTF-8 bytes, then pad, bos, eos (259 ids)
  'sentencepiece:/path/m.model'   an existing SentencePiece model (special ids from the model)
  'hf:/path/tokenizer.json'       a Hugging Face `tokenizers` file (e.g. a Llama or GPT-NeoX one)
A relative path is resolved against `base_dir` (preprocess metadata stores paths relative to its
directory). `train_sentencepiece` / `train_bpe` learn a new one from an iterable of texts (a bounded
sample: see preprocess.py).

`data.get_tokenizer(data_config, workdir)` picks one from a data config (a spec, a SentencePiece
model trained on the source, or the one an ArrayRecord corpus records).
"""

from __future__ import annotations

import io
import json
import os
from typing import Iterable

import numpy as np

SPEC_KINDS = ('byte', 'sentencepiece', 'hf')
SPEC_HELP = "'byte', 'sentencepiece', 'sentencepiece:PATH' or 'hf:PATH'"


def parse_spec(spec) -> tuple[str, str | None]:
  """('byte' | 'sentencepiece' | 'hf', path or None) of a spec; 'sentencepiece' alone has no path
  (the data config's train-on-the-corpus option). Raises ValueError for anything else."""
  if isinstance(spec, str):
    kind, sep, path = spec.partition(':')
    if not sep and kind in ('byte', 'sentencepiece'):
      return kind, None
    if sep and kind in ('sentencepiece', 'hf') and path.strip():
      return kind, path.strip()
  raise ValueError(f'Unknown tokenizer {spec!r}; expected {SPEC_HELP}.')


def _resolve(path: str, base_dir: str | None) -> str:
  path = os.path.expanduser(path)
  if base_dir is not None and not os.path.isabs(path):
    path = os.path.join(base_dir, path)
  if not os.path.isfile(path):
    raise ValueError(f'Tokenizer file {path!r} does not exist.')
  return path


def from_spec(spec: str, *, base_dir: str | None = None):
  """The tokenizer a spec names (see the module docstring)."""
  kind, path = parse_spec(spec)
  if kind == 'byte':
    return ByteTokenizer()
  if path is None:
    raise ValueError("Tokenizer spec 'sentencepiece' needs a model file here: "
                     "'sentencepiece:/path/model.model'.")
  path = _resolve(path, base_dir)
  return SentencePieceTokenizer.load(path) if kind == 'sentencepiece' else HFTokenizer.load(path)


def smallest_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned integer dtype that holds ids 0 .. vocab_size - 1."""
  for dtype in (np.uint8, np.uint16, np.uint32):
    if vocab_size <= np.iinfo(dtype).max + 1:
      return np.dtype(dtype)
  raise ValueError(f'vocab_size {vocab_size} does not fit in uint32.')


class ByteTokenizer:
  """Ids 0..255 are the UTF-8 bytes, then pad, bos and eos."""

  pad_id = 256
  bos_id = 257
  eos_id = 258
  vocab_size = 259
  spec = 'byte'
  model_bytes = None

  def __init__(self):
    self.token_bytes = np.concatenate([np.ones(256, np.int32), np.zeros(3, np.int32)])

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8'))

  def encode_array(self, text: str) -> np.ndarray:
    """Like `encode`, as a uint8 array [num_bytes] (no Python list; what data.py uses)."""
    return np.frombuffer(text.encode('utf-8'), np.uint8)

  def decode(self, ids) -> str:
    ids = np.asarray(ids, np.int64).reshape(-1)
    ids = ids[(ids >= 0) & (ids < 256)]
    return ids.astype(np.uint8).tobytes().decode('utf-8', errors='replace')

  def __repr__(self):
    return 'ByteTokenizer()'


class SentencePieceTokenizer:
  """A SentencePiece model. Special ids come from the model (pad falls back to eos when it has none).

  `train` makes the project's own kind: BPE over UTF-8 with byte fallback, lossless on source code
  (no normalisation, whitespace kept). Ids: unk 0, bos 1, eos 2, pad 3, '\\n' 4 (one token per
  newline; pieces never span lines), then the 256 byte-fallback pieces and the learned ones.
  Needs the optional `sentencepiece` package.
  """

  def __init__(self, model_proto: bytes, path: str | None = None):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.model_proto = self.model_bytes = model_proto
    self.spec = f'sentencepiece:{path}' if path else None
    self.vocab_size = self._sp.get_piece_size()
    if self._sp.eos_id() < 0:
      raise ValueError(f'SentencePiece model {path or ""!r} has no eos piece; it is needed to end '
                       'documents.')
    self.eos_id = self._sp.eos_id()
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else self.eos_id
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
    token_bytes = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self._sp.is_byte(i):
        token_bytes[i] = 1
      elif not (self._sp.is_control(i) or self._sp.is_unknown(i)):
        token_bytes[i] = len(self._sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
    self.token_bytes = token_bytes

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, model_path: str) -> SentencePieceTokenizer:
    """Trains on `texts` (documents; fed to the trainer line by line), saves to `model_path`."""
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if vocab_size < 300:
      raise ValueError(f'sp_vocab_size must be >= 300 (5 special + 256 byte pieces + merges); '
                       f'got {vocab_size}.')
    lines = (line for text in texts for line in text.split('\n') if line.strip())
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type='bpe',
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=['\n'],
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, byte_fallback=True,
        split_digits=True, max_sentence_length=1 << 16, num_threads=2, minloglevel=2)
    proto = model.getvalue()
    _write_atomic(model_path, proto)
    return cls(proto, model_path)

  @classmethod
  def load(cls, model_path: str) -> SentencePieceTokenizer:
    with open(model_path, 'rb') as f:
      return cls(f.read(), model_path)

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids, np.int64).reshape(-1)
    special = (ids == self.pad_id) | (ids == self.bos_id) | (ids == self.eos_id)
    ids = ids[(ids >= 0) & (ids < self.vocab_size) & ~special]
    return self._sp.decode(ids.tolist())

  def __repr__(self):
    return f'SentencePieceTokenizer(vocab_size={self.vocab_size})'


def _write_atomic(path: str, content: bytes) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp_path = f'{path}.tmp{os.getpid()}'
  with open(tmp_path, 'wb') as f:
    f.write(content)
  os.replace(tmp_path, path)  # Atomic: a reader never sees half a model.


def _byte_level_alphabet() -> dict[str, int]:
  """GPT-2's byte-level BPE alphabet: the character standing for each byte -> the byte.

  Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 bytes
  take the characters U+0100, U+0101, ... in byte order.
  """
  printable = [*range(ord('!'), ord('~') + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[chr(b)] = b
    else:
      table[chr(256 + extra)] = b
      extra += 1
  return table


# Names that Hugging Face tokenizers commonly give their special tokens, most usual first.
_HF_EOS = ('</s>', '<|endoftext|>', '<|end_of_text|>', '<eos>', '<|eot_id|>', '[SEP]')
_HF_BOS = ('<s>', '<|begin_of_text|>', '<bos>', '<|startoftext|>', '[CLS]')
_HF_PAD = ('<pad>', '<|padding|>', '[PAD]', '<|pad|>')


class HFTokenizer:
  """A Hugging Face `tokenizers` file (tokenizer.json), encoded without added special tokens.

  eos is the first of `_HF_EOS` in the vocabulary (an error if none is); bos and pad likewise, else
  eos. Needs the optional `tokenizers` package.
  """

  def __init__(self, json_text: str, path: str | None = None):
    import tokenizers  # pylint: disable=g-import-not-at-top
    try:
      self._tok = tokenizers.Tokenizer.from_str(json_text)
    except Exception as e:  # tokenizers raises plain Exception for bad files.
      raise ValueError(f'cannot load tokenizer {path or ""!r}: {e}') from e
    self.model_bytes = json_text.encode('utf-8')
    self.spec = f'hf:{path}' if path else None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    vocab = self._tok.get_vocab(with_added_tokens=True)

    def find(names):
      return next((vocab[n] for n in names if n in vocab), None)

    self.eos_id = find(_HF_EOS)
    if self.eos_id is None:
      raise ValueError(f'tokenizer {path or ""!r} has none of the eos tokens {list(_HF_EOS)}; '
                       'one is needed to end documents.')
    self.bos_id = find(_HF_BOS)
    self.bos_id = self.eos_id if self.bos_id is None else self.bos_id
    self.pad_id = find(_HF_PAD)
    self.pad_id = self.eos_id if self.pad_id is None else self.pad_id
    config = json.loads(json_text)
    byte_level = 'ByteLevel' in json.dumps([config.get('decoder'), config.get('pre_tokenizer')])
    alphabet = _byte_level_alphabet()
    special = {t['id'] for t in config.get('added_tokens', []) if t.get('special')}
    special |= {self.eos_id, self.bos_id, self.pad_id}
    unk = (config.get('model') or {}).get('unk_token')
    if unk in vocab:
      special.add(vocab[unk])
    token_bytes = np.zeros(self.vocab_size, np.int32)
    for piece, i in vocab.items():
      if i in special or i >= self.vocab_size:
        continue
      if byte_level and all(c in alphabet for c in piece):
        token_bytes[i] = len(piece)
      elif len(piece) == 6 and piece.startswith('<0x') and piece.endswith('>'):
        token_bytes[i] = 1  # SentencePiece-style byte fallback, e.g. Llama's <0x0A>.
      else:
        token_bytes[i] = len(piece.replace('\u2581', ' ').removeprefix('##').encode('utf-8'))
    self.token_bytes = token_bytes

  @classmethod
  def load(cls, path: str) -> HFTokenizer:
    with open(path, encoding='utf-8') as f:
      return cls(f.read(), path)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids, np.int64).reshape(-1)
    ids = ids[(ids >= 0) & (ids < self.vocab_size)]
    return self._tok.decode(ids.tolist(), skip_special_tokens=True)

  def __repr__(self):
    return f'HFTokenizer(vocab_size={self.vocab_size})'


def train_sentencepiece(texts: Iterable[str], vocab_size: int, path: str) -> SentencePieceTokenizer:
  """A SentencePiece BPE (see `SentencePieceTokenizer.train`) learned from `texts`, saved to `path`."""
  return SentencePieceTokenizer.train(texts, vocab_size, path)


def train_bpe(texts: Iterable[str], vocab_size: int, path: str) -> HFTokenizer:
  """A byte-level BPE (GPT-2 style, Hugging Face `tokenizers`) learned from `texts`, saved to `path`
  as tokenizer.json. Ids: <pad> 0, <s> 1, </s> 2, then the 256 byte symbols and the merges."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders  # pylint: disable=g-import-not-at-top
  from tokenizers import models  # pylint: disable=g-import-not-at-top
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import trainers  # pylint: disable=g-import-not-at-top
  if vocab_size < 300:
    raise ValueError(f'vocab_size must be >= 300 (3 special + 256 byte symbols + merges); '
                     f'got {vocab_size}.')
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<pad>', '<s>', '</s>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  _write_atomic(path, tok.to_str().encode('utf-8'))
  return HFTokenizer(tok.to_str(), path)


TRAINERS = {'sentencepiece': train_sentencepiece, 'bpe': train_bpe}
MODEL_FILES = {'sentencepiece': 'tokenizer.model', 'hf': 'tokenizer.json'}


def from_checkpoint_meta(info: dict) -> HFTokenizer:
  """The Hugging Face tokenizer a converted checkpoint's metadata carries (convert.reading), with
  the converted model's own special ids, which know best."""
  tok = HFTokenizer(info['json'], info.get('path')) if 'json' in info else HFTokenizer.load(info['path'])
  for key, attr in (('eos_token_id', 'eos_id'), ('bos_token_id', 'bos_id'), ('pad_token_id', 'pad_id')):
    if info.get(key) is not None:
      setattr(tok, attr, int(info[key]))
  return tok
