"""PyTorch's F.interpolate (align_corners=False) as per-axis weights, so ports match it exactly.

jax.image.resize uses another cubic kernel (a=-0.5) and antialiases when shrinking; the
reference models (SAM's rel-pos tables and masks, ViTDet's and open_clip's position
embeddings) use torch's kernels, so parity needs torch's weights.
"""
import functools

import numpy as np


@functools.lru_cache(maxsize=256)
def linear_taps(in_size: int, out_size: int):
  """(i0, i1, w0, w1) of torch's linear/bilinear resize along one axis, in float32 as torch."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(src.astype(np.int64), in_size - 1)
  i1 = i0 + (i0 < in_size - 1)
  w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
  return i0, i1, np.float32(1.0) - w1, w1


@functools.lru_cache(maxsize=256)
def linear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of F.interpolate(mode="linear" / "bilinear") along one axis."""
  i0, i1, w0, w1 = linear_taps(in_size, out_size)
  m = np.zeros((out_size, in_size), np.float32)
  np.add.at(m, (np.arange(out_size), i0), w0)
  np.add.at(m, (np.arange(out_size), i1), w1)
  return m


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel (torch: a=-0.75 plain, a=-0.5 antialiased, as PIL)."""
  x = np.abs(x)
  a = x.dtype.type(a)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=256)
def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False, dtype=np.float32) -> np.ndarray:
  """[out, in] weights of F.interpolate(mode="bicubic", antialias=...) along one axis.

  Computed in `dtype`, as ATen computes for tensors of that dtype, so float32 tables match
  torch's float32 results and float64 ones its float64 results.
  """
  if not antialias:  # aten upsample_bicubic2d: 4 taps, borders replicated.
    one = dtype(1)
    scale = dtype(in_size) / dtype(out_size)
    dst = np.arange(out_size)
    src = (scale * (dst.astype(dtype) + dtype(0.5)) - dtype(0.5)).astype(dtype)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    t = np.clip(src - i0.astype(dtype), dtype(0), one)
    taps = [_cubic(t + one, -0.75), _cubic(t, -0.75), _cubic(one - t, -0.75), _cubic(2 - t, -0.75)]
    m = np.zeros((out_size, in_size), dtype)
    for k, w in enumerate(taps):
      np.add.at(m, (dst, np.clip(i0 - 1 + k, 0, in_size - 1)), w.astype(dtype))
    return m
  # aten _upsample_bicubic2d_aa: PIL-style support widened by the scale, renormalised.
  scale = in_size / out_size
  m = np.zeros((out_size, in_size), np.float64)
  support = 2.0 * scale if scale >= 1 else 2.0
  inv = 1.0 / scale if scale >= 1 else 1.0
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    w = _cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
    m[i, lo:hi] = w / w.sum() if w.sum() != 0 else w
  return m.astype(dtype)
