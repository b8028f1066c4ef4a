"""Dataset preparation: every source, every bad-input path, kill-and-rerun resume."""
import glob
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from samclip_jax.data import pipeline, prepare, records


def _img(h=48, w=64, fmt="JPEG", seed=0):
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
  return buf.getvalue()


def _rle(mask):
  from pycocotools import mask as mask_utils
  return records.rle_to_json(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data if isinstance(data, bytes) else data.encode())


def _quiet(*_):
  pass


def _reasons(manifest):
  return {s["item"]: s["reason"] for s in manifest["skipped"]}


def _all_records(out):
  recs = []
  for split in ("train", "val"):
    p = os.path.join(out, split + ".json")
    if os.path.exists(p):
      recs += records.read_all(p)
  return recs


def test_folder_bad_inputs(tmp_path):
  src = tmp_path / "in"
  _write(str(src / "a.jpg"), _img(seed=1))
  _write(str(src / "b.png"), _img(fmt="PNG", seed=2))
  _write(str(src / "b.txt"), "\ufeffa caption for b\n".encode("utf-8"))  # a BOM is not text
  _write(str(src / "c.webp"), _img(fmt="WEBP", seed=3))
  _write(str(src / "corrupt.jpg"), b"\xff\xd8\xff\xe0 definitely not a jpeg")
  _write(str(src / "trunc.png"), _img(fmt="PNG", seed=4)[:300])
  _write(str(src / "notes.xyz"), b"hello")
  _write(str(src / "d.jpg"), _img(seed=5))
  _write(str(src / "d.txt"), " \n")
  out = str(tmp_path / "out")
  m = prepare.prepare("folder", str(src), out, shard_size=2, val_fraction=0.0, log=_quiet)
  assert m["splits"]["train"]["records"] == 3 and m["splits"]["train"]["inputs"] == 7
  r = _reasons(m)
  assert set(r) == {"corrupt.jpg", "trunc.png", "notes.xyz", "d.jpg"}
  assert r["d.jpg"] == "empty caption file"
  assert r["corrupt.jpg"].startswith("corrupt image")
  assert r["trunc.png"].startswith("corrupt image")
  assert r["notes.xyz"].startswith("unsupported file type .xyz")
  assert m["num_skipped_inputs"] == 4
  recs = {x["key"]: x for x in _all_records(out)}
  assert set(recs) == {"a.jpg", "b.png", "c.webp"}
  assert recs["b.png"]["caption"] == "a caption for b"
  assert Image.open(io.BytesIO(recs["c.webp"]["image"])).format == "PNG"  # re-encoded
  assert (recs["a.jpg"]["height"], recs["a.jpg"]["width"]) == (48, 64)
  # The output feeds the CLIP loader directly.
  b = next(iter(pipeline.clip_loader(os.path.join(out, "train.json"), batch_size=2, seed=0,
                                     resolutions=(224,))))
  assert b["image"].shape == (2, 224, 224, 3)


def test_an_output_directory_of_two_splits_is_not_one_split(tmp_path):
  """prepare's output holds train and val shards: given as one data path it would train on
  val too; it is refused, naming the split manifests (with one split, it is that split)."""
  src = tmp_path / "in"
  for i in range(6):
    _write(str(src / f"{i}.jpg"), _img(seed=i))
  out = tmp_path / "out"
  prepare.prepare("folder", str(src), str(out), val_fraction=0.5, log=_quiet)
  with pytest.raises(ValueError, match=r"holds the splits train.json, val.json: give one of them"):
    records.resolve_files(str(out))
  os.remove(out / "val.json")
  assert records.resolve_files(str(out)) == records.resolve_files(str(out / "train.json"))


def test_bad_options_and_a_users_output_directory(tmp_path):
  """Options that would drop inputs silently, and an --output holding a user's files (or a
  file), are refused before anything is written."""
  src = tmp_path / "in"
  _write(str(src / "a.jpg"), _img(seed=1))
  out = tmp_path / "out"
  for kw, message in ((dict(shard_size=-1), "--shard-size"), (dict(shard_size=0), "--shard-size"),
                      (dict(val_fraction=float("nan")), "--val-fraction"),
                      (dict(val_fraction=1.5), "--val-fraction"), (dict(workers=-2), "--workers")):
    with pytest.raises(SystemExit, match=message):
      prepare.prepare("folder", str(src), str(out), log=_quiet, **kw)
  assert not out.exists()
  user = tmp_path / "mine"
  _write(str(user / "manifest.json"), '{"mine": 1}')
  _write(str(user / "notes.txt"), "years of work")
  with pytest.raises(SystemExit, match="not an earlier prepare's output"):
    prepare.prepare("folder", str(src), str(user), log=_quiet)
  assert sorted(os.listdir(user)) == ["manifest.json", "notes.txt"]
  assert (user / "manifest.json").read_text() == '{"mine": 1}'
  _write(str(tmp_path / "a_file"), "x")
  with pytest.raises(SystemExit, match="not a directory"):
    prepare.prepare("folder", str(src), str(tmp_path / "a_file"), log=_quiet)
  with pytest.raises(SystemExit, match="lies inside the input"):  # its shards would become inputs
    prepare.prepare("folder", str(src), str(src / "prepared"), log=_quiet)
  assert sorted(os.listdir(src)) == ["a.jpg"]
  # An earlier output of its own is taken (the rerun resumes it).
  prepare.prepare("folder", str(src), str(out), val_fraction=0.0, log=_quiet)
  assert prepare.prepare("folder", str(src), str(out), val_fraction=0.0, log=_quiet)["splits"]["train"]["records"] == 1


def test_folder_class_labels(tmp_path):
  for cls, n in (("cat", 2), ("dog", 1)):
    for i in range(n):
      _write(str(tmp_path / "in" / cls / f"{i}.jpg"), _img(seed=i))
  m = prepare.prepare("folder", str(tmp_path / "in"), str(tmp_path / "out"), val_fraction=0.0,
                      log=_quiet)
  assert m["classes"] == ["cat", "dog"]
  assert sorted((r["key"], r["label"]) for r in _all_records(str(tmp_path / "out"))) == [
      ("cat/0.jpg", 0), ("cat/1.jpg", 0), ("dog/0.jpg", 1)]
  # Hidden folders and files (a notebook's checkpoints, macOS's ._ files) and a folder of
  # notes alone are not classes: the labels stay those of cat and dog.
  _write(str(tmp_path / "in" / ".ipynb_checkpoints" / "0.jpg"), _img(seed=5))
  _write(str(tmp_path / "in" / "cat" / "._0.jpg"), b"AppleDouble")
  _write(str(tmp_path / "in" / "notes" / "readme.md"), "my notes")
  m = prepare.prepare("folder", str(tmp_path / "in"), str(tmp_path / "out2"), val_fraction=0.0,
                      log=_quiet)
  assert m["classes"] == ["cat", "dog"]
  assert sorted((r["key"], r["label"]) for r in _all_records(str(tmp_path / "out2"))) == [
      ("cat/0.jpg", 0), ("cat/1.jpg", 0), ("dog/0.jpg", 1)]
  assert list(_reasons(m)) == ["notes/readme.md"]   # skipped and counted, as any other file


def _coco_fixture(tmp_path):
  h, w = 40, 50
  mask = np.zeros((h, w), bool)
  mask[5:20, 10:30] = True
  imgs = tmp_path / "images"
  for name in ("1.jpg", "2.jpg", "4.jpg"):
    _write(str(imgs / name), _img(h, w, seed=len(name)))
  _write(str(imgs / "4.jpg"), b"garbage")
  coco = {
      "images": [{"id": 1, "file_name": "1.jpg", "height": h, "width": w},
                 {"id": 2, "file_name": "2.jpg", "height": h, "width": w},
                 {"id": 3, "file_name": "missing.jpg", "height": h, "width": w},
                 {"id": 4, "file_name": "4.jpg", "height": h, "width": w}],
      "annotations": [
          {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [[10, 5, 30, 5, 30, 20, 10, 20]]},
          {"id": 11, "image_id": 1, "category_id": 2, "segmentation": _rle(mask)},
          {"id": 12, "image_id": 1, "category_id": 2, "segmentation": _rle(np.zeros((10, 10), bool))},
          {"id": 13, "image_id": 2, "category_id": 1, "segmentation": [[1, 2, 3]]},
          {"id": 14, "image_id": 2, "category_id": 1},
          {"id": 15, "image_id": 2, "category_id": 1, "segmentation": {"size": [h, w], "counts": "@@@#garbage"}},
          {"id": 16, "image_id": 2, "category_id": 3, "iscrowd": 1, "segmentation": _rle(mask)},
          {"id": 17, "image_id": 2, "category_id": 1,
           "segmentation": {"size": [h, w], "counts": [100, 50, h * w - 150]}},
      ],
      "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
  }
  _write(str(tmp_path / "ann.json"), json.dumps(coco))
  return str(imgs), str(tmp_path / "ann.json"), mask


def test_coco_bad_inputs(tmp_path):
  imgs, ann, mask = _coco_fixture(tmp_path)
  out = str(tmp_path / "out")
  m = prepare.prepare("coco", imgs, out, annotations=ann, val_fraction=0.0, log=_quiet)
  r = _reasons(m)
  assert r["3"].startswith("missing image")
  assert r["4"].startswith("corrupt image")
  assert r["1#ann12"].startswith("RLE size [10, 10] does not match")
  assert r["2#ann13"].startswith("invalid polygon")
  assert r["2#ann14"] == "annotation without segmentation"
  assert r["2#ann15"].startswith("invalid RLE")
  assert m["num_skipped_inputs"] == 2 and m["num_skipped_annotations"] == 4
  recs = {x["key"]: x for x in _all_records(out)}
  assert set(recs) == {"1", "2"}
  assert recs["1"]["classes"] == [1, 2]
  poly = records.decode_mask(recs["1"]["masks"][0])
  assert abs(int(poly.sum()) - int(mask.sum())) < 60  # polygon rasterisation of the same box
  np.testing.assert_array_equal(records.decode_mask(recs["1"]["masks"][1]), mask)
  assert recs["2"]["classes"] == [1] and records.decode_mask(recs["2"]["masks"][0]).sum() == 50


def test_coco_doubtful_annotations_are_skipped_one_by_one(tmp_path):
  """Each doubtful annotation is skipped and listed alone (one with a bad category once
  dropped its whole image); empty masks are not stored; a size given as text is named."""
  h, w = 40, 50
  mask = np.zeros((h, w), bool)
  mask[5:20, 10:30] = True
  _write(str(tmp_path / "images" / "1.jpg"), _img(h, w, seed=1))
  _write(str(tmp_path / "images" / "2.jpg"), _img(h, w, seed=2))
  ok = {"image_id": 1, "category_id": 1, "segmentation": _rle(mask)}
  anns = [dict(ok, id=1),
          dict(ok, id=2, category_id="dog"), dict(ok, id=3, category_id=99), dict(ok, id=4, category_id=-3),
          dict(ok, id=5, category_id=1.7), {k: v for k, v in dict(ok, id=6).items() if k != "category_id"},
          dict(ok, id=7, iscrowd="0"),
          dict(ok, id=8, segmentation=[[1, 1, 10, 10, 20, 20]]),               # collinear: no area
          dict(ok, id=9, segmentation=[[100, 100, 120, 100, 120, 120]]),       # outside the image
          dict(ok, id=10, segmentation=_rle(np.zeros((h, w), bool))),
          {"id": 11, "image_id": 2, "category_id": 1, "segmentation": _rle(mask)}]
  coco = {"images": [{"id": 1, "file_name": "1.jpg", "height": h, "width": w},
                     {"id": 2, "file_name": "2.jpg", "height": str(h), "width": w}],
          "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
  _write(str(tmp_path / "ann.json"), json.dumps(coco))
  m = prepare.prepare("coco", str(tmp_path / "images"), str(tmp_path / "out"),
                      annotations=str(tmp_path / "ann.json"), val_fraction=0.0, log=_quiet)
  r = _reasons(m)
  for aid, cid in ((2, "'dog'"), (3, "99"), (4, "-3"), (5, "1.7"), (6, "None")):
    assert r[f"1#ann{aid}"] == f"category_id {cid} is not one of the categories"
  assert r["1#ann7"] == "iscrowd must be 0 or 1, got '0'"
  for aid in (8, 9, 10):
    assert r[f"1#ann{aid}"] == "empty mask: no pixel inside the image", (aid, r)
  assert r["images[1]"] == "image 2 has a height that is not a positive integer: '40'"
  recs = {x["key"]: x for x in _all_records(str(tmp_path / "out"))}
  assert set(recs) == {"1"} and recs["1"]["classes"] == [1]
  coco["categories"].append({"id": 2, "name": "c"})
  _write(str(tmp_path / "ann.json"), json.dumps(coco))
  with pytest.raises(SystemExit, match="category ids repeat: 2"):
    prepare.prepare("coco", str(tmp_path / "images"), str(tmp_path / "out2"),
                    annotations=str(tmp_path / "ann.json"), log=_quiet)
  assert not os.path.exists(tmp_path / "out2")


def test_coco_malformed_annotation_file(tmp_path):
  _write(str(tmp_path / "ann.json"), "{not json")
  (tmp_path / "images").mkdir()
  with pytest.raises(SystemExit, match="cannot read COCO annotations"):
    prepare.prepare("coco", str(tmp_path / "images"), str(tmp_path / "out"),
                    annotations=str(tmp_path / "ann.json"), log=_quiet)


def _sa1b_files(h=32, w=40):
  mask = np.zeros((h, w), bool)
  mask[3:9, 4:20] = True
  good = {"image": {"image_id": 1, "height": h, "width": w, "file_name": "sa_1.jpg"},
          "annotations": [{"id": 1, "segmentation": _rle(mask), "bbox": [4, 3, 16, 6], "area": 96},
                          {"id": 2, "segmentation": _rle(np.ones((h + 1, w), bool))}]}
  return {
      "sa_1.jpg": _img(h, w), "sa_1.json": json.dumps(good).encode(),
      "sa_2.jpg": _img(h, w, seed=2), "sa_2.json": b'{"image": {}, "annotations": [',
      "sa_3.json": json.dumps(good).encode(),  # its image is missing
      "sa_4.jpg": _img(h, w, seed=4)[:200], "sa_4.json": json.dumps(good).encode(),
      "sa_5.jpg": _img(h, w, seed=5),  # no annotation file
  }, mask


def _check_sa1b(m, out, mask):
  r = _reasons(m)
  key = lambda s: [k for k in r if k.endswith(s)][0]  # noqa: E731
  assert r[key("sa_2")].startswith("malformed annotation JSON")
  assert r[key("sa_3")] == "missing image"
  assert r[key("sa_4")].startswith("corrupt image")
  assert r[key("sa_5")] == "missing annotation JSON"
  assert r[key("sa_1#ann2")].startswith("RLE size [33, 40] does not match")
  recs = _all_records(out)
  assert [x["key"] for x in recs] == ["sa_1"]
  assert len(recs[0]["masks"]) == 1
  np.testing.assert_array_equal(records.decode_mask(recs[0]["masks"][0]), mask)


def test_sa1b_folder_and_tar(tmp_path):
  files, mask = _sa1b_files()
  for name, data in files.items():
    _write(str(tmp_path / "dir" / name), data)
  m = prepare.prepare("sa1b", str(tmp_path / "dir"), str(tmp_path / "out1"), val_fraction=0.0,
                      log=_quiet)
  _check_sa1b(m, str(tmp_path / "out1"), mask)
  with tarfile.open(str(tmp_path / "sa_000000.tar"), "w") as tf:
    for name, data in sorted(files.items()):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
  m = prepare.prepare("sa1b", str(tmp_path / "sa_000000.tar"), str(tmp_path / "out2"),
                      val_fraction=0.0, log=_quiet)
  _check_sa1b(m, str(tmp_path / "out2"), mask)
  # SAM loader reads it.
  b = next(iter(pipeline.sam_loader(os.path.join(str(tmp_path / "out2"), "train.json"),
                                    batch_size=1, masks_per_image=2, points_per_prompt=2, seed=0)))
  assert b["prompt_valid"][0].tolist() == [True, False]


def test_wds_tars(tmp_path):
  d = tmp_path / "shards"
  os.makedirs(d)
  samples = [
      {"000.jpg": _img(seed=1), "000.txt": b"first caption"},
      {"001.png": _img(fmt="PNG", seed=2), "001.json": json.dumps({"caption": "from json"}).encode()},
      {"002.txt": b"caption without image"},
      {"003.jpg": b"\xff\xd8 broken"},
  ]
  for t, group in enumerate((samples[:2], samples[2:])):
    with tarfile.open(str(d / f"part-{t:03d}.tar"), "w") as tf:
      for s in group:
        for name, data in s.items():
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tf.addfile(info, io.BytesIO(data))
  _write(str(d / "part-999.tar"), b"not a tar at all" * 100)
  out = str(tmp_path / "out")
  m = prepare.prepare("wds", str(d), out, val_fraction=0.0, log=_quiet)
  r = _reasons(m)
  assert r["part-001/002"].startswith("no supported image")
  assert r["part-001/003"].startswith("corrupt image")
  assert r["part-999/"].startswith("unreadable tar")
  recs = {x["key"]: x for x in _all_records(out)}
  assert recs["part-000/000"]["caption"] == "first caption"
  assert recs["part-000/001"]["caption"] == "from json"
  assert len(recs) == 2 and m["num_skipped_inputs"] == 3


def test_kill_and_rerun_no_duplicates_or_losses(tmp_path):
  src = tmp_path / "in"
  for i in range(23):
    _write(str(src / f"{i:03d}.jpg"), _img(16, 16, seed=i))
  _write(str(src / "bad.jpg"), b"broken")
  args = [sys.executable, "-m", "samclip_jax.data.prepare", "--source", "folder",
          "--input", str(src), "--shard-size", "5", "--val-fraction", "0.2"]
  ref = str(tmp_path / "ref")
  subprocess.run(args + ["--output", ref], check=True, capture_output=True)
  out = str(tmp_path / "out")
  env = dict(os.environ, **{prepare.STOP_ENV: "2"})
  # Killed after the 2nd shard file is in place but before it is committed.
  killed = subprocess.run(args + ["--output", out], env=env, capture_output=True, text=True)
  assert killed.returncode == 3, killed.stderr
  assert len([n for n in os.listdir(os.path.join(out, "progress"))
              if n.endswith(".array_record.json")]) == 1
  rerun = subprocess.run(args + ["--output", out], capture_output=True, text=True, check=True)
  assert "1 shards already done" in rerun.stdout
  got, want = _all_records(out), _all_records(ref)
  keys = [x["key"] for x in got]
  assert len(keys) == len(set(keys)) == 23
  assert sorted(keys) == sorted(x["key"] for x in want)
  assert json.load(open(os.path.join(out, "manifest.json")))["skipped"] == \
      json.load(open(os.path.join(ref, "manifest.json")))["skipped"]
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def _png16(arr):
  """A 16-bit PNG (gray [H,W] or RGB [H,W,3] uint16) written by hand: PIL cannot save 16-bit RGB."""
  import struct
  import zlib
  h, w = arr.shape[:2]
  chunk = lambda t, d: (struct.pack(">I", len(d)) + t + d  # noqa: E731
                        + struct.pack(">I", zlib.crc32(t + d)))
  rows = arr.astype(">u2").reshape(h, -1).view(np.uint8)
  raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], 1).tobytes()
  ihdr = struct.pack(">IIBBBBB", w, h, 16, 2 if arr.ndim == 3 else 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
          + chunk(b"IEND", b""))


def test_wide_images_keep_their_range(tmp_path):
  from samclip_jax import api
  from samclip_jax.data import transforms
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 65536, (12, 10)).astype(np.uint16)
  rgb = rng.integers(0, 65536, (12, 10, 3)).astype(np.uint16)
  flt = rng.random((12, 10)).astype(np.float32)
  src = tmp_path / "in"
  _write(str(src / "gray16.png"), _png16(gray))
  _write(str(src / "rgb16.png"), _png16(rgb))
  os.makedirs(src, exist_ok=True)
  Image.fromarray(flt).save(str(src / "float.tiff"))
  want = {"gray16.png": np.repeat(np.rint(gray / 257.0)[..., None], 3, -1),
          "rgb16.png": rgb >> 8,  # PIL keeps the high byte of 16-bit RGB
          "float.tiff": np.repeat(np.rint(flt * 255.0)[..., None], 3, -1)}
  out = str(tmp_path / "out")
  prepare.prepare("folder", str(src), out, val_fraction=0.0, log=_quiet)
  recs = {x["key"]: x for x in _all_records(out)}
  assert set(recs) == set(want)
  for name, expect in want.items():
    # Stored pixels (decoded by the loaders) and the API / predict reader agree with the range.
    np.testing.assert_array_equal(transforms.decode_image(recs[name]["image"]), expect, err_msg=name)
    np.testing.assert_array_equal(api.load_image(str(src / name)), expect, err_msg=name)
    with Image.open(str(src / name)) as im:
      np.testing.assert_array_equal(api.as_rgb_uint8(im), expect, err_msg=name)


def test_int32_and_float_images_are_read_in_the_range_they_hold():
  """PIL's convert("I") / convert("F") of an 8-bit picture keep 0..255 (they came out black /
  white, read as 16-bit / 0..1); float files in 0..1 and 16-bit content in mode I still scale;
  a range no picture has is refused by name."""
  from samclip_jax import api
  rng = np.random.default_rng(3)
  grey = rng.integers(0, 256, (9, 11)).astype(np.uint8)
  want = np.repeat(grey[..., None], 3, -1)
  eight = Image.fromarray(grey)
  for im in (eight.convert("I"), eight.convert("F"), Image.fromarray(grey.astype(np.float32) / 255, "F"),
             Image.fromarray(grey.astype(np.int32) * 257, "I")):
    np.testing.assert_array_equal(api.as_rgb_uint8(im), want, err_msg=im.mode)
  # Float rounding and resampling stray a little past the range: still that range, clipped.
  unit = grey.astype(np.float32) / 255
  for strayed in (unit * np.float32(1.02), unit - np.float32(0.01)):
    got = api.as_rgb_uint8(Image.fromarray(strayed, "F"))[..., 0].astype(int)
    np.testing.assert_array_equal(got, np.clip(np.rint(strayed * 255.0), 0, 255))
  for bad in (Image.fromarray(np.full((4, 4), 70000, np.int32), "I"),
              Image.fromarray(np.full((4, 4), -3.0, np.float32), "F")):
    with pytest.raises(ValueError, match=f"a mode-{bad.mode} image with values .*: not a picture's range"):
      api.as_rgb_uint8(bad)


def test_coco_bad_geometry_and_entries_are_skipped_and_counted(tmp_path):
  h, w = 40, 50
  _write(str(tmp_path / "images" / "1.jpg"), _img(h, w))
  box = [10, 5, 30, 5, 30, 20, 10, 20]
  coco = {
      "images": [{"id": 1, "file_name": "1.jpg", "height": h, "width": w}, "2.jpg",
                 {"id": 1, "file_name": "other.jpg"}],
      "annotations": [
          {"id": 20, "image_id": 1, "category_id": 1, "segmentation": [box]},
          {"id": 21, "image_id": 1, "category_id": 1, "segmentation": [[1e9, 5, 30, 5, 30, 20]]},
          {"id": 22, "image_id": 1, "category_id": 1,
           "segmentation": [[float("nan"), 5, 30, 5, 30, 20]]},
          {"id": 23, "image_id": 1, "category_id": 1, "segmentation": [box, [5, 5, 6, 5, 6, -1e7]]},
          {"id": 24, "image_id": 99, "category_id": 1, "segmentation": [box]},
      ],
      "categories": [{"id": 1, "name": "a"}],
  }
  _write(str(tmp_path / "ann.json"), json.dumps(coco))  # NaN is written as the NaN token
  out = str(tmp_path / "out")
  # A subprocess: the unchecked polygon hangs or kills pycocotools' caller.
  run = subprocess.run([sys.executable, "-m", "samclip_jax.data.prepare", "--source", "coco",
                        "--input", str(tmp_path / "images"), "--annotations",
                        str(tmp_path / "ann.json"), "--output", out, "--val-fraction", "0"],
                       capture_output=True, text=True, timeout=60)
  assert run.returncode == 0, run.stderr[-2000:]
  m = json.load(open(os.path.join(out, "manifest.json")))
  r = _reasons(m)
  assert r["1#ann21"].startswith("invalid polygon: coordinate 1e+09 is beyond")
  assert r["1#ann22"] == "invalid polygon: non-finite coordinate"
  assert r["1#ann23"].startswith("invalid polygon: coordinate 1e+07")
  assert r["99#ann24"] == "annotation refers to missing image id 99"
  assert r["images[1]"].startswith("image entry is not an object")
  assert r["images[2]"] == "duplicate image id 1"
  assert m["num_skipped_inputs"] == 2 and m["num_skipped_annotations"] == 4
  recs = _all_records(out)
  assert [x["key"] for x in recs] == ["1"] and len(recs[0]["masks"]) == 1


def _tar(path, members):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))


def test_non_utf8_names_are_stored_safely(tmp_path):
  src = os.fsencode(str(tmp_path / "in"))
  os.makedirs(src)
  for name, data in ((b"caf\xe9.jpg", _img(seed=1)), (b"caf\xe9.txt", b"latin-1 name"),
                     (b"ok.jpg", _img(seed=2))):
    _write(os.path.join(src, name), data)
  out = str(tmp_path / "out")
  m = prepare.prepare("folder", os.fsdecode(src), out, val_fraction=0.5, log=_quiet)
  assert m["skipped"] == []
  recs = {x["key"]: x for x in _all_records(out)}
  assert set(recs) == {"caf\\xe9.jpg", "ok.jpg"}
  assert recs["caf\\xe9.jpg"]["caption"] == "latin-1 name"
  # Tar member names too; two tars named alike give one key twice: the second is skipped.
  for d in ("a", "b"):
    _tar(str(tmp_path / d / "part-000.tar"), {"\udcff.jpg": _img(seed=3)})
  m = prepare.prepare("wds", str(tmp_path / "[ab]" / "part-000.tar"), str(tmp_path / "out2"),
                      val_fraction=0.0, log=_quiet)
  assert [x["key"] for x in _all_records(str(tmp_path / "out2"))] == ["part-000/\\xff"]
  assert m["skipped"] == [{"item": "part-000/\\xff", "kind": "input", "reason": "duplicate key"}]


def test_resume_after_the_inputs_changed(tmp_path):
  src = tmp_path / "in"
  for i in range(12):
    _write(str(src / f"{i:03d}.jpg"), _img(8, 8, seed=i))
  out = str(tmp_path / "out")
  run = lambda o: prepare.prepare("folder", str(src), o, shard_size=4, val_fraction=0.0,  # noqa: E731
                                  log=_quiet)
  run(out)
  # Interrupted before the last shard was committed, then the input listing changed:
  # 3 inputs gone from the middle, 3 new at the end (same shard names, other contents).
  os.remove(os.path.join(out, "progress", "train-00002-of-00003.array_record.json"))
  for i in (4, 5, 6):
    os.remove(str(src / f"{i:03d}.jpg"))
  for n in ("z0", "z1", "z2"):
    _write(str(src / f"{n}.jpg"), _img(8, 8, seed=len(n)))

  def check():
    m = run(out)
    ref = str(tmp_path / f"ref{len(os.listdir(src))}")
    want = run(ref)
    assert [x["key"] for x in _all_records(out)] == [x["key"] for x in _all_records(ref)]
    assert m["splits"] == want["splits"]
    # No stale shard left for a directory glob to pick up.
    assert sorted(glob.glob(os.path.join(out, "*.array_record"))) == sorted(records.resolve_files(
        os.path.join(out, "train.json")))

  check()
  # The number of shards changes (new names): the old shard files are ours and go; a file
  # the user put in the output directory stays.
  for i in range(20, 25):
    _write(str(src / f"{i:03d}.jpg"), _img(8, 8, seed=i))
  _write(os.path.join(out, "notes.txt"), "mine")
  check()
  assert os.path.exists(os.path.join(out, "notes.txt"))


def _proc_stat(pid):
  """(parent pid, state) of a process from /proc, or None once it is gone."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None
  return int(fields[1]), fields[0]


def test_killed_parallel_prepare_leaves_no_workers(tmp_path):
  if not os.path.isdir("/proc/self"):
    pytest.skip("needs /proc")
  src = tmp_path / "in"
  for i in range(4):
    _write(str(src / f"{i}.jpg"), _img(8, 8, seed=i))
  os.mkfifo(str(src / "0_hold.jpg"))  # reading it blocks: the run is busy when it is killed
  proc = subprocess.Popen(
      [sys.executable, "-m", "samclip_jax.data.prepare", "--source", "folder", "--input",
       str(src), "--output", str(tmp_path / "out"), "--shard-size", "1", "--workers", "2"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _kill_and_expect_workers_gone(proc, 2)


def _kill_and_expect_workers_gone(proc, num_workers, ready=lambda: True):
  """SIGKILLs `proc` once it has `num_workers` children and `ready()`; they must exit within 10 s."""
  workers = []
  alive = lambda: [w for w in workers if (_proc_stat(w) or (0, "Z"))[1] not in "ZX"]  # noqa: E731
  try:
    deadline = time.time() + 120
    while (len(workers) < num_workers or not ready()) and time.time() < deadline and proc.poll() is None:
      workers = [int(p) for p in os.listdir("/proc")
                 if p.isdigit() and (_proc_stat(p) or (0,))[0] == proc.pid]
      time.sleep(0.05)
    assert len(workers) >= num_workers, f"the job did not start its {num_workers} workers"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.time() + 10
    while alive() and time.time() < deadline:
      time.sleep(0.05)
    assert not alive(), "workers outlived the killed job"
  finally:
    for pid in [proc.pid] + alive():
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def test_killed_training_loader_leaves_no_grain_workers(tmp_path):
  """A training job killed mid-run (SIGKILL, OOM) must not leave grain workers spinning."""
  if not os.path.isdir("/proc/self"):
    pytest.skip("needs /proc")
  marker = tmp_path / "batch_done"
  script = ("from absl import flags; flags.FLAGS.mark_as_parsed()\n"
            "import time\nfrom samclip_jax.data import pipeline\n"
            "it = iter(pipeline.sam_loader('world:train:1000:64', batch_size=2, masks_per_image=2,"
            " points_per_prompt=3, seed=0, image_size=64, worker_count=1))\n"
            f"next(it)\nopen({str(marker)!r}, 'w').close()\ntime.sleep(600)\n")
  proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, cwd=os.path.dirname(os.path.dirname(__file__)))
  _kill_and_expect_workers_gone(proc, 1, ready=marker.exists)  # killed mid-run, as a job is


def _sideways(h, w, orientation=6):
  """A PNG stored h x w (a red top-left corner) tagged to be shown turned: 6 = turn 90 degrees
  clockwise, as a phone stores a portrait photo."""
  stored = np.full((h, w, 3), 90, np.uint8)
  stored[:4, :4] = (255, 0, 0)
  exif = Image.Exif()
  exif[0x0112] = orientation
  buf = io.BytesIO()
  Image.fromarray(stored).save(buf, format="PNG", exif=exif.tobytes())
  return buf.getvalue()


def test_images_are_read_upright_unless_annotations_were_made_on_the_stored_pixels(tmp_path):
  """A photo a camera stored sideways is read as viewers show it (points and boxes a person
  reads off a viewer then fall where meant); COCO annotations of the stored size keep it."""
  from samclip_jax import api
  from samclip_jax.data import transforms
  path = tmp_path / "photo.png"
  path.write_bytes(_sideways(40, 100))
  shown = api.load_image(str(path))
  assert shown.shape == (100, 40, 3) and tuple(shown[0, -1]) == (255, 0, 0)  # top-left -> top-right
  with Image.open(path) as im:
    np.testing.assert_array_equal(transforms.as_rgb_uint8(im), shown)   # a PIL image given to the API
  assert api.load_image(str(path), annotated_hw=(40, 100)).shape == (40, 100, 3)
  assert api.load_image(str(path), annotated_hw=(100, 40)).shape == (100, 40, 3)

  # prepare: stored upright (every reader decodes the same pixels), or as stored when the
  # annotations say the stored size.
  imgs = tmp_path / "images"
  _write(str(imgs / "1.png"), _sideways(40, 100))
  _write(str(imgs / "2.png"), _sideways(40, 100))
  coco = {"images": [{"id": 1, "file_name": "1.png", "height": 100, "width": 40},
                     {"id": 2, "file_name": "2.png", "height": 40, "width": 100}],
          "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10],
                           "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]},
                          {"id": 11, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10],
                           "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]}],
          "categories": [{"id": 1, "name": "a"}]}
  _write(str(tmp_path / "ann.json"), json.dumps(coco))
  out = str(tmp_path / "out")
  m = prepare.prepare("coco", str(imgs), out, annotations=str(tmp_path / "ann.json"), val_fraction=0.0, log=_quiet)
  assert m["num_skipped_inputs"] == 0
  recs = {x["key"]: x for x in _all_records(out)}
  for key, hw, corner in (("1", (100, 40), (0, -1)), ("2", (40, 100), (0, 0))):
    img = np.asarray(Image.open(io.BytesIO(recs[key]["image"])).convert("RGB"))   # as loaders read it
    assert img.shape[:2] == hw == (recs[key]["height"], recs[key]["width"]), key
    assert tuple(img[corner]) == (255, 0, 0), key
