"""evaluate.py end to end on the embedded sample with tiny random models (8 CPU devices):
each task's numbers are checked against the same quantity computed through the user API."""
import importlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import eval_models
from samclip_jax import api, cli, evaluate, metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  return {"models": eval_models.ensure_models(base), "sample": eval_models.ensure_sample(base)}


def _config(task, env, model="samclip", **overrides):
  c = importlib.import_module(f"configs.eval.{task}").get_config("local")
  c.model = env["models"][model]
  c.data.sample_dir = env["sample"]["root"]
  if "resolution" in c:
    c.resolution = 64      # tiny models: small inputs keep the CPU test quick
  if "templates" in c:
    c.templates = "photo"
  for k, v in overrides.items():
    if k.startswith("data."):
      c.data[k[5:]] = v
    else:
      c[k] = v
  return c


def _files(workdir, task):
  with open(os.path.join(workdir, f"{task}.json")) as f:
    result = json.load(f)
  with open(os.path.join(workdir, f"{task}.md")) as f:
    md = f.read()
  return result, md


def test_classification_matches_api(env, tmp_path):
  cfg = _config("classification", env, max_images=12)
  res = evaluate.evaluate(cfg, str(tmp_path))
  saved, md = _files(str(tmp_path), "classification")
  assert saved["metrics"] == pytest.approx(res["metrics"]) and "| top1 |" in md
  for f in ("classification.json", "classification.md"):     # as readable as open() makes them
    assert os.stat(tmp_path / f).st_mode & 0o777 == 0o666 & ~cli._umask()
  assert res["devices"] == 8 and res["num_images"] == 12 and res["model_type"] == "samclip"
  items, names = evaluate.classification_items(cfg, str(tmp_path))
  model = api.SamClip.from_checkpoint(env["models"]["samclip"])
  hits = [model.classify(api.load_image(p), names, "photo", resolution=64)[0][0] == names[y]
          for p, y in evaluate.spread(items, 12)]
  assert res["metrics"]["top1"] == pytest.approx(100.0 * np.mean(hits))


def test_max_images_spreads_over_every_class(env, tmp_path):
  """max_images of an image folder takes images of every class (its first N, sorted by class,
  would be the first classes only: a silently wrong estimate of the whole set's accuracy)."""
  src = env["sample"]["classification_images"]
  files = sorted(os.listdir(src))
  for k, cls in enumerate(["ant", "bee", "cat"]):
    os.makedirs(tmp_path / "images" / cls)
    for f in files[4 * k:4 * k + 4]:
      shutil.copy(os.path.join(src, f), tmp_path / "images" / cls / f)
    if cls == "ant":   # all but its first image unreadable: the first 3 of the folder would meet them
      for f in files[1:4]:
        (tmp_path / "images" / cls / f).write_bytes(b"not an image")
  cfg = _config("classification", env, max_images=3,
                **{"data.sample_dir": "", "data.image_dir": str(tmp_path / "images")})
  items, names = evaluate.classification_items(cfg, str(tmp_path))
  assert len(items) == 12 and [names[y] for _, y in evaluate.spread(items, 3)] == ["ant", "bee", "cat"]
  assert evaluate.spread(items, 0) == items == evaluate.spread(items, 20)
  res = evaluate.evaluate(cfg, str(tmp_path / "out"))
  assert res["num_images"] == 3 and res["skipped"] == []


def test_classification_teacher_matches_clip_model(env, tmp_path):
  from samclip_jax.clip_model import ClipModel
  from samclip_jax.templates import get_templates
  cfg = _config("classification", env, model="clip", max_images=12)
  res = evaluate.evaluate(cfg, str(tmp_path))
  assert res["model_type"] == "open_clip"
  items, names = evaluate.classification_items(cfg, str(tmp_path))
  clip = ClipModel.from_checkpoint(env["models"]["clip"])
  classifier = clip.zero_shot_classifier(names, get_templates("photo"))
  items = evaluate.spread(items, 12)
  logits, _ = clip.classify_pixels(clip.preprocess([api.load_image(p) for p, _ in items]), classifier)
  expected = metrics.topk_accuracy(np.asarray(logits), np.array([y for _, y in items]))
  assert res["metrics"]["top1"] == pytest.approx(expected["top1"])
  assert len(names) == 5 and "top5" not in res["metrics"]  # the sample's 5 classes: top-5 cannot miss


def test_classification_image_folder(env, tmp_path):
  src = env["sample"]["classification_images"]
  files = sorted(os.listdir(src))
  for k, cls in enumerate(["red_thing", "blue_thing"]):
    os.makedirs(tmp_path / "images" / cls)
    for f in files[3 * k:3 * k + 3]:
      shutil.copy(os.path.join(src, f), tmp_path / "images" / cls / f)
  # Not classes: a hidden folder, a folder of notes alone; an image in a sub-folder is its class's.
  os.makedirs(tmp_path / "images" / ".ipynb_checkpoints")
  shutil.copy(os.path.join(src, files[0]), tmp_path / "images" / ".ipynb_checkpoints" / files[0])
  os.makedirs(tmp_path / "images" / "notes")
  (tmp_path / "images" / "notes" / "readme.md").write_text("mine")
  os.makedirs(tmp_path / "images" / "blue_thing" / "more")
  shutil.copy(os.path.join(src, files[6]), tmp_path / "images" / "blue_thing" / "more" / files[6])
  cfg = _config("classification", env, **{"data.sample_dir": "", "data.image_dir": str(tmp_path / "images")})
  res = evaluate.evaluate(cfg, str(tmp_path / "out"))
  assert res["num_images"] == 7 and res["metrics"]["num_classes"] == 2
  assert "top5" not in res["metrics"]     # two classes: every image is within the top five
  for k in range(6):                        # six classes: top-5 can miss, so it is reported
    os.makedirs(tmp_path / "six" / f"class_{k}")
    shutil.copy(os.path.join(src, files[k]), tmp_path / "six" / f"class_{k}" / files[k])
  six = _config("classification", env, **{"data.sample_dir": "", "data.image_dir": str(tmp_path / "six")})
  m = evaluate.evaluate(six, str(tmp_path / "out6"))["metrics"]
  assert m["num_classes"] == 6 and m["top1"] <= m["top5"] <= 100.0
  _, names = evaluate.classification_items(cfg, str(tmp_path))
  assert names == ["blue thing", "red thing"]   # sorted folder names, "_" -> " "


@pytest.mark.parametrize("model", ["samclip", "clip"])
def test_retrieval(env, tmp_path, model):
  cfg = _config("retrieval", env, model=model, max_images=10)
  res = evaluate.evaluate(cfg, str(tmp_path))
  m = res["metrics"]
  for d in ("image_to_text", "text_to_image"):
    assert 0 <= m[f"{d}_R@1"] <= m[f"{d}_R@5"] <= m[f"{d}_R@10"] == 100.0   # 10 images, 10 captions
  if model == "samclip":
    paths, captions, t2i = evaluate.retrieval_items(cfg, str(tmp_path))
    sc = api.SamClip.from_checkpoint(env["models"]["samclip"])
    img = np.asarray(sc.encode_image([api.load_image(p) for p in paths], resolution=64))
    txt = np.asarray(sc.text_model.encode_text(captions, normalize=True))
    expected = metrics.retrieval_recall(img @ txt.T, t2i)
    assert {k: m[k] for k in expected} == pytest.approx(expected)


def test_instance_segmentation_matches_predictor(env, tmp_path):
  from pycocotools import mask as mask_utils
  from pycocotools.coco import COCO
  cfg = _config("instance_segmentation", env, max_images=5)
  res = evaluate.evaluate(cfg, str(tmp_path))
  m = res["metrics"]
  assert set(m) >= {"AP", "AP50", "AP75", "num_prompts"} and m["boxes"] == "ground truth"
  with open(tmp_path / "instance_segmentation_predictions.json") as f:
    preds = json.load(f)
  coco = COCO(env["sample"]["coco_instances"])
  first = sorted(coco.getImgIds())[0]
  anns = coco.loadAnns(coco.getAnnIds(imgIds=first, iscrowd=False))
  mine = [p for p in preds if p["image_id"] == first]
  assert len(mine) == len(anns) == len([p for p in preds if p["image_id"] == first])
  # The batched, sharded path gives the masks and scores of SamPredictor (segment_anything's API).
  predictor = api.SamClip.from_checkpoint(env["models"]["samclip"]).predictor()
  info = coco.loadImgs(first)[0]
  predictor.set_image(api.load_image(os.path.join(env["sample"]["coco_images"], info["file_name"])))
  boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                    for a in anns])
  masks, iou, _ = predictor.predict_batch(boxes=boxes, multimask_output=False)
  for p, ref_mask, ref_iou in zip(mine, masks[:, 0], iou[:, 0]):
    ours = mask_utils.decode(p["segmentation"]).astype(bool)
    inter, union = (ours & ref_mask).sum(), (ours | ref_mask).sum()
    assert union == 0 or inter / union > 0.99
    assert p["score"] == pytest.approx(float(ref_iou), abs=1e-4)


def test_instance_segmentation_teacher_with_detections(env, tmp_path):
  from pycocotools.coco import COCO
  coco = COCO(env["sample"]["coco_instances"])
  ids = evaluate.spread(sorted(coco.getImgIds()), 4)
  dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
           "score": 0.9 if a["id"] % 2 else 0.2} for a in coco.loadAnns(coco.getAnnIds(imgIds=ids))]
  with open(tmp_path / "dets.json", "w") as f:
    json.dump(dets, f)
  cfg = _config("instance_segmentation", env, model="sam", max_images=4,
                **{"data.detections": str(tmp_path / "dets.json"), "data.min_score": 0.5})
  res = evaluate.evaluate(cfg, str(tmp_path / "out"))
  assert res["model_type"] == "sam" and res["metrics"]["boxes"] == "detections"
  assert res["metrics"]["num_prompts"] == sum(d["score"] > 0.5 for d in dets)
  assert res["metrics"]["num_detections_of_other_images"] == 0
  with open(tmp_path / "out" / "instance_segmentation_predictions.json") as f:
    assert {p["score"] for p in json.load(f)} == {0.9}   # detector scores rank the masks
  # A bad detection is named (it would change the AP silently), before any mask is predicted.
  good = dets[0]
  for change, message in (({"score": None}, "detection 1 has a score that is not a finite number"),
                          ({"bbox": [1, 2, 3]}, "detection 1 has a bbox that is not 4 finite numbers"),
                          ({"bbox": [1, 2, float("nan"), 4]}, "not 4 finite numbers"),
                          ({"bbox": [1, 2, 0, 4]}, "zero or negative size"),
                          ({"category_id": 77}, "category_id the annotations do not define"),
                          ({"image_id": "3"}, "non-integer image_id"),
                          ({"bbox": [5000, 5000, 10, 10]}, "bbox entirely outside its")):  # was dropped silently
    with open(tmp_path / "bad.json", "w") as f:
      json.dump([good, dict(good, **change)], f)
    bad = _config("instance_segmentation", env, model="sam", max_images=4,
                  **{"data.detections": str(tmp_path / "bad.json")})
    with pytest.raises(ValueError, match=re.escape(message)):
      evaluate.evaluate(bad, str(tmp_path / "bad_out"))
    assert not (tmp_path / "bad_out").exists()
  # Detections of images the annotations lack (a file for the full set, annotations of a subset):
  # left out and counted in the report, not dropped without a word.
  with open(tmp_path / "more.json", "w") as f:
    json.dump(dets + [dict(good, image_id=10 ** 6), dict(good, image_id=10 ** 6 + 1)], f)
  more = _config("instance_segmentation", env, model="sam", max_images=4,
                 **{"data.detections": str(tmp_path / "more.json"), "data.min_score": 0.5})
  got = evaluate.evaluate(more, str(tmp_path / "more_out"))["metrics"]
  assert got["num_detections_of_other_images"] == 2
  assert {k: v for k, v in got.items() if k != "num_detections_of_other_images"} == {
      k: v for k, v in res["metrics"].items() if k != "num_detections_of_other_images"}
  with open(tmp_path / "bad.json", "w") as f:
    json.dump([{k: v for k, v in good.items() if k != "score"}], f)
  with pytest.raises(ValueError, match="detection 0 needs image_id, category_id, bbox and score"):
    evaluate.evaluate(bad, str(tmp_path / "bad_out"))


@pytest.mark.parametrize("mode,n", [("clip", 6), ("clip+sam", 2)])
def test_semantic_segmentation_matches_api(env, tmp_path, mode, n):
  cfg = _config("semantic_segmentation", env, max_images=n, mode=mode)
  res = evaluate.evaluate(cfg, str(tmp_path))
  items, names = evaluate.semantic_items(cfg, str(tmp_path))
  assert names[0] == "background" and len(names) == 6
  model = api.SamClip.from_checkpoint(env["models"]["samclip"])
  cm = metrics.ConfusionMatrix(len(names))
  for image_path, label_path in evaluate.spread(items, n):
    kw = {"resolution": 64} if mode == "clip" else {}   # clip+sam runs at SAM's input size
    pred = model.segment_semantic(api.load_image(image_path), names, mode=mode, templates="photo", **kw)
    cm.update(pred, evaluate._load_label(label_path))
  expected = cm.compute()
  assert res["metrics"]["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-6)
  assert res["metrics"]["aAcc"] == pytest.approx(expected["aAcc"], abs=1e-6)


def test_every_task_shares_one_workdir(env, tmp_path):
  """The README's :local commands, one workdir: each task (and each semantic-segmentation mode)
  keeps its own report, and a rerun of any of them is let in."""
  runs = [("instance_segmentation", {}), ("semantic_segmentation", {"mode": "clip"}),
          ("semantic_segmentation", {"mode": "clip+sam"}), ("instance_segmentation", {})]
  for task, overrides in runs:
    evaluate.evaluate(_config(task, env, max_images=1, **overrides), str(tmp_path))
  assert _files(tmp_path, "semantic_segmentation")[0]["metrics"]["mode"] == "clip"
  assert _files(tmp_path, "semantic_segmentation_clip_sam")[0]["metrics"]["mode"] == "clip+sam"
  assert _files(tmp_path, "instance_segmentation")[0]["task"] == "instance_segmentation"
  assert (tmp_path / evaluate.PREDICTIONS_FILE).is_file()


def test_errors(env, tmp_path):
  with pytest.raises(ValueError, match="semantic_segmentation evaluates samclip"):
    evaluate.evaluate(_config("semantic_segmentation", env, model="clip"), str(tmp_path))
  cfg = _config("classification", env)
  cfg.model = ""
  with pytest.raises(ValueError, match="set --config.model"):
    evaluate.evaluate(cfg, str(tmp_path))
  with pytest.raises(ValueError, match="unknown config arg"):
    importlib.import_module("configs.eval.classification").get_config("remote")
  user = tmp_path / "mine"
  user.mkdir()
  (user / "classification.json").write_text("{}")
  (user / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="holds files evaluate did not write"):
    evaluate.evaluate(_config("classification", env), str(user))
  assert (user / "classification.json").read_text() == "{}"
  for field, value in (("max_images", -1), ("batch_size", 0), ("num_workers", -1)):
    with pytest.raises(ValueError, match=f"--config.{field} must be an integer"):
      evaluate.evaluate(_config("classification", env, **{field: value}), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
  # A data error after the model loaded leaves no empty workdir behind either.
  cfg = _config("classification", env, **{"data.sample_dir": ""})
  with pytest.raises(ValueError, match="set --config.data.image_dir"):
    evaluate.evaluate(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("task", evaluate.TASKS)
def test_local_defaults_to_the_main_job(task, tmp_path):
  """`:local` evaluates the README main job's workdir; missing, it says what to run and writes nothing."""
  cfg = importlib.import_module(f"configs.eval.{task}").get_config("local")
  assert cfg.model == "/tmp/samclip_local" and cfg.data.sample_dir
  cfg.model = str(tmp_path / "samclip_local")
  with pytest.raises(cli.UsageError) as e:
    evaluate.evaluate(cfg, str(tmp_path / "out"))
  assert ("--config.model=DIR" in str(e.value) and
          f"python -m samclip_jax.main --config=configs/merge.py:local --workdir={cfg.model}" in str(e.value))
  assert os.listdir(tmp_path) == []


def test_command_line(env, tmp_path):
  cmd = [sys.executable, "-m", "samclip_jax.evaluate", "--config=configs/eval/retrieval.py:local",
         f"--config.model={env['models']['samclip']}", "--config.max_images=6", "--config.resolution=64",
         f"--config.data.sample_dir={env['sample']['root']}", f"--workdir={tmp_path}"]
  run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0, run.stderr[-3000:]
  assert "| image_to_text_R@1 |" in run.stdout and "[retrieval] 6/6 images" in run.stderr
  assert not re.search(r"^I\d{4} ", run.stderr, re.M), run.stderr[:2000]    # no Orbax INFO lines
  missing = subprocess.run(cmd[:4] + [f"--config.model={tmp_path}/none", f"--workdir={tmp_path}/w"], cwd=REPO,
                           capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert missing.returncode == 2 and missing.stderr.startswith(f"error: no model at {tmp_path}/none")
  assert not os.path.exists(tmp_path / "w")
  result, _ = _files(str(tmp_path), "retrieval")
  assert result["num_images"] == 6 and result["config"]["max_images"] == 6


def test_retrieval_several_captions_per_image(env, tmp_path):
  src = env["sample"]["classification_images"]
  files = sorted(os.listdir(src))[:4]
  entries = [{"file_name": f, "captions": [f"a photo number {i}", f"picture {i}"]} for i, f in enumerate(files)]
  with open(tmp_path / "caps.json", "w") as f:
    json.dump(entries, f)
  cfg = _config("retrieval", env, **{"data.sample_dir": "", "data.image_dir": src,
                                     "data.captions_file": str(tmp_path / "caps.json")})
  res = evaluate.evaluate(cfg, str(tmp_path / "out"))
  assert res["num_images"] == 4 and res["metrics"]["num_captions"] == 8
  paths, captions, t2i = evaluate.retrieval_items(cfg, str(tmp_path))
  assert t2i == [0, 0, 1, 1, 2, 2, 3, 3] and captions[1] == "picture 0"
  # One entry per caption (the same file_name twice) is the same image: counted once, as above
  # (it counted as two images, each the other's wrong answer, halving R@1).
  with open(tmp_path / "flat.json", "w") as f:
    json.dump([{"file_name": e["file_name"], "caption": c} for e in entries for c in e["captions"]], f)
  flat = _config("retrieval", env, **{"data.sample_dir": "", "data.image_dir": src,
                                      "data.captions_file": str(tmp_path / "flat.json")})
  assert evaluate.retrieval_items(flat, str(tmp_path)) == (paths, captions, t2i)
  # Malformed entries are named, not read as something else (a string's characters as captions).
  for bad, message in (({"file_name": files[0], "captions": "one caption"}, "must be a list of non-empty"),
                       ({"file_name": files[0], "captions": ["", "x"]}, "must be a list of non-empty"),
                       ({"file_name": files[0], "captions": []}, "has no caption"),
                       ({"captions": ["x"]}, "entry 0 has no file_name"),
                       (None, "caps.json holds no entries")):
    with open(tmp_path / "caps.json", "w") as f:
      json.dump([bad] if bad else [], f)
    with pytest.raises(ValueError, match=message):
      evaluate.retrieval_items(cfg, str(tmp_path))


# ----------------------------------------------------------------------------- unreadable inputs
def _spoil(directory, names):
  """names[0] becomes random bytes, names[1] is cut in half (a truncated download)."""
  with open(os.path.join(directory, names[0]), "wb") as f:
    f.write(np.random.default_rng(0).bytes(2000))
  path = os.path.join(directory, names[1])
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _broken_png(path):
  """A PNG whose second IDAT chunk has a damaged type: PIL raises SyntaxError, not OSError."""
  from PIL import Image
  noise = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
  Image.fromarray(noise).save(path, format="PNG", compress_level=0)   # ~200 KB: several IDATs
  data = bytearray(open(path, "rb").read())
  second = data.find(b"IDAT", data.find(b"IDAT") + 4)
  assert second > 0
  data[second:second + 4] = b"\x00\x01\x02\x03"
  open(path, "wb").write(bytes(data))


def test_unreadable_images_are_skipped_and_counted(env, tmp_path):
  """Classification and retrieval over folders holding a corrupt and a truncated image: both
  are skipped and listed; the rest scores exactly as a folder without them (captions of a
  skipped image leave with it)."""
  src = env["sample"]["classification_images"]
  files = sorted(os.listdir(src))[:8]
  for name in ("clean", "spoilt"):
    for k, cls in enumerate(["red_thing", "blue_thing"]):
      os.makedirs(tmp_path / name / cls)
      for f in files[4 * k:4 * k + 4]:
        shutil.copy(os.path.join(src, f), tmp_path / name / cls / f)
  _spoil(tmp_path / "spoilt" / "red_thing", files[:2])
  _broken_png(tmp_path / "spoilt" / "blue_thing" / "broken.png")
  for f in files[:2]:
    os.remove(tmp_path / "clean" / "red_thing" / f)
  res = {}
  for name in ("clean", "spoilt"):
    cfg = _config("classification", env, **{"data.sample_dir": "", "data.image_dir": str(tmp_path / name)})
    res[name] = evaluate.evaluate(cfg, str(tmp_path / f"out_{name}"))
  assert res["spoilt"]["num_images"] == res["clean"]["num_images"] == 6
  assert [os.path.basename(s["file"]) for s in res["spoilt"]["skipped"]] == ["broken.png"] + files[:2]
  assert all("cannot read" in s["reason"] for s in res["spoilt"]["skipped"])
  assert res["spoilt"]["metrics"] == res["clean"]["metrics"] and res["clean"]["skipped"] == []
  saved, md = _files(str(tmp_path / "out_spoilt"), "classification")
  assert len(saved["skipped"]) == 3 and "3 unreadable inputs skipped" in md

  captions = [{"file_name": f, "captions": [f"a photo number {i}", f"picture {i}"]} for i, f in enumerate(files)]
  for name, entries in (("clean", captions[2:]), ("spoilt", captions)):
    with open(tmp_path / f"{name}.json", "w") as f:
      json.dump(entries, f)
    cfg = _config("retrieval", env, **{"data.sample_dir": "", "data.image_dir": str(tmp_path / name / "red_thing"),
                                       "data.captions_file": str(tmp_path / f"{name}.json")})
    for e in entries:   # the blue files live in the other folder
      if not os.path.exists(tmp_path / name / "red_thing" / e["file_name"]):
        shutil.copy(os.path.join(src, e["file_name"]), tmp_path / name / "red_thing" / e["file_name"])
    res[name] = evaluate.evaluate(cfg, str(tmp_path / f"ret_{name}"))
  assert res["spoilt"]["num_images"] == 6 and res["spoilt"]["metrics"]["num_captions"] == 12
  assert res["spoilt"]["metrics"] == res["clean"]["metrics"]


def test_unreadable_segmentation_inputs_are_skipped_and_counted(env, tmp_path):
  """Semantic segmentation with a corrupt label map, one of the wrong size and one holding a
  value beyond the class names, and instance segmentation with a corrupt image: skipped and
  listed; the rest scores as without them."""
  from PIL import Image
  from pycocotools.coco import COCO
  images, labels = env["sample"]["coco_images"], env["sample"]["semantic_labels"]
  stems = sorted(os.path.splitext(f)[0] for f in os.listdir(labels))[:5]
  for name in ("clean", "spoilt"):
    for d in ("img", "lab"):
      os.makedirs(tmp_path / name / d)
    for s in stems[3:] if name == "clean" else stems:
      shutil.copy(os.path.join(images, s + ".jpg"), tmp_path / name / "img")
      shutil.copy(os.path.join(labels, s + ".png"), tmp_path / name / "lab")
  with open(tmp_path / "spoilt" / "lab" / (stems[0] + ".png"), "wb") as f:   # a corrupt label map
    f.write(np.random.default_rng(0).bytes(2000))
  small = tmp_path / "spoilt" / "lab" / (stems[1] + ".png")
  with Image.open(small) as im:
    im.resize((im.width // 2, im.height // 2), Image.NEAREST).save(small)
  beyond = tmp_path / "spoilt" / "lab" / (stems[2] + ".png")
  with Image.open(beyond) as im:
    values = np.asarray(im).copy()
  values[0, 0] = 9   # 6 class names: a short classes file would hide this class
  Image.fromarray(values).save(beyond)
  res = {}
  with open(env["sample"]["classes"]) as f:
    names = ["background"] + json.load(f)["classes"]
  for name in ("clean", "spoilt"):
    cfg = _config("semantic_segmentation", env, **{
        "data.sample_dir": "", "data.image_dir": str(tmp_path / name / "img"),
        "data.label_dir": str(tmp_path / name / "lab"), "data.class_names": names})
    res[name] = evaluate.evaluate(cfg, str(tmp_path / f"sem_{name}"))
  assert res["spoilt"]["num_images"] == 2 and len(res["spoilt"]["skipped"]) == 3
  assert ["a label map:" in s["reason"] for s in res["spoilt"]["skipped"]] == [True, False, False]
  assert "does not match its image" in res["spoilt"]["skipped"][1]["reason"]
  assert "label values [9] beyond the 6 class names (ignore_index 255)" in res["spoilt"]["skipped"][2]["reason"]
  assert res["spoilt"]["metrics"] == res["clean"]["metrics"]

  # Instance segmentation: a corrupt image, and one of another size than its annotations say
  # (its masks would be of another frame than theirs).
  coco = COCO(env["sample"]["coco_instances"])
  ids = evaluate.spread(sorted(coco.getImgIds()), 4)
  coco_dir = tmp_path / "coco"
  os.makedirs(coco_dir)
  for i in ids:
    shutil.copy(os.path.join(images, coco.loadImgs(i)[0]["file_name"]), coco_dir)
  bad, resized = (coco.loadImgs(i)[0]["file_name"] for i in (ids[0], ids[3]))
  _spoil(coco_dir, [bad, bad])
  with Image.open(coco_dir / resized) as im:
    im.resize((im.width // 2, im.height // 2)).save(coco_dir / resized)
  cfg = _config("instance_segmentation", env, max_images=4, **{"data.sample_dir": "", "data.image_dir": str(coco_dir),
                                                              "data.annotations": env["sample"]["coco_instances"]})
  out = evaluate.evaluate(cfg, str(tmp_path / "inst"))
  assert out["num_images"] == 2 and [os.path.basename(s["file"]) for s in out["skipped"]] == sorted([bad, resized])
  info = coco.loadImgs(ids[3])[0]
  assert f"is {info['height'] // 2}x{info['width'] // 2}, its annotations say {info['height']}x{info['width']}" in [
      s["reason"] for s in out["skipped"] if s["file"].endswith(resized)][0]
  with open(tmp_path / "inst" / "instance_segmentation_predictions.json") as f:
    assert {p["image_id"] for p in json.load(f)} == set(ids[1:3])


def test_nothing_to_measure_is_null_in_valid_json(env, tmp_path):
  """Every pixel ignored (255): mIoU is null, not a bare NaN that strict JSON parsers refuse;
  a clip+sam report points at its own file for its skipped inputs."""
  (tmp_path / "img").mkdir()
  (tmp_path / "lab").mkdir()
  Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
  Image.new("L", (8, 8), 255).save(tmp_path / "lab" / "a.png")
  cfg = _config("semantic_segmentation", env, **{"data.sample_dir": "", "data.image_dir": str(tmp_path / "img"),
                                                 "data.label_dir": str(tmp_path / "lab"),
                                                 "data.class_names": ("background", "cat")})
  res = evaluate.evaluate(cfg, str(tmp_path / "out"))
  def refuse(constant):
    raise ValueError(f"invalid JSON constant {constant}")
  with open(tmp_path / "out" / "semantic_segmentation.json") as f:
    written = json.loads(f.read(), parse_constant=refuse)
  assert written["metrics"]["mIoU"] is None and res["metrics"]["mIoU"] is None
  assert "| mIoU | n/a (nothing to measure) |" in (tmp_path / "out" / "semantic_segmentation.md").read_text()
  md = evaluate.markdown(dict(res, skipped=[{"file": "x", "reason": "y"}]), "semantic_segmentation_clip_sam")
  assert "skipped (listed in semantic_segmentation_clip_sam.json)" in md


def test_a_teacher_workdir_ahead_of_its_export_points_at_the_export(env, tmp_path):
  """A SAM teacher's workdir whose checkpoints are newer than its export: evaluated from a model
  directory only, and the error says where this workdir's is."""
  workdir = tmp_path / "sam_run"
  shutil.copytree(env["models"]["sam"], workdir / "export")
  (workdir / "checkpoints" / "5").mkdir(parents=True)
  cfg = _config("instance_segmentation", env, model="sam", max_images=1)
  cfg.model = str(workdir)
  with pytest.raises(ValueError, match=re.escape(f"(this training workdir's is {workdir / 'export'})")):
    evaluate.evaluate(cfg, str(tmp_path / "out"))


def test_classes_file_names_every_label_value(env, tmp_path):
  """Line k of classes_file names label value k - 1: a byte-order mark and trailing newlines
  are not names, and a blank line inside is refused (dropping it would shift every later name)."""
  (tmp_path / "img").mkdir()
  (tmp_path / "lab").mkdir()
  Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
  Image.new("L", (8, 8)).save(tmp_path / "lab" / "a.png")
  cfg = _config("semantic_segmentation", env, **{"data.sample_dir": "", "data.image_dir": str(tmp_path / "img"),
                                                 "data.label_dir": str(tmp_path / "lab"),
                                                 "data.classes_file": str(tmp_path / "classes.txt")})
  (tmp_path / "classes.txt").write_bytes("\ufeffbackground\ncat\ndog\n\n".encode("utf-8"))
  assert evaluate.semantic_items(cfg, str(tmp_path))[1] == ["background", "cat", "dog"]
  (tmp_path / "classes.txt").write_text("background\n\ncat\n")
  with pytest.raises(ValueError, match="line 2 is blank"):
    evaluate.semantic_items(cfg, str(tmp_path))
