"""Overlay pictures: class-coloured translucent masks, contours, prompts and a legend (PIL)."""
import colorsys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IGNORE_INDEX = 255
POSITIVE = (40, 220, 60)
NEGATIVE = (235, 40, 40)
BOX = (40, 220, 60)


def palette(n: int) -> list[tuple[int, int, int]]:
  """n distinct saturated RGB colours (golden-ratio hue steps), the same for every call."""
  out = []
  for i in range(n):
    h = (0.07 + i * 0.618033988749895) % 1.0
    s, v = (0.75, 0.95) if i % 2 == 0 else (0.6, 0.8)
    out.append(tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, s, v)))
  return out


def class_colours(names: Sequence[str]) -> list[tuple[int, int, int]]:
  """A colour per class: the one its name means when it names a colour ("red", "purple": PIL's
  CSS colours), else the palette's, so a legend never calls a green swatch "purple"."""
  from PIL import ImageColor
  out = palette(len(names))
  for i, name in enumerate(names):
    try:
      out[i] = ImageColor.getrgb(str(name).strip())[:3]
    except ValueError:
      pass
  return out


def _boundary(mask: np.ndarray, thickness: int) -> np.ndarray:
  """Pixels of `mask` within `thickness` of its edge (4-neighbour erosion)."""
  inner = mask.copy()
  for _ in range(thickness):
    p = np.pad(inner, 1)
    inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
  return mask & ~inner


def _thickness(h: int, w: int) -> int:
  return max(1, round(min(h, w) / 300))


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
  except TypeError:  # older Pillow: the fixed bitmap font
    return ImageFont.load_default()


def _blend(image: np.ndarray, masks: Sequence[np.ndarray], colours, alpha: float) -> np.ndarray:
  """Translucent fill then opaque contours, later masks on top."""
  out = image.astype(np.float32)
  t = _thickness(*image.shape[:2])
  for m, c in zip(masks, colours):
    c = np.asarray(c, np.float32)
    out[m] = (1 - alpha) * out[m] + alpha * c
  for m, c in zip(masks, colours):
    edge = _boundary(m, t)
    out[edge] = 0.4 * np.asarray(c, np.float32)   # darker shade of the class colour
  return np.clip(out, 0, 255).astype(np.uint8)


def add_legend(picture: Image.Image, entries: Sequence[tuple[str, tuple[int, int, int]]],
               title: str | None = None) -> Image.Image:
  """Appends a white panel on the right listing colour swatches with their names."""
  if not entries and not title:
    return picture
  h = picture.height
  size = max(12, min(24, h // 30))
  font = _font(size)
  probe = ImageDraw.Draw(picture)
  lines = ([title] if title else []) + [name for name, _ in entries]
  text_w = max(probe.textlength(s, font=font) for s in lines)
  pad, sw = size // 2, size
  row = size + pad
  panel_w = int(pad * 3 + sw + text_w)
  panel_h = max(h, pad * 2 + row * len(lines))
  out = Image.new("RGB", (picture.width + panel_w, panel_h), (255, 255, 255))
  out.paste(picture, (0, 0))
  d = ImageDraw.Draw(out)
  x0, y = picture.width + pad, pad
  if title:
    d.text((x0, y), title, fill=(0, 0, 0), font=font)
    y += row
  for name, colour in entries:
    d.rectangle([x0, y, x0 + sw, y + sw], fill=tuple(colour), outline=(0, 0, 0))
    d.text((x0 + sw + pad, y), name, fill=(0, 0, 0), font=font)
    y += row
  return out


def _draw_prompts(picture: Image.Image, points=None, point_labels=None, boxes=None) -> None:
  d = ImageDraw.Draw(picture)
  r = max(4, _thickness(picture.height, picture.width) * 5)
  if boxes is not None:
    for b in np.asarray(boxes, np.float64).reshape(-1, 4):
      d.rectangle([float(v) for v in b], outline=BOX, width=max(2, r // 3))
  if points is not None:
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    labels = np.ones(len(pts), int) if point_labels is None else np.asarray(point_labels).reshape(-1)
    for (x, y), lab in zip(pts, labels):
      d.ellipse([x - r, y - r, x + r, y + r], fill=POSITIVE if lab > 0 else NEGATIVE,
                outline=(255, 255, 255), width=max(1, r // 3))


def _draw_tags(picture: Image.Image, masks, tags, colours) -> None:
  d = ImageDraw.Draw(picture)
  font = _font(max(12, min(20, picture.height // 35)))
  for m, tag, c in zip(masks, tags, colours):
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
      continue
    x, y = int(xs.min()), int(ys.min())
    l, t, r, b = d.textbbox((x, y), tag, font=font)
    d.rectangle([l - 2, t - 2, r + 2, b + 2], fill=tuple(int(v * 0.5) for v in c))
    d.text((x, y), tag, fill=(255, 255, 255), font=font)


def overlay_semantic(image: np.ndarray, label_map: np.ndarray, class_names: Sequence[str],
                     alpha: float = 0.5, skip: Sequence[int] = (), title: str | None = None) -> Image.Image:
  """Colours each class of an HxW label map over the image; the legend lists classes present.

  Classes in `skip` (say a "background" index) and IGNORE_INDEX pixels stay uncoloured.
  """
  image = np.asarray(image)
  label_map = np.asarray(label_map)
  if label_map.shape != image.shape[:2]:
    raise ValueError(f"label map {label_map.shape} does not match image {image.shape[:2]}")
  colours = class_colours(class_names)
  present = [c for c in np.unique(label_map) if c != IGNORE_INDEX and c not in skip and c < len(class_names)]
  masks = [label_map == c for c in present]
  pic = Image.fromarray(_blend(image, masks, [colours[c] for c in present], alpha))
  return add_legend(pic, [(class_names[c], colours[c]) for c in present], title)


def overlay_masks(image: np.ndarray, masks: Sequence[np.ndarray], names: Sequence[str] | None = None,
                  colours: Sequence[tuple[int, int, int]] | None = None, alpha: float = 0.5,
                  points=None, point_labels=None, boxes=None, title: str | None = None,
                  tags: Sequence[str] | None = None) -> Image.Image:
  """Instance masks over the image (largest drawn first), prompts on top, legend of `names`.

  Masks sharing a name share a colour (class_colours); unnamed masks get one colour each.
  `tags` (say "cat 0.93") are written at the top-left corner of each mask.
  """
  image = np.asarray(image)
  masks = [np.asarray(m, bool) for m in masks]
  for m in masks:
    if m.shape != image.shape[:2]:
      raise ValueError(f"mask {m.shape} does not match image {image.shape[:2]}")
  if colours is None:
    if names is not None:
      uniq = list(dict.fromkeys(names))
      table = dict(zip(uniq, class_colours(uniq)))
      colours = [table[n] for n in names]
    else:
      colours = palette(len(masks))
  order = np.argsort([-m.sum() for m in masks], kind="stable")
  pic = Image.fromarray(_blend(image, [masks[i] for i in order], [colours[i] for i in order], alpha))
  _draw_prompts(pic, points, point_labels, boxes)
  if tags is not None:
    _draw_tags(pic, masks, tags, colours)
  entries = []
  if names is not None:
    seen = set()
    for n, c in zip(names, colours):
      if n not in seen:
        seen.add(n)
        entries.append((n, c))
  return add_legend(pic, entries, title)
