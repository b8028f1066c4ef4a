"""Zero-shot metrics: accuracy, retrieval recall, semantic-segmentation mIoU, COCO mask AP."""
import contextlib
import io
from typing import Any, Mapping, Sequence

import numpy as np

IGNORE_INDEX = 255


# -- classification ------------------------------------------------------------------------

def topk_correct(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
  """Counts of samples whose label is among the k highest logits, for each k."""
  logits, labels = np.asarray(logits), np.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"want logits [N,C] and labels [N], got {logits.shape} and {labels.shape}")
  # Rank of the true class = number of classes scoring strictly higher (ties count for it).
  true = np.take_along_axis(logits, labels[:, None].astype(np.int64), axis=1)
  rank = (logits > true).sum(axis=1)
  return {k: int((rank < k).sum()) for k in ks}


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """{"top1": .., "top5": ..} in percent; k larger than the class count counts every sample."""
  n = len(labels)
  correct = topk_correct(logits, labels, ks)
  return {f"top{k}": 100.0 * c / max(n, 1) for k, c in correct.items()}


# -- retrieval -----------------------------------------------------------------------------

def retrieval_recall(similarity: np.ndarray, text_to_image: Sequence[int],
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Recall@k in percent, both directions, from a [num_images, num_texts] similarity matrix.

  `text_to_image[j]` is the image caption j describes; an image may have several captions.
  image->text: an image counts at k if any of its captions is among its k best texts.
  text->image: a caption counts at k if its image is among its k best images.
  """
  sim = np.asarray(similarity, np.float64)
  t2i = np.asarray(text_to_image, np.int64)
  n_img, n_txt = sim.shape
  if t2i.shape != (n_txt,):
    raise ValueError(f"text_to_image needs {n_txt} entries, got {t2i.shape}")
  positive = np.zeros_like(sim, dtype=bool)
  positive[t2i, np.arange(n_txt)] = True
  if not positive.any(axis=1).all():
    raise ValueError("every image needs at least one caption")
  # Rank of the best positive: count of negatives scoring strictly higher than it.
  best_pos_i2t = np.where(positive, sim, -np.inf).max(axis=1)
  rank_i2t = (np.where(positive, -np.inf, sim) > best_pos_i2t[:, None]).sum(axis=1)
  pos_t2i = sim[t2i, np.arange(n_txt)]
  rank_t2i = (sim > pos_t2i[None, :]).sum(axis=0)
  out = {}
  for k in ks:
    out[f"image_to_text_R@{k}"] = 100.0 * float((rank_i2t < k).mean())
    out[f"text_to_image_R@{k}"] = 100.0 * float((rank_t2i < k).mean())
  return out


# -- semantic segmentation -----------------------------------------------------------------

def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
  """[num_classes, num_classes] int64 counts, rows = ground truth, columns = prediction.

  Pixels whose ground truth is `ignore_index` (or outside [0, num_classes)) are skipped.
  """
  pred, gt = np.asarray(pred).ravel().astype(np.int64), np.asarray(gt).ravel().astype(np.int64)
  if pred.shape != gt.shape:
    raise ValueError(f"prediction and label map differ in size: {pred.size} vs {gt.size}")
  valid = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
  if np.any((pred[valid] < 0) | (pred[valid] >= num_classes)):
    raise ValueError(f"predicted class outside [0, {num_classes})")
  idx = gt[valid] * num_classes + pred[valid]
  return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


class ConfusionMatrix:
  """Accumulates a confusion matrix over images; `compute()` gives mIoU as mmseg does."""

  def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
    self.num_classes = num_classes
    self.ignore_index = ignore_index
    self.matrix = np.zeros((num_classes, num_classes), np.int64)

  def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
    self.matrix += confusion_matrix(pred, gt, self.num_classes, self.ignore_index)

  def compute(self) -> dict[str, Any]:
    return miou_from_confusion(self.matrix)


def miou_from_confusion(matrix: np.ndarray) -> dict[str, Any]:
  """mIoU, per-class IoU, mean accuracy and pixel accuracy (percent) from a confusion matrix.

  As in mmseg's `total_area_to_metrics`: IoU_c = |pred=c & gt=c| / |pred=c or gt=c|. A class
  absent from both prediction and ground truth (union 0) has IoU NaN and is left out of the
  mean (nanmean); a class predicted but never in the ground truth counts with IoU 0.
  Mean accuracy likewise leaves out classes absent from the ground truth.
  """
  m = np.asarray(matrix, np.float64)
  inter = np.diag(m)
  gt_area, pred_area = m.sum(axis=1), m.sum(axis=0)
  union = gt_area + pred_area - inter
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = np.where(union > 0, inter / union, np.nan)
    acc = np.where(gt_area > 0, inter / gt_area, np.nan)
  present = ~np.isnan(iou)
  total = m.sum()
  return {
      "mIoU": 100.0 * float(np.mean(iou[present])) if present.any() else float("nan"),
      "mAcc": 100.0 * float(np.nanmean(acc)) if (~np.isnan(acc)).any() else float("nan"),
      "aAcc": 100.0 * float(inter.sum() / total) if total > 0 else float("nan"),
      "per_class_IoU": [None if np.isnan(v) else 100.0 * float(v) for v in iou],
  }


# -- COCO mask AP --------------------------------------------------------------------------

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode_mask(mask: np.ndarray) -> dict:
  """Binary HxW mask -> COCO compressed RLE with a str `counts` (JSON-ready)."""
  from pycocotools import mask as mask_utils
  rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
  rle["counts"] = rle["counts"].decode("ascii")
  return rle


def coco_mask_ap(coco_gt, predictions: Sequence[Mapping[str, Any]],
                 image_ids: Sequence[int] | None = None) -> dict[str, float]:
  """COCO segm AP / AP50 / AP75 / APs / APm / APl in percent (pycocotools COCOeval).

  `coco_gt`: a pycocotools COCO, a COCO-format dict or a path to one. `predictions`: dicts
  {image_id, category_id, segmentation (RLE, or a binary HxW array), score}. `image_ids`
  restricts the evaluation (default: every image of the ground truth). No predictions at all
  gives 0 (COCOeval itself cannot load an empty result list).
  """
  from pycocotools.cocoeval import COCOeval

  gt = _as_coco(coco_gt)
  results = []
  for p in predictions:
    seg = p["segmentation"]
    if isinstance(seg, np.ndarray):
      seg = encode_mask(seg)
    # No "bbox" key: loadRes would then take the box area as the detection area.
    results.append({"image_id": int(p["image_id"]), "category_id": int(p["category_id"]),
                    "segmentation": seg, "score": float(p["score"])})
  if not results:
    return {name: 0.0 for name in COCO_STAT_NAMES}
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
    dt = gt.loadRes(results)
    ev = COCOeval(gt, dt, iouType="segm")
    if image_ids is not None:
      ev.params.imgIds = sorted(int(i) for i in image_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  # COCOeval reports -1 where no ground truth falls in an area range; keep it as NaN.
  return {name: (100.0 * float(v) if v >= 0 else float("nan"))
          for name, v in zip(COCO_STAT_NAMES, ev.stats[:6])}


def _as_coco(coco_gt):
  from pycocotools.coco import COCO
  if isinstance(coco_gt, COCO):
    return coco_gt
  with contextlib.redirect_stdout(io.StringIO()):
    if isinstance(coco_gt, str):
      return COCO(coco_gt)
    coco = COCO()
    coco.dataset = dict(coco_gt)
    coco.createIndex()
  return coco
