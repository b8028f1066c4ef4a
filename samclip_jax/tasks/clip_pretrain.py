"""Pretraining a small CLIP (OpenCLIP towers, the BPE tokenizer) contrastively on captions.

Symmetric InfoNCE over the batch with a learned temperature, as open_clip: logits =
exp(logit_scale) * normalised image . text embeddings, logit_scale clamped to ln(100).
Optionally each image also meets `hard_negatives` captions of its own with one shape name
swapped (NegCLIP, Yuksekgonul et al. 2023): in-batch negatives almost always differ in colour,
so colour alone solves the batch and shapes get little gradient; a swapped shape name cannot
be told apart by colour.
Held-out metrics: zero-shot top-1 on the largest shape (class names in OpenAI's 80
templates, averaged) and caption retrieval R@1 within each held-out batch.
"""
import dataclasses
import math
from typing import Any

import flax.linen as nn
from flax import traverse_util
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from samclip_jax import loop, sharding
from samclip_jax.models.clip import CLIP, ClipConfig, TextConfig, VisionConfig, init_variables, load_clip, load_clip_config
from samclip_jax.tasks import common

MAX_LOGIT_SCALE = math.log(100.0)  # open_clip clamps the learned temperature here


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def contrastive_loss(image_emb, text_emb, logit_scale, negative_emb=None):
  """Symmetric InfoNCE (image->text and text->image cross-entropy, averaged).

  negative_emb [B, K, D]: extra captions only image b must reject (columns of its
  image->text row alone; the text->image direction is unchanged).
  """
  img, txt = _unit(image_emb), _unit(text_emb)
  scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
  logits = scale * img @ txt.T
  labels = jnp.arange(logits.shape[0])
  ce = optax.softmax_cross_entropy_with_integer_labels
  rows = logits
  if negative_emb is not None:
    rows = jnp.concatenate([logits, scale * jnp.einsum("bd,bkd->bk", img, _unit(negative_emb))], 1)
  return 0.5 * (jnp.mean(ce(rows, labels)) + jnp.mean(ce(logits.T, labels)))


def swap_shapes(text: str, count: int, rng, classes) -> list[str]:
  """`count` false versions of `text`, each with one class name replaced by a class the text
  does not name (by any other class when it names them all), distinct while there are enough;
  a text naming no class gets "a photo of a CLASS" versions."""
  import re
  found = list(re.finditer(r"\b(" + "|".join(map(re.escape, classes)) + r")\b", text))
  named = {m.group(0) for m in found}
  swaps = [text[:m.start()] + c + text[m.end():] for m in found
           for c in ([c for c in classes if c not in named] or [c for c in classes if c != m.group(0)])]
  swaps = list(dict.fromkeys(swaps)) or [f"a photo of a {c}" for c in classes]
  order = rng.permutation(len(swaps))
  return [swaps[order[i % len(swaps)]] for i in range(count)]


class CaptionRender(grain.transforms.RandomMap):
  """Record -> the whole image at `resolution`, caption tokens, label; `train` adds a random
  flip, a random one of the scene's true captions and a random prompt template around it,
  and `hard_negatives` shape-swapped versions of that caption ("negative_tokens" [K, L])."""

  def __init__(self, resolution: int, context_length: int, train: bool,
               caption_weights=None, templates: tuple[str, ...] = (), hard_negatives: int = 0):
    self.resolution, self.context_length, self.flip = resolution, context_length, train
    self.caption_weights, self.templates = caption_weights, tuple(templates)
    self.hard_negatives = hard_negatives if train else 0
    self._tokenizer, self._tokens = None, {}  # captions repeat: tokenise each once

  def caption(self, rec, rng) -> str:
    """The training caption: a weighted draw of the scene's true captions, its "a photo of a"
    wrapper swapped for a random template (zero-shot prompts are then not new sentences to
    the text tower); evaluation keeps the canonical caption."""
    from samclip_jax.data import sample
    variants = rec.get("captions") or [rec["caption"]]
    if not self.flip:
      return rec["caption"]
    weights = np.array((self.caption_weights or sample.CAPTION_WEIGHTS)[:len(variants)], np.float64)
    text = variants[int(rng.choice(len(variants), p=weights / weights.sum()))]
    if self.templates and text.startswith(sample.CAPTION_PREFIX):
      text = self.templates[int(rng.integers(len(self.templates)))].format(text[len(sample.CAPTION_PREFIX):])
    return text

  def random_map(self, element, rng):
    from samclip_jax.data import records, transforms
    from samclip_jax.tokenizer import Tokenizer
    if self._tokenizer is None:  # built in the worker that uses it (not pickled)
      self._tokenizer = Tokenizer.default(self.context_length)
    _, raw = element
    rec = records.decode(raw)
    h, w = transforms.image_size(rec["image"])
    flip = self.flip and bool(rng.integers(2))
    image = transforms.render_view_encoded(rec["image"], (0, 0, w, h), flip, self.resolution)
    text = self.caption(rec, rng)
    out = {"image": image, "tokens": self._tokenize(text), "label": np.int32(rec.get("label", -1))}
    if self.hard_negatives:
      from samclip_jax.data import sample
      negatives = swap_shapes(text, self.hard_negatives, rng, sample.CLASSES)
      out["negative_tokens"] = np.stack([self._tokenize(t) for t in negatives])
    return out

  def _tokenize(self, text):
    if text not in self._tokens:
      self._tokens[text] = self._tokenizer(text)[0]
    return self._tokens[text]


@dataclasses.dataclass
class ClipPretrainTask:
  config: Any
  mesh: Any
  rules: tuple
  clip_config: ClipConfig
  model: CLIP
  tx: Any
  schedule: Any
  state_shardings: Any
  aux_shardings: Any
  trainable_paths: list
  frozen_paths: list
  class_names: tuple
  started_from: str = ""  # the init_from model's provenance (common.started_from)
  log_keys = ("total_loss", "logit_scale")
  metric_names = ("total_loss", "logit_scale")

  @property
  def images_per_step(self):
    return self.config.clip_batch_size

  def describe(self):
    v, t = self.clip_config.vision, self.clip_config.text
    tower = f"ResNet {v.layers} width {v.width}" if v.is_resnet else f"patch {v.patch_size} width {v.width} x {v.layers}"
    return (f"CLIP pretraining: image {v.image_size} px {tower}, "
            f"text width {t.width} x {t.layers}, embed {self.clip_config.embed_dim}; mesh "
            f"{dict(self.mesh.shape)} on {self.mesh.devices.size} {jax.devices()[0].platform} device(s)")

  def abstract_state(self):
    params = nn.unbox(jax.eval_shape(lambda: init_variables(self.clip_config))["params"])
    return loop.abstract_state(self.tx, self.config.optim.frozen, params, self.state_shardings)

  def init_aux(self):
    """Tokenised zero-shot prompts [classes * templates, L] for the held-out top-1."""
    from samclip_jax.templates import get_templates
    from samclip_jax.tokenizer import Tokenizer
    templates = get_templates(self.config.zero_shot_templates)
    texts = [t.format(c) if "{}" in t else t(c) for c in self.class_names for t in templates]
    tokens = Tokenizer.default(self.clip_config.text.context_length)(texts)
    return {"class_tokens": jax.device_put(tokens, self.aux_shardings["class_tokens"])}

  def init_state(self, aux):
    del aux
    make = lambda params: loop.make_state(self.tx, self.config.optim.frozen, params)
    if self.config.init_from:  # an exported CLIP of this size: its weights, a fresh optimizer
      _, params = load_clip(self.config.init_from, target=loop.params_target(self.abstract_state()))
      return jax.jit(make, out_shardings=self.state_shardings)(params)
    key = jax.random.key(self.config.seed, impl=self.config.prng_impl)
    m = self.config.model
    init = lambda k: make(resnet_init(nn.unbox(init_variables(self.clip_config, k))["params"],
                                      m.get("open_residuals", False), m.get("mean_pool_init", False)))
    return jax.jit(init, out_shardings=self.state_shardings)(key)

  def _embed(self, params, batch):
    x = common.normalize_clip(batch["image"])
    img = self.model.apply({"params": params}, x, method=CLIP.encode_image)
    txt = self.model.apply({"params": params}, batch["tokens"], method=CLIP.encode_text)
    return img.astype(jnp.float32), txt.astype(jnp.float32)

  def micro_grads(self, trainable, frozen, aux, batches):
    del aux
    from samclip_jax import optim

    def loss_fn(tp):
      params = optim.merge_params(tp, frozen)
      b = batches["clip"]
      img, txt = self._embed(params, b)
      neg = None
      if "negative_tokens" in b:
        n, k, length = b["negative_tokens"].shape
        neg = self.model.apply({"params": params}, b["negative_tokens"].reshape(n * k, length),
                               method=CLIP.encode_text).astype(jnp.float32).reshape(n, k, -1)
      return contrastive_loss(img, txt, params["logit_scale"], neg)

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    scale = optim.merge_params(trainable, frozen)["logit_scale"]
    return grads, {"total_loss": loss, "logit_scale": jnp.exp(jnp.minimum(scale, MAX_LOGIT_SCALE))}

  def eval_metrics(self, params, aux, batches):
    b = batches["clip"]
    img, txt = self._embed(params, b)
    img, txt = _unit(img), _unit(txt)
    cls = _unit(self.model.apply({"params": params}, aux["class_tokens"], method=CLIP.encode_text))
    cls = cls.reshape(len(self.class_names), -1, cls.shape[-1]).mean(1)  # average the templates
    pred = jnp.argmax(img @ cls.T, axis=-1)
    labelled = b["label"] >= 0
    top1 = jnp.sum((pred == b["label"]) & labelled) / jnp.maximum(jnp.sum(labelled), 1)
    # Retrieval: the best caption for each image is its own (or an identical caption).
    best = jnp.argmax(img @ txt.T, axis=-1)
    r1 = jnp.mean(jnp.all(b["tokens"][best] == b["tokens"], axis=-1))
    return {"top1": top1, "retrieval_r1": r1, "loss": contrastive_loss(img, txt, params["logit_scale"])}

  def data_paths(self, workdir):
    del workdir
    return {"clip_train": self.config.data.clip_train, "clip_val": self.config.data.clip_val}

  def make_loaders(self, paths, split="train"):
    from samclip_jax.data import pipeline, records
    cfg, nproc = self.config, jax.process_count()
    is_train = split == "train"
    raw = pipeline.data_source(paths[f"clip_{split}"])
    if len(raw) and "caption" not in records.decode(raw[0]):  # else a KeyError deep in a worker
      raise ValueError(f"{paths[f'clip_{split}']}: its records have no caption (e.g. "
                       f"{records.decode(raw[0]).get('key', 'the first')!r}); CLIP pretraining needs a "
                       "caption set (prepare --source folder with .txt captions, or --source wds)")
    source = pipeline.KeyedSource(raw)
    from samclip_jax.templates import get_templates
    templates = get_templates(cfg.caption_templates) if cfg.get("caption_templates") else ()
    ops = [CaptionRender(cfg.clip_image_size, self.clip_config.text.context_length, train=is_train,
                         caption_weights=cfg.get("caption_weights"), templates=templates,
                         hard_negatives=cfg.get("hard_negatives", 0)),
           grain.transforms.Batch(batch_size=cfg.clip_batch_size // nproc, drop_remainder=True)]
    return {"clip": pipeline.make_loader(
        source, ops, seed=cfg.seed if is_train else cfg.seed + 1, shard_index=jax.process_index(),
        shard_count=nproc, num_epochs=None if is_train else 1,
        worker_count=cfg.data.worker_count if is_train else 0, shuffle=is_train)}

  def device_batches(self, host):
    return common.device_batches(self, host)

  def prepare_workdir(self, workdir):
    del workdir

  def export(self, state, directory):
    """A CLIP model directory (convert/open_clip.py's format, with the bundled tokenizer)."""
    from samclip_jax.clip_model import save_clip
    params = jax.tree.map(np.asarray, common.export_params(state))
    if self.clip_config.vision.is_resnet:
      params = self._precise_bn(params)
    if self.config.zero_unused_tokens:
      params = _zero_unused_token_rows(params, self.config)
    save_clip(directory, self.clip_config, params, name="world CLIP",
              extra={"source": common.pretraining_source(self, self.config.data.clip_train,
                                                         int(state.step))})

  def _precise_bn(self, params):
    """A ResNet tower trains on batch statistics: its running statistics are those of
    `precise_bn_batches` global training batches (the same ones for the same seed; sharded as
    training is, so every process computes the same statistics)."""
    from samclip_jax.models.modified_resnet import precise_bn
    loader = self.make_loaders(self.data_paths(None), "train")["clip"]
    collect = jax.jit(lambda p, images: self.model.apply(
        {"params": p}, common.normalize_clip(images), method=CLIP.encode_image,
        mutable=["batch_stats"])[1]["batch_stats"])
    batches = (self.device_batches({"clip": b})["clip"]["image"]
               for _, b in zip(range(self.config.precise_bn_batches), loader))
    return precise_bn(params, collect, batches)


def resnet_init(params, open_residuals: bool = False, mean_pool: bool = False):
  """ModifiedResNet initialisation choices (the module stays open_clip's; README: the shape probe).

  open_residuals: each Bottleneck's last BatchNorm scale starts at 1, not open_clip's 0 (every
  residual branch closed, so at first only the stem's three convolutions see space).
  mean_pool: the attention pool's query projection starts at 0, so the pool starts as a mean
  over the positions (uniform attention) and learns where to look from there.
  """
  rules = [(open_residuals, lambda path: path[-2:] == ("bn3", "scale"), jnp.ones_like),
           (mean_pool, lambda path: path[-3:-1] == ("attnpool", "q_proj"), jnp.zeros_like)]

  def init(path, x):
    for enabled, matches, value in rules:
      if enabled and matches(tuple(path)):
        return value(x)
    return x
  return traverse_util.path_aware_map(init, params)


def _zero_unused_token_rows(params, config):
  """Token-embedding rows the world's captions and prompts never use were never trained:
  zeroing them keeps the shipped model small (they compress away) and changes no output the
  training could have shaped."""
  from samclip_jax.data import sample
  from samclip_jax.templates import get_templates
  from samclip_jax.tokenizer import Tokenizer
  words = list(sample.CLASSES) + list(sample.COLOURS) + ["a photo of a", "and", ",", "plain background"]
  texts = words + [t.format(c) for c in sample.CLASSES for t in get_templates(config.zero_shot_templates)]
  used = np.unique(Tokenizer.default(1024)(texts))
  table = params["token_embedding"]["embedding"]
  keep = np.zeros(table.shape[0], bool)
  keep[used] = True
  params = dict(params, token_embedding={"embedding": np.where(keep[:, None], table, 0).astype(table.dtype)})
  return params


def clip_config(config) -> ClipConfig:
  m = config.model
  resnet = tuple(m.get("resnet_layers") or ())  # open_clip's ModifiedResNet (RN50's layout, smaller)
  vision = VisionConfig(image_size=config.clip_image_size, patch_size=None if resnet else m.patch_size,
                        width=m.width, layers=resnet or m.layers, head_width=m.head_width)
  text = TextConfig(context_length=m.context_length, width=m.text_width,
                    heads=max(1, m.text_width // m.head_width), layers=m.text_layers)
  return ClipConfig(embed_dim=m.embed_dim, vision=vision, text=text)


def check_caption_weights(weights, n: int) -> None:
  """None / () (the default), or n finite weights >= 0, the first (the canonical caption, all
  a scene without shapes has) above 0."""
  if not weights:
    return
  ok = (isinstance(weights, (tuple, list)) and len(weights) == n
        and all(isinstance(w, (int, float)) and not isinstance(w, bool) and np.isfinite(w) and w >= 0
                for w in weights) and weights[0] > 0)
  if not ok:
    raise ValueError(f"caption_weights must be {n} finite numbers >= 0 (canonical, largest shape with "
                     "colour, largest shape, all shapes), the first above 0, e.g. "
                     f"'(0.1,0.15,0.75,0.0)'; got {weights!r}")


def create(config, devices=None) -> ClipPretrainTask:
  loop.validate_common(config)
  common.validate_batches(config, ("clip_batch_size",))
  if config.clip_batch_size < 2:
    raise ValueError("clip_batch_size must be >= 2 (contrastive learning needs negatives)")
  if not (isinstance(config.get("hard_negatives", 0), int) and config.get("hard_negatives", 0) >= 0):
    raise ValueError(f"hard_negatives must be an int >= 0, got {config.get('hard_negatives')!r}")
  from samclip_jax.data import sample
  check_caption_weights(config.get("caption_weights"), len(sample.CAPTION_WEIGHTS))
  mesh, rules = common.pretraining_mesh(config, devices, "clip_batch_size", ("clip_train", "clip_val"))
  cfg = clip_config(config)
  common.check_init_from(config, cfg, load_clip_config)
  boxed = jax.eval_shape(lambda: init_variables(cfg))["params"]
  tx, schedule, state_sh, trainable, frozen = loop.state_layout(config, boxed, mesh, rules)
  return ClipPretrainTask(config=config, mesh=mesh, rules=rules, clip_config=cfg,
                          model=CLIP(cfg, dtype=common.DTYPES[config.compute_dtype],
                                     batch_stats=cfg.vision.is_resnet), tx=tx,
                          schedule=schedule, state_shardings=state_sh,
                          aux_shardings={"class_tokens": sharding.replicated(mesh)},
                          trainable_paths=trainable, frozen_paths=frozen, class_names=sample.CLASSES,
                          started_from=common.started_from(config))
