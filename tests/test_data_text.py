"""Tests of tokenizers, LM packing and the language-model datasets."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sift_jax import data

_TEXT = "Größe: naïve café — 数据 🙂\nline two\ttab"


def test_byte_tokenizer_round_trip():
  tok = data.ByteTokenizer()
  ids = tok.encode(_TEXT)
  assert ids.dtype == np.int32 and tok.vocab_size == 256 and tok.eos_id is None
  np.testing.assert_array_equal(ids, list(_TEXT.encode("utf-8")))
  assert tok.decode(ids) == _TEXT
  eos_tok = data.ByteTokenizer(add_eos=True)
  assert (eos_tok.vocab_size, eos_tok.eos_id) == (257, 256)
  assert eos_tok.decode([104, 105, 256, 106]) == "hi\nj"
  with pytest.raises(ValueError, match=r"ids must lie in \[0, 256\)"):
    tok.decode([256])


def test_char_tokenizer_round_trip_and_unknowns():
  tok = data.CharTokenizer.from_text(_TEXT)
  assert tok.vocab_size == len(set(_TEXT))
  assert tok.chars == "".join(sorted(set(_TEXT)))
  ids = tok.encode(_TEXT)
  assert ids.dtype == np.int32 and ids.shape == (len(_TEXT),)
  assert tok.decode(ids) == _TEXT
  np.testing.assert_array_equal(ids, [tok.chars.index(c) for c in _TEXT])
  with pytest.raises(ValueError, match=r"not in the vocabulary: \['Z'\]"):
    tok.encode("Zeta")
  unk = data.CharTokenizer.from_text("abc", add_eos=True, add_unk=True)
  assert (unk.vocab_size, unk.eos_id, unk.unk_id) == (5, 3, 4)
  np.testing.assert_array_equal(unk.encode("abzc"), [0, 1, 4, 2])
  assert unk.decode([0, 3, 4]) == "a\n\ufffd"
  with pytest.raises(ValueError, match="duplicates"):
    data.CharTokenizer(chars="aab")


def test_packing_exact_windows_without_padding():
  tokens = np.arange(1, 1001, dtype=np.int32)
  source = data.PackedLMSource(tokens, seq_len=64)
  assert len(source) == (1000 - 1) // 64 == 15
  inputs = np.stack([source[i]["inputs"] for i in range(len(source))])
  targets = np.stack([source[i]["targets"] for i in range(len(source))])
  assert inputs.shape == targets.shape == (15, 64)
  # Inputs tile the stream contiguously; targets are the next tokens.
  np.testing.assert_array_equal(inputs.reshape(-1), tokens[:15 * 64])
  np.testing.assert_array_equal(targets.reshape(-1), tokens[1:15 * 64 + 1])
  np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
  with pytest.raises(ValueError, match="seq_len must be a positive int"):
    data.PackedLMSource(tokens, seq_len=0)


def test_tokenize_documents_inserts_eos():
  tok = data.ByteTokenizer(add_eos=True)
  stream = data.tokenize_documents(["ab", "", "c"], tok)
  np.testing.assert_array_equal(stream, [97, 98, 256, 256, 99, 256])


def test_pydoc_chars_dataset():
  corpus = data.pydoc_corpus()
  train_info = data.get_dataset_info("pydoc_chars", split="train", seq_len=64)
  tok = train_info.tokenizer
  assert train_info.task == "lm" and train_info.vocab_size == len(set(corpus))
  assert train_info.input_shape == (64,) and train_info.input_dtype == np.int32
  num_test_chars = int(round(len(corpus) * 0.1))
  num_train_chars = len(corpus) - num_test_chars
  assert train_info.num_examples == (num_train_chars - 1) // 64
  it = data.make_dataset("pydoc_chars", split="test", batch_size=256,
                         seq_len=64, process_index=0, process_count=1)
  assert it.info.num_examples == (num_test_chars - 1) // 64
  batches = list(it)  # eval: one ordered pass
  inputs = np.concatenate([b["inputs"] for b in batches])
  targets = np.concatenate([b["targets"] for b in batches])
  assert inputs.dtype == targets.dtype == np.int32
  assert inputs.shape == (it.info.num_examples, 64)
  np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
  test_text = corpus[num_train_chars:]
  assert tok.decode(inputs.reshape(-1)) == test_text[:inputs.size]
  assert tok.decode(targets[-1]) == test_text[inputs.size - 63:inputs.size + 1]


def test_pydoc_chars_train_is_shuffled_and_resumable():
  kw = dict(split="train", batch_size=8, seq_len=32, seed=1, process_index=0,
            process_count=1)
  it = data.make_dataset("pydoc_chars", **kw)
  [next(it) for _ in range(2)]
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(2)]
  fresh = data.make_dataset("pydoc_chars", **kw)
  fresh.set_state(state)
  for a, b in zip(expected, [next(fresh) for _ in range(2)]):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["targets"], b["targets"])
  other_len = data.make_dataset("pydoc_chars", **dict(kw, seq_len=16))
  with pytest.raises(ValueError, match="options"):
    other_len.set_state(state)


def test_text_files_dataset(tmp_path):
  texts = {"a.txt": "hello world\n", "b.txt": "Grüße\n", "sub/c.txt": "xyz" * 30}
  for rel, text in texts.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(text, encoding="utf-8")
  pattern = str(tmp_path / "**" / "*.txt")
  # Sorted glob order: a.txt, b.txt, sub/c.txt; byte tokens + EOS (256) each.
  stream = np.concatenate([
      np.append(np.frombuffer(texts[k].encode(), np.uint8).astype(np.int32), 256)
      for k in ("a.txt", "b.txt", "sub/c.txt")])
  num_test = int(round(len(stream) * 0.25))
  train_tokens = stream[:len(stream) - num_test]
  it = data.make_dataset(f"text_files:{pattern}", split="train", batch_size=2,
                         seq_len=8, shuffle=False, num_epochs=1,
                         drop_remainder=False, test_fraction=0.25,
                         process_index=0, process_count=1)
  assert it.info.vocab_size == 257
  n = (len(train_tokens) - 1) // 8
  assert it.info.num_examples == n
  inputs = np.concatenate([b["inputs"] for b in it])
  np.testing.assert_array_equal(inputs.reshape(-1), train_tokens[:n * 8])
  test_info = data.get_dataset_info("text_files", split="test", seq_len=4,
                                    paths=[pattern], test_fraction=0.25)
  assert test_info.num_examples == (num_test - 1) // 4
  chars = data.get_dataset_info(f"text_files:{pattern}", split="train",
                                seq_len=8, tokenizer="char")
  assert chars.vocab_size == len(set("".join(texts.values()))) + 1  # + EOS
  with pytest.raises(FileNotFoundError, match="no file matches"):
    data.make_dataset(f"text_files:{tmp_path}/*.md", split="train",
                      batch_size=2, process_index=0, process_count=1)


def test_tfds_text_dataset_under_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    source = tfds.data_source("tiny_shakespeare", split="train",
                              data_dir=tmp_path)
    docs = [source[i]["text"] for i in range(len(source))]
    it = data.make_dataset("tfds_text:tiny_shakespeare", split="train",
                           batch_size=2, seq_len=8, shuffle=False, num_epochs=1,
                           data_dir=tmp_path, process_index=0, process_count=1)
    batches = list(it)
  docs = [d.decode() if isinstance(d, bytes) else d for d in docs]
  stream = data.tokenize_documents(docs, data.ByteTokenizer(add_eos=True))
  n = (len(stream) - 1) // 8
  assert it.info.num_examples == n and it.info.vocab_size == 257
  assert len(batches) == n // 2
  inputs = np.concatenate([b["inputs"] for b in batches])
  np.testing.assert_array_equal(inputs.reshape(-1), stream[:len(inputs) * 8])
  with pytest.raises(ValueError, match="tfds_text"):
    data.make_dataset("tfds_text:", split="train", batch_size=2,
                      process_index=0, process_count=1)


def test_unknown_tfds_text_dataset(tmp_path):
  with pytest.raises(ValueError, match="unknown TFDS dataset name='no_such_ds'"):
    data.make_dataset("tfds_text:no_such_ds", split="train", batch_size=2,
                      data_dir=tmp_path, process_index=0, process_count=1)
