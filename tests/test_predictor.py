"""SamPredictor against segment_anything's SamPredictor: same weights, same image, same prompts."""
import contextlib
import io

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor as TorchSamPredictor
from segment_anything import sam_model_registry

from convert.sam import convert_sam, main as convert_main
from samclip_jax.models.sam import SamConfig, load_sam
from samclip_jax.predictor import SamPredictor, postprocess_masks
from sam_reference import TINY, build_torch_sam, random_image, randomize_

TOL = 1e-4


def _maxabs(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _embedding(p):
  return np.asarray(p.get_image_embedding())


def _torch_embedding(tp):
  return tp.get_image_embedding().numpy().transpose(0, 2, 3, 1)


def _check_outputs(got, want):
  """(mask logits, iou, low-res logits) against torch's."""
  (m, i, l), (tm, ti, tl) = got, [np.asarray(x) for x in want]
  assert m.shape == tm.shape and i.shape == ti.shape and l.shape == tl.shape
  assert m.dtype == np.float32
  assert _maxabs(l, tl) <= TOL
  assert _maxabs(i, ti) <= TOL
  assert _maxabs(m, tm) <= TOL


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(config, params) converted from a random torch SAM through a .pth file, and that torch SAM."""
  tsam = build_torch_sam(TINY, seed=3)
  d = tmp_path_factory.mktemp("sam_tiny")
  torch.save(tsam.state_dict(), d / "sam_tiny.pth")
  convert_sam(str(d / "sam_tiny.pth"), str(d / "converted"), config=TINY, verbose=False)
  return str(d / "converted"), tsam


def _pair(tiny, h, w):
  directory, tsam = tiny
  image = random_image(h, w, seed=h + 2 * w)
  jp, tp = SamPredictor.from_checkpoint(directory), TorchSamPredictor(tsam)
  jp.set_image(image)
  tp.set_image(image)
  return jp, tp


@pytest.fixture(scope="module", params=[(600, 800), (800, 600)], ids=["600x800", "800x600"])
def pair(request, tiny):
  """Predictors holding the same non-square image (longest side resized down to 256, then padded)."""
  return _pair(tiny, *request.param)


def _prompts(h, w):
  pts = np.array([[0.3 * w, 0.4 * h], [0.7 * w, 0.6 * h]])
  box = np.array([0.1 * w, 0.2 * h, 0.8 * w, 0.9 * h])
  return pts, np.array([1, 0]), box


def test_image_embedding(pair):
  jp, tp = pair
  assert jp.input_size == tuple(tp.input_size) and jp.original_size == tuple(tp.original_size)
  assert _maxabs(_embedding(jp), _torch_embedding(tp)) <= TOL


def test_square_image_needs_no_padding(tiny):
  jp, tp = _pair(tiny, 256, 256)
  assert jp.input_size == (256, 256)
  assert _maxabs(_embedding(jp), _torch_embedding(tp)) <= TOL
  pts, lbl, _ = _prompts(256, 256)
  kw = dict(point_coords=pts, point_labels=lbl, return_logits=True)
  _check_outputs(jp.predict(**kw), tp.predict(**kw))


@pytest.mark.parametrize("kind,multimask", [("points", True), ("box", False), ("points+box", True),
                                            ("points+box", False)])
def test_predict_parity(pair, kind, multimask):
  jp, tp = pair
  pts, lbl, box = _prompts(*jp.original_size)
  kw = {}
  if "points" in kind:
    kw.update(point_coords=pts, point_labels=lbl)
  if "box" in kind:
    kw["box"] = box
  got = jp.predict(**kw, multimask_output=multimask, return_logits=True)
  want = tp.predict(**kw, multimask_output=multimask, return_logits=True)
  assert got[0].shape == ((3 if multimask else 1),) + jp.original_size
  _check_outputs(got, want)


def test_predict_mask_input_and_bool_masks(pair):
  jp, tp = pair
  pts, lbl, _ = _prompts(*jp.original_size)
  _, _, low_res = tp.predict(point_coords=pts[:1], point_labels=lbl[:1], multimask_output=False)
  kw = dict(point_coords=pts, point_labels=lbl, mask_input=low_res, multimask_output=False)
  _check_outputs(jp.predict(**kw, return_logits=True), tp.predict(**kw, return_logits=True))
  masks, _, _ = jp.predict(**kw)
  t_logits = tp.predict(**kw, return_logits=True)[0]
  assert masks.dtype == np.bool_
  sure = np.abs(t_logits) > 1e-3  # a threshold at 0 may flip where |logit| ~ float32 noise
  np.testing.assert_array_equal(masks[sure], t_logits[sure] > 0)
  # Mask prompt alone: SAM's sparse prompt is then empty.
  kw = dict(mask_input=low_res, multimask_output=True, return_logits=True)
  _check_outputs(jp.predict(**kw), tp.predict(**kw))


def _torch_batch(tp, coords=None, labels=None, boxes=None, **kw):
  with torch.no_grad():
    tc = None if coords is None else torch.as_tensor(tp.transform.apply_coords(coords, tp.original_size),
                                                     dtype=torch.float)
    tl = None if labels is None else torch.as_tensor(labels, dtype=torch.int)
    tb = None if boxes is None else tp.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float),
                                                                    tp.original_size)
    return [x.numpy() for x in tp.predict_torch(tc, tl, tb, **kw)]


def test_predict_batch_boxes(pair):
  jp, tp = pair
  h, w = jp.original_size
  boxes = np.array([[0.1 * w, 0.2 * h, 0.8 * w, 0.9 * h], [0, 0, 0.5 * w, 0.5 * h], [0.4 * w, 0.1 * h, w, 0.7 * h]])
  got = jp.predict_batch(boxes=boxes, return_logits=True)
  assert got[0].shape == (3, 3, h, w) and got[1].shape == (3, 3) and got[2].shape[:2] == (3, 3)
  _check_outputs(got, _torch_batch(tp, boxes=boxes, return_logits=True))


def test_predict_batch_points_and_boxes(pair):
  jp, tp = pair
  h, w = jp.original_size
  rng = np.random.default_rng(0)
  coords = rng.uniform(0, 1, (3, 2, 2)) * [w, h]
  labels = np.array([[1, 0], [1, 1], [0, 1]])
  boxes = np.array([[0.1 * w, 0.2 * h, 0.8 * w, 0.9 * h]] * 3)
  got = jp.predict_batch(coords, labels, boxes, multimask_output=False, return_logits=True)
  _check_outputs(got, _torch_batch(tp, coords, labels, boxes, multimask_output=False, return_logits=True))


def test_predict_batch_padded_points(pair):
  """Label -1 pads rows with fewer points, as torch's PromptEncoder treats it."""
  jp, tp = pair
  h, w = jp.original_size
  coords = np.array([[[0.2 * w, 0.3 * h], [0.6 * w, 0.5 * h], [0, 0]], [[0.5 * w, 0.5 * h], [0, 0], [0, 0]],
                     [[0.1 * w, 0.9 * h], [0.9 * w, 0.1 * h], [0.5 * w, 0.2 * h]]])
  labels = np.array([[1, 0, -1], [1, -1, -1], [1, 1, 0]])
  got = jp.predict_batch(coords, labels, return_logits=True)
  _check_outputs(got, _torch_batch(tp, coords, labels, return_logits=True))


def test_postprocess_matches_torch_interpolate():
  """Upscale + crop + resize with torch's bilinear (align_corners=False) weights, up and down."""
  rng = np.random.default_rng(5)
  low = rng.normal(size=(2, 3, 64, 64)).astype(np.float32)
  for input_size, original in (((192, 256), (600, 800)), ((256, 171), (97, 65)), ((256, 256), (256, 256))):
    got = np.asarray(postprocess_masks(low, 256, input_size, original))
    t = torch.nn.functional.interpolate(torch.from_numpy(low), (256, 256), mode="bilinear", align_corners=False)
    t = t[..., :input_size[0], :input_size[1]]
    t = torch.nn.functional.interpolate(t, original, mode="bilinear", align_corners=False).numpy()
    assert got.shape == t.shape
    assert _maxabs(got, t) <= 1e-5


# ---------------------------------------------------------------- image formats and errors
def test_image_formats(tiny):
  directory, _ = tiny
  p = SamPredictor.from_checkpoint(directory)
  rgb = random_image(90, 120, seed=7)
  p.set_image(rgb)
  ref = _embedding(p)
  p.set_image(np.concatenate([rgb, np.full((90, 120, 1), 7, np.uint8)], axis=2))  # RGBA: alpha dropped
  np.testing.assert_array_equal(_embedding(p), ref)
  p.set_image(rgb[:, :, ::-1], image_format="BGR")
  np.testing.assert_array_equal(_embedding(p), ref)
  gray = rgb[:, :, 0]
  p.set_image(gray)
  g = _embedding(p)
  p.set_image(gray[:, :, None])
  np.testing.assert_array_equal(_embedding(p), g)
  p.set_image(np.repeat(gray[:, :, None], 3, axis=2))
  np.testing.assert_array_equal(_embedding(p), g)
  assert p.original_size == (90, 120) and p.input_size == (192, 256)


def test_input_errors(tiny):
  directory, _ = tiny
  p = SamPredictor.from_checkpoint(directory)
  pts, lbl = np.array([[10.0, 20.0]]), np.array([1])
  with pytest.raises(RuntimeError, match="set_image"):
    p.predict(point_coords=pts, point_labels=lbl)
  with pytest.raises(RuntimeError, match="set_image"):
    p.get_image_embedding()
  for bad, match in ((np.zeros((8, 8, 3), np.float32), "uint8"), (np.zeros((8, 8, 2), np.uint8), "HxW"),
                     (np.zeros((2, 8, 8, 3), np.uint8), "HxW"), (np.zeros((0, 8, 3), np.uint8), "empty")):
    with pytest.raises(ValueError, match=match):
      p.set_image(bad)
  with pytest.raises(ValueError, match="image_format"):
    p.set_image(np.zeros((8, 8, 3), np.uint8), image_format="HSV")
  p.set_image(random_image(40, 30))
  cases = [
      (dict(point_labels=lbl), "point_coords must be supplied"),
      (dict(point_coords=pts), "point_labels must be supplied"),
      (dict(point_coords=np.array([10.0, 20.0]), point_labels=lbl), "Nx2"),
      (dict(point_coords=pts, point_labels=np.array([1, 0])), "point_labels must have shape"),
      (dict(point_coords=pts, point_labels=np.array([2])), r"must be in \{0, 1\}"),
      (dict(point_coords=pts, point_labels=np.array([-1])), r"must be in \{0, 1\}"),
      (dict(box=np.array([1.0, 2.0, 3.0])), "length-4"),
      (dict(mask_input=np.zeros((64, 64), np.float32)), "mask_input must be 1x64x64"),
      (dict(point_coords=np.array([["a", "b"]]), point_labels=lbl), "numeric"),
      ({}, "at least one prompt"),
  ]
  for kw, match in cases:
    with pytest.raises(ValueError, match=match):
      p.predict(**kw)
  with pytest.raises(ValueError, match="batch sizes differ"):
    p.predict_batch(point_coords=np.zeros((2, 1, 2)), point_labels=np.ones((2, 1)), boxes=np.zeros((3, 4)))
  with pytest.raises(ValueError, match="BxNx2"):
    p.predict_batch(point_coords=pts, point_labels=lbl)
  with pytest.raises(ValueError, match="Bx4"):
    p.predict_batch(boxes=np.zeros(4))
  p.reset_image()
  with pytest.raises(RuntimeError, match="set_image"):
    p.predict(point_coords=pts, point_labels=lbl)


# ---------------------------------------------------------------- the real ViT-B at 1024
@pytest.fixture(scope="module")
def vit_b(tmp_path_factory):
  """segment_anything's vit_b with random weights, converted by the CLI (variant inferred)."""
  torch.manual_seed(0)
  tsam = randomize_(sam_model_registry["vit_b"](), seed=0).eval()
  d = tmp_path_factory.mktemp("sam_vit_b")
  torch.save(tsam.state_dict(), d / "sam_vit_b_random.pth")
  log = io.StringIO()
  with contextlib.redirect_stdout(log):
    rc = convert_main(["--checkpoint", str(d / "sam_vit_b_random.pth"), "--output", str(d / "converted")])
  assert rc == 0, log.getvalue()
  return str(d / "converted"), tsam, log.getvalue()


def test_vit_b_full_size_parity(vit_b):
  """The real vit_b at 1024 px, converted by the CLI: embeddings, point and batched box
  outputs equal segment_anything's. (The suite's one full-size encoder run: block by block
  parity is in test_vit_det at small sizes.)"""
  directory, tsam, log = vit_b
  assert "variant vit_b (inferred" in log and "converted SAM vit_b: 93.7M params" in log
  config, _ = load_sam(directory)
  assert config == SamConfig.from_name("vit_b")
  image = random_image(480, 640, seed=11)
  jp, tp = SamPredictor.from_checkpoint(directory), TorchSamPredictor(tsam)
  jp.set_image(image)
  tp.set_image(image)
  assert _embedding(jp).shape == (1, 64, 64, 256)
  emb_diff = _maxabs(_embedding(jp), _torch_embedding(tp))
  assert emb_diff <= TOL, emb_diff
  pts, lbl, box = _prompts(480, 640)
  kw = dict(point_coords=pts, point_labels=lbl, multimask_output=True, return_logits=True)
  _check_outputs(jp.predict(**kw), tp.predict(**kw))
  boxes = np.stack([box, box * 0.5])
  _check_outputs(jp.predict_batch(boxes=boxes, multimask_output=False, return_logits=True),
                 _torch_batch(tp, boxes=boxes, multimask_output=False, return_logits=True))
