"""SAM's automatic mask generator ("segment everything") over a SamPredictor.

A port of segment_anything/automatic_mask_generator.py + utils/amg.py: a point grid is
prompted in fixed-size batches, masks are filtered by predicted IoU and stability score, and
duplicates removed by box NMS (numpy, same rule as torchvision.ops.batched_nms). Mask
post-processing (upscaling, stability score, binarisation, boxes) runs jitted on the device;
only scores, boxes and the surviving boolean masks come back to the host. Optional crop layers
and small-region clean-up (scipy instead of OpenCV) are supported as in the reference.

With a samclip_jax SamPredictor the generator asks for low-res logits and upscales them on the
device. Any other predictor needs `set_image(image)`, `predict_batch(point_coords [N,1,2],
point_labels [N,1], multimask_output=True, return_logits=True) -> (masks [N,M,H,W], iou
[N,M], ...)` with coordinates in the original image frame, and `mask_threshold` (default 0.0).
"""
import functools
import itertools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from samclip_jax.api import upscale_matrices
from samclip_jax.predictor import SamPredictor


# -- point grids and crops -----------------------------------------------------------------

SAM_SETTINGS = {"points_per_side": 32, "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}
GRID_SPACING = 8    # a model below 1024 px: a point every 8 px of what it sees
SMALL_MODEL_THRESHOLDS = {"pred_iou_thresh": 0.8, "stability_score_thresh": 0.8}


def suited_settings(height: int, width: int, model_size: int) -> dict:
  """Grid and filters that suit an image and a model: SAM's for a 1024-px model; a smaller
  model gets a point every GRID_SPACING px of what it sees (8 to 32 a side) and looser filters,
  as its coarser masks score lower stability (the README: found shapes on world scenes)."""
  if model_size >= 1024:
    return dict(SAM_SETTINGS)
  side = int(np.clip(round(min(height, width, model_size) / GRID_SPACING), 8, 32))
  return dict(points_per_side=side, **SMALL_MODEL_THRESHOLDS)


def build_point_grid(n_per_side: int) -> np.ndarray:
  """[n*n, 2] (x, y) points evenly spaced in [0,1]^2, cell centres."""
  offset = 1 / (2 * n_per_side)
  side = np.linspace(offset, 1 - offset, n_per_side)
  xs = np.tile(side[None, :], (n_per_side, 1))
  ys = np.tile(side[:, None], (1, n_per_side))
  return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
  """One grid per crop layer, n_per_side / scale_per_layer**i points a side."""
  return [build_point_grid(int(n_per_side / (scale_per_layer ** i))) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: Sequence[int], n_layers: int,
                        overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
  """XYXY crop boxes: the whole image, then (2**i)**2 overlapping crops in layer i."""
  im_h, im_w = im_size
  short_side = min(im_h, im_w)
  boxes, layers = [[0, 0, im_w, im_h]], [0]

  def crop_len(orig_len, n_crops, overlap):
    return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

  for i_layer in range(n_layers):
    n = 2 ** (i_layer + 1)
    overlap = int(overlap_ratio * short_side * (2 / n))
    crop_w, crop_h = crop_len(im_w, n, overlap), crop_len(im_h, n, overlap)
    x0s = [int((crop_w - overlap) * i) for i in range(n)]
    y0s = [int((crop_h - overlap) * i) for i in range(n)]
    for x0, y0 in itertools.product(x0s, y0s):
      boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
      layers.append(i_layer + 1)
  return boxes, layers


# -- mask utilities ------------------------------------------------------------------------

def calculate_stability_score(masks, mask_threshold: float, threshold_offset: float):
  """IoU of the masks binarised at threshold +- offset (the high one lies inside the low one)."""
  inter = (masks > (mask_threshold + threshold_offset)).sum(axis=(-1, -2), dtype=jnp.int32)
  union = (masks > (mask_threshold - threshold_offset)).sum(axis=(-1, -2), dtype=jnp.int32)
  return inter / union


def batched_mask_to_box(masks):
  """Inclusive XYXY pixel boxes around boolean masks [..., H, W]; [0,0,0,0] when empty."""
  xp = jnp if isinstance(masks, jax.Array) else np
  h, w = masks.shape[-2:]
  rows, cols = masks.any(axis=-1), masks.any(axis=-2)
  ar_h, ar_w = xp.arange(h), xp.arange(w)
  bottom = xp.max(rows * ar_h, axis=-1)
  top = xp.min(xp.where(rows, ar_h, h), axis=-1)
  right = xp.max(cols * ar_w, axis=-1)
  left = xp.min(xp.where(cols, ar_w, w), axis=-1)
  empty = (right < left) | (bottom < top)
  out = xp.stack([left, top, right, bottom], axis=-1)
  return out * (~empty)[..., None]


def box_area(boxes: np.ndarray) -> np.ndarray:
  return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
  """Indices kept by greedy NMS, by decreasing score (torchvision.ops.nms's rule: stable
  sort, a box is dropped when its IoU with a kept one is > threshold)."""
  # float32 like torchvision's kernel, so IoUs at the threshold round the same way.
  boxes = np.asarray(boxes, np.float32)
  scores = np.asarray(scores, np.float32)
  order = np.argsort(-scores, kind="stable")
  if len(order) == 0:
    return order.astype(np.int64)
  b = boxes[order]
  area = box_area(b)
  lt = np.maximum(b[:, None, :2], b[None, :, :2])
  rb = np.minimum(b[:, None, 2:], b[None, :, 2:])
  wh = np.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = inter / (area[:, None] + area[None, :] - inter)   # 0/0 -> NaN never suppresses
  return order[greedy_keep(iou, iou_threshold)]


def greedy_keep(iou: np.ndarray, iou_threshold: float) -> np.ndarray:
  """Positions kept by greedy NMS over items sorted by decreasing score, given their pairwise
  IoU [N, N]: an item is dropped when its IoU with a kept one is > threshold (NaN never is)."""
  suppressed = np.zeros(len(iou), bool)
  keep = []
  for i in range(len(iou)):
    if suppressed[i]:
      continue
    keep.append(i)
    # In double, as torchvision compares: a float32 IoU equal to a threshold like 1/3 after
    # rounding would otherwise suppress what torchvision keeps.
    suppressed |= iou[i].astype(np.float64) > float(iou_threshold)
  return np.array(keep, np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, idxs: np.ndarray, iou_threshold: float) -> np.ndarray:
  """NMS within each category `idxs` (boxes offset per category, as torchvision does)."""
  boxes = np.asarray(boxes, np.float32)
  if len(boxes) == 0:
    return np.zeros((0,), np.int64)
  offsets = np.asarray(idxs, np.float32) * (boxes.max() + np.float32(1))
  return nms(boxes + offsets[:, None], scores, iou_threshold)


def is_box_near_crop_edge(boxes: np.ndarray, crop_box: Sequence[int], orig_box: Sequence[int],
                          atol: float = 20.0) -> np.ndarray:
  """Boxes (crop frame) touching a crop edge that is not an edge of the original image."""
  boxes = uncrop_boxes_xyxy(boxes, crop_box).astype(np.float32)
  crop = np.asarray(crop_box, np.float32)[None]
  orig = np.asarray(orig_box, np.float32)[None]
  near_crop = np.abs(boxes - crop) <= atol
  near_image = np.abs(boxes - orig) <= atol
  return np.any(near_crop & ~near_image, axis=1)


def uncrop_boxes_xyxy(boxes: np.ndarray, crop_box: Sequence[int]) -> np.ndarray:
  x0, y0 = crop_box[:2]
  return boxes + np.array([x0, y0, x0, y0], dtype=boxes.dtype)


def uncrop_points(points: np.ndarray, crop_box: Sequence[int]) -> np.ndarray:
  x0, y0 = crop_box[:2]
  return points + np.array([x0, y0], dtype=points.dtype)


def uncrop_masks(masks: np.ndarray, crop_box: Sequence[int], orig_h: int, orig_w: int) -> np.ndarray:
  x0, y0, x1, y1 = crop_box
  if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
    return masks
  pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
  return np.pad(masks, ((0, 0), (y0, pad_y - y0), (x0, pad_x - x0)))


def mask_to_rle(masks: np.ndarray) -> list[dict[str, Any]]:
  """Boolean [B,H,W] -> uncompressed COCO RLEs (column-major runs, starting with zeros)."""
  b, h, w = masks.shape
  flat = np.asarray(masks).transpose(0, 2, 1).reshape(b, h * w)
  out = []
  for m in flat:
    change = np.flatnonzero(m[1:] != m[:-1]) + 1
    bounds = np.concatenate([[0], change, [h * w]])
    counts = np.diff(bounds).tolist()
    if m[0]:
      counts = [0] + counts
    out.append({"size": [h, w], "counts": counts})
  return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
  """Uncompressed RLE -> boolean HxW mask."""
  h, w = rle["size"]
  counts = np.asarray(rle["counts"], np.int64)
  values = (np.arange(len(counts)) % 2).astype(bool)
  return np.repeat(values, counts).reshape(w, h).T


def area_from_rle(rle: dict[str, Any]) -> int:
  return int(sum(rle["counts"][1::2]))


def coco_encode_rle(rle: dict[str, Any]) -> dict[str, Any]:
  """Uncompressed RLE -> compressed COCO RLE with str counts."""
  from pycocotools import mask as mask_utils
  h, w = rle["size"]
  out = mask_utils.frPyObjects(rle, h, w)
  out["counts"] = out["counts"].decode("utf-8")
  return out


def box_xyxy_to_xywh(box) -> list:
  x0, y0, x1, y1 = [v.item() if hasattr(v, "item") else v for v in box]
  return [x0, y0, x1 - x0, y1 - y0]


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
  """Drops holes ("holes") or islands ("islands") smaller than area_thresh (8-connected)."""
  from scipy import ndimage  # a jax dependency; OpenCV in the reference
  if mode not in ("holes", "islands"):
    raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
  correct_holes = mode == "holes"
  working = correct_holes ^ mask
  regions, n = ndimage.label(working, structure=np.ones((3, 3), int))
  sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
  small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
  if not small:
    return mask, False
  fill = [0] + small
  if not correct_holes:
    fill = [i for i in range(n + 1) if i not in fill]
    if not fill:   # every island is small: keep the largest
      fill = [int(np.argmax(sizes)) + 1]
  return np.isin(regions, fill), True


@functools.partial(jax.jit, static_argnames=("mask_threshold", "offset"))
def _binarise(masks, mask_threshold: float, offset: float):
  """Logits [N,H,W] -> (stability [N], boolean masks, boxes [N,4]) on the device."""
  stability = calculate_stability_score(masks, mask_threshold, offset)
  binary = masks > mask_threshold
  return stability, binary, batched_mask_to_box(binary)


@functools.partial(jax.jit, static_argnames=("mask_threshold", "offset"))
def _binarise_low_res(low_res, a_h, a_w, mask_threshold: float, offset: float):
  """Low-res logits [N,h,w] -> `_binarise` of their full-res upscale a_h @ low @ a_w.T (SAM's
  postprocess_masks as matrices: matmuls, several times faster than gathers on CPUs); the
  full-res logits only ever exist on the device."""
  up = jnp.einsum("Hh,nhw,Ww->nHW", a_h, low_res, a_w, precision="highest")
  return _binarise(up, mask_threshold, offset)


# -- the generator -------------------------------------------------------------------------

class SamAutomaticMaskGenerator:
  """Masks for a whole image from a point grid, with segment_anything's filters and outputs."""

  def __init__(self, predictor, points_per_side: Optional[int] = 32, points_per_batch: int = 64,
               pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
               stability_score_offset: float = 1.0, box_nms_thresh: float = 0.7,
               crop_n_layers: int = 0, crop_nms_thresh: float = 0.7,
               crop_overlap_ratio: float = 512 / 1500, crop_n_points_downscale_factor: int = 1,
               point_grids: Optional[list[np.ndarray]] = None, min_mask_region_area: int = 0,
               output_mode: str = "binary_mask", progress: Optional[Callable[[int], Any]] = None):
    """Arguments as segment_anything's; `progress(n)` is called after each batch of n points.

    After `generate`, `counts` holds how many candidate masks each filter let through:
    candidates, pred_iou (above pred_iou_thresh), stability (and above
    stability_score_thresh), inside (and not cut by a crop edge), kept (after duplicate
    removal), with best_pred_iou / best_stability among the candidates."""
    if (points_per_side is None) == (point_grids is None):
      raise ValueError("give exactly one of points_per_side or point_grids")
    for name, value in (("points_per_side", points_per_side), ("points_per_batch", points_per_batch)):
      if value is not None and value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    if output_mode not in ("binary_mask", "uncompressed_rle", "coco_rle"):
      raise ValueError(f"unknown output_mode {output_mode!r}")
    if points_per_side is not None:
      self.point_grids = build_all_layer_point_grids(points_per_side, crop_n_layers,
                                                     crop_n_points_downscale_factor)
    else:
      self.point_grids = [np.asarray(g) for g in point_grids]
    if len(self.point_grids) < crop_n_layers + 1:
      raise ValueError(f"need {crop_n_layers + 1} point grids, got {len(self.point_grids)}")
    self.predictor = predictor
    self.points_per_batch = points_per_batch
    self.pred_iou_thresh = pred_iou_thresh
    self.stability_score_thresh = stability_score_thresh
    self.stability_score_offset = stability_score_offset
    self.box_nms_thresh = box_nms_thresh
    self.crop_n_layers = crop_n_layers
    self.crop_nms_thresh = crop_nms_thresh
    self.crop_overlap_ratio = crop_overlap_ratio
    self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
    self.min_mask_region_area = min_mask_region_area
    self.output_mode = output_mode
    self.progress = progress
    self.counts: dict[str, float] = {}

  @property
  def mask_threshold(self) -> float:
    return float(getattr(self.predictor, "mask_threshold", 0.0))

  def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
    """Records {segmentation, area, bbox (XYWH), predicted_iou, point_coords,
    stability_score, crop_box (XYWH)} for an HxWx3 uint8 image, in segment_anything's order
    (highest predicted IoU first, unless small-region removal or crop layers re-ran NMS)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    self.counts = dict.fromkeys(("candidates", "pred_iou", "stability", "inside"), 0)
    self.counts.update(best_pred_iou=float("-inf"), best_stability=float("-inf"))
    data = self._generate_masks(image)
    if self.min_mask_region_area > 0:
      data = self.postprocess_small_regions(
          data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh))
    if self.output_mode == "coco_rle":
      segs = [coco_encode_rle(r) for r in data["rles"]]
    elif self.output_mode == "binary_mask":
      segs = [rle_to_mask(r) for r in data["rles"]]
    else:
      segs = data["rles"]
    self.counts["kept"] = len(segs)
    return [{
        "segmentation": segs[i],
        "area": area_from_rle(data["rles"][i]),
        "bbox": box_xyxy_to_xywh(data["boxes"][i]),
        "predicted_iou": float(data["iou_preds"][i]),
        "point_coords": [data["points"][i].tolist()],
        "stability_score": float(data["stability_score"][i]),
        "crop_box": box_xyxy_to_xywh(data["crop_boxes"][i]),
    } for i in range(len(segs))]

  def _generate_masks(self, image: np.ndarray) -> dict[str, Any]:
    orig_size = image.shape[:2]
    crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
    parts = [self._process_crop(image, box, layer, orig_size) for box, layer in zip(crop_boxes, layer_idxs)]
    data = _cat(parts)
    if len(crop_boxes) > 1 and len(data["rles"]):
      scores = 1.0 / box_area(data["crop_boxes"].astype(np.float32))   # prefer smaller crops
      keep = batched_nms(data["boxes"], scores, np.zeros(len(scores)), self.crop_nms_thresh)
      data = _filter(data, keep)
    return data

  def _process_crop(self, image, crop_box, layer_idx, orig_size) -> dict[str, Any]:
    x0, y0, x1, y1 = crop_box
    crop = image[y0:y1, x0:x1, :]
    crop_size = crop.shape[:2]
    self.predictor.set_image(crop)
    points_for_image = self.point_grids[layer_idx] * np.array(crop_size)[None, ::-1]
    parts = []
    for start in range(0, len(points_for_image), self.points_per_batch):
      points = points_for_image[start:start + self.points_per_batch]
      parts.append(self._process_batch(points, crop_size, crop_box, orig_size))
    if hasattr(self.predictor, "reset_image"):
      self.predictor.reset_image()
    data = _cat(parts)
    keep = batched_nms(data["boxes"], data["iou_preds"], np.zeros(len(data["boxes"])), self.box_nms_thresh)
    data = _filter(data, keep)
    data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
    data["points"] = uncrop_points(data["points"], crop_box)
    data["crop_boxes"] = np.array([crop_box] * len(data["rles"]), np.int64).reshape(-1, 4)
    return data

  def _process_batch(self, points, im_size, crop_box, orig_size) -> dict[str, Any]:
    orig_h, orig_w = orig_size
    n = len(points)
    # Pad to a fixed batch so the jitted model and post-processing compile once.
    padded = np.concatenate([points, np.repeat(points[-1:], self.points_per_batch - n, axis=0)])
    prompts = dict(point_coords=padded[:, None, :], point_labels=np.ones((len(padded), 1), np.int32),
                   multimask_output=True, return_logits=True)
    offset = float(self.stability_score_offset)
    if isinstance(self.predictor, SamPredictor):
      # Full-res float logits (GBs for a large image) are only ever built on the device.
      _, iou_preds, low_res = self.predictor.predict_batch(**prompts, output="low_res")
      m = low_res.shape[1]
      a_h, a_w = upscale_matrices(low_res.shape[-2:], self.predictor.image_size, self.predictor.input_size,
                                  self.predictor.original_size)
      stability, binary, boxes = _binarise_low_res(
          jnp.asarray(low_res).reshape(-1, *low_res.shape[-2:]), a_h, a_w, self.mask_threshold, offset)
    else:
      masks, iou_preds = self.predictor.predict_batch(**prompts)[:2]
      m = masks.shape[1]
      stability, binary, boxes = _binarise(jnp.asarray(masks).reshape(-1, *masks.shape[-2:]),
                                           self.mask_threshold, offset)
    valid = np.arange(len(padded) * m) < n * m
    iou_preds = np.asarray(iou_preds, np.float32).reshape(-1)
    stability, boxes = np.asarray(stability), np.asarray(boxes)
    keep = valid.copy()
    self._count("candidates", keep)
    # nanmax: an empty candidate's stability is 0/0, and max() against a NaN keeps the NaN's side.
    self.counts["best_pred_iou"] = max(self.counts["best_pred_iou"], float(np.nanmax(iou_preds[valid], initial=-np.inf)))
    self.counts["best_stability"] = max(self.counts["best_stability"], float(np.nanmax(stability[valid], initial=-np.inf)))
    if self.pred_iou_thresh > 0.0:
      keep &= iou_preds > self.pred_iou_thresh
    self._count("pred_iou", keep)
    if self.stability_score_thresh > 0.0:
      keep &= stability >= self.stability_score_thresh
    self._count("stability", keep)
    keep &= ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
    self._count("inside", keep)
    if self.progress is not None:
      self.progress(n)
    idx = np.flatnonzero(keep)
    kept_masks = np.asarray(binary[idx]) if len(idx) else np.zeros((0, *binary.shape[1:]), bool)
    kept_masks = uncrop_masks(kept_masks, crop_box, orig_h, orig_w)
    return {
        "iou_preds": iou_preds[idx],
        "points": np.repeat(points, m, axis=0)[idx],
        "stability_score": stability[idx],
        "boxes": boxes[idx],
        "rles": mask_to_rle(kept_masks),
    }

  def _count(self, key: str, keep: np.ndarray):
    self.counts[key] = self.counts.get(key, 0) + int(keep.sum())

  @staticmethod
  def postprocess_small_regions(data: dict[str, Any], min_area: int, nms_thresh: float) -> dict[str, Any]:
    """Removes small holes and islands, then NMS again preferring unchanged masks."""
    if len(data["rles"]) == 0:
      return data
    new_masks, scores = [], []
    for rle in data["rles"]:
      mask = rle_to_mask(rle)
      mask, changed_holes = remove_small_regions(mask, min_area, mode="holes")
      mask, changed_islands = remove_small_regions(mask, min_area, mode="islands")
      new_masks.append(mask)
      scores.append(float(not (changed_holes or changed_islands)))
    masks = np.stack(new_masks)
    boxes = batched_mask_to_box(masks)
    keep = batched_nms(boxes, np.array(scores), np.zeros(len(boxes)), nms_thresh)
    data = dict(data, rles=list(data["rles"]), boxes=data["boxes"].copy())
    for i in keep:
      if scores[i] == 0.0:
        data["rles"][i] = mask_to_rle(masks[i][None])[0]
        data["boxes"][i] = boxes[i]
    return _filter(data, keep)


def _cat(parts: list[dict[str, Any]]) -> dict[str, Any]:
  out = {}
  for key in parts[0]:
    if key == "rles":
      out[key] = [r for p in parts for r in p[key]]
    else:
      out[key] = np.concatenate([p[key] for p in parts], axis=0)
  return out


def _filter(data: dict[str, Any], keep: np.ndarray) -> dict[str, Any]:
  keep = np.asarray(keep, np.int64)
  return {k: ([v[i] for i in keep] if isinstance(v, list) else v[keep]) for k, v in data.items()}
