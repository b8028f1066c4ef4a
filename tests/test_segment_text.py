"""Text-prompted instance segmentation (SamClip.segment_text) on the tiny random merged model:
the contract users rely on (bool masks of the image size, best first, no duplicates, an empty
result when nothing passes a threshold, clear refusals), its pieces (candidate points, mask NMS), the
world measurement and predict --text."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import eval_models
from samclip_jax import api, predict, world_eval


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  return eval_models.ensure_models(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def model(paths):
  return api.SamClip.from_checkpoint(paths["samclip"])


def _image(h=150, w=210):
  """Non-square (the padded SAM frame is cropped back), a red rectangle on green."""
  rng = np.random.default_rng(0)
  img = np.zeros((h, w, 3), np.uint8) + np.array([60, 120, 60], np.uint8)
  img[20:90, 30:120] = [220, 40, 40]
  return np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)


def _pairwise_iou(masks):
  m = masks.reshape(len(masks), -1).astype(np.float64)
  inter = m @ m.T
  area = np.diag(inter)
  return inter / (area[:, None] + area[None, :] - inter)


def test_masks_sorted_and_deduplicated(model):
  img = _image()
  every, _ = model.segment_text(img, "red rectangle", templates="photo", nms_thresh=1.0)
  masks, scores = model.segment_text(img, "red rectangle", templates="photo", nms_thresh=0.3)
  assert masks.dtype == bool and masks.shape[1:] == img.shape[:2]
  assert scores.dtype == np.float32 and scores.shape == (len(masks),)
  assert 1 <= len(masks) < len(every)          # candidates found, and NMS removed some
  assert np.all(np.diff(scores) <= 0) and np.all((scores >= 0) & (scores <= 1))
  assert masks.any(axis=(1, 2)).all()
  iou = _pairwise_iou(masks)
  assert (iou[~np.eye(len(masks), dtype=bool)] <= 0.3).all()
  # The kept masks are among the un-suppressed ones, the best of them first.
  flat = {m.tobytes() for m in every}
  assert all(m.tobytes() in flat for m in masks)


def test_min_score_drops_exactly_the_low_scored_masks(model):
  img = _image()
  masks, scores = model.segment_text(img, "red rectangle", templates="photo", nms_thresh=1.0)
  assert len(np.unique(scores)) >= 2
  cut = float(np.sort(scores)[len(scores) // 2])          # a score that some masks miss
  kept, kept_scores = model.segment_text(img, "red rectangle", templates="photo", nms_thresh=1.0,
                                         min_score=cut)
  np.testing.assert_array_equal(kept_scores, scores[scores >= cut])
  np.testing.assert_array_equal(kept, masks[scores >= cut])
  none, none_scores = model.segment_text(img, "red rectangle", templates="photo", min_score=1.0)
  assert none.shape == (0, 150, 210) and none_scores.shape == (0,)    # p_mask < 1: no score reaches 1


def test_nothing_matches(model):
  # No patch has p(query) > 0.999 (the tiny model's relevance stays below 0.98): 0 masks.
  masks, scores = model.segment_text(_image(), "red rectangle", templates="photo", threshold=0.999)
  assert masks.shape == (0, 150, 210) and masks.dtype == bool
  assert scores.shape == (0,) and scores.dtype == np.float32
  # Without a threshold it ranks: the same weak evidence still gives its best guesses.
  masks, scores = model.segment_text(_image(), "red rectangle", templates="photo")
  assert len(masks) >= 1 and (scores < 0.999).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(text=""), "non-empty text"),
    (dict(text="   "), "non-empty text"),
    (dict(text=None), "non-empty text"),
    (dict(text=["red"]), "non-empty text"),
    (dict(text="star", contrast="background"), "must be a list of names"),
    (dict(text="star", contrast=["Star"]), "nothing but the query"),
    (dict(text="star", contrast=[]), "at least one class name"),
    (dict(text="star", threshold=1.0), "threshold"),
    (dict(text="star", max_candidates=0), "max_candidates"),
    (dict(text="star", min_score=-0.1), "min_score"),
    (dict(text="star", min_score=1.5), "min_score"),
    (dict(text="star", image=np.zeros((10, 10, 3), np.float32)), "uint8"),
    (dict(text="star", image=np.zeros((10, 10, 2), np.uint8)), "HxWx3"),
    (dict(text="star", image=np.zeros((0, 10, 3), np.uint8)), "HxWx3"),
])
def test_bad_inputs_refused(model, kwargs, message):
  kwargs = {"image": _image(), "templates": "photo", **kwargs}
  with pytest.raises(ValueError, match=message):
    model.segment_text(**kwargs)


def test_text_candidates():
  rel = np.full((8, 8), 0.2)
  rel[1:4, 1:4] = [[0.6, 0.7, 0.6], [0.7, 0.9, 0.7], [0.6, 0.7, 0.6]]   # a blob peaking at (2, 2)
  rel[5, 6] = 0.8                                                         # a second, lower peak
  rel[7, 0] = 0.95                                                        # highest, but in the padding
  chosen = rel > 0.5
  # Model input 128 (16-px patches), image part 112 rows x 128 columns: row 7 is padding.
  pts = api.text_candidates(rel, chosen, 128, (112, 128), max_points=4)
  np.testing.assert_array_equal(pts, [[40, 40], [104, 88]])              # (x, y) centres, best first
  np.testing.assert_array_equal(api.text_candidates(rel, chosen, 128, (112, 128), 1), [[40, 40]])
  assert api.text_candidates(rel, np.zeros_like(chosen), 128, (128, 128), 4).shape == (0, 2)


def test_mask_nms():
  masks = np.zeros((4, 10, 10), bool)
  masks[0, :5] = True                 # 50 px
  masks[1, :4] = True                 # 40 px inside 0: IoU 0.8
  masks[2, 6:] = True                 # disjoint from both
  masks[3, :6] = True                 # IoU 5/6 with 0, 4/6 with 1
  scores = np.array([0.5, 0.9, 0.1, 0.3], np.float32)
  np.testing.assert_array_equal(api.mask_nms(masks, scores, 0.7), [1, 3, 2])   # 0: IoU 0.8 with 1
  np.testing.assert_array_equal(api.mask_nms(masks, scores, 0.82), [1, 0, 2])  # 3: 5/6 with 0
  np.testing.assert_array_equal(api.mask_nms(masks, scores, 1.0), [1, 0, 3, 2])
  assert api.mask_nms(masks[:0], scores[:0], 0.5).shape == (0,)


def test_world_text_metrics(paths, capsys):
  """world_eval --text: JSON figures per query kind, in range, one colour+shape query a scene."""
  assert world_eval.main(["--model", paths["samclip"], "--scenes", "2", "--side", "64", "--text"]) == 0
  out = json.loads(capsys.readouterr().out)
  world = world_eval.scenes(2, 64)
  assert out["text_colour_shape_queries"] == sum(len(s["masks"]) > 0 for s in world) > 0
  for kind in world_eval.TEXT_QUERIES:
    n = out[f"text_{kind}_queries"]
    for key in ("miou", "top1_miou", "random_miou", "hit_rate", "empty_rate"):
      value = out[f"text_{kind}_{key}"]
      assert (value is None) if n == 0 else 0.0 <= value <= 1.0
    if n:
      assert out[f"text_{kind}_top1_miou"] <= out[f"text_{kind}_miou"]
      assert out[f"text_{kind}_random_miou"] <= out[f"text_{kind}_miou"]
      assert out[f"text_{kind}_masks"] >= 1 - out[f"text_{kind}_empty_rate"]


def test_predict_text_writes_picture(paths, tmp_path, capsys):
  src = tmp_path / "in.png"
  Image.fromarray(_image()).save(src)
  out = tmp_path / "out.png"
  args = ["--checkpoint", paths["samclip"], "--image", str(src), "--templates", "photo", "--output", str(out)]
  assert predict.main(args + ["--text", "red rectangle"]) == 0
  err = capsys.readouterr().err
  assert "[text] 'red rectangle': " in err and " (scores " in err
  n = int(err.split("[text] 'red rectangle': ")[1].split(" mask")[0])
  assert n >= 2
  top = tmp_path / "top.png"
  assert predict.main(args[:-1] + [str(top), "--text", "red rectangle", "--top", "1"]) == 0
  assert f"{n} masks (scores " in capsys.readouterr().err    # all found, the best drawn
  with Image.open(top) as im:
    drawn_one = np.asarray(im.convert("RGB"))[:150, :210].astype(int)
  with Image.open(out) as im:
    pic = np.asarray(im.convert("RGB"))
  assert (drawn_one != pic[:150, :210].astype(int)).any()
  assert pic.shape[0] >= 150 and pic.shape[1] > 210
  assert np.abs(pic[:150, :210].astype(int) - _image()).max() > 0        # masks drawn over it
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".predict-")]


@pytest.mark.parametrize("extra,message", [
    (["--text", "star", "--points", "5,5"], "--text takes no"),
    (["--text", "star", "--classes", "a,b"], "--text takes no"),
    (["--text", " "], "non-empty query"),
    (["--contrast", "a,b", "--classes", "a,b"], "--contrast needs --text"),
    (["--text", "star", "--contrast", " , "], "--contrast: give"),
    (["--classes", "a,b", "--min-score", "0.5"], "--min-score needs --text"),
    (["--classes", "a,b", "--top", "1"], "--top needs --text"),
    (["--text", "star", "--top", "0"], "--top must be at least 1"),
    (["--text", "star", "--min-score", "2"], "--min-score must be in [0, 1]"),
])
def test_predict_text_bad_arguments(paths, tmp_path, capsys, extra, message):
  out = tmp_path / "out.png"
  args = ["--checkpoint", paths["samclip"], "--image", "unused.png", "--output", str(out)]
  assert predict.main(args + extra) == 2
  assert message in capsys.readouterr().err
  assert not os.listdir(tmp_path)
