"""Embedded sample: procedurally drawn scenes with exact masks, built once from a seed.

Each scene is a textured gradient background with 1-6 filled shapes (circle, rectangle,
triangle, ellipse, star) in named colours; later shapes occlude earlier ones and the
instance masks are the visible pixels, so masks, boxes and semantic maps are exact. The
sample holds a CLIP set (images + captions + label = class of the largest shape) and a SAM
set (images + instance masks), each with train / val splits, as ArrayRecord shards
(records.py) plus a COCO-format export of the val scenes for evaluation.
"""
import io
import json
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from samclip_jax.data import records

CLASSES = ("circle", "rectangle", "triangle", "ellipse", "star")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (230, 210, 40), "purple": (140, 60, 180), "orange": (240, 140, 30),
    "white": (245, 245, 245), "black": (20, 20, 20),
}
FORMAT_VERSION = 2
MIN_AREA = 48  # instances occluded below this many visible pixels are dropped
DEFAULTS = dict(seed=0, num_clip_train=160, num_clip_val=32, num_sam_train=96,
                num_sam_val=32, min_side=320, max_side=640, train_shards=2)


def _shape_mask(rng, cls: str, h: int, w: int, sizes=(0.07, 0.28)) -> np.ndarray:
  """Draws one filled shape (radius `sizes` x the shorter side) as an exact bool mask."""
  m = Image.new("L", (w, h), 0)
  d = ImageDraw.Draw(m)
  s = min(h, w)
  cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
  r = rng.uniform(*sizes) * s
  if cls == "circle":
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
  elif cls == "ellipse":
    a, b = r, r * rng.uniform(0.35, 0.65)
    ang = rng.uniform(0, np.pi)
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x, y = a * np.cos(t), b * np.sin(t)
    pts = np.stack([cx + x * np.cos(ang) - y * np.sin(ang), cy + x * np.sin(ang) + y * np.cos(ang)], 1)
    d.polygon([tuple(p) for p in pts], fill=1)
  elif cls == "rectangle":
    hw, hh = r * rng.uniform(0.6, 1.2), r * rng.uniform(0.4, 1.0)
    d.rectangle([cx - hw, cy - hh, cx + hw, cy + hh], fill=1)
  elif cls == "triangle":
    ang = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
    d.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in ang], fill=1)
  elif cls == "star":
    ang = rng.uniform(0, 2 * np.pi) + np.arange(10) * np.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    d.polygon([(cx + q * np.cos(a), cy + q * np.sin(a)) for a, q in zip(ang, rad)], fill=1)
  else:
    raise ValueError(cls)
  return np.asarray(m, dtype=bool)


def _smooth(rng, sh: int, sw: int, amplitude: float) -> np.ndarray:
  """Low-frequency noise [sh, sw] (a random coarse grid, bilinearly upsampled)."""
  grid = rng.uniform(-amplitude, amplitude, (int(rng.integers(2, 10)), int(rng.integers(2, 10))))
  return np.asarray(Image.fromarray(grid.astype(np.float32), "F").resize((sw, sh), Image.BILINEAR))


def _background(rng, h: int, w: int) -> np.ndarray:
  """A random background, int16 [H,W,3]: gradient, stripes, checkerboard or blotches, with texture.

  Varied on purpose: the teachers and the merged model must not learn one renderer's look.
  """
  # Smooth parts are drawn at 1/8 size and upsampled; patterns at full size.
  sh, sw = -(-h // 8), -(-w // 8)
  c0, c1 = rng.uniform(20, 235, (2, 3))
  kind = rng.choice(["gradient", "gradient", "stripes", "checker", "blotches"])
  ang = rng.uniform(0, 2 * np.pi)
  if kind == "gradient":
    t = np.arange(sw)[None, :] * np.cos(ang) + np.arange(sh)[:, None] * np.sin(ang)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    t = np.asarray(Image.fromarray(t.astype(np.float32), "F").resize((w, h), Image.BILINEAR))
  elif kind == "stripes":
    period = rng.uniform(0.05, 0.3) * min(h, w)
    t = np.arange(w)[None, :] * np.cos(ang) + np.arange(h)[:, None] * np.sin(ang)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * t / period) * rng.uniform(0.3, 1.0)
  elif kind == "checker":
    cell = max(int(rng.uniform(0.04, 0.2) * min(h, w)), 2)
    t = ((np.arange(h)[:, None] // cell + np.arange(w)[None, :] // cell) % 2).astype(np.float32)
    t = t * rng.uniform(0.3, 1.0)
  else:
    t = np.asarray(Image.fromarray(_smooth(rng, sh, sw, 1.0), "F").resize((w, h), Image.BILINEAR))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
  tex = np.asarray(Image.fromarray(_smooth(rng, sh, sw, rng.uniform(5, 35)), "F").resize((w, h), Image.BILINEAR))
  img = c0 + t[..., None] * (c1 - c0) + tex[..., None]
  return np.clip(img, 0, 255).astype(np.int16)


def draw_scene(seed: int, index: int, min_side: int = 320, max_side: int = 640, max_shapes: int = 6,
               sizes=(0.07, 0.28)) -> dict:
  """One deterministic scene: image uint8 [H,W,3], masks bool [N,H,W], classes, colours.

  1..max_shapes shapes of radius `sizes` (fractions of the shorter side); the defaults draw
  the world every split uses.
  """
  rng = np.random.default_rng([seed, index])
  h, w = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
  img = _background(rng, h, w)
  inst = np.zeros((h, w), np.int32)
  shapes = []
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  for i in range(int(rng.integers(1, max_shapes + 1))):
    cls = CLASSES[int(rng.integers(len(CLASSES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    m = _shape_mask(rng, cls, h, w, sizes)
    # Shading: a brightness factor and a linear light gradient across the shape.
    ang = rng.uniform(0, 2 * np.pi)
    light = rng.uniform(-0.12, 0.12) * ((xx * np.cos(ang) + yy * np.sin(ang)) / max(h, w) - 0.5)
    factor = rng.uniform(0.85, 1.1) + light[m][:, None]
    img[m] = np.clip(np.asarray(COLOURS[colour])[None, :] * factor, 0, 255).astype(np.int16)
    inst[m] = i + 1
    shapes.append((cls, colour))
  img += rng.integers(-10, 11, img.shape, dtype=np.int16) * np.int16(rng.integers(0, 3))  # sensor noise
  img = np.clip(img, 0, 255).astype(np.uint8)
  if rng.uniform() < 0.25:  # slight defocus now and then
    img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2))))
  masks, classes, colours = [], [], []
  for i, (cls, colour) in enumerate(shapes):
    m = inst == i + 1
    if m.sum() >= MIN_AREA:
      masks.append(m)
      classes.append(CLASSES.index(cls) + 1)  # category ids start at 1; 0 = background
      colours.append(colour)
  masks = np.stack(masks) if masks else np.zeros((0, h, w), bool)
  semantic = np.zeros((h, w), np.uint8)
  for m, c in zip(masks, classes):
    semantic[m] = c
  return {"image": img, "masks": masks, "classes": classes, "colours": colours,
          "semantic": semantic}


CAPTION_PREFIX = "a photo of a "  # every caption starts so; training swaps it for a template


def caption(scene: dict) -> str:
  """'a photo of a red circle and a blue star', largest shapes first (at most 3)."""
  if not scene["classes"]:
    return CAPTION_PREFIX + "plain background"
  order = np.argsort([-m.sum() for m in scene["masks"]], kind="stable")[:3]
  parts = [f"a {scene['colours'][i]} {CLASSES[scene['classes'][i] - 1]}" for i in order]
  body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
  return "a photo of " + body


# How often CLIP pretraining draws each of caption_variants (canonical, largest shape with
# colour, largest shape, all shapes): shape-only captions most, so shape words get learned.
CAPTION_WEIGHTS = (0.15, 0.15, 0.35, 0.35)


def caption_variants(scene: dict) -> list[str]:
  """Other true descriptions of a scene (training captions for CLIP): the largest shape with
  and without its colour, all shapes without colours. The canonical caption comes first."""
  out = [caption(scene)]
  if scene["classes"]:
    order = np.argsort([-m.sum() for m in scene["masks"]], kind="stable")[:3]
    names = [CLASSES[scene["classes"][i] - 1] for i in order]
    big = order[0]
    out += [f"a photo of a {scene['colours'][big]} {names[0]}", f"a photo of a {names[0]}",
            "a photo of " + " and ".join(f"a {n}" for n in names)]
  return out


def label(scene: dict) -> int:
  """Class index (0-based into CLASSES) of the largest visible shape, -1 if none."""
  if not scene["classes"]:
    return -1
  return scene["classes"][int(np.argmax([m.sum() for m in scene["masks"]]))] - 1


def _encode_image(img: np.ndarray, png: bool) -> bytes:
  buf = io.BytesIO()
  if png:
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
  else:
    Image.fromarray(img).save(buf, format="JPEG", quality=92)
  return buf.getvalue()


def _bbox(m: np.ndarray) -> list[float]:
  ys, xs = np.nonzero(m)
  return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _build(root: str, cfg: dict) -> None:
  """Draws every split and writes shards, manifests and the COCO export under root."""
  splits = [("clip_train", cfg["num_clip_train"], cfg["train_shards"]),
            ("clip_val", cfg["num_clip_val"], 1),
            ("sam_train", cfg["num_sam_train"], cfg["train_shards"]),
            ("sam_val", cfg["num_sam_val"], 1)]
  coco_dir = os.path.join(root, "coco")
  for sub in ("images", "semantic", "clip_images"):
    os.makedirs(os.path.join(coco_dir, sub))
  cats = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
  coco = {"images": [], "annotations": [], "categories": cats}
  classification = []
  offset = 0
  for split, n, n_shards in splits:
    encoded = []
    for i in range(n):
      scene = draw_scene(cfg["seed"], offset + i, cfg["min_side"], cfg["max_side"])
      key = f"{split}_{i:05d}"
      png = (i % 16) == 5  # a few PNGs so both decoders are exercised
      img_bytes = _encode_image(scene["image"], png)
      fname = key + (".png" if png else ".jpg")
      h, w = scene["image"].shape[:2]
      rec = {"key": key, "image": img_bytes, "height": h, "width": w}
      if split.startswith("clip"):
        rec["caption"] = caption(scene)
        rec["label"] = label(scene)
      else:
        rec["masks"] = records.encode_masks(scene["masks"])
        rec["classes"] = list(scene["classes"])
      encoded.append(records.encode(rec))
      if split == "sam_val":
        with open(os.path.join(coco_dir, "images", fname), "wb") as f:
          f.write(img_bytes)
        Image.fromarray(scene["semantic"]).save(os.path.join(coco_dir, "semantic", key + ".png"))
        image_id = i + 1
        coco["images"].append({"id": image_id, "file_name": fname, "height": h, "width": w})
        for m, c, rle in zip(scene["masks"], scene["classes"], rec["masks"]):
          coco["annotations"].append({
              "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": c,
              "segmentation": rle, "area": float(m.sum()), "bbox": _bbox(m), "iscrowd": 0})
      elif split == "clip_val":
        with open(os.path.join(coco_dir, "clip_images", fname), "wb") as f:
          f.write(img_bytes)
        classification.append({"file_name": fname, "label": rec["label"], "caption": rec["caption"]})
    offset += n
    per = -(-n // n_shards)
    files = []
    for s in range(n_shards):
      path = os.path.join(root, records.shard_name(split, s, n_shards))
      records.write_shard(path, encoded[s * per:(s + 1) * per])
      files.append(path)
    records.write_split_manifest(os.path.join(root, split + ".json"), files,
                                 {"split": split, "source": "embedded_sample"})
  with open(os.path.join(coco_dir, "instances_val.json"), "w") as f:
    json.dump(coco, f)
  with open(os.path.join(coco_dir, "classification_val.json"), "w") as f:
    json.dump(classification, f)
  with open(os.path.join(root, "classes.json"), "w") as f:
    json.dump({"classes": list(CLASSES), "semantic_background": 0,
               "semantic_value": "category id (1-based index into classes)"}, f, indent=2)


def _paths(root: str) -> dict:
  coco = os.path.join(root, "coco")
  return {
      "root": root,
      "clip_train": os.path.join(root, "clip_train.json"),
      "clip_val": os.path.join(root, "clip_val.json"),
      "sam_train": os.path.join(root, "sam_train.json"),
      "sam_val": os.path.join(root, "sam_val.json"),
      "classes": os.path.join(root, "classes.json"),
      "coco_images": os.path.join(coco, "images"),
      "coco_instances": os.path.join(coco, "instances_val.json"),
      "semantic_labels": os.path.join(coco, "semantic"),
      "classification_images": os.path.join(coco, "clip_images"),
      "classification_labels": os.path.join(coco, "classification_val.json"),
      "manifest": os.path.join(root, "manifest.json"),
  }


def _is_built(root: str, cfg: dict) -> bool:
  try:
    with open(os.path.join(root, "manifest.json")) as f:
      m = json.load(f)
  except (OSError, ValueError):
    return False
  return m.get("version") == FORMAT_VERSION and m.get("config") == cfg


def _check_replaceable(root: str) -> None:
  """Refuses to build over anything but nothing, an empty directory or a sample of ours (any
  version): a user's directory given as sample_dir is never deleted."""
  if not os.path.lexists(root):
    return
  if not os.path.isdir(root) or os.path.islink(root):
    raise FileExistsError(f"sample directory {root} exists and is not a directory of the embedded sample")
  try:
    with open(os.path.join(root, "manifest.json")) as f:
      ours = {"version", "config", "counts"} <= set(json.load(f))
  except (OSError, ValueError, TypeError):
    ours = False
  if os.listdir(root) and not ours:
    raise FileExistsError(f"{root} holds files that are not the embedded sample's; the sample is "
                          "not built there (choose an empty or new directory)")


def ensure_sample(directory: str, **overrides) -> dict:
  """Builds the embedded sample in `directory` once (atomic) and returns its paths.

  Paths: clip_train / clip_val / sam_train / sam_val (split manifests, accepted by the
  loaders), classes (JSON), coco_images + coco_instances + semantic_labels (COCO export of
  sam_val; semantic PNGs hold category ids, 0 = background), classification_images +
  classification_labels (clip_val with labels and captions), manifest.
  """
  cfg = dict(DEFAULTS)
  unknown = set(overrides) - set(cfg)
  if unknown:
    raise TypeError(f"unknown sample options {sorted(unknown)}")
  cfg.update(overrides)
  root = os.path.abspath(directory)
  if _is_built(root, cfg):
    return _paths(root)
  _check_replaceable(root)
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700 whatever the umask: the user's umask decides
  try:
    t0 = time.time()
    _build(tmp, cfg)
    counts = {}
    for split in ("clip_train", "clip_val", "sam_train", "sam_val"):
      with open(os.path.join(tmp, split + ".json")) as f:
        counts[split] = json.load(f)["num_records"]
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
      json.dump({"version": FORMAT_VERSION, "config": cfg, "counts": counts,
                 "build_seconds": round(time.time() - t0, 2)}, f, indent=2)
    if os.path.exists(root) and not _is_built(root, cfg):
      _check_replaceable(root)  # again: the directory may have changed during the build
      shutil.rmtree(root)  # a sample of another version or config: rebuild
    try:
      os.rename(tmp, root)
    except OSError:
      # Another process finished first; its build is identical (same seed and config).
      if not _is_built(root, cfg):
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return _paths(root)
