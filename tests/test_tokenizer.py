"""samclip_jax.tokenizer gives open_clip.tokenize's ids (open_clip is the reference)."""
import random

import numpy as np
import open_clip
import pytest
from open_clip.tokenizer import SimpleTokenizer, default_bpe

from samclip_jax import tokenizer as tok

TEXTS = [
  "a photo of a cat.",
  "A PHOTO of a Dog!!  With   spaces\tand\nnewlines",
  "it's 'S 'LL don't 123.45 $%^&* a_b c-d",
  "Héllo wörld! café naïve ÀÉÎ façade",      # accents
  "cafe\u0301 e\u0301",                       # decomposed accents (NFC in ftfy)
  "日本語のテキスト 中文 한국어",              # CJK
  "emoji 😀🎉 test 👨‍👩‍👧 ❤️",              # emoji, ZWJ sequences
  "&amp;amp; “curly quotes” ﬁsh Ｆｕｌｌｗｉｄｔｈ",  # ftfy / html cleaning
  "İstanbul ΟΔΟΣ straße ﬀ Ǆ",
  "foo<end_of_text>bar <START_OF_TEXT> <|endoftext|>",  # literal special tokens
  "",
  "   \t\n ",
]


@pytest.fixture(scope="module")
def tokenizer():
  return tok.Tokenizer.from_bpe(default_bpe())


def test_ids_equal_open_clip(tokenizer):
  ours = tokenizer(TEXTS)
  ref = open_clip.tokenize(TEXTS).numpy()
  assert ours.dtype == np.int32 and ours.shape == (len(TEXTS), 77)
  for text, a, b in zip(TEXTS, ours, ref):
    np.testing.assert_array_equal(a, b, err_msg=repr(text))


@pytest.mark.parametrize("n_words", [74, 75, 76, 77, 200])
def test_truncation_matches_open_clip(tokenizer, n_words):
  # "x" is one token: sot + n + eot; open_clip keeps 76 then forces eot into slot 76.
  text = " ".join(["x"] * n_words)
  ours, ref = tokenizer([text, "short"]), open_clip.tokenize([text, "short"]).numpy()
  np.testing.assert_array_equal(ours, ref)
  if n_words >= 75:
    assert ours[0, 76] == tokenizer.eot_token_id
  assert (ours[1, 3:] == 0).all()  # open_clip pads with 0, not with eot.


def test_long_mixed_text_and_context_length(tokenizer):
  long = "Ünïcödé 文字 and emoji 🐱 " * 40
  for length in (77, 16):
    np.testing.assert_array_equal(tokenizer([long, "a dog"], context_length=length),
                                  open_clip.tokenize([long, "a dog"], context_length=length).numpy())


def test_random_unicode(tokenizer):
  # Includes letters added in recent Unicode versions: the Python-side split keeps parity.
  rng = random.Random(0)
  chars = [chr(c) for c in list(range(1, 0x3400)) + list(range(0xA000, 0xD800)) + list(range(0x1F300, 0x1FB00))]
  texts = ["".join(rng.choice(chars) for _ in range(rng.randint(1, 40))) for _ in range(300)]
  np.testing.assert_array_equal(tokenizer(texts), open_clip.tokenize(texts).numpy())


def test_vocab_matches_simple_tokenizer():
  vocab, merges = tok.vocab_from_bpe(default_bpe())
  ref = SimpleTokenizer()
  assert len(vocab) == len(ref.encoder) == 49408
  renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
  assert {renamed.get(k, k): v for k, v in ref.encoder.items()} == vocab
  assert merges == list(ref.bpe_ranks)


def test_files_round_trip_and_transformers_interop(tmp_path, tokenizer):
  vocab_path, merges_path = str(tmp_path / tok.VOCAB_FILE), str(tmp_path / tok.MERGES_FILE)
  tok.write_vocab_files(tok.vocab_from_bpe(default_bpe()), vocab_path, merges_path)
  again = tok.Tokenizer.from_directory(str(tmp_path))
  np.testing.assert_array_equal(again(TEXTS), tokenizer(TEXTS))
  # The files are transformers' format: v5 takes them as vocab=/merges=.
  from transformers import CLIPTokenizer
  hf = CLIPTokenizer(vocab=vocab_path, merges=merges_path)
  assert hf("a photo of a cat.")["input_ids"] == [int(i) for i in tokenizer("a photo of a cat.")[0, :8]]
  # The v4 keyword is ignored silently in v5: every id comes out 0 or 2 (why we pass vocab=).
  broken = CLIPTokenizer(vocab_file=vocab_path, merges_file=merges_path)
  assert set(broken("a photo of a cat.")["input_ids"]) <= {0, 1, 2}


def test_bad_files(tmp_path):
  (tmp_path / "v.json").write_text("[1, 2]")
  (tmp_path / "m.txt").write_text("#version: 0.2\na b c\n")
  with pytest.raises(ValueError, match="not CLIP BPE"):
    tok.Tokenizer.from_files(str(tmp_path / "v.json"), str(tmp_path / "m.txt"))
  with pytest.raises(ValueError, match="start/end-of-text"):
    tok.Tokenizer({"a": 0, "b": 1}, [])
