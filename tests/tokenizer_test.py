"""Tests of retnet_jax/tokenizer.py."""

import os

import numpy as np
import pytest

from retnet_jax import data
from retnet_jax import tokenizer as tokenizer_lib
from tests import util

UNICODE_TEXT = 'def f(x):\n\treturn x  # héllo, 日本語, emoji 🙂, ß → ∑\r\n'


def test_byte_tokenizer_round_trips_unicode():
  tok = tokenizer_lib.ByteTokenizer()
  ids = tok.encode(UNICODE_TEXT)
  assert ids == list(UNICODE_TEXT.encode('utf-8'))
  assert all(0 <= i < 256 for i in ids)  # No special tokens added.
  assert tok.decode(ids) == UNICODE_TEXT
  assert tok.decode(np.asarray(ids, np.int32)) == UNICODE_TEXT
  np.testing.assert_array_equal(tok.encode_array(UNICODE_TEXT), ids)


def test_byte_tokenizer_ids_and_token_bytes():
  tok = tokenizer_lib.ByteTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)
  assert tok.token_bytes.shape == (259,) and tok.token_bytes.dtype == np.int32
  np.testing.assert_array_equal(tok.token_bytes[:256], 1)
  np.testing.assert_array_equal(tok.token_bytes[256:], 0)
  ids = tok.encode(UNICODE_TEXT)
  assert tok.token_bytes[ids].sum() == len(UNICODE_TEXT.encode('utf-8'))


def test_byte_tokenizer_decode_skips_specials_and_replaces_invalid_utf8():
  tok = tokenizer_lib.ByteTokenizer()
  assert tok.decode([tok.bos_id, 104, 105, tok.eos_id, tok.pad_id, tok.pad_id]) == 'hi'
  assert tok.decode([0xFF, 65]) == '\ufffdA'
  assert tok.decode(tok.encode('é')[:1]) == '\ufffd'  # Half a two-byte character.


def test_get_tokenizer_byte_and_bad_names():
  assert isinstance(data.get_tokenizer({}), tokenizer_lib.ByteTokenizer)
  assert isinstance(data.get_tokenizer({'tokenizer': 'byte'}),
                    tokenizer_lib.ByteTokenizer)
  with pytest.raises(ValueError, match=r"Unknown tokenizer 'gpt2'.*'byte', 'sentencepiece'"):
    data.get_tokenizer({'tokenizer': 'gpt2'})
  with pytest.raises(ValueError, match=r"Unknown data config keys \['tokeniser'\]"):
    data.get_tokenizer({'tokeniser': 'byte'})
  with pytest.raises(ValueError, match='needs a text source'):
    data.get_tokenizer({'source': 'mqar', 'tokenizer': 'sentencepiece'})


def _training_texts():
  rng = np.random.default_rng(0)
  words = ['def', 'return', 'self', 'import', 'class', 'for', 'in', 'if', 'else', 'None', 'x',
           'value', 'name', '日本', 'héllo', '(', ')', ':', '=', '+', '0', '1', '42']
  texts = []
  for _ in range(200):
    lines = [' ' * int(rng.integers(0, 3) * 4) + ' '.join(rng.choice(words, 6)) for _ in range(5)]
    texts.append('\n'.join(lines) + '\n')
  return texts


def test_sentencepiece_round_trip_and_save_load(tmp_path):
  util.require('sentencepiece')
  model_path = str(tmp_path / 'sp' / 'tokenizer.model')
  tok = tokenizer_lib.SentencePieceTokenizer.train(_training_texts(), 320, model_path)
  assert tok.vocab_size == 320 and os.path.exists(model_path)
  assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
  assert tok.token_bytes.shape == (320,) and tok.token_bytes.dtype == np.int32
  for i in (tok.pad_id, tok.bos_id, tok.eos_id):
    assert tok.token_bytes[i] == 0
  ids = tok.encode(UNICODE_TEXT)  # Unseen characters go through byte fallback: lossless.
  assert tok.decode(ids) == UNICODE_TEXT
  assert tok.token_bytes[ids].sum() == len(UNICODE_TEXT.encode('utf-8'))
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == UNICODE_TEXT
  assert not {tok.pad_id, tok.bos_id, tok.eos_id} & set(ids)
  text = _training_texts()[0]
  assert len(tok.encode(text)) < 0.75 * len(text.encode('utf-8'))  # Learned merges compress.
  loaded = tokenizer_lib.SentencePieceTokenizer.load(model_path)
  assert loaded.encode(text) == tok.encode(text)
  np.testing.assert_array_equal(loaded.token_bytes, tok.token_bytes)
  with pytest.raises(ValueError, match='sp_vocab_size must be >= 300'):
    tokenizer_lib.SentencePieceTokenizer.train(_training_texts(), 100, model_path)


def test_get_tokenizer_sentencepiece_trains_once_then_reloads(tmp_path, monkeypatch):
  util.require('sentencepiece')
  for i, text in enumerate(_training_texts()[:20]):
    (tmp_path / f'doc{i:02d}.txt').write_text(text, encoding='utf-8')
  config = {'source': 'files', 'files_glob': str(tmp_path / '*.txt'),
            'tokenizer': 'sentencepiece', 'sp_vocab_size': 300}
  workdir = tmp_path / 'workdir'
  tok = data.get_tokenizer(config, str(workdir))
  assert (workdir / 'tokenizer.model').exists() and tok.vocab_size == 300

  def fail(*args, **kwargs):
    raise AssertionError('trained again instead of loading <workdir>/tokenizer.model')

  monkeypatch.setattr(tokenizer_lib.SentencePieceTokenizer, 'train', fail)
  again = data.get_tokenizer(config, str(workdir))
  assert again.model_proto == tok.model_proto


@pytest.mark.parametrize('spec, expected', [
    ('byte', ('byte', None)), ('sentencepiece', ('sentencepiece', None)),
    ('sentencepiece:/m/a.model', ('sentencepiece', '/m/a.model')), ('hf:t.json', ('hf', 't.json')),
])
def test_parse_spec(spec, expected):
  assert tokenizer_lib.parse_spec(spec) == expected


@pytest.mark.parametrize('spec', ['gpt2', 'hf:', 'hf', 'byte:x', '', None, 3])
def test_parse_spec_rejects(spec):
  with pytest.raises(ValueError, match="Unknown tokenizer .*expected 'byte', 'sentencepiece'"):
    tokenizer_lib.parse_spec(spec)


def test_smallest_dtype():
  assert [tokenizer_lib.smallest_dtype(v).name for v in (256, 257, 65536, 65537)] == [
      'uint8', 'uint16', 'uint16', 'uint32']


def test_bpe_spec_round_trips_and_counts_bytes(tmp_path):
  util.require('tokenizers')
  path = str(tmp_path / 'tokenizer.json')
  trained = tokenizer_lib.train_bpe(_training_texts(), 320, path)
  tok = tokenizer_lib.from_spec('hf:tokenizer.json', base_dir=str(tmp_path))
  assert tok.vocab_size == trained.vocab_size == 320
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  ids = tok.encode(UNICODE_TEXT)
  assert tok.decode(ids) == UNICODE_TEXT and tok.decode([1] + ids + [2, 0]) == UNICODE_TEXT
  assert not {0, 1, 2} & set(ids)
  assert tok.token_bytes[ids].sum() == len(UNICODE_TEXT.encode('utf-8'))  # Byte-level pieces.
  text = _training_texts()[0]
  assert len(tok.encode(text)) < 0.75 * len(text.encode('utf-8'))
  assert data.get_tokenizer({'source': 'files', 'files_glob': path,
                                      'tokenizer': f'hf:{path}'}).encode(text) == tok.encode(text)


def test_hf_tokenizer_with_sentencepiece_style_pieces(tmp_path):
  """A Llama-like tokenizer.json: '▁' for spaces, <0xNN> byte fallback, <s> / </s> specials."""
  tokenizers = util.require('tokenizers')
  vocab = {'<unk>': 0, '<s>': 1, '</s>': 2, '<0x0A>': 3, '▁hi': 4, 'é': 5, '▁': 6}
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token='<unk>',
                                                   byte_fallback=True))
  tok.add_special_tokens(['<s>', '</s>'])
  tok.save(str(tmp_path / 'tokenizer.json'))
  ours = tokenizer_lib.from_spec(f"hf:{tmp_path / 'tokenizer.json'}")
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)  # No pad: eos pads.
  assert list(ours.token_bytes) == [0, 0, 0, 1, 3, 2, 1]
  with pytest.raises(ValueError, match=r'has none of the eos tokens'):
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel({'a': 0, '<unk>': 1}, unk_token='<unk>'))
    t.save(str(tmp_path / 'noeos.json'))
    tokenizer_lib.from_spec(f"hf:{tmp_path / 'noeos.json'}")


def test_sentencepiece_spec_loads_an_existing_model(tmp_path):
  util.require('sentencepiece')
  path = str(tmp_path / 'm.model')
  trained = tokenizer_lib.train_sentencepiece(_training_texts(), 320, path)
  for spec in (f'sentencepiece:{path}', 'sentencepiece:m.model'):
    tok = tokenizer_lib.from_spec(spec, base_dir=str(tmp_path))
    assert tok.model_bytes == trained.model_bytes and tok.eos_id == 2
  tok = data.get_tokenizer({'source': 'files', 'files_glob': path,
                                     'tokenizer': f'sentencepiece:{path}'})
  assert tok.encode(UNICODE_TEXT) == trained.encode(UNICODE_TEXT)
  with pytest.raises(ValueError, match=r"Tokenizer file '.*nope.model' does not exist"):
    tokenizer_lib.from_spec('sentencepiece:nope.model', base_dir=str(tmp_path))
