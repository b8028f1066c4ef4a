"""Embedded sample: deterministic, exact masks, atomic and idempotent build, COCO export."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from samclip_jax.data import records, sample

SMALL = dict(num_clip_train=12, num_clip_val=4, num_sam_train=10, num_sam_val=6)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  return sample.ensure_sample(str(tmp_path_factory.mktemp("s") / "sample"), **SMALL)


def test_build_is_deterministic(built, tmp_path):
  other = sample.ensure_sample(str(tmp_path / "again"), **SMALL)
  for split in ("clip_train", "clip_val", "sam_train", "sam_val"):
    for a, b in zip(records.resolve_files(built[split]), records.resolve_files(other[split])):
      assert open(a, "rb").read() == open(b, "rb").read()
  with open(built["coco_instances"]) as f, open(other["coco_instances"]) as g:
    assert json.load(f) == json.load(g)


def test_counts_and_fields(built):
  man = json.load(open(built["manifest"]))
  assert man["counts"] == {"clip_train": 12, "clip_val": 4, "sam_train": 10, "sam_val": 6}
  clip = records.read_all(built["clip_train"])
  assert len(clip) == 12 and len({r["key"] for r in clip}) == 12
  for r in clip:
    assert r["caption"].startswith("a photo of")
    assert -1 <= r["label"] < len(sample.CLASSES)
    img = np.asarray(Image.open(__import__("io").BytesIO(r["image"])))
    assert img.shape == (r["height"], r["width"], 3)
    assert 320 <= min(img.shape[:2]) and max(img.shape[:2]) <= 640
  assert len({(r["height"], r["width"]) for r in clip}) > 3  # varied aspect ratios


def test_masks_are_exact(built):
  # Records were drawn from scenes offset by the earlier splits' sizes (clip first).
  offset = SMALL["num_clip_train"] + SMALL["num_clip_val"]
  recs = records.read_all(built["sam_train"])
  for i, r in enumerate(recs[:5]):
    scene = sample.draw_scene(0, offset + i)
    masks = np.stack([records.decode_mask(m) for m in r["masks"]])
    np.testing.assert_array_equal(masks, scene["masks"])
    assert r["classes"] == scene["classes"]
    assert masks.sum(0).max() <= 1  # visible parts never overlap
    sem = np.zeros(masks.shape[1:], np.uint8)
    for m, c in zip(masks, r["classes"]):
      sem[m] = c
    np.testing.assert_array_equal(sem, scene["semantic"])
    # The drawn colour is inside each mask (PNG/JPEG noise aside).
    img = scene["image"].astype(np.int32)
    for m, colour in zip(masks, scene["colours"]):
      ref = np.asarray(sample.COLOURS[colour])
      inner = m & np.roll(m, 2, 0) & np.roll(m, -2, 0) & np.roll(m, 2, 1) & np.roll(m, -2, 1)
      if inner.sum() > 20:
        assert np.abs(np.median(img[inner], 0) - ref).max() < 0.2 * 255


def test_coco_export(built):
  from pycocotools.coco import COCO
  coco = COCO(built["coco_instances"])
  assert len(coco.getImgIds()) == SMALL["num_sam_val"]
  assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(sample.CLASSES)
  recs = records.read_all(built["sam_val"])
  for img_info, rec in zip(coco.loadImgs(coco.getImgIds()), recs):
    assert os.path.isfile(os.path.join(built["coco_images"], img_info["file_name"]))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=img_info["id"]))
    sem = np.asarray(Image.open(os.path.join(
        built["semantic_labels"], os.path.splitext(img_info["file_name"])[0] + ".png")))
    assert sem.shape == (img_info["height"], img_info["width"])
    for a, rle in zip(anns, rec["masks"]):
      m = coco.annToMask(a).astype(bool)
      np.testing.assert_array_equal(m, records.decode_mask(rle))
      assert (sem[m] == a["category_id"]).all()
      ys, xs = np.nonzero(m)
      assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
  cls = json.load(open(built["classification_labels"]))
  assert len(cls) == SMALL["num_clip_val"]
  assert all(os.path.isfile(os.path.join(built["classification_images"], c["file_name"])) for c in cls)


def test_idempotent_and_half_built(tmp_path):
  small = dict(num_clip_train=2, num_clip_val=1, num_sam_train=2, num_sam_val=1)
  d = str(tmp_path / "s")
  p = sample.ensure_sample(d, **small)
  mtime = os.path.getmtime(p["manifest"])
  assert sample.ensure_sample(d, **small) == p
  assert os.path.getmtime(p["manifest"]) == mtime
  # A sample of another config is rebuilt whole, not trusted.
  os.remove(records.resolve_files(p["clip_val"])[0])
  p2 = sample.ensure_sample(d, **dict(small, num_clip_val=2))
  assert len(records.read_all(p2["clip_val"])) == 2
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp dirs left


def test_never_builds_over_a_users_directory(tmp_path):
  """sample_dir pointed at a user's directory (or a copy of a sample without its manifest):
  refused before anything is built, and nothing in it is touched."""
  small = dict(num_clip_train=2, num_clip_val=1, num_sam_train=2, num_sam_val=1)
  user = tmp_path / "mine"
  user.mkdir()
  (user / "thesis.tex").write_text("years of work")
  (user / "manifest.json").write_text('{"files": 3}')  # someone else's manifest
  with pytest.raises(FileExistsError, match="not the embedded sample"):
    sample.ensure_sample(str(user), **small)
  assert sorted(os.listdir(user)) == ["manifest.json", "thesis.tex"]
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(FileExistsError, match="not a directory"):
    sample.ensure_sample(str(tmp_path / "a_file"), **small)
  assert sorted(os.listdir(tmp_path)) == ["a_file", "mine"]  # no temporary left
  (tmp_path / "empty").mkdir()  # an empty directory is fine
  assert os.path.isfile(sample.ensure_sample(str(tmp_path / "empty"), **small)["manifest"])


def test_caption_names_largest_shape():
  scene = sample.draw_scene(0, 3)
  cap = sample.caption(scene)
  big = int(np.argmax([m.sum() for m in scene["masks"]]))
  assert cap.startswith(f"a photo of a {scene['colours'][big]} {sample.CLASSES[scene['classes'][big] - 1]}")
  assert sample.label(scene) == scene["classes"][big] - 1
