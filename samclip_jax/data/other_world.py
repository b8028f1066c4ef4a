"""Scenes of the world's classes and colours drawn by other code: a held-out check of renderer overfitting.

Nothing trains on these. They share only the names with sample.draw_scene (5 shape classes,
8 colour names) and differ in everything else: shapes are rasterised analytically with 3x3
supersampling and alpha-blended (soft edges), rectangles and stars rotate freely, the palette's
shades are other ones, backgrounds are plain, noisy or a linear gradient without texture,
sides vary independently, and every image goes through JPEG at quality 50-90. A scene dict
has sample.draw_scene's keys (image, masks, classes, colours, semantic), so world_eval and
the tests measure on it unchanged.
"""
import io

import numpy as np
from PIL import Image

from samclip_jax.data import sample

PALETTE = {"red": (200, 20, 30), "green": (30, 150, 40), "blue": (20, 60, 200),
           "yellow": (250, 230, 60), "purple": (120, 40, 160), "orange": (255, 120, 0),
           "white": (255, 255, 255), "black": (0, 0, 0)}
assert set(PALETTE) == set(sample.COLOURS)
SUPERSAMPLE = 3
SEED_OFFSET = 7919  # its streams never meet the world's (seed, index) pairs


def _polygon(u, v, xs, ys) -> np.ndarray:
  """Even-odd point-in-polygon test of the points (u, v) against vertices (xs, ys)."""
  out = np.zeros(u.shape, bool)
  for j in range(len(xs)):
    x0, y0, x1, y1 = xs[j], ys[j], xs[j - 1], ys[j - 1]
    crosses = (y0 > v) != (y1 > v)
    out ^= crosses & (u < x0 + (v - y0) * (x1 - x0) / np.where(y1 == y0, 1e-12, y1 - y0))
  return out


def _inside(cls: str, u: np.ndarray, v: np.ndarray, r: float, aspect: float) -> np.ndarray:
  """Is each point (u, v), in the shape's own rotated frame centred on it, inside the shape?"""
  if cls == "circle":
    return u ** 2 + v ** 2 <= r ** 2
  if cls == "ellipse":
    return (u / r) ** 2 + (v / (r * aspect)) ** 2 <= 1
  if cls == "rectangle":
    return (np.abs(u) <= r) & (np.abs(v) <= r * (aspect + 0.3))
  if cls == "triangle":
    t = np.arange(3) * 2 * np.pi / 3
    return _polygon(u, v, r * np.cos(t), r * np.sin(t))
  if cls == "star":
    t = np.arange(10) * np.pi / 5
    q = np.where(np.arange(10) % 2 == 0, r, 0.42 * r)
    return _polygon(u, v, q * np.cos(t), q * np.sin(t))
  raise ValueError(cls)


def _background(rng, h: int, w: int) -> np.ndarray:
  base = rng.uniform(0, 255, 3)
  kind = rng.choice(["plain", "noise", "gradient"])
  if kind == "plain":
    return np.broadcast_to(base, (h, w, 3)).astype(np.float64)
  if kind == "noise":
    return base + rng.normal(0, rng.uniform(8, 30), (h, w, 3))
  ang = rng.uniform(0, 2 * np.pi)
  t = (np.arange(w)[None, :] * np.cos(ang) + np.arange(h)[:, None] * np.sin(ang)) / max(h, w)
  return base + (t - t.mean())[..., None] * rng.uniform(-150, 150, 3)


def draw_scene(seed: int, index: int, min_side: int = 160, max_side: int = 400, max_shapes: int = 4) -> dict:
  """One deterministic scene: image uint8 [H,W,3], masks bool [N,H,W], classes, colours, semantic."""
  rng = np.random.default_rng([seed, SEED_OFFSET, index])
  h, w = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
  img = _background(rng, h, w)
  s = SUPERSAMPLE
  ys, xs = (np.mgrid[0:h * s, 0:w * s] + 0.5) / s
  inst = np.zeros((h, w), np.int32)
  shapes = []
  for i in range(int(rng.integers(1, max_shapes + 1))):
    cls = sample.CLASSES[int(rng.integers(len(sample.CLASSES)))]
    colour = list(PALETTE)[int(rng.integers(len(PALETTE)))]
    r = rng.uniform(0.1, 0.35) * min(h, w)
    cx, cy = rng.uniform(0.5 * r, w - 0.5 * r), rng.uniform(0.5 * r, h - 0.5 * r)
    ang = rng.uniform(0, 2 * np.pi)
    u = (xs - cx) * np.cos(ang) + (ys - cy) * np.sin(ang)
    v = -(xs - cx) * np.sin(ang) + (ys - cy) * np.cos(ang)
    cover = _inside(cls, u, v, r, rng.uniform(0.4, 0.7)).reshape(h, s, w, s).mean((1, 3))
    img = img * (1 - cover[..., None]) + np.asarray(PALETTE[colour], np.float64) * cover[..., None]
    inst[cover >= 0.5] = i + 1
    shapes.append((cls, colour))
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(50, 91)))
  image = np.asarray(Image.open(buf).convert("RGB"))
  masks, classes, colours = [], [], []
  for i, (cls, colour) in enumerate(shapes):
    m = inst == i + 1
    if m.sum() >= sample.MIN_AREA:
      masks.append(m)
      classes.append(sample.CLASSES.index(cls) + 1)
      colours.append(colour)
  semantic = np.zeros((h, w), np.uint8)
  for m, c in zip(masks, classes):
    semantic[m] = c
  return {"image": image, "masks": np.stack(masks) if masks else np.zeros((0, h, w), bool),
          "classes": classes, "colours": colours, "semantic": semantic}
