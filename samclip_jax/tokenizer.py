"""The CLIP BPE tokenizer, giving the ids of open_clip.tokenize (transformers' CLIPTokenizer inside).

transformers' CLIPTokenizer alone differs from open_clip on some inputs: open_clip cleans text
first (ftfy.fix_text, html.unescape twice, whitespace collapsed, lower case), so curly quotes,
ligatures, full-width forms and HTML entities change; and its word regex runs in Python's
`regex` module, whose Unicode tables are newer than the Rust splitter's. So Tokenizer cleans
and splits words in Python exactly as open_clip does, lets transformers (Rust) do the
byte-level BPE of each word, and lays ids out as open_clip: [sot] + tokens + [eot], cut to
context_length with eot forced into the last slot, padded with 0.
"""
import functools
import gzip
import html
import json
import os
from typing import Iterable, Sequence

import numpy as np

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
_SOT_NAMES = ("<|startoftext|>", "<start_of_text>")
_EOT_NAMES = ("<|endoftext|>", "<end_of_text>")
# open_clip uses the first 49152 - 256 - 2 merges of its BPE table.
_NUM_MERGES = 49152 - 256 - 2
# OpenAI CLIP's BPE table (MIT; copied from open_clip 3.3.0's bpe_simple_vocab_16e6.txt.gz), so
# tokenizing needs no open_clip.
BUNDLED_BPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")
_OPEN_CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2 / CLIP byte -> printable unicode character table."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def vocab_from_bpe(bpe_path: str | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """open_clip's bpe_simple_vocab_16e6.txt.gz (default: the bundled copy) -> (vocab, merges) in open_clip's id order."""
  with gzip.open(bpe_path or BUNDLED_BPE) as f:
    lines = f.read().decode("utf-8").split("\n")
  merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
  chars = list(bytes_to_unicode().values())
  tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
  tokens += [_SOT_NAMES[0], _EOT_NAMES[0]]  # ids 49406, 49407; transformers' names.
  return {t: i for i, t in enumerate(tokens)}, merges


def write_vocab_files(vocab_merges: tuple[dict[str, int], list[tuple[str, str]]], vocab_path: str,
                      merges_path: str) -> None:
  """Writes transformers-format vocab.json and merges.txt."""
  vocab, merges = vocab_merges
  with open(vocab_path, "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(merges_path, "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
    f.writelines(f"{a} {b}\n" for a, b in merges)


def read_vocab_files(vocab_path: str, merges_path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  with open(vocab_path, encoding="utf-8") as f:
    vocab = json.load(f)
  with open(merges_path, encoding="utf-8") as f:
    merges = [tuple(line.split()) for line in f.read().split("\n")
              if line and not line.startswith("#version")]
  bad = [m for m in merges if len(m) != 2]
  if not isinstance(vocab, dict) or bad:
    raise ValueError(f"{vocab_path} / {merges_path} are not CLIP BPE vocab/merges files")
  return vocab, merges


def clean_text(text: str) -> str:
  """open_clip's 'lower' cleaning: ftfy.fix_text, html.unescape x2, collapse whitespace, lower."""
  try:
    import ftfy
  except ImportError as e:  # open_clip depends on ftfy; without it ids differ on some inputs.
    raise ImportError("samclip_jax.tokenizer needs ftfy (pip install ftfy) to match open_clip's ids") from e
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return " ".join(text.split()).strip().lower()


@functools.lru_cache(maxsize=1)
def _word_pattern():
  import regex  # A transformers dependency; supports \p{L} like open_clip's tokenizer.
  return regex.compile("|".join(_SOT_NAMES[1:] + _EOT_NAMES[1:]) + "|" + _OPEN_CLIP_PATTERN, regex.IGNORECASE)


def _split_words(text: str) -> list[str]:
  return _word_pattern().findall(text)


class Tokenizer:
  """CLIP BPE tokenizer with open_clip.tokenize's output; `tokenizer(texts)` -> int32 [N, 77]."""

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], context_length: int = 77):
    from transformers import CLIPTokenizer  # Imported lazily: transformers is slow to import.
    sot = next((n for n in _SOT_NAMES if n in vocab), None)
    eot = next((n for n in _EOT_NAMES if n in vocab), None)
    if sot is None or eot is None:
      raise ValueError(f"vocab has no start/end-of-text tokens ({_SOT_NAMES[0]}, {_EOT_NAMES[0]})")
    # Special tokens under open_clip's names, so literal "<end_of_text>" maps as open_clip maps it.
    hf_vocab = {k: v for k, v in vocab.items() if k not in (sot, eot)}
    hf_vocab.update({_SOT_NAMES[1]: vocab[sot], _EOT_NAMES[1]: vocab[eot]})
    # transformers 5 takes the vocab/merges themselves; its old vocab_file= keyword is ignored
    # silently (every id then comes out 0 or 2).
    self._hf = CLIPTokenizer(vocab=hf_vocab, merges=[tuple(m) for m in merges], bos_token=_SOT_NAMES[1],
                             eos_token=_EOT_NAMES[1], pad_token=_EOT_NAMES[1], unk_token=_EOT_NAMES[1])
    # Text is cleaned and split into words here in Python with open_clip's own regex (the
    # `regex` module, IGNORECASE, current Unicode tables): the Rust normaliser and splitter use
    # older Unicode tables and differ on recently assigned letters. Rust then only does the
    # byte-level BPE.
    from tokenizers import pre_tokenizers
    backend = self._hf.backend_tokenizer
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    self.sot_token_id = vocab[sot]
    self.eot_token_id = vocab[eot]
    self.vocab_size = len(vocab)
    self.context_length = context_length

  @classmethod
  def from_files(cls, vocab_path: str, merges_path: str, context_length: int = 77) -> "Tokenizer":
    return cls(*read_vocab_files(vocab_path, merges_path), context_length=context_length)

  @classmethod
  def from_directory(cls, directory: str, context_length: int = 77) -> "Tokenizer":
    """A model directory written by convert/open_clip.py (vocab.json + merges.txt)."""
    return cls.from_files(os.path.join(directory, VOCAB_FILE), os.path.join(directory, MERGES_FILE),
                          context_length)

  @classmethod
  def from_bpe(cls, bpe_path: str | None = None, context_length: int = 77) -> "Tokenizer":
    """From an open_clip BPE table; default: the bundled OpenAI one (every OpenAI-BPE OpenCLIP model's)."""
    return cls(*vocab_from_bpe(bpe_path), context_length=context_length)

  @classmethod
  def default(cls, context_length: int = 77) -> "Tokenizer":
    """The OpenAI CLIP tokenizer from the bundled BPE table."""
    return cls.from_bpe(None, context_length)

  def encode(self, texts: Iterable[str]) -> list[list[int]]:
    """BPE ids of each cleaned text, without start/end tokens."""
    words = [_split_words(clean_text(t)) for t in texts]
    ids = self._hf([w for w in words if w], is_split_into_words=True, add_special_tokens=False)["input_ids"] \
        if any(words) else []
    it = iter(ids)
    return [next(it) if w else [] for w in words]

  def tokenize(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
    """int32 [N, context_length], laid out exactly as open_clip.tokenize (0 padding)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    length = context_length or self.context_length
    out = np.zeros((len(texts), length), np.int32)
    for i, ids in enumerate(self.encode(texts)):
      ids = [self.sot_token_id] + ids + [self.eot_token_id]
      if len(ids) > length:  # open_clip truncates, then forces eot into the last slot.
        ids = ids[:length]
        ids[-1] = self.eot_token_id
      out[i, :len(ids)] = ids
    return out

  __call__ = tokenize
