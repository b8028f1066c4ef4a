"""ClipModel: inference API of a converted OpenCLIP model (embeddings, preprocessing, zero-shot)."""
import math
import os
import tempfile
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from samclip_jax import tokenizer as tok
from samclip_jax.models.clip import (CLIP, MODEL_TYPE, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, ClipConfig,
                                     load_clip)
from samclip_jax.templates import IMAGENET_TEMPLATES, get_templates
from samclip_jax.tokenizer import Tokenizer


def save_clip(directory: str, config: ClipConfig, params, name: str = "custom", vocab: str | None = None,
              merges: str | None = None, extra: Mapping[str, Any] | None = None) -> None:
  """Writes a CLIP model directory (params, config.json, vocab.json + merges.txt) that load_clip and
  ClipModel.from_checkpoint read; the tokenizer is vocab/merges, default the bundled OpenAI BPE."""
  from samclip_jax import checkpoint  # Orbax is only needed here.
  with tempfile.TemporaryDirectory() as tmp:
    if vocab is None:
      vocab, merges = os.path.join(tmp, tok.VOCAB_FILE), os.path.join(tmp, tok.MERGES_FILE)
      tok.write_vocab_files(tok.vocab_from_bpe(), vocab, merges)
      source = "bpe_simple_vocab_16e6.txt.gz (OpenAI CLIP, bundled)"
    else:
      source = f"{vocab} + {merges}"
    Tokenizer.from_files(vocab, merges)  # Refuse unusable tokenizer files before writing.
    meta = {
      "model_type": MODEL_TYPE,
      "open_clip_model": name,
      "config": config.to_dict(),
      "tokenizer": {"vocab": tok.VOCAB_FILE, "merges": tok.MERGES_FILE,
                    "context_length": config.text.context_length, "source": source},
      **(extra or {}),
    }
    checkpoint.save_model(directory, jax.tree.map(np.asarray, params), meta,
                          extra_files={tok.VOCAB_FILE: vocab, tok.MERGES_FILE: merges})


def check_class_names(class_names) -> list[str]:
  """Distinct non-empty names as a list; a bare string is refused (not split into letters)."""
  if isinstance(class_names, str):
    raise ValueError(f"class names must be a list of names, got the string {class_names!r} "
                     f"(for one class write [{class_names!r}])")
  names = list(class_names)
  if not names:
    raise ValueError("give at least one class name")
  bad = [n for n in names if not isinstance(n, str) or not n.strip()]
  if bad:
    raise ValueError(f"class names must be non-empty strings, got {bad}")
  # The tokenizer lowercases and collapses spaces: "Cat" and "cat " are the same class, and
  # a class listed twice would split its probability between the copies.
  seen, dups = {}, []
  for n in names:
    key = " ".join(n.lower().split())
    if key in seen:
      dups.append(f"{seen[key]!r} and {n!r}")
    seen.setdefault(key, n)
  if dups:
    raise ValueError(f"class names repeat: {', '.join(dups)}; list each class once")
  return names


def one_image(image):
  """Refuses a batch where one image is expected (classify answers for one image)."""
  if isinstance(image, (list, tuple)) or (isinstance(image, np.ndarray) and image.ndim == 4):
    raise ValueError("classify takes one image; for several, compare encode_image(images) with "
                     "the class embeddings (zero_shot_classifier / text_classifier)")
  return image


def ranked(class_names: Sequence[str], probs) -> list[tuple[str, float]]:
  """[(class name, probability)], most likely first."""
  probs = np.asarray(probs)
  return [(class_names[i], float(probs[i])) for i in np.argsort(-probs, kind="stable")]


def _l2_normalize(x, axis=-1):
  return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def _bucket(n: int, batch_size: int) -> int:
  """Padded batch for n items: powers of two up to batch_size, so few shapes get compiled."""
  return min(batch_size, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _batched(fn: Callable, x: np.ndarray, batch_size: int, dim: int) -> jax.Array:
  """fn over x in fixed-size chunks (the last one padded), concatenated: [len(x), dim]."""
  if not len(x):
    return jnp.zeros((0, dim), jnp.float32)
  outs = []
  for start in range(0, len(x), batch_size):
    chunk = x[start:start + batch_size]
    size = _bucket(len(chunk), batch_size)
    pad = np.zeros((size - len(chunk),) + chunk.shape[1:], chunk.dtype)
    outs.append(fn(np.concatenate([chunk, pad]) if len(pad) else chunk)[:len(chunk)])
  return jnp.concatenate(outs)


class ClipModel:
  """OpenCLIP model in JAX: encode_image / encode_text / zero_shot_classifier / classify.

  Images go in raw (PIL or uint8 HxWx3) and are preprocessed inside, as everywhere in the
  API; encode_pixels / classify_pixels take already preprocessed pixels (see preprocess).
  """

  def __init__(self, config: ClipConfig, params, tokenizer: Tokenizer | None = None,
               dtype: Any = jnp.float32, batch_size: int = 32, text_batch_size: int = 256):
    self.config = config
    self.params = jax.device_put(params)
    self.tokenizer = tokenizer
    self.batch_size = batch_size
    self.text_batch_size = text_batch_size
    self.module = CLIP(config, dtype=dtype)
    self._image_fn = jax.jit(self._apply(CLIP.encode_image))
    self._text_fn = jax.jit(self._apply(CLIP.encode_text))

  def _apply(self, method):
    return lambda params, x: self.module.apply({"params": params}, x, method=method).astype(jnp.float32)

  @classmethod
  def from_checkpoint(cls, directory: str, dtype: Any = jnp.float32, **kwargs) -> "ClipModel":
    """A model directory written by `python -m convert.open_clip`."""
    config, params = load_clip(directory)
    tokenizer = Tokenizer.from_directory(directory, config.text.context_length)
    return cls(config, params, tokenizer, dtype=dtype, **kwargs)

  @property
  def image_size(self) -> tuple[int, int]:
    return self.config.vision.image_hw

  @property
  def logit_scale(self) -> jax.Array:
    """exp(logit_scale): the temperature open_clip multiplies cosine similarities by."""
    return jnp.exp(self.params["logit_scale"])

  def encode_image(self, images, normalize: bool = False) -> jax.Array:
    """Raw images (one or a list: PIL, uint8 HxWx3, or uint8 [N,H,W,3]) -> [N, D]."""
    return self.encode_pixels(self.preprocess(images), normalize)

  def encode_pixels(self, pixels, normalize: bool = False) -> jax.Array:
    """float32 [N, H, W, 3], already preprocessed (see preprocess) -> [N, D]."""
    pixels = np.asarray(pixels, np.float32)
    out = _batched(lambda x: self._image_fn(self.params, x), pixels, self.batch_size, self.config.embed_dim)
    return _l2_normalize(out) if normalize else out

  def encode_text(self, texts: Sequence[str], normalize: bool = False) -> jax.Array:
    """Strings -> [N, D] (tokenized as open_clip.tokenize)."""
    if self.tokenizer is None:
      raise ValueError("this ClipModel has no tokenizer; build it with from_checkpoint or pass one")
    if isinstance(texts, str):  # list("red") would embed three letters
      raise ValueError(f"encode_text takes a list of strings, got the string {texts!r} (write [{texts!r}])")
    ids = self.tokenizer.tokenize(list(texts), self.config.text.context_length)
    out = _batched(lambda x: self._text_fn(self.params, x), ids, self.text_batch_size, self.config.embed_dim)
    return _l2_normalize(out) if normalize else out

  def preprocess(self, images) -> np.ndarray:
    """PIL images or uint8 HWC arrays -> float32 [N, S, S, 3], as open_clip's eval transform.

    Resize the shorter side to S with PIL's bicubic (what torchvision's Resize does for PIL
    input: antialiased, a=-0.5), center crop S x S, convert to RGB, /255, OPENAI mean/std.
    Identical to open_clip's preprocess on PIL images; torchvision on tensors would use torch's
    antialiased bicubic instead (differences of about one grey level).
    """
    from PIL import Image  # Only needed here.
    from samclip_jax.data.transforms import as_rgb_uint8, is_wide, to_rgb
    if isinstance(images, (Image.Image, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
      images = [images]
    th, tw = self.image_size
    out = np.empty((len(images), th, tw, 3), np.float32)
    for i, img in enumerate(images):
      if not isinstance(img, Image.Image):  # arrays: checked and made RGB as everywhere else
        img = Image.fromarray(as_rgb_uint8(img))
      elif is_wide(img.mode):  # 16-bit / float: scaled from their range, not clipped
        img = to_rgb(img)
      w, h = img.size
      if th == tw:  # torchvision Resize(int): shorter side -> S, longer side truncated.
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = th, int(th * long / short)
        nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
      else:  # Non-square target: cover it, keeping the aspect ratio.
        s = max(th / h, tw / w)
        nh, nw = max(th, round(h * s)), max(tw, round(w * s))
      if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.BICUBIC)
      top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
      img = img.crop((left, top, left + tw, top + th)).convert("RGB")
      x = np.asarray(img, np.float32) / np.float32(255.0)
      out[i] = (x - np.asarray(OPENAI_DATASET_MEAN, np.float32)) / np.asarray(OPENAI_DATASET_STD, np.float32)
    return out

  def zero_shot_classifier(self, class_names: Sequence[str],
                           templates: str | Sequence[str | Callable[[str], str]] = IMAGENET_TEMPLATES,
                           classes_per_batch: int = 16) -> jax.Array:
    """[C, D] unit rows: per class, the mean of its normalised prompt embeddings, renormalised.

    `templates`: a template set name (samclip_jax.templates, e.g. "imagenet80") or the templates.
    """
    class_names = check_class_names(class_names)
    if isinstance(templates, str):
      templates = get_templates(templates)
    if not templates:
      raise ValueError("zero_shot_classifier needs at least one template")
    def formats_once(t):  # one '{}' and no other replacement field ("{} and {}", "{name}")
      try:
        return t.count("{}") == 1 and t.format("\0").count("\0") == 1
      except (IndexError, KeyError, ValueError):
        return False
    bad = [t for t in templates if isinstance(t, str) and not formats_once(t)]
    if bad:  # every class would get the same prompt, or format() fails deep inside
      raise ValueError(f"templates must hold '{{}}' once where the class name goes (or be callables), got {bad[:3]}")
    fmt = lambda t, c: t.format(c) if isinstance(t, str) else t(c)
    self._check_distinct_tokens(class_names, templates[0])
    rows = []
    for start in range(0, len(class_names), classes_per_batch):
      names = class_names[start:start + classes_per_batch]
      emb = self.encode_text([fmt(t, c) for c in names for t in templates], normalize=True)
      rows.append(_l2_normalize(emb.reshape(len(names), len(templates), -1).mean(axis=1)))
    return jnp.concatenate(rows)

  def _check_distinct_tokens(self, class_names, template):
    """Refuses class names that become the same prompt once cut to the context length."""
    if self.tokenizer is None:
      return
    prompts = [template.format(c) if isinstance(template, str) else template(c) for c in class_names]
    ids = np.asarray(self.tokenizer.tokenize(prompts, self.config.text.context_length))
    _, first, inverse = np.unique(ids, axis=0, return_index=True, return_inverse=True)
    clash = [(class_names[first[k]], class_names[i]) for i, k in enumerate(inverse.ravel()) if first[k] != i]
    if clash:
      a, b = clash[0]
      raise ValueError(f"class names {a[:40]!r}... and {b[:40]!r}... are the same prompt after truncation to "
                       f"{self.config.text.context_length} tokens: shorten them")

  def classify(self, image, class_names: Sequence[str], templates="imagenet80") -> list[tuple[str, float]]:
    """One raw image -> [(class name, probability)], most likely first (softmax over the classes)."""
    names = check_class_names(class_names)
    _, probs = self.classify_pixels(self.preprocess(one_image(image)), self.zero_shot_classifier(names, templates))
    return ranked(names, probs[0])

  def classify_pixels(self, pixels, classifier) -> tuple[jax.Array, jax.Array]:
    """Preprocessed pixels [N,H,W,3], classifier [C,D] -> (logits, probabilities) [N, C]:
    exp(logit_scale) * cos(image, class) and its softmax."""
    image = self.encode_pixels(pixels, normalize=True)
    logits = self.logit_scale * jnp.einsum("nd,cd->nc", image, classifier, precision="highest")
    return logits, jax.nn.softmax(logits, axis=-1)
