"""Automatic mask generator against segment_anything's (same predictions in, same masks out)."""
import types

import numpy as np
import pytest

from samclip_jax import automatic_mask_generator as amg

torch = pytest.importorskip("torch")
sa_amg = pytest.importorskip("segment_anything.utils.amg")
from segment_anything import SamAutomaticMaskGenerator as RefGenerator  # noqa: E402


def test_stability_score_matches_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=3.0, size=(6, 17, 23)).astype(np.float32)
  ref = sa_amg.calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()
  ours = np.asarray(amg.calculate_stability_score(logits, 0.0, 1.0))
  np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_mask_to_box_and_rle_match_reference():
  rng = np.random.default_rng(1)
  masks = rng.random((5, 13, 9)) > 0.7
  masks[2] = False                          # empty mask -> box [0,0,0,0]
  masks[3] = False
  masks[3, 4:7, 2:3] = True
  ref_boxes = sa_amg.batched_mask_to_box(torch.from_numpy(masks)).numpy()
  np.testing.assert_array_equal(amg.batched_mask_to_box(masks), ref_boxes)
  ref_rles = sa_amg.mask_to_rle_pytorch(torch.from_numpy(masks))
  ours = amg.mask_to_rle(masks)
  assert ours == ref_rles
  for rle, m in zip(ours, masks):
    np.testing.assert_array_equal(amg.rle_to_mask(rle), m)
    assert amg.area_from_rle(rle) == m.sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_matches_torchvision(seed):
  from torchvision.ops import batched_nms
  rng = np.random.default_rng(seed)
  n = 60
  xy = rng.integers(0, 50, size=(n, 2))
  wh = rng.integers(0, 30, size=(n, 2))     # zero-size boxes included
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  boxes[10:15] = boxes[0]                   # exact duplicates
  scores = rng.random(n).astype(np.float32)
  scores[20:25] = scores[19]                # ties: stable order
  cats = rng.integers(0, 3, size=n)
  ref = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(cats), 0.5).numpy()
  np.testing.assert_array_equal(amg.batched_nms(boxes, scores, cats, 0.5), ref)
  ref1 = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.zeros(n), 0.3).numpy()
  np.testing.assert_array_equal(amg.nms(boxes, scores, 0.3), ref1)


def test_nms_threshold_compared_in_double():
  """IoU 1/3 exactly, threshold 1/3: torchvision keeps both boxes (float32 rounding must not suppress)."""
  from torchvision.ops import nms
  boxes = np.array([[0, 0, 2, 1], [1, 0, 3, 1]], np.float32)
  scores = np.array([0.9, 0.8], np.float32)
  ref = nms(torch.from_numpy(boxes), torch.from_numpy(scores), 1 / 3).numpy()
  np.testing.assert_array_equal(amg.nms(boxes, scores, 1 / 3), ref)


def test_remove_small_regions_by_hand():
  m = np.zeros((10, 10), bool)
  m[1:8, 1:8] = True
  m[4, 4] = False            # a 1-pixel hole
  m[9, 9] = True             # a 1-pixel island
  filled, changed = amg.remove_small_regions(m, 3, "holes")
  assert changed and filled[4, 4] and filled.sum() == 50
  cleaned, changed = amg.remove_small_regions(filled, 3, "islands")
  assert changed and not cleaned[9, 9] and cleaned.sum() == 49
  _, changed = amg.remove_small_regions(cleaned, 3, "islands")
  assert not changed


def test_generate_crop_boxes_matches_reference():
  for size, layers in [((200, 300), 1), ((480, 640), 2)]:
    assert amg.generate_crop_boxes(size, layers, 512 / 1500) == sa_amg.generate_crop_boxes(size, layers, 512 / 1500)
  np.testing.assert_array_equal(amg.build_point_grid(5), sa_amg.build_point_grid(5))


# -- whole generator, with a synthetic "model" that both generators share ------------------

def _scene(h=200, w=300):
  im = np.zeros((h, w, 3), np.uint8) + np.array([40, 90, 40], np.uint8)
  yy, xx = np.mgrid[:h, :w]
  im[(yy - 70) ** 2 + (xx - 90) ** 2 < 45 ** 2] = [220, 40, 40]
  im[120:180, 160:280] = [40, 40, 220]
  im[20:60, 200:260] = [230, 230, 60]
  im[150:160, 20:30] = [250, 250, 250]
  return im


def _fake_predictions(image, points):
  """Deterministic multimask logits for points [N,2]: colour region, disc, soft blend."""
  img = image.astype(np.float32)
  h, w = img.shape[:2]
  yy, xx = np.mgrid[:h, :w].astype(np.float32)
  masks, ious = [], []
  for x, y in points:
    col = img[min(int(y), h - 1), min(int(x), w - 1)]
    cdist = np.linalg.norm(img - col, axis=-1)
    dist = np.hypot(xx - x, yy - y)
    masks.append(np.stack([2.0 - cdist / 20.0, (30.0 - dist) / 3.0,
                           1.5 - cdist / 60.0 - dist / 100.0]))
    ious.append([0.9 + 0.08 * np.sin(x / 9.0), 0.85 + 0.1 * np.cos(y / 7.0), 0.8 + 0.15 * np.sin(x * y)])
  return np.stack(masks).astype(np.float32), np.asarray(ious, np.float32)


class _FakeTorchPredictor:
  """What segment_anything's generator uses of a SamPredictor, over the synthetic model."""
  device = "cpu"
  model = types.SimpleNamespace(mask_threshold=0.0)
  transform = types.SimpleNamespace(apply_coords=lambda coords, size: np.array(coords, float))

  def set_image(self, image):
    self.image = image

  def reset_image(self):
    self.image = None

  def predict_torch(self, point_coords, point_labels, multimask_output=True, return_logits=False):
    masks, ious = _fake_predictions(self.image, point_coords.numpy()[:, 0])
    return torch.from_numpy(masks), torch.from_numpy(ious), None


class _FakePredictor:
  """The samclip_jax predictor interface over the same synthetic model."""
  mask_threshold = 0.0

  def set_image(self, image):
    self.image = image

  def predict_batch(self, point_coords, point_labels, multimask_output=True, return_logits=False):
    masks, ious = _fake_predictions(self.image, point_coords[:, 0])
    return masks, ious, None


def _compare(ours, ref):
  assert len(ours) == len(ref) and len(ref) > 0
  for a, b in zip(ours, ref):
    np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
    assert a["area"] == b["area"] and a["bbox"] == b["bbox"] and a["crop_box"] == b["crop_box"]
    np.testing.assert_allclose(a["point_coords"], b["point_coords"])
    assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-6)
    assert a["stability_score"] == pytest.approx(b["stability_score"], abs=1e-6)


@pytest.mark.parametrize("kwargs", [
    dict(points_per_side=12, points_per_batch=64),
    dict(points_per_side=8, points_per_batch=7, pred_iou_thresh=0.8, stability_score_thresh=0.7,
         box_nms_thresh=0.5),
    dict(points_per_side=6, crop_n_layers=1, pred_iou_thresh=0.7, stability_score_thresh=0.5),
])
def test_generator_matches_reference(kwargs):
  image = _scene()
  # The reference's model only serves to build its predictor, which is then swapped.
  dummy = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=1024))
  ref_gen = RefGenerator(dummy, **kwargs)
  ref_gen.predictor = _FakeTorchPredictor()
  ref = ref_gen.generate(image)
  ours = amg.SamAutomaticMaskGenerator(_FakePredictor(), **kwargs).generate(image)
  _compare(ours, ref)
  if kwargs.get("crop_n_layers"):
    assert len({tuple(r["crop_box"]) for r in ours}) > 1


def test_output_modes_and_small_regions():
  image = _scene()
  gen = amg.SamAutomaticMaskGenerator(_FakePredictor(), points_per_side=6, output_mode="coco_rle",
                                      min_mask_region_area=50)
  recs = gen.generate(image)
  assert recs and isinstance(recs[0]["segmentation"]["counts"], str)
  from pycocotools import mask as mask_utils
  for r in recs:
    assert int(mask_utils.area(r["segmentation"])) == r["area"]
  with pytest.raises(ValueError, match="exactly one"):
    amg.SamAutomaticMaskGenerator(_FakePredictor(), points_per_side=None)


def test_progress_and_filter_counts():
  """What a user reads when masks are few: points done as they go, and what each filter kept."""
  done = []
  gen = amg.SamAutomaticMaskGenerator(_FakePredictor(), points_per_side=5, points_per_batch=10,
                                      pred_iou_thresh=0.88, stability_score_thresh=0.8, progress=done.append)
  recs = gen.generate(_scene())
  assert done == [10, 10, 5]
  c = gen.counts
  assert c["candidates"] == 25 * 3 and c["kept"] == len(recs)
  assert c["candidates"] > c["pred_iou"] >= c["stability"] >= c["inside"] >= c["kept"] > 0
  # The generator's own thresholds, applied to everything it saw, give the same counts.
  loose = amg.SamAutomaticMaskGenerator(_FakePredictor(), points_per_side=5, pred_iou_thresh=0.0,
                                        stability_score_thresh=0.0, box_nms_thresh=1.0)
  everything = loose.generate(_scene())
  assert c["best_pred_iou"] == pytest.approx(max(r["predicted_iou"] for r in everything), abs=1e-6)
  assert c["pred_iou"] == sum(r["predicted_iou"] > 0.88 for r in everything)
  assert c["stability"] == sum(r["predicted_iou"] > 0.88 and r["stability_score"] >= 0.8 for r in everything)


# -- the JAX SamPredictor (converted random-weight SAM) against segment_anything's generator --

@pytest.fixture(scope="module")
def tiny_sam_pair(tmp_path_factory):
  """(torch Sam, samclip_jax SamPredictor) with the same random weights (via convert_sam)."""
  from convert.sam import convert_sam
  from samclip_jax.predictor import SamPredictor
  from sam_reference import TINY, build_torch_sam
  sam = build_torch_sam(TINY, seed=0)
  with torch.no_grad():   # random logits are ~1 wide; widen them so stability scores spread out
    for mlp in sam.mask_decoder.output_hypernetworks_mlps:
      mlp.layers[-1].weight.mul_(10.0)
      mlp.layers[-1].bias.mul_(10.0)
  d = tmp_path_factory.mktemp("amg_sam")
  torch.save(sam.state_dict(), d / "sam.pth")
  convert_sam(str(d / "sam.pth"), str(d / "sam"), config=TINY, verbose=False)
  return sam, SamPredictor.from_checkpoint(str(d / "sam"))


def _match(ours, ref):
  """Pairs records by prompt point and predicted IoU (near-ties may swap order)."""
  assert len(ours) == len(ref)
  left = list(ours)
  pairs = []
  for r in ref:
    cands = [o for o in left if np.allclose(o["point_coords"], r["point_coords"])]
    assert cands, f"no mask from point {r['point_coords']}"
    best = min(cands, key=lambda o: abs(o["predicted_iou"] - r["predicted_iou"]))
    left.remove(best)
    pairs.append((best, r))
  return pairs


@pytest.mark.parametrize("kwargs", [
    dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0),
    dict(points_per_side=6, pred_iou_thresh=0.3, stability_score_thresh=0.2),
])
def test_jax_predictor_generator_matches_segment_anything(tiny_sam_pair, kwargs):
  sam, predictor = tiny_sam_pair
  image = _scene()
  with torch.no_grad():
    ref = RefGenerator(sam, **kwargs).generate(image)
  ours = amg.SamAutomaticMaskGenerator(predictor, **kwargs).generate(image)
  assert len(ref) > 0
  for a, b in _match(ours, ref):
    assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-4)
    assert a["stability_score"] == pytest.approx(b["stability_score"], abs=1e-2)
    inter = np.logical_and(a["segmentation"], b["segmentation"]).sum()
    union = np.logical_or(a["segmentation"], b["segmentation"]).sum()
    assert inter / max(union, 1) > 0.995
    assert a["crop_box"] == b["crop_box"]
