"""Geometric prompts sampled from instance masks, in SAM's fixed-shape point encoding.

Each of K slots holds P points with labels {-2 absent, -1 pad, 0 negative, 1 positive, 2 box
top-left, 3 box bottom-right}; coordinates are (x, y) pixel indices in the resized 1024 frame
(SAM's prompt encoder adds 0.5 to reach the pixel centre). A prompt is a box with probability
box_prob, else 1..P-1 points (the first positive, the last negative with probability neg_prob
when there are two or more). Each slot holds the sequence SAM itself embeds (a box's two
corners; points and one pad), and the rest of the slot is absent (no token: models/sam.py). Boxes are the mask's tight box (inclusive corners)
with SAM's training noise: std 10% of the side, at most 20 px, per coordinate.
"""
import numpy as np

from samclip_jax.data import records
from samclip_jax.models.sam import ABSENT, BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, PAD, POSITIVE, NEGATIVE
from samclip_jax.data.transforms import nearest_indices

BOX_NOISE_FRACTION = 0.1
BOX_NOISE_MAX = 20.0


def resized_mask_crop(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray):
  """Nearest-resized mask restricted to its box: (crop, y_offset, x_offset) or None if empty."""
  ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
  if len(ys) == 0:
    return None
  # rows/cols are monotone: the output rows whose source falls inside the mask's box.
  ya, yb = np.searchsorted(rows, ys[0], "left"), np.searchsorted(rows, ys[-1], "right")
  xa, xb = np.searchsorted(cols, xs[0], "left"), np.searchsorted(cols, xs[-1], "right")
  crop = mask[rows[ya:yb]][:, cols[xa:xb]]
  if not crop.any():
    return None
  return crop, int(ya), int(xa)


def full_resized_mask(mask: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
  """The whole mask resized like the image (nearest): what the prompts refer to."""
  return mask[nearest_indices(mask.shape[0], new_h)][:, nearest_indices(mask.shape[1], new_w)]


def _box_prompt(rng, crop, y0, x0, new_h, new_w, P):
  ys, xs = np.nonzero(crop.any(1))[0], np.nonzero(crop.any(0))[0]
  box = np.array([xs[0] + x0, ys[0] + y0, xs[-1] + x0, ys[-1] + y0], np.float32)
  side = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1] * 2, np.float32)
  noise = np.clip(rng.normal(0.0, 1.0, 4) * BOX_NOISE_FRACTION * side, -BOX_NOISE_MAX, BOX_NOISE_MAX)
  box = box + noise.astype(np.float32)
  box[[0, 2]] = np.clip(box[[0, 2]], 0, new_w - 1)
  box[[1, 3]] = np.clip(box[[1, 3]], 0, new_h - 1)
  x_lo, x_hi = sorted(box[[0, 2]])
  y_lo, y_hi = sorted(box[[1, 3]])
  coords = np.zeros((P, 2), np.float32)
  labels = np.full((P,), ABSENT, np.int32)
  coords[0], coords[1] = (x_lo, y_lo), (x_hi, y_hi)
  labels[0], labels[1] = BOX_TOP_LEFT, BOX_BOTTOM_RIGHT
  return coords, labels


def _point_prompt(rng, crop, y0, x0, full_valid, P, neg_prob):
  n = int(rng.integers(1, P))  # SAM adds one pad after points: it takes the last slot
  neg = n > 1 and rng.uniform() < neg_prob
  n_pos = n - int(neg)
  fy, fx = np.nonzero(crop)
  pick = rng.integers(0, len(fy), n_pos)
  coords = np.zeros((P, 2), np.float32)
  labels = np.full((P,), ABSENT, np.int32)
  labels[n] = PAD
  coords[:n_pos, 0], coords[:n_pos, 1] = fx[pick] + x0, fy[pick] + y0
  labels[:n_pos] = POSITIVE
  if neg:
    # Negative point: inside the image content, outside the mask (rejection sampling).
    new_h, new_w = full_valid
    h, w = crop.shape
    for _ in range(50):
      y, x = int(rng.integers(new_h)), int(rng.integers(new_w))
      if not (y0 <= y < y0 + h and x0 <= x < x0 + w and crop[y - y0, x - x0]):
        coords[n_pos], labels[n_pos] = (x, y), NEGATIVE
        break
  return coords, labels


def sample_prompts(rng: np.random.Generator, masks, orig_hw, new_hw, num_masks: int,
                   points_per_prompt: int, box_prob: float = 0.5, neg_prob: float = 0.5):
  """K prompts from a record's RLE masks.

  Returns coords f32 [K,P,2], labels i32 [K,P], valid bool [K] and mask_index i32 [K]
  (which mask each slot was drawn from, -1 for padding).
  """
  K, P = num_masks, points_per_prompt
  if P < 2:
    raise ValueError("points_per_prompt must be >= 2 (a box takes two points)")
  coords = np.zeros((K, P, 2), np.float32)
  labels = np.full((K, P), -1, np.int32)
  valid = np.zeros((K,), bool)
  mask_index = np.full((K,), -1, np.int32)
  (h, w), (nh, nw) = orig_hw, new_hw
  rows, cols = nearest_indices(h, nh), nearest_indices(w, nw)
  order = rng.permutation(len(masks))
  k = 0
  for i in order:
    if k == K:
      break
    mask = records.decode_mask(masks[i])
    if mask.shape != (h, w):
      continue  # a mask that does not match its image cannot be placed
    found = resized_mask_crop(mask, rows, cols)
    if found is None:
      continue  # vanished at this scale (thinner than one output pixel)
    crop, y0, x0 = found
    if rng.uniform() < box_prob:
      coords[k], labels[k] = _box_prompt(rng, crop, y0, x0, nh, nw, P)
    else:
      coords[k], labels[k] = _point_prompt(rng, crop, y0, x0, (nh, nw), P, neg_prob)
    valid[k] = True
    mask_index[k] = i
    k += 1
  return coords, labels, valid, mask_index
