"""Tokenizers: UTF-8 bytes (the default) and an optional SentencePiece BPE.

Both expose the same small interface:

    encode(text) -> list[int]        no special tokens added
    decode(ids) -> str               special ids skipped; invalid UTF-8 decoded with errors='replace'
    pad_id, bos_id, eos_id, vocab_size
    token_bytes [vocab_size] int32   UTF-8 bytes each token stands for (0 for special tokens), so a
                                     loss summed over targets divides by token_bytes[targets].sum()
                                     to give bits per byte.

`get_tokenizer(data_config, workdir)` picks one from `data_config.tokenizer`.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np


class ByteTokenizer:
  """Ids 0..255 are the UTF-8 bytes, then pad, bos and eos."""

  pad_id = 256
  bos_id = 257
  eos_id = 258
  vocab_size = 259

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
  """BPE over UTF-8 with byte fallback, lossless on source code (no normalisation, whitespace kept).

  Ids: unk 0, bos 1, eos 2, pad 3, '\\n' 4 (one token per newline; pieces never span lines), then the
  256 byte-fallback pieces and the learned ones. Needs the optional `sentencepiece` package.
  """

  pad_id = 3
  bos_id = 1
  eos_id = 2

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.model_proto = model_proto
    self.vocab_size = self._sp.get_piece_size()
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
    import io  # pylint: disable=g-import-not-at-top
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
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    tmp_path = f'{model_path}.tmp{os.getpid()}'
    with open(tmp_path, 'wb') as f:
      f.write(proto)
    os.replace(tmp_path, model_path)  # Atomic: a reader never sees half a model.
    return cls(proto)

  @classmethod
  def load(cls, model_path: str) -> SentencePieceTokenizer:
    with open(model_path, 'rb') as f:
      return cls(f.read())

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


def get_tokenizer(data_config, workdir: str | None = None):
  """The tokenizer named by `data_config.tokenizer` ('byte' or 'sentencepiece').

  'sentencepiece' is trained once on the train split of `data_config` (vocab `sp_vocab_size`) and
  saved to <workdir>/tokenizer.model; a model already there is loaded instead. Without a workdir
  it is trained every call and not saved. With several hosts, train it before the run starts: each
  host would otherwise train its own copy (identical in our checks, as SentencePiece training is
  deterministic for the same data, but wasted work, and hosts race to write the file).
  """
  from retnet_jax import data  # pylint: disable=g-import-not-at-top  (data does not import us)
  cfg = data.resolve_config(data_config)
  if cfg['tokenizer'] == 'byte':
    return ByteTokenizer()
  # resolve_config allows only 'byte' and 'sentencepiece'.
  if cfg['source'] == 'mqar':
    raise ValueError("tokenizer='sentencepiece' needs a text source; MQAR's token ids are the data "
                     "(use tokenizer='byte', which MQAR ignores).")
  if workdir is not None:
    model_path = os.path.join(workdir, 'tokenizer.model')
    if os.path.exists(model_path):
      return SentencePieceTokenizer.load(model_path)
  else:
    import tempfile  # pylint: disable=g-import-not-at-top
    model_path = os.path.join(tempfile.mkdtemp(), 'tokenizer.model')
  texts = data.load_texts(data_config, 'train')
  return SentencePieceTokenizer.train(texts, cfg['sp_vocab_size'], model_path)
