"""SamPredictor: segment_anything's numpy prediction API on the JAX SAM.

    predictor = SamPredictor.from_checkpoint("ckpt/sam_vit_b")
    predictor.set_image(image)                      # HxWx3 uint8 RGB, any size
    masks, scores, low_res = predictor.predict(point_coords=np.array([[500, 375]]),
                                               point_labels=np.array([1]))

Pixels match segment_anything: the longest side is resized with PIL bilinear (as its
ResizeLongestSide does through torchvision), normalised, zero padded bottom/right to a
square; masks are upscaled with PyTorch's bilinear (align_corners=False) weights.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from samclip_jax.data.transforms import as_rgb_uint8
from samclip_jax.interpolate import linear_taps
from samclip_jax.models.sam import (MASK_THRESHOLD, PIXEL_MEAN, PIXEL_STD, Sam, SamConfig, build_sparse_prompt,
                                    load_sam)


def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
  """(h, w) with the longest side scaled to long_side_length (ResizeLongestSide's rounding)."""
  scale = long_side_length * 1.0 / max(oldh, oldw)
  # At least one pixel: a 1x300 strip would round its short side to 0 (segment_anything crashes).
  return max(int(oldh * scale + 0.5), 1), max(int(oldw * scale + 0.5), 1)


def apply_coords(coords: np.ndarray, original_size: tuple[int, int], target_length: int) -> np.ndarray:
  """(x, y) pixels of the original image -> pixels of the resized model input (float64 as SAM)."""
  old_h, old_w = original_size
  new_h, new_w = get_preprocess_shape(old_h, old_w, target_length)
  coords = np.array(coords, dtype=float)
  coords[..., 0] = coords[..., 0] * (new_w / old_w)
  coords[..., 1] = coords[..., 1] * (new_h / old_h)
  return coords


def _resize_axis(x, axis: int, in_size: int, out_size: int, keep: int | None = None):
  """Linear resample of one axis; `keep` computes only the first `keep` outputs (a crop)."""
  i0, i1, l0, l1 = linear_taps(in_size, out_size)
  if keep is not None:
    i0, i1, l0, l1 = i0[:keep], i1[:keep], l0[:keep], l1[:keep]
  shape = [1] * x.ndim
  shape[axis] = -1
  return (jnp.take(x, i0, axis=axis) * l0.reshape(shape) + jnp.take(x, i1, axis=axis) * l1.reshape(shape))


def postprocess_masks(masks, image_size: int, input_size: tuple[int, int], original_size: tuple[int, int]):
  """Low-res logits [..., h, w] -> [..., H, W]: upscale to the padded input, crop, resize (Sam.postprocess_masks)."""
  h, w = masks.shape[-2:]
  # Width first, then height: the order of torch's CPU bilinear kernel.
  x = _resize_axis(masks.astype(jnp.float32), -1, w, image_size, keep=input_size[1])
  x = _resize_axis(x, -2, h, image_size, keep=input_size[0])
  x = _resize_axis(x, -1, input_size[1], original_size[1])
  return _resize_axis(x, -2, input_size[0], original_size[0])


@functools.lru_cache(maxsize=8)
def _compiled(config: SamConfig, dtype):
  """Jitted encoder / decoder / postprocessing shared by every predictor of one config.

  jax.jit keeps one executable per input shape: the encoder compiles once per padded input
  size, the decoder per prompt shape, the postprocessing per (input, original) image size.
  """
  model = Sam(config, dtype=dtype)

  def encode(params, x):
    return model.apply({"params": params}, x, method=Sam.encode_image)[0]

  def decode(params, features, coords, labels, mask_input):
    # Every mask token's output: the multimask choice is a slice taken outside, so one
    # executable serves both.
    masks, iou = model.apply({"params": params}, features, coords, labels, mask_input, None,
                             method=Sam.predict_masks)
    return masks[0].astype(jnp.float32), iou[0].astype(jnp.float32)

  def post(low_res, input_size, original_size, return_logits):
    masks = postprocess_masks(low_res, config.image_size, input_size, original_size)
    return masks if return_logits else masks > MASK_THRESHOLD

  return (jax.jit(encode), jax.jit(decode),
          jax.jit(post, static_argnames=("input_size", "original_size", "return_logits")))


class SamPredictor:
  """Embeds an image once, then predicts masks for point / box / mask prompts (numpy in and out)."""

  def __init__(self, config: SamConfig, params, dtype=jnp.float32):
    self.config = config
    self.model = Sam(config, dtype=dtype)
    self.params = jax.device_put(nn.unbox(params))
    self.image_size = config.image_size
    self._encode, self._decode, self._post = _compiled(config, jnp.dtype(dtype))
    self.reset_image()

  @classmethod
  def from_checkpoint(cls, directory: str, dtype=jnp.float32) -> "SamPredictor":
    """From a model directory written by `python -m convert.sam`."""
    config, params = load_sam(directory)
    return cls(config, params, dtype=dtype)

  # ------------------------------------------------------------------ image
  def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
    """Computes the embedding of `image`: uint8 HxWx3 (RGB, or BGR with image_format="BGR"),
    or a PIL image of any mode. Grayscale HxW or HxWx1 is repeated to three channels; RGBA
    (HxWx4) drops alpha.
    """
    if image_format not in ("RGB", "BGR"):
      raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    image = as_rgb_uint8(image)  # PIL (palette, CMYK, 16-bit...) or uint8 arrays, checked as everywhere
    if image_format == "BGR":
      image = image[:, :, ::-1]
    image = np.ascontiguousarray(image)

    self.reset_image()
    h, w = image.shape[:2]
    newh, neww = get_preprocess_shape(h, w, self.image_size)
    resized = np.asarray(Image.fromarray(image).resize((neww, newh), Image.BILINEAR))
    x = (resized.astype(np.float32) - np.array(PIXEL_MEAN, np.float32)) / np.array(PIXEL_STD, np.float32)
    padded = np.zeros((1, self.image_size, self.image_size, 3), np.float32)  # pad after normalising, as SAM
    padded[0, :newh, :neww] = x
    self.features = self._encode(self.params, padded)
    self.original_size = (h, w)
    self.input_size = (newh, neww)
    self.is_image_set = True

  def get_image_embedding(self) -> jax.Array:
    """Embedding of the current image, [1, h, w, C] (NHWC; segment_anything returns NCHW)."""
    if not self.is_image_set:
      raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
    return self.features

  def reset_image(self) -> None:
    """Forgets the current image."""
    self.is_image_set = False
    self.features = None
    self.original_size = None
    self.input_size = None

  # ------------------------------------------------------------------ prompts
  def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
              multimask_output: bool = True, return_logits: bool = False):
    """One prompt -> (masks CxHxW bool (float logits if return_logits), iou C, low-res logits CxLxL).

    point_coords Nx2 (x, y) pixels of the original image; point_labels N in {0 background,
    1 foreground}; box length-4 XYXY; mask_input 1xLxL logits of a previous prediction. L is
    config.mask_input_size: 256 for SAM at 1024 px (64 for the world's 128 px models).
    """
    self._check_image()
    if point_coords is not None:
      point_coords = _as_float(point_coords, "point_coords")
      if point_coords.ndim != 2 or point_coords.shape[1] != 2:
        raise ValueError(f"point_coords must be Nx2, got shape {point_coords.shape}")
    if point_labels is not None:
      point_labels = np.asarray(point_labels)
      if point_coords is not None and point_labels.shape != point_coords.shape[:1]:
        raise ValueError(f"point_labels must have shape ({point_coords.shape[0]},) to match point_coords, "
                         f"got {point_labels.shape}")
    if box is not None:
      box = _as_float(box, "box")
      if box.shape not in ((4,), (1, 4)):
        raise ValueError(f"box must be a length-4 XYXY array, got shape {box.shape}")
      box = box.reshape(1, 4)
    if mask_input is not None:
      mask_input = _as_float(mask_input, "mask_input")
      if mask_input.shape != (1,) + self.config.mask_input_size:
        raise ValueError(f"mask_input must be 1x{self.config.mask_input_size[0]}x{self.config.mask_input_size[1]}, "
                         f"got shape {mask_input.shape}")
      mask_input = mask_input[None]
    masks, iou, low_res = self._predict(
        None if point_coords is None else point_coords[None], None if point_labels is None else point_labels[None],
        box, mask_input, multimask_output, return_logits, allowed_labels=(0, 1))
    return masks[0], iou[0], low_res[0]

  def predict_batch(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                    multimask_output: bool = True, return_logits: bool = False, output: str = "masks"):
    """B prompts at once -> (masks BxCxHxW, iou BxC, low-res logits BxCxLxL; L as in predict).

    point_coords BxNx2 and point_labels BxN (label -1 pads rows with fewer points), boxes Bx4
    XYXY, mask_input Bx1xLxL; all in the original image's pixels, B shared by all given.
    output="low_res" skips the full-resolution masks (returned as None): callers that upscale
    on the device themselves (the automatic mask generator) then never hold them on the host.
    """
    if output not in ("masks", "low_res"):
      raise ValueError(f"output must be 'masks' or 'low_res', got {output!r}")
    self._check_image()
    if point_coords is not None:
      point_coords = _as_float(point_coords, "point_coords")
      if point_coords.ndim != 3 or point_coords.shape[2] != 2:
        raise ValueError(f"point_coords must be BxNx2, got shape {point_coords.shape}")
    if point_labels is not None:
      point_labels = np.asarray(point_labels)
      if point_coords is not None and point_labels.shape != point_coords.shape[:2]:
        raise ValueError(f"point_labels must have shape {point_coords.shape[:2]} to match point_coords, "
                         f"got {point_labels.shape}")
    if boxes is not None:
      boxes = _as_float(boxes, "boxes")
      if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be Bx4 XYXY, got shape {boxes.shape}")
    if mask_input is not None:
      mask_input = _as_float(mask_input, "mask_input")
      if mask_input.ndim != 4 or mask_input.shape[1:] != (1,) + self.config.mask_input_size:
        raise ValueError(f"mask_input must be Bx1x{self.config.mask_input_size[0]}x{self.config.mask_input_size[1]}, "
                         f"got shape {mask_input.shape}")
    sizes = {name: a.shape[0] for name, a in
             (("point_coords", point_coords), ("boxes", boxes), ("mask_input", mask_input)) if a is not None}
    if len(set(sizes.values())) > 1:
      raise ValueError(f"prompt batch sizes differ: {sizes}")
    if 0 in sizes.values():
      raise ValueError(f"an empty prompt batch {sizes}: give at least one prompt")
    return self._predict(point_coords, point_labels, boxes, mask_input, multimask_output, return_logits,
                         allowed_labels=(-1, 0, 1), upscale=output == "masks")

  def _check_image(self):
    if not self.is_image_set:
      raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")

  def _predict(self, point_coords, point_labels, boxes, mask_input, multimask_output, return_logits,
               allowed_labels, upscale=True):
    """Batched prompts (K leading) in original-image pixels -> numpy outputs with K leading."""
    if point_coords is not None and point_coords.shape[1] == 0 and (point_labels is None or np.size(point_labels) == 0):
      point_coords = point_labels = None  # no point at all: as if none were given
    if point_coords is not None and point_labels is None:
      raise ValueError("point_labels must be supplied if point_coords is supplied.")
    if point_labels is not None and point_coords is None:
      raise ValueError("point_coords must be supplied if point_labels is supplied.")
    if point_coords is None and boxes is None and mask_input is None:
      raise ValueError("give at least one prompt: point_coords/point_labels, a box or mask_input")
    if point_labels is not None:
      bad = np.setdiff1d(np.unique(point_labels), allowed_labels)
      if bad.size:
        raise ValueError(f"point_labels must be in {set(allowed_labels)}, got {bad.tolist()}")
      point_coords = apply_coords(point_coords, self.original_size, self.image_size)
    if boxes is not None:
      boxes = apply_coords(boxes.reshape(-1, 2, 2), self.original_size, self.image_size).reshape(-1, 4)
    if point_coords is None and boxes is None:  # mask only: SAM's prompt is then empty
      k = mask_input.shape[0]
      coords, labels = np.zeros((k, 0, 2), np.float32), np.zeros((k, 0), np.int32)
    else:
      coords, labels = build_sparse_prompt(point_coords, point_labels, boxes)
    mask = None if mask_input is None else np.asarray(mask_input, np.float32)[:, 0, :, :, None][None]
    low_res, iou = self._decode(self.params, self.features, coords[None], labels[None], mask)
    sl = slice(1, None) if multimask_output else slice(0, 1)  # as MaskDecoder.forward
    low_res, iou = np.asarray(low_res)[:, sl], np.asarray(iou)[:, sl]
    if not upscale:
      return None, iou, low_res
    masks = self._post(low_res, input_size=self.input_size, original_size=self.original_size,
                       return_logits=bool(return_logits))
    return np.asarray(masks), iou, low_res


def _as_float(x, name: str) -> np.ndarray:
  x = np.asarray(x)
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
    raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
  if not np.isfinite(x).all():   # NaN / inf prompts would give empty masks and NaN scores
    raise ValueError(f"{name} holds non-finite values (NaN or inf): {x.tolist() if x.size <= 8 else x.shape}")
  return x.astype(np.float64 if name != "mask_input" else np.float32)
