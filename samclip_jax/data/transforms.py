"""Image transforms shared by the pipelines and the extraction job (numpy + PIL, uint8).

The CLIP view rendering lives here once so that the offline teacher-embedding job and the
training loader produce bit-identical pixels for a stored view (box, flip, resolution).
"""
import io
import math
import struct
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps

# Documented choice: RandomResizedCrop scale (0.4, 1.0) instead of the classification
# default (0.08, 1.0): distillation targets come from the same view, but tiny crops of
# web images carry little of the caption's content and waste teacher compute.
CROP_SCALE = (0.4, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def visible_files(root: str) -> list[str]:
  """Every file under root, as sorted relative paths, skipping hidden files and folders
  (.ipynb_checkpoints, .DS_Store, ._ AppleDouble files): they are never a user's data."""
  import os
  out = []
  for d, dirs, files in os.walk(root):
    dirs[:] = [x for x in dirs if not x.startswith(".")]
    out += [os.path.relpath(os.path.join(d, f), root) for f in files if not f.startswith(".")]
  return sorted(out)


def is_image_name(path: str) -> bool:
  return path.lower().endswith(IMAGE_EXTS)


# PIL modes with samples wider than 8 bits -> the sample value that is white. PIL's own
# convert("RGB") clips these at 255, so a 16-bit image came out almost white. 16-bit PNGs
# open as I;16 (older Pillow: I).
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}
# 32-bit integer and float images have no one range: PIL's convert("I") / ("F") of an 8-bit
# picture keeps 0..255, float files often hold 0..1, older Pillow reads 16-bit PNGs as I. White
# is the smallest of these standard ranges that holds the image's largest value.
RANGED_MODES = {"I": (255, 65535), "F": (1.0, 255, 65535)}


OVERSHOOT = 0.05   # of the range: float rounding and resampling (bicubic rings) stray past it


def _white(im: Image.Image, x: np.ndarray) -> float:
  if im.mode in WIDE_MODES:
    return WIDE_MODES[im.mode]
  finite = x[np.isfinite(x)]
  lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
  fits = [w for w in RANGED_MODES[im.mode] if hi <= (1 + OVERSHOOT) * w]
  if not fits or lo < -OVERSHOOT * fits[0]:
    raise ValueError(f"a mode-{im.mode} image with values {lo:g}..{hi:g}: not a picture's range "
                     f"({' / '.join(f'0..{w:g}' for w in RANGED_MODES[im.mode])}); convert it to 8-bit first")
  return fits[0]


def is_wide(mode: str) -> bool:
  """Samples wider than 8 bits (16-bit, int32, float): PIL's convert would clip them."""
  return mode in WIDE_MODES or mode in RANGED_MODES


def to_rgb(im: Image.Image) -> Image.Image:
  """Any PIL image -> 8-bit RGB; wide samples (16-bit, int32, float) scaled from their range."""
  if not is_wide(im.mode):
    return im.convert("RGB")
  x = np.asarray(im, np.float64)
  x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) * (255.0 / _white(im, x))
  return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "L").convert("RGB")


EXIF_ORIENTATION = 0x0112  # the tag a camera sets when it stores a portrait photo sideways


def oriented(im: Image.Image, annotated_hw=None) -> Image.Image:
  """The picture as viewers show it: its EXIF orientation applied (as cv2.imread in
  segment_anything's scripts and detectron2's read_image). Unless annotations made on the
  stored pixels say so: where only the stored size matches `annotated_hw` (h, w), it is kept."""
  if im.getexif().get(EXIF_ORIENTATION, 1) not in range(2, 9):
    return im
  turned = ImageOps.exif_transpose(im)
  if annotated_hw is not None and tuple(annotated_hw) == im.size[::-1] != turned.size[::-1]:
    return im
  return turned


def as_rgb_uint8(image) -> np.ndarray:
  """One raw image, PIL (any mode, wide ones scaled by to_rgb; upright, `oriented`) or array
  (HxW, HxWx1/3/4 uint8) -> uint8 [H,W,3]; anything else is refused by name."""
  if isinstance(image, Image.Image):
    return np.asarray(to_rgb(oriented(image)))
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"images must be uint8 RGB, got dtype {image.dtype}")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected an HxWx3 image (or HxW, HxWx1, HxWx4), got shape {image.shape}")
  if 0 in image.shape[:2]:
    raise ValueError(f"image is empty: expected an HxWx3 image with pixels, got shape {image.shape}")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return np.ascontiguousarray(image[..., :3])


class UnreadableInput(ValueError):
  """A file whose content cannot be read as what it should be (corrupt, truncated, too large)."""


# What PIL raises for a damaged file: truncated data and bad codecs (OSError without an errno),
# broken PNG chunks (SyntaxError), early ends (EOFError), short headers (struct.error).
CORRUPT_FILE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def read_image_file(path: str, what: str, read: Callable[[Image.Image], Any]):
  """read(PIL image) of the file at `path`; damage is UnreadableInput naming the file. System
  errors (an OSError with an errno: no permission, too many open files, I/O) propagate as
  they are: they say nothing about the file."""
  try:
    with Image.open(path) as im:
      im.load()
      return read(im)
  except UnreadableInput:
    raise  # `read` named the problem itself
  except CORRUPT_FILE_ERRORS as e:
    if isinstance(e, OSError) and e.errno is not None:
      raise
    raise UnreadableInput(f"cannot read {path} as {what}: {e}") from e


def decode_image(data, min_long_side: int | None = None) -> np.ndarray:
  """Encoded JPEG/PNG bytes (or an array) -> uint8 [H,W,3] RGB; raises on corrupt data.

  min_long_side lets a JPEG decode at a reduced DCT scale (1/2, 1/4, 1/8) as long as its
  longest side stays >= min_long_side (the caller resizes to that anyway).
  """
  if isinstance(data, np.ndarray):
    img = data
    if img.ndim == 2:
      img = np.repeat(img[..., None], 3, -1)
    if img.shape[-1] == 4:
      img = img[..., :3]
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
      raise ValueError(f"unsupported image array {img.dtype} {img.shape}")
    return img
  with Image.open(io.BytesIO(data)) as im:
    if min_long_side and im.format == "JPEG":
      factor = max(im.size) / min_long_side
      if factor >= 2:
        im.draft("RGB", (int(im.size[0] / factor), int(im.size[1] / factor)))
    im.load()
    return np.asarray(to_rgb(im))


def preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
  """Output size of SAM's ResizeLongestSide.get_preprocess_shape."""
  scale = long_side / max(h, w)
  return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_longest_pad(image: np.ndarray, long_side: int = 1024,
                       orig_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
  """Resizes the longest side to long_side (PIL bilinear, as SAM) and zero-pads bottom/right.

  orig_hw: the full-resolution size when `image` was decoded at a reduced scale, so the
  output size (and the masks' frame) is the one SAM computes from the original.
  """
  h, w = image.shape[:2]
  nh, nw = preprocess_shape(*(orig_hw or (h, w)), long_side)
  if (nh, nw) != (h, w):
    image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  out = np.zeros((long_side, long_side, 3), np.uint8)
  out[:nh, :nw] = image
  return out, (nh, nw)


def nearest_indices(old: int, new: int) -> np.ndarray:
  """Source index of each output pixel for a nearest resize old -> new (pixel centres)."""
  return np.minimum(((np.arange(new) + 0.5) * (old / new)).astype(np.int64), old - 1)


def sample_crop(rng: np.random.Generator, h: int, w: int, scale=CROP_SCALE,
                ratio=CROP_RATIO) -> tuple[int, int, int, int]:
  """RandomResizedCrop box (x0, y0, cw, ch) in pixels, torchvision's algorithm."""
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      y0 = int(rng.integers(0, h - ch + 1))
      x0 = int(rng.integers(0, w - cw + 1))
      return x0, y0, cw, ch
  # Fallback: central crop at the clamped aspect ratio.
  in_ratio = w / h
  if in_ratio < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif in_ratio > ratio[1]:
    ch, cw = h, int(round(h * ratio[1]))
  else:
    cw, ch = w, h
  return (w - cw) // 2, (h - ch) // 2, cw, ch


def render_view(image: np.ndarray, box, flip: bool, resolution: int) -> np.ndarray:
  """Crops box (x0, y0, cw, ch), resizes to resolution^2 (PIL bilinear), flips: uint8."""
  x0, y0, cw, ch = (int(v) for v in box)
  out = np.asarray(Image.fromarray(image).resize(
      (resolution, resolution), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch)))
  if flip:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def image_size(data) -> tuple[int, int]:
  """(h, w) of encoded image bytes from the header alone (or of an array)."""
  if isinstance(data, np.ndarray):
    return data.shape[0], data.shape[1]
  with Image.open(io.BytesIO(data)) as im:
    return im.size[1], im.size[0]


def render_view_encoded(data, box, flip: bool, resolution: int) -> np.ndarray:
  """render_view straight from encoded bytes; JPEGs decode at a reduced DCT scale when the
  crop is at least twice the output size (2-8x less decode work on large web images).

  Both the training loader and the extraction job render views with this function, so a
  stored view is reproduced bit for bit.
  """
  if isinstance(data, np.ndarray):
    return render_view(decode_image(data), box, flip, resolution)
  x0, y0, cw, ch = (int(v) for v in box)
  with Image.open(io.BytesIO(data)) as im:
    w, h = im.size
    factor = min(cw, ch) / resolution
    if im.format == "JPEG" and factor >= 2:
      # PIL picks the largest of 1/2, 1/4, 1/8 whose result is still >= the size asked for.
      im.draft("RGB", (int(w / factor), int(h / factor)))
    sx, sy = im.size[0] / w, im.size[1] / h
    rgb = to_rgb(im)
  out = rgb.resize((resolution, resolution), Image.BILINEAR,
                   box=(x0 * sx, y0 * sy, (x0 + cw) * sx, (y0 + ch) * sy))
  out = np.asarray(out)
  if flip:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def sample_view(rng: np.random.Generator, h: int, w: int) -> tuple[tuple[int, int, int, int], bool]:
  """One random CLIP view: crop box and horizontal flip."""
  box = sample_crop(rng, h, w)
  return box, bool(rng.integers(2))
