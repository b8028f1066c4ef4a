"""SamClip: the merged model for users (zero-shot classification, semantic segmentation, SAM).

    model = SamClip.from_checkpoint("workdir/export")      # or a training workdir
    model.classify(image, ["cat", "dog"])                  # [("cat", 0.93), ("dog", 0.07)]
    model.encode_image([image1, image2])                   # unit CLIP-head embeddings [2, D]
    labels = model.segment_semantic(image, ["grass", "cat"], mode="clip+sam")   # [H,W]
    masks, scores = model.segment_text(image, "red star")  # instance masks [N,H,W], best first
    predictor = model.predictor()                          # SamPredictor, segment_anything's API
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(point_coords=np.array([[500, 375]]), point_labels=np.array([1]))
    records = model.mask_generator(points_per_side=16).generate(image)

The CLIP text encoder stays the frozen teacher's: a merged model directory carries it as a
`text_model/` sub-directory (an open_clip model directory with its tokenizer), or names
one in config.json under "text_model" or "clip_checkpoint" (train.py's export records the
converted teacher there; a path relative to the model directory or absolute; a teacher
shipped in the package is found in this installation, whichever checkout made the model);
`from_checkpoint(..., text_model=DIR)` overrides them. A model whose named teacher is gone
still loads: its SAM side works, and text calls say what to pass. A training workdir read
before its export uses WORKDIR/text_model/ (train.py writes it at the start of a
random-teacher run).

Images go in raw (PIL, or uint8 HxW / HxWx3 / HxWx4 arrays) and are resized and normalised
inside, as in ClipModel and SamPredictor; `encode_pixels` is the low-level call on uint8
batches already at the model's input size.
"""
import dataclasses
import functools
import json
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from samclip_jax import checkpoint
from samclip_jax.clip_model import ClipModel, check_class_names, one_image, ranked
from samclip_jax.data import transforms
from samclip_jax.data.transforms import as_rgb_uint8
from samclip_jax.interpolate import linear_matrix, linear_taps
from samclip_jax.models.sam import ABSENT, PIXEL_MEAN, PIXEL_STD, POSITIVE, build_sparse_prompt
from samclip_jax.models.samclip import (MODEL_TYPE, SamClipConfig, SamClipNet, load_samclip,
                                        sam_params_from_samclip)

TEXT_MODEL_DIR = "text_model"       # sub-directory of a merged model holding the text tower
TEXT_MODEL_KEY = "text_model"       # or config.json key naming an open_clip model directory
CLIP_RESOLUTION = 448               # CLIP-head-only segmentation (paper: 448 -> 28x28 patches)
CLASSIFY_RESOLUTION = 336           # paper's ImageNet number is at 336 px
NEG_LOGIT = -1e4                    # "no mask" logit: finite so bilinear resizing stays finite
TEXT_CONTRAST = ("background",)     # segment_text: what a patch is when it is not the query


class CheckpointNotFound(FileNotFoundError):
  """A path that is neither a merged model directory nor a training workdir with one."""


def load_image(path: str, annotated_hw=None) -> np.ndarray:
  """Reads an image file as uint8 RGB [H,W,3], upright as viewers show it (its EXIF orientation
  applied, unless only the stored pixels have the `annotated_hw` of annotations made on them:
  transforms.oriented); a clear error for missing / unreadable files."""
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path} is a directory, not an image file")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image not found: {path}")
  return transforms.read_image_file(
      path, "an image", lambda im: np.asarray(transforms.to_rgb(transforms.oriented(im, annotated_hw))))


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Shorter side -> size (PIL bicubic, as open_clip's eval transform), center crop: uint8."""
  img = Image.fromarray(image)
  w, h = img.size
  if w <= h:
    nw, nh = size, int(size * h / w)
  else:
    nw, nh = int(size * w / h), size
  if (nw, nh) != (w, h):
    img = img.resize((nw, nh), Image.BICUBIC)
  top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
  return np.asarray(img.crop((left, top, left + size, top + size)))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
  """Whole image squashed to size x size (PIL bilinear): every pixel keeps a patch."""
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


LABEL_MODES = ("crop", "dense")
# The mean pixel the merged model's input is normalised by: it reads as zero, "nothing here".
MEAN_PIXEL = tuple(round(v) for v in PIXEL_MEAN)


def mask_crop(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The mask's bounding box of `image`, pixels outside the mask in the mean colour, centred on a
  square of it (so a centre crop keeps all of it): uint8 [S,S,3]."""
  ys, xs = np.nonzero(mask)
  y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
  fill = np.asarray(MEAN_PIXEL, np.uint8)
  box = np.where(mask[y0:y1, x0:x1, None], image[y0:y1, x0:x1], fill)
  h, w = box.shape[:2]
  side = max(h, w)
  out = np.full((side, side, 3), fill, np.uint8)
  out[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = box
  return out


def sam_input(image: np.ndarray, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
  """SAM's preprocessing: longest side -> image_size (PIL bilinear), normalise, zero pad."""
  from samclip_jax.predictor import get_preprocess_shape
  h, w = image.shape[:2]
  nh, nw = get_preprocess_shape(h, w, image_size)
  resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  x = (resized.astype(np.float32) - np.array(PIXEL_MEAN, np.float32)) / np.array(PIXEL_STD, np.float32)
  out = np.zeros((1, image_size, image_size, 3), np.float32)  # pad after normalising, as SAM
  out[0, :nh, :nw] = x
  return out, (nh, nw)


def normalize_sam(images):
  """uint8 [..., 3] -> float32 with SAM's pixel mean / std (the student's normalisation)."""
  x = jnp.asarray(images, jnp.float32)
  return (x - jnp.asarray(PIXEL_MEAN, jnp.float32)) / jnp.asarray(PIXEL_STD, jnp.float32)


def _l2(x, axis=-1):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- locating checkpoints
WORKDIR_MODEL_CONFIG = "model_config.json"   # a training workdir's model description


def _latest_step(workdir: str) -> int | None:
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    return None
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(os.path.abspath(ckpt_dir))
  try:
    return mngr.latest_step()
  finally:
    mngr.close()


def resolve_checkpoint(path: str) -> dict:
  """Where a model's config and params live.

  -> {"meta": config.json contents (model_type, sizes, teacher paths), "model_dir": a model
  directory to load or None, "workdir_step": Orbax step to restore or None, "base": the
  directory relative text-model paths start from}. A merged model directory is read as it
  is. A training workdir (train.py) gives its latest Orbax checkpoint under checkpoints/
  when it is newer than its export/ (the merged model written at the end of a run); the
  model's sizes then come from export/config.json or WORKDIR/model_config.json.
  """
  if not os.path.exists(path):
    raise CheckpointNotFound(f"checkpoint not found: {path}")
  if os.path.isfile(os.path.join(path, checkpoint.CONFIG_FILE)):
    return {"meta": checkpoint.load_config(path), "model_dir": path, "workdir_step": None, "base": path}
  export = os.path.join(path, "export")
  has_export = os.path.isfile(os.path.join(export, checkpoint.CONFIG_FILE))
  step = _latest_step(path)
  if step is None and has_export:
    return {"meta": checkpoint.load_config(export), "model_dir": export, "workdir_step": None, "base": export}
  if step is None:
    raise CheckpointNotFound(
        f"{path} is neither a model directory (no {checkpoint.CONFIG_FILE}) nor a training workdir "
        f"(no export/ model directory, no checkpoints/ steps)")
  if has_export:
    meta = checkpoint.load_config(export)
    if int(meta.get("step", -1)) >= step:
      return {"meta": meta, "model_dir": export, "workdir_step": None, "base": export}
    return {"meta": meta, "model_dir": None, "workdir_step": step, "base": export}
  cfg_path = os.path.join(path, WORKDIR_MODEL_CONFIG)
  if not os.path.isfile(cfg_path):
    raise CheckpointNotFound(
        f"{path} has checkpoints (latest step {step}) but no model description: neither export/ "
        f"nor {WORKDIR_MODEL_CONFIG} (SamClipConfig.to_dict() of the run)")
  with open(cfg_path) as f:
    meta = json.load(f)
  meta.setdefault("model_type", MODEL_TYPE)
  return {"meta": meta, "model_dir": None, "workdir_step": step, "base": path}


def restore_workdir_params(workdir: str, step: int) -> dict:
  """Student params (trainable + frozen merged) of a train.py Orbax step, on one device.

  Reads only state.params / state.frozen (partial restore: no optimizer state in memory).
  """
  import orbax.checkpoint as ocp
  from flax import traverse_util
  item = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
  meta = dict(ocp.StandardCheckpointer().metadata(item).item_metadata)
  missing = {"params", "frozen"} - set(meta)
  if missing:
    raise CheckpointNotFound(f"{item}: not a train.py state (missing {sorted(missing)})")
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                        {k: meta[k] for k in ("params", "frozen")})
  restored = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  flat = dict(traverse_util.flatten_dict(restored["frozen"] or {}))
  flat.update(traverse_util.flatten_dict(restored["params"]))
  return traverse_util.unflatten_dict(flat)


def model_type(path: str) -> str:
  """model_type of a model directory or of a training workdir's model."""
  return resolve_checkpoint(path)["meta"].get("model_type")


def _text_model_path(base: str, meta: dict) -> str | None:
  """The CLIP text tower of a merged model or workdir: text_model/ sub-directory, then config keys."""
  sub = os.path.join(base, TEXT_MODEL_DIR)
  if os.path.isfile(os.path.join(sub, checkpoint.CONFIG_FILE)):
    return sub
  for key in (TEXT_MODEL_KEY, "clip_checkpoint"):   # clip_checkpoint: train.py's export
    ref = meta.get(key)
    if not ref:
      continue
    ref = ref if os.path.isabs(ref) else os.path.normpath(os.path.join(base, ref))
    if os.path.isfile(os.path.join(ref, checkpoint.CONFIG_FILE)):
      return ref
    shipped = _shipped_teacher_at(ref)
    if shipped:   # a shipped teacher, named where the package was when the model was made
      return shipped
    raise CheckpointNotFound(f"{base}: config.json's {key} names {ref}, which is not a model directory; "
                             "give the CLIP teacher's directory (predict --text-model DIR, "
                             "SamClip.from_checkpoint(..., text_model=DIR))")
  return None


def _shipped_teacher_at(ref: str) -> str | None:
  """This installation's copy of a teacher shipped in the package, if `ref` is the path of one
  in another checkout or installation (.../samclip_jax/assets/teachers/NAME)."""
  from configs.common import TEACHERS_DIR, shipped_teacher
  parts = os.path.normpath(ref).split(os.sep)
  if len(parts) < 4 or parts[-4:-1] != ["samclip_jax", *TEACHERS_DIR]:
    return None
  here = shipped_teacher(parts[-1])
  return here if os.path.isfile(os.path.join(here, checkpoint.CONFIG_FILE)) else None


# ----------------------------------------------------------------------------- the model
def _net(cfg) -> SamClipNet:
  config, dtype = cfg
  return SamClipNet(config, dtype=dtype)


@functools.partial(jax.jit, static_argnums=0)
def _pooled(cfg, params, images_uint8):
  p, _ = _net(cfg).apply({"params": params}, normalize_sam(images_uint8), method=SamClipNet.clip_features)
  return _l2(p)


@functools.partial(jax.jit, static_argnums=0)
def _patches(cfg, params, images_uint8):
  _, patch = _net(cfg).apply({"params": params}, normalize_sam(images_uint8), method=SamClipNet.clip_features)
  return _l2(patch)


@functools.partial(jax.jit, static_argnums=0)
def _encode_both(cfg, params, x):
  """One backbone pass -> (SAM image embeddings, unit CLIP-head patch embeddings)."""
  net = _net(cfg)
  emb, aux = net.apply({"params": params}, x, method=SamClipNet.encode_image)
  _, patch = net.apply({"params": params}, aux["tokens"], method=SamClipNet.clip_features_from_tokens)
  return emb, _l2(patch)


@functools.partial(jax.jit, static_argnums=0)
def _decode(cfg, params, emb, coords, labels, mask_input):
  low, _ = _net(cfg).apply({"params": params}, emb, coords, labels, mask_input, False,
                           method=SamClipNet.predict_masks)
  return low


@functools.partial(jax.jit, static_argnums=0)
def _decode_multimask(cfg, params, emb, coords, labels):
  """Point prompts, no mask input -> (low-res logits [B,K,3,h,w], predicted IoUs [B,K,3])."""
  return _net(cfg).apply({"params": params}, emb, coords, labels, None, True, method=SamClipNet.predict_masks)


class SamClip:
  """Merged SAM-CLIP model: CLIP head (classification, semantic segmentation) + SAM head."""

  def __init__(self, config: SamClipConfig, params, text_model=None, dtype=jnp.float32,
               resolution: int | None = None):
    dim = getattr(getattr(text_model, "config", None), "embed_dim", None)
    if dim is not None and dim != config.out_dim:
      raise ValueError(f"the text model embeds into {dim} dims but this SamClip's CLIP head into "
                       f"{config.out_dim}: it is not the teacher this model was distilled from")
    self.config = config
    # CLIP-head input sizes when a call names none: the paper's (336 classification, 448
    # segmentation), or the one resolution a model was trained for (its config.json's
    # "inference_resolution", e.g. 128 for the embedded world's models).
    self.classify_resolution = resolution or CLASSIFY_RESOLUTION
    self.segment_resolution = resolution or CLIP_RESOLUTION
    self.params = jax.device_put(nn.unbox(params))
    self.text_model = text_model       # a ClipModel (frozen teacher) or None
    self._missing_text = None          # why from_checkpoint found no text model it was told of
    self.module = SamClipNet(config, dtype=dtype)
    self._classifiers: dict = {}
    # Compiled once per (config, dtype) for the process, whichever instance calls.
    cfg = (config, dtype)
    self._pooled = lambda p, x: _pooled(cfg, p, x)
    self._patches = lambda p, x: _patches(cfg, p, x)
    self._encode_both = lambda p, x: _encode_both(cfg, p, x)
    self._decode = lambda p, emb, coords, labels, mask_input: _decode(cfg, p, emb, coords, labels, mask_input)
    self._decode_multimask = lambda p, emb, coords, labels: _decode_multimask(cfg, p, emb, coords, labels)

  # -------------------------------------------------------------- loading
  @classmethod
  def from_checkpoint(cls, path: str, text_model=None, dtype=jnp.float32) -> "SamClip":
    """A merged model directory (config.json model_type "samclip") or a training workdir.

    `text_model`: a ClipModel or an open_clip model directory (the teacher); default: the
    one the model directory carries or names (see the module docstring).
    """
    where = resolve_checkpoint(path)
    meta = where["meta"]
    if meta.get("model_type") != MODEL_TYPE:
      raise ValueError(f"{path} holds a {meta.get('model_type')!r} model, expected {MODEL_TYPE!r}")
    if where["model_dir"] is not None:
      config, params = load_samclip(where["model_dir"])
    else:
      known = {f.name for f in dataclasses.fields(SamClipConfig)}
      config = SamClipConfig.from_dict({k: v for k, v in meta.items() if k in known})
      params = restore_workdir_params(path, where["workdir_step"])
    missing = None
    if text_model is None:
      try:
        text_model = _text_model_path(where["base"], meta)
      except CheckpointNotFound as e:   # the image side works without it; text calls say why not
        missing = str(e)
    if isinstance(text_model, str):
      text_model = ClipModel.from_checkpoint(text_model)
    model = cls(config, params, text_model, dtype=dtype, resolution=meta.get("inference_resolution"))
    model._missing_text = missing
    return model

  # -------------------------------------------------------------- text side
  def _require_text(self):
    if self.text_model is None and self._missing_text:
      raise CheckpointNotFound(self._missing_text)
    if self.text_model is None:
      raise ValueError(
          "this SamClip model has no CLIP text encoder: its directory has no text_model/ and its "
          "config.json names none; pass text_model=<open_clip model directory> (the CLIP teacher)")
    return self.text_model

  @property
  def logit_scale(self) -> float:
    """The teacher's exp(logit_scale) (100 for released CLIPs): the softmax temperature."""
    return float(self._require_text().logit_scale)

  def text_classifier(self, class_names: Sequence[str], templates="imagenet80") -> jax.Array:
    """[C, D] unit class embeddings: prompt templates averaged (OpenAI's zero-shot recipe)."""
    from samclip_jax.templates import get_templates
    if not class_names:
      raise ValueError("give at least one class name")
    names = check_class_names(class_names)
    tpl = tuple(get_templates(templates) if isinstance(templates, str) else templates)
    key = (tuple(names), tpl)
    if key not in self._classifiers:
      self._classifiers[key] = self._require_text().zero_shot_classifier(names, tpl)
    return self._classifiers[key]

  # -------------------------------------------------------------- image side
  @staticmethod
  def _resolution(resolution, default: int) -> int:
    if resolution is None:
      return default
    if resolution < 16 or resolution % 16:
      raise ValueError(f"resolution must be a positive multiple of the patch size 16, got {resolution}")
    return int(resolution)

  def encode_pixels(self, images_uint8, dense: bool = False) -> jax.Array:
    """Low level: uint8 [B,R,R,3] at the input size (R a multiple of 16) -> unit pooled
    CLIP-head embeddings [B,D], or per-patch ones [B,R/16,R/16,D] when dense."""
    return (self._patches if dense else self._pooled)(self.params, images_uint8)

  def encode_image(self, images, resolution: int | None = None) -> jax.Array:
    """Raw images (one, or a list) -> unit pooled CLIP-head embeddings [N,D] (shorter side
    resized to `resolution`, center crop, as open_clip's eval transform)."""
    if isinstance(images, (Image.Image, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
      images = [images]
    if len(images) == 0:
      raise ValueError("encode_image needs at least one image")
    resolution = self._resolution(resolution, self.classify_resolution)
    return self.encode_pixels(np.stack([resize_center_crop(as_rgb_uint8(im), resolution) for im in images]))

  def classify(self, image, class_names: Sequence[str], templates="imagenet80",
               resolution: int | None = None) -> list[tuple[str, float]]:
    """[(class name, probability)], most likely first (softmax over the given classes)."""
    names = check_class_names(class_names)  # a generator is read once, here
    classifier = self.text_classifier(names, templates)
    emb = self.encode_image(one_image(image), resolution)
    return ranked(names, jax.nn.softmax(self.logit_scale * emb @ classifier.T, axis=-1)[0])

  def semantic_logits(self, image, class_names: Sequence[str], templates="imagenet80",
                      resolution: int | None = None) -> np.ndarray:
    """CLIP head alone: per-class logits [C,H,W] at the image size (bilinear from the patches)."""
    resolution = self._resolution(resolution, self.segment_resolution)
    image = as_rgb_uint8(image)
    h, w = image.shape[:2]
    classifier = self.text_classifier(class_names, templates)
    patch = self.encode_pixels(resize_square(image, resolution)[None], dense=True)[0]
    logits = self.logit_scale * jnp.einsum("hwd,cd->chw", patch, classifier, precision="highest")
    return resize_bilinear(np.asarray(logits), (h, w))

  def segment_semantic(self, image, class_names: Sequence[str], mode: str = "clip",
                       templates="imagenet80", threshold: float = 0.5, points_per_class: int = 3,
                       prompt_grid: int | None = 32, seed: int = 0,
                       resolution: int | None = None) -> np.ndarray:
    """Label map [H,W] (int32 indices into class_names).

    mode="clip": the image squashed to 448x448 (`resolution`), 28x28 patch embeddings vs the class text
    embeddings, logits upsampled bilinearly to the image, argmax.
    mode="clip+sam": see `segment_clip_sam` (1024 px, CLIP logits prompt the SAM head).
    """
    if mode == "clip":
      return np.argmax(self.semantic_logits(image, class_names, templates, resolution), axis=0).astype(np.int32)
    if mode == "clip+sam":
      if resolution is not None:   # it was dropped without a word
        raise ValueError("resolution is for mode='clip'; 'clip+sam' runs at SAM's input size "
                         f"({self.config.sam.image_size})")
      return self.segment_clip_sam(image, class_names, templates, threshold, points_per_class,
                                   prompt_grid, seed)[0]
    raise ValueError(f"mode must be 'clip' or 'clip+sam', got {mode!r}")

  def segment_clip_sam(self, image, class_names: Sequence[str], templates="imagenet80",
                       threshold: float = 0.5, points_per_class: int = 3, prompt_grid: int | None = 32,
                       seed: int = 0) -> tuple[np.ndarray, dict]:
    """CLIP+SAM composition (paper section 5): -> (label map [H,W], details).

    One 1024-px backbone pass feeds both heads. The CLIP head's per-patch class
    probabilities (softmax over classes of logit_scale * cosine; the 64x64 patches of a
    1024 input average-pooled to `prompt_grid`^2, 32 as in the paper; None or a grid at
    least the patch grid keeps the patches) make, for each class, a mask
    prompt (the probability map as logits log(p/(1-p)), bilinearly upsampled to SAM's 256x256
    mask-input frame) and up to `points_per_class` positive points drawn (seeded) among the
    cells with p > threshold inside the image. Classes without such a cell are not prompted.
    The SAM head returns one 256x256 logit map per prompted class; they are upscaled to the
    image as SAM's masks are, and each pixel takes the class of the largest logit.
    Background rule: a pixel that no class's SAM mask covers (every logit <= 0) takes the
    CLIP head's own label there (so a "background" class, when listed, fills the rest).
    details: prompted [C] bool, points [C,P,2] (x, y) and point_labels [C,P] in SAM's input
    frame (the image scaled so its longest side is config.sam.image_size: divide by that
    scale for image pixels), covered_fraction.
    """
    class_names = check_class_names(class_names)   # a list: a generator has no len()
    if isinstance(points_per_class, bool) or not isinstance(points_per_class, (int, np.integer)) or points_per_class < 0:
      raise ValueError(f"points_per_class must be an integer >= 0, got {points_per_class!r}")
    if not 0.0 <= threshold <= 1.0:
      raise ValueError(f"threshold must be in [0, 1] (a class probability), got {threshold}")
    image = as_rgb_uint8(image)
    h, w = image.shape[:2]
    size = self.config.sam.image_size
    x, (nh, nw) = sam_input(image, size)
    classifier = self.text_classifier(class_names, templates)
    emb, patch = self._encode_both(self.params, x)
    grid = patch.shape[1]
    logits = self.logit_scale * jnp.einsum("hwd,cd->chw", patch[0], classifier, precision="highest")
    # CLIP-only labels at the image size, from the native grid (the fallback of the rule above).
    clip_full = upscale_low_res(np.asarray(logits), size, (nh, nw), (h, w))
    pooled = logits
    if prompt_grid is not None and prompt_grid < 1:
      raise ValueError(f"prompt_grid must be at least 1 (or None), got {prompt_grid}")
    if prompt_grid is not None and prompt_grid < grid:
      if grid % prompt_grid:
        raise ValueError(f"prompt_grid {prompt_grid} does not divide the {grid}x{grid} patch grid")
      f = grid // prompt_grid
      pooled = logits.reshape(len(class_names), prompt_grid, f, prompt_grid, f).mean(axis=(2, 4))
    g = pooled.shape[-1]
    probs = np.asarray(jax.nn.softmax(pooled, axis=0))                # [C,g,g]
    cell = size / g
    centres = (np.arange(g) + 0.5) * cell
    inside = (centres[:, None] < nh) & (centres[None, :] < nw)       # cells of real pixels
    rng = np.random.default_rng(seed)
    num_classes = len(class_names)
    coords = np.zeros((num_classes, points_per_class, 2), np.float32)
    labels = np.full((num_classes, points_per_class), ABSENT, np.int32)  # classes with fewer points
    prompted = np.zeros(num_classes, bool)
    for c in range(num_classes):
      ys, xs = np.nonzero((probs[c] > threshold) & inside)
      if len(ys) == 0:
        continue
      pick = rng.choice(len(ys), size=min(points_per_class, len(ys)), replace=False)
      coords[c, :len(pick)] = np.stack([centres[xs[pick]], centres[ys[pick]]], axis=-1)
      labels[c, :len(pick)] = POSITIVE
      prompted[c] = True
    p = np.clip(probs, 1e-6, 1 - 1e-6)
    mask_logits = np.where(inside[None], np.log(p) - np.log1p(-p), -20.0).astype(np.float32)
    mh, mw = self.config.sam.mask_input_size
    mask_input = jax.image.resize(jnp.asarray(mask_logits), (num_classes, mh, mw), "bilinear")
    sp_coords, sp_labels = build_sparse_prompt(coords, labels)
    low = self._decode(self.params, emb, sp_coords[None], sp_labels[None], mask_input[None, ..., None])
    low = np.where(prompted[:, None, None], np.asarray(low[0, :, 0]), NEG_LOGIT)
    full = upscale_low_res(low, size, (nh, nw), (h, w))               # [C,H,W]
    covered = full.max(axis=0) > 0
    label = np.where(covered, full.argmax(axis=0), clip_full.argmax(axis=0))
    details = {"prompted": prompted, "points": coords, "point_labels": labels,
               "covered_fraction": float(covered.mean())}
    return np.asarray(label, np.int32), details

  def label_masks(self, image, masks: Sequence[np.ndarray], class_names: Sequence[str],
                  templates="imagenet80", mode: str = "crop") -> list[tuple[str, float]]:
    """For each binary mask [H,W] (the image's size), its most likely class with its probability.

    mode "crop": the mask cut out (mask_crop: its box, the pixels outside it in the mean
    colour, centred on a square) and classified by the pooled CLIP-head embedding, the output
    distillation trains; "dense": the class whose per-patch CLIP-head logits are highest on
    average inside the mask, where the scene around a small mask weighs in (README: on the world's
    held-out scenes crops name instances' colours right 0.62 of the time, dense logits 0.41).
    """
    if mode not in LABEL_MODES:
      raise ValueError(f"label_masks mode must be one of {LABEL_MODES}, got {mode!r}")
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
      raise ValueError(f"masks is one {masks.shape[0]}x{masks.shape[1]} array: give a list of masks "
                       "(or an [N,H,W] array), e.g. [mask]")
    if len(masks) == 0:
      return []
    image = as_rgb_uint8(image)
    class_names = check_class_names(class_names)
    for i, m in enumerate(masks):
      if np.shape(m) != image.shape[:2]:
        raise ValueError(f"mask {i} has shape {np.shape(m)}; masks must be HxW like the image, "
                         f"{image.shape[0]}x{image.shape[1]}")
      m = np.asarray(m)
      if m.dtype != bool and not ((m == 0) | (m == 1)).all():
        raise ValueError(f"mask {i} is not binary (values in [{m.min()}, {m.max()}]): give bool or 0/1 masks")
      if not m.any():
        raise ValueError(f"mask {i} is empty: no pixel to name")
    if mode == "crop":
      emb = self.encode_image([mask_crop(image, np.asarray(m, bool)) for m in masks])
      mean = self.logit_scale * emb @ self.text_classifier(class_names, templates).T
    else:
      logits = self.semantic_logits(image, class_names, templates)            # [C,H,W]
      m = np.stack([np.asarray(x, np.float32) for x in masks])                  # [N,H,W]
      area = np.maximum(m.sum(axis=(1, 2)), 1.0)
      mean = np.einsum("nhw,chw->nc", m, logits) / area[:, None]
    probs = np.asarray(jax.nn.softmax(mean, axis=-1))
    best = probs.argmax(axis=-1)
    return [(class_names[i], float(probs[n, i])) for n, i in enumerate(best)]

  # -------------------------------------------------------------- text-prompted instances
  def segment_text(self, image, text: str, contrast: Sequence[str] = TEXT_CONTRAST,
                   templates="imagenet80", threshold: float | None = None, nms_thresh: float = 0.5,
                   max_candidates: int = 16, min_score: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Instances a free-text query names -> (masks bool [N,H,W], scores float32 [N]), best first.

    Relevance is segment_semantic's zero-shot rule with the query as one class and `contrast`
    (default "background"; name the other things the image may hold for a sharper query) as
    the rest: on the one backbone pass at SAM's input size (1024 px) that feeds both heads,
    each CLIP-head patch gets logits logit_scale * cosine with the prompts' text embeddings
    and p(query) = softmax over [text, *contrast]. Candidates: the local maxima (3x3) of
    p(query) over the patches inside the image (only those with p(query) > `threshold` when one
    is given), the `max_candidates` highest, each a positive point prompt for the SAM head.
    Each of SAM's three masks per point is scored p_mask x predicted IoU (clipped to [0, 1]),
    p_mask the query's probability from the mean logits inside the mask (logits bilinearly
    upsampled to the image, as label_masks names masks); the best non-empty mask of each point
    is kept, then greedy NMS on mask IoU (> `nms_thresh` suppressed, `mask_nms`); masks scored
    below `min_score` are dropped. It ranks, it does not decide presence: without `threshold`
    or `min_score` a query the image does not hold still gets its best guesses, low-scored
    (a patch need not be more like the query than like every contrast prompt: with a weak CLIP
    the true instance often is not, README). No candidate, or no mask left: 0 masks ([0,H,W]
    and [0]).
    """
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f"segment_text needs a non-empty text query, got {text!r}")
    if threshold is not None and not 0.0 <= threshold < 1.0:
      raise ValueError(f"threshold must be None or in [0, 1), got {threshold}")
    if max_candidates < 1:
      raise ValueError(f"max_candidates must be at least 1, got {max_candidates}")
    if not 0.0 <= nms_thresh <= 1.0:
      raise ValueError(f"nms_thresh must be in [0, 1] (a mask IoU), got {nms_thresh}")
    if not 0.0 <= min_score <= 1.0:
      raise ValueError(f"min_score must be in [0, 1] (scores are p_mask x predicted IoU), got {min_score}")
    query = " ".join(text.lower().split())
    others = [c for c in check_class_names(contrast) if " ".join(c.lower().split()) != query]
    if not others:
      raise ValueError(f"the contrast set {list(contrast)} holds nothing but the query {text!r}: "
                       "relevance needs at least one other prompt")
    image = as_rgb_uint8(image)
    h, w = image.shape[:2]
    nothing = np.zeros((0, h, w), bool), np.zeros((0,), np.float32)
    size = self.config.sam.image_size
    x, (nh, nw) = sam_input(image, size)
    classifier = self.text_classifier([text] + others, templates)
    emb, patch = self._encode_both(self.params, x)
    logits = np.asarray(self.logit_scale * jnp.einsum("hwd,cd->chw", patch[0], classifier, precision="highest"))
    relevance = np.asarray(jax.nn.softmax(logits, axis=0))[0]
    chosen = relevance > threshold if threshold is not None else np.ones_like(relevance, bool)
    points = text_candidates(relevance, chosen, size, (nh, nw), max_candidates)
    if len(points) == 0:
      return nothing
    # A fixed prompt batch (the first point repeated) so the decoder compiles once.
    k = len(points)
    batch = np.concatenate([points, np.repeat(points[:1], max_candidates - k, axis=0)])
    coords, labels = build_sparse_prompt(batch[:, None, :], np.full((max_candidates, 1), POSITIVE, np.int32))
    low, iou = self._decode_multimask(self.params, emb, coords[None], labels[None])
    low, iou = np.asarray(low[0, :k]), np.clip(np.asarray(iou[0, :k]), 0.0, 1.0)   # [k,3,h',w'], [k,3]
    # The mean upsampled CLIP logits inside a mask m, sum(m * a_h L a_w^T) / |m|, is
    # <a_h^T m a_w, L> / |m|: no [C,H,W] map; and one point's three masks at a time.
    a_h, a_w = upscale_matrices(logits.shape[-2:], size, (nh, nw), (h, w))
    masks, scores = [], []
    for i in range(k):
      m = upscale_low_res(low[i], size, (nh, nw), (h, w)) > 0                 # [3,H,W]
      area = m.sum(axis=(1, 2))
      weights = np.matmul(a_h.T, np.matmul(m.astype(np.float32), a_w))      # [3,g,g]
      inside = np.einsum("nyx,cyx->nc", weights, logits) / np.maximum(area, 1)[:, None]
      p_mask = np.asarray(jax.nn.softmax(inside, axis=1))[:, 0]
      score = np.where(area > 0, p_mask * iou[i], -np.inf)
      best = int(np.argmax(score))                                           # SAM's 3 -> 1 per point
      if np.isfinite(score[best]) and score[best] >= min_score:
        masks.append(m[best])
        scores.append(score[best])
    if not masks:
      return nothing
    masks, scores = np.stack(masks), np.asarray(scores, np.float32)
    keep = mask_nms(masks, scores, nms_thresh)
    return masks[keep], scores[keep]

  # -------------------------------------------------------------- SAM head
  def predictor(self):
    """A SamPredictor over the merged backbone + SAM head (segment_anything's API)."""
    from samclip_jax.predictor import SamPredictor
    return SamPredictor(self.config.sam, sam_params_from_samclip(self.params))

  def mask_generator(self, **kwargs):
    """SamAutomaticMaskGenerator over `predictor()`; kwargs as segment_anything's, defaults
    that suit this model (suited_settings for images at least its input size, as predict's)."""
    from samclip_jax.automatic_mask_generator import SamAutomaticMaskGenerator, suited_settings
    size = self.config.sam.image_size
    settings = suited_settings(size, size, size)
    if "point_grids" in kwargs:  # a grid given replaces the default points_per_side
      settings["points_per_side"] = None
    return SamAutomaticMaskGenerator(self.predictor(), **{**settings, **kwargs})


def resize_bilinear(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """[..., h, w] -> [..., H, W] float32 on the host (no compile per image size)."""
  x = np.asarray(x, np.float32)
  i0, i1, w0, w1 = linear_taps(x.shape[-1], out_hw[1])
  x = x[..., i0] * w0 + x[..., i1] * w1
  i0, i1, w0, w1 = linear_taps(x.shape[-2], out_hw[0])
  return x[..., i0, :] * w0[:, None] + x[..., i1, :] * w1[:, None]


def upscale_matrices(low_hw: tuple[int, int], image_size: int, input_size: tuple[int, int],
                     original_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """SAM's postprocess_masks as two matrices: masks [H,W] = a_h [H,h] @ low [h,w] @ a_w.T [w,W].

  Upscale to the padded input, crop the image part, resize to the original size, composed
  per axis (agrees with samclip_jax.predictor.postprocess_masks to float rounding).
  """
  (h, w), (ih, iw), (oh, ow) = low_hw, input_size, original_size
  a_h = linear_matrix(ih, oh) @ linear_matrix(h, image_size)[:ih]
  a_w = linear_matrix(iw, ow) @ linear_matrix(w, image_size)[:iw]
  return a_h.astype(np.float32), a_w.astype(np.float32)


def upscale_low_res(low: np.ndarray, image_size: int, input_size: tuple[int, int],
                    original_size: tuple[int, int]) -> np.ndarray:
  """SAM's postprocess_masks on the host: low-res [..., h, w] -> [..., H, W] float32, with no
  padded 1024x1024 intermediate and no compile per image size (see upscale_matrices)."""
  low = np.asarray(low, np.float32)
  a_h, a_w = upscale_matrices(low.shape[-2:], image_size, input_size, original_size)
  return np.matmul(a_h, np.matmul(low, a_w.T))


def text_candidates(relevance: np.ndarray, chosen: np.ndarray, image_size: int,
                    input_size: tuple[int, int], max_points: int) -> np.ndarray:
  """Point prompts (x, y in the model input frame) [K,2] from a patch-grid relevance map [g,g]:
  the local maxima (3x3) of relevance among the `chosen` patches inside the image, the
  `max_points` highest first."""
  from scipy import ndimage
  g = relevance.shape[0]
  centres = (np.arange(g) + 0.5) * (image_size / g)
  ok = chosen & (centres[:, None] < input_size[0]) & (centres[None, :] < input_size[1])
  r = np.where(ok, relevance, -1.0)
  ys, xs = np.nonzero(ok & (r == ndimage.maximum_filter(r, size=3, mode="constant", cval=-1.0)))
  order = np.argsort(-relevance[ys, xs], kind="stable")[:max_points]
  return np.stack([centres[xs[order]], centres[ys[order]]], axis=-1).astype(np.float32)


def mask_nms(masks: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
  """Indices kept by greedy NMS on mask IoU, by decreasing score (torchvision.ops.nms's rule,
  as automatic_mask_generator.nms, with the IoU of the masks [N,H,W] instead of their boxes)."""
  order = np.argsort(-np.asarray(scores, np.float32), kind="stable")
  if len(order) == 0:
    return order.astype(np.int64)
  flat = np.asarray(masks, bool).reshape(len(order), -1)[order].astype(np.float32)
  inter = flat @ flat.T
  area = np.diag(inter)
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = inter / (area[:, None] + area[None, :] - inter)   # two empty masks: NaN, never suppresses
  from samclip_jax.automatic_mask_generator import greedy_keep
  return order[greedy_keep(iou, iou_threshold)]
