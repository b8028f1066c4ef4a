"""Metrics against values computed by hand."""
import math

import numpy as np
import pytest

from samclip_jax import metrics


def test_topk_accuracy():
  logits = np.array([
      [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],   # label 0: top1
      [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # label 4: rank 4 -> top5 only
      [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],   # label 5: rank 5 -> neither
      [0.0, 0.2, 0.1, 0.0, 0.0, 0.0],   # label 2: rank 1 -> top5 only
  ])
  labels = np.array([0, 4, 5, 2])
  acc = metrics.topk_accuracy(logits, labels)
  assert acc == {"top1": 25.0, "top5": 75.0}


def test_retrieval_recall_several_captions():
  # 3 images, 5 captions: captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2.
  t2i = [0, 0, 1, 1, 2]
  sim = np.array([
      # c0   c1   c2   c3   c4
      [0.1, 0.9, 0.5, 0.0, 0.0],   # img0: best text is c1 (its own) -> R@1 hit
      [0.8, 0.2, 0.1, 0.3, 0.7],   # img1: order c0, c4, c3 -> first own caption at rank 2
      [0.0, 0.1, 0.2, 0.3, 0.05],  # img2: c4 is last of 5 -> rank 4
  ])
  r = metrics.retrieval_recall(sim, t2i, ks=(1, 2, 5))
  # image->text: ranks (0, 2, 4) -> R@1 1/3, R@2 1/3, R@5 3/3.
  assert r["image_to_text_R@1"] == pytest.approx(100 / 3)
  assert r["image_to_text_R@2"] == pytest.approx(100 / 3)
  assert r["image_to_text_R@5"] == pytest.approx(100.0)
  # text->image (column-wise): c0 own img0=0.1 < 0.8 -> rank 1; c1 0.9 best -> 0;
  # c2 own img1=0.1, beaten by 0.5 and 0.2 -> rank 2; c3 0.3 ties img2's 0.3 -> rank 0
  # (ties favour the positive); c4 0.05 beaten by 0.7 -> rank 1.
  assert r["text_to_image_R@1"] == pytest.approx(100 * 2 / 5)
  assert r["text_to_image_R@2"] == pytest.approx(100 * 4 / 5)
  assert r["text_to_image_R@5"] == pytest.approx(100.0)


def test_retrieval_needs_caption_per_image():
  with pytest.raises(ValueError, match="at least one caption"):
    metrics.retrieval_recall(np.zeros((2, 2)), [0, 0])


def test_miou_by_hand():
  # 3 classes + ignore. Two images accumulated.
  gt1 = np.array([[0, 0, 1, 1],
                  [0, 0, 1, 255]])
  pr1 = np.array([[0, 1, 1, 1],
                  [0, 0, 1, 2]])      # the 2 sits on an ignored pixel: not counted
  gt2 = np.array([[1, 1]])
  pr2 = np.array([[1, 0]])
  cm = metrics.ConfusionMatrix(num_classes=4)   # class 3 never appears anywhere
  cm.update(pr1, gt1)
  cm.update(pr2, gt2)
  # class 0: gt pixels 4 (img1) ; pred 0 on (0,0),(1,0),(1,1) + img2 (0,1) -> pred area 4
  #          intersection 3 -> union 4+4-3 = 5 -> IoU 3/5
  # class 1: gt 3 (img1) + 2 (img2) = 5; pred (0,1),(0,2),(0,3),(1,2) + img2 (0,0) = 5;
  #          intersection 3 + 1 = 4 -> union 6 -> IoU 4/6
  # class 2: never in gt, never predicted on a counted pixel -> absent, excluded
  # class 3: absent -> excluded
  res = cm.compute()
  assert res["per_class_IoU"][0] == pytest.approx(60.0)
  assert res["per_class_IoU"][1] == pytest.approx(100 * 4 / 6)
  assert res["per_class_IoU"][2] is None and res["per_class_IoU"][3] is None
  assert res["mIoU"] == pytest.approx(100 * (3 / 5 + 4 / 6) / 2)
  assert res["aAcc"] == pytest.approx(100 * 7 / 9)
  assert res["mAcc"] == pytest.approx(100 * (3 / 4 + 4 / 5) / 2)


def test_miou_false_positive_class_counts_zero():
  # Class 2 predicted but absent from the ground truth: IoU 0, included in the mean.
  gt = np.array([[0, 0, 1, 1]])
  pr = np.array([[0, 0, 1, 2]])
  res = metrics.miou_from_confusion(metrics.confusion_matrix(pr, gt, 3))
  assert res["per_class_IoU"] == [100.0, 50.0, 0.0]
  assert res["mIoU"] == pytest.approx(50.0)


def _square(h, w, y0, x0, size):
  m = np.zeros((h, w), np.uint8)
  m[y0:y0 + size, x0:x0 + size] = 1
  return m


def _toy_coco():
  h = w = 64
  masks = [_square(h, w, 4, 4, 20), _square(h, w, 30, 30, 24)]   # areas 400, 576: both "small"
  anns = []
  for i, m in enumerate(masks):
    rle = metrics.encode_mask(m)
    ys, xs = np.nonzero(m)
    anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "segmentation": rle,
                 "area": float(m.sum()), "iscrowd": 0,
                 "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]})
  gt = {"images": [{"id": 1, "height": h, "width": w, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "thing"}], "annotations": anns}
  return gt, masks


def test_coco_ap_perfect():
  gt, masks = _toy_coco()
  preds = [{"image_id": 1, "category_id": 1, "segmentation": m, "score": 0.9 - 0.1 * i}
           for i, m in enumerate(masks)]
  ap = metrics.coco_mask_ap(gt, preds)
  assert ap["AP"] == pytest.approx(100.0)
  assert ap["AP50"] == pytest.approx(100.0)
  assert math.isnan(ap["APl"])   # no ground truth in the large range


@pytest.mark.parametrize("wrong_first", [False, True])
def test_coco_ap_one_wrong(wrong_first):
  gt, masks = _toy_coco()
  wrong = _square(64, 64, 40, 0, 10)   # touches neither ground-truth mask: IoU 0
  scores = (0.8, 0.9) if wrong_first else (0.9, 0.8)
  preds = [{"image_id": 1, "category_id": 1, "segmentation": masks[0], "score": scores[0]},
           {"image_id": 1, "category_id": 1, "segmentation": wrong, "score": scores[1]}]
  ap = metrics.coco_mask_ap(gt, preds)
  # Recall reaches 1/2 at every IoU threshold. COCO samples precision at 101 recall points
  # 0, .01, ..., 1 (interpolated: best precision at recall >= r): points r <= .5 (51 of them)
  # get the precision of the correct detection, the other 50 get 0.
  # Correct one ranked first: precision 1 -> AP 51/101.
  # Wrong one ranked first: the correct one arrives at precision 1/2 -> AP 0.5 * 51/101.
  expected = 100 * 51 / 101 * (0.5 if wrong_first else 1.0)
  assert ap["AP"] == pytest.approx(expected)
  assert ap["AP75"] == pytest.approx(expected)


def test_coco_ap_no_predictions():
  gt, _ = _toy_coco()
  assert metrics.coco_mask_ap(gt, [])["AP"] == 0.0
