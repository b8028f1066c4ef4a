"""predict CLI: overlay pictures for classes, point / box prompts and --everything; clear
errors and no partial output."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import eval_models
from samclip_jax import cli, predict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = "circle,rectangle,triangle,ellipse,star"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  sample = eval_models.ensure_sample(base)
  images = sample["coco_images"]
  return {"models": eval_models.ensure_models(base),
          "image": os.path.join(images, sorted(os.listdir(images))[0])}


def _run(env, out, *args, checkpoint="samclip"):
  return predict.main(["--checkpoint", env["models"][checkpoint], "--image", env["image"],
                       "--output", str(out), "--templates", "photo", *args])


def _check_picture(env, out):
  """A readable picture: the image (tinted by masks) plus a legend panel on the right."""
  src = np.asarray(Image.open(env["image"]).convert("RGB"))
  with Image.open(out) as im:
    pic = np.asarray(im.convert("RGB"))
  h, w = src.shape[:2]
  assert pic.shape[0] >= h and pic.shape[1] > w
  assert np.abs(pic[:h, :w].astype(int) - src).max() > 0      # masks drawn over the image
  assert not [f for f in os.listdir(os.path.dirname(out)) if f.startswith(".predict-")]
  assert os.stat(out).st_mode & 0o777 == 0o666 & ~cli._umask()   # not mkstemp's 0600
  return pic


@pytest.mark.parametrize("args", [
    ("--classes", CLASSES),                                    # CLIP+SAM semantic (default mode)
    ("--classes", CLASSES, "--mode", "clip"),
    ("--points", "120,90;300,250", "--labels", "1,0"),
    ("--points", "120,90"),
    ("--boxes", "20,30,200,220;150,100,300,300", "--classes", "circle,star"),
    ("--boxes", "20,30,200,220", "--points", "100,100"),
    ("--everything", "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
     "--classes", "circle,star"),
], ids=["semantic", "semantic-clip", "points", "one-point", "boxes", "box+point", "everything"])
def test_writes_overlay(env, tmp_path, capsys, args):
  out = tmp_path / "out.png"
  assert _run(env, out, *args) == 0, capsys.readouterr().err
  assert f"wrote {out}" in capsys.readouterr().out
  _check_picture(env, str(out))


def test_jpeg_output_and_workdir_checkpoint(env, tmp_path):
  # A training workdir whose export is the merged model works as --checkpoint too.
  import shutil
  shutil.copytree(env["models"]["samclip"], tmp_path / "work" / "export")
  out = tmp_path / "out.jpg"
  rc = predict.main(["--checkpoint", str(tmp_path / "work"), "--image", env["image"], "--output", str(out),
                     "--classes", "circle,star", "--mode", "clip", "--templates", "photo"])
  assert rc == 0
  with Image.open(out) as im:
    assert im.format == "JPEG"


@pytest.mark.parametrize("args,code,message", [
    (("--points", "1,2;3"), 2, "is not 'x,y'"),
    (("--points", "1,a"), 2, "non-number"),
    (("--points", "1,2;3,4", "--labels", "1"), 2, "1 labels for 2 points"),
    (("--points", "1,2", "--labels", "2"), 2, "1 (foreground) or 0"),
    (("--boxes", "10,10,5,20"), 2, "x0 < x1"),
    (("--boxes", "1,2,3"), 2, "x0,y0,x1,y1"),
    (("--boxes", "nan,0,10,10"), 2, "'nan,0,10,10' holds a non-finite number"),
    (("--points", "nan,nan"), 2, "'nan,nan' holds a non-finite number"),
    (("--everything", "--pred-iou-thresh", "2"), 2, "--pred-iou-thresh must be in [0, 1], got 2.0"),
    (("--everything", "--stability-score-thresh", "-1"), 2, "--stability-score-thresh must be in [0, 1]"),
    (("--points", "99999,5"), 2, "outside"),
    (("--labels", "1"), 2, "--labels needs --points"),
    ((), 2, "nothing to do"),
    (("--everything", "--points", "1,1"), 2, "--everything takes no"),
    (("--points", "1,1", "--points-per-side", "8"), 2, "--points-per-side needs --everything"),  # was ignored
    (("--classes", "a,b", "--stability-score-thresh", "0.5"), 2, "--stability-score-thresh needs --everything"),
    (("--boxes", "1,1,9,9", "--mode", "clip"), 2, "--mode is for semantic segmentation"),  # was ignored
    (("--classes", " , "), 2, "class names"),
    (("--classes", "cat,dog,Cat"), 2, "repeat: 'cat' and 'Cat'"),
    (("--points", "-5,10"), 2, "--points fall outside"),          # a leading '-' is a value, not an option
    (("--boxes", "-5,0,10,10"), 2, "--boxes fall outside"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments(env, tmp_path, capsys, args, code, message):
  out = tmp_path / "out.png"
  assert _run(env, out, *args) == code
  assert message in capsys.readouterr().err
  assert not os.listdir(tmp_path)     # no output, no temporary left behind


def test_bad_files(env, tmp_path, capsys):
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not an image at all")
  out = tmp_path / "out.png"
  rc = predict.main(["--checkpoint", env["models"]["samclip"], "--image", str(bad), "--output", str(out),
                     "--classes", "a,b"])
  assert rc == 2 and "cannot read" in capsys.readouterr().err and not out.exists()
  rc = predict.main(["--checkpoint", env["models"]["samclip"], "--image", str(tmp_path / "missing.png"),
                     "--output", str(out), "--classes", "a,b"])
  assert rc == 2 and "image not found" in capsys.readouterr().err
  rc = predict.main(["--checkpoint", env["models"]["samclip"], "--image", str(tmp_path), "--output", str(out),
                     "--classes", "a,b"])
  assert rc == 2 and f"{tmp_path} is a directory, not an image file" in capsys.readouterr().err
  rc = predict.main(["--checkpoint", str(tmp_path / "nope"), "--image", env["image"], "--output", str(out),
                     "--classes", "a,b"])
  assert rc == 2 and "checkpoint not found" in capsys.readouterr().err
  rc = predict.main(["--checkpoint", env["models"]["samclip_no_text"], "--image", env["image"],
                     "--output", str(out), "--classes", "a,b", "--mode", "clip"])
  assert rc == 1 and "no CLIP text encoder" in capsys.readouterr().err
  rc = predict.main(["--checkpoint", env["models"]["samclip"], "--image", env["image"],
                     "--output", str(tmp_path / "no_dir" / "o.png"), "--classes", "a,b"])
  assert rc == 2 and "output directory does not exist" in capsys.readouterr().err
  (tmp_path / "a_file").write_text("x")
  rc = predict.main(["--checkpoint", env["models"]["samclip"], "--image", env["image"],
                     "--output", str(tmp_path / "a_file" / "o.png"), "--classes", "a,b"])
  assert rc == 2 and f"{tmp_path / 'a_file'} is a file, not a directory" in capsys.readouterr().err
  assert not out.exists() and (tmp_path / "a_file").read_text() == "x"


def test_output_replaces_only_its_own_pictures(env, tmp_path, capsys):
  """A rerun replaces predict's own picture; a user's file, the input image or a directory as
  --output is refused before the model runs (--overwrite replaces a user's file on purpose)."""
  import shutil
  out = tmp_path / "out.png"
  args = ("--classes", "circle,star", "--mode", "clip")
  assert _run(env, out, *args) == 0
  assert _run(env, out, *args) == 0, capsys.readouterr().err   # its own picture: replaced
  user = tmp_path / "mine.png"
  shutil.copy(env["image"], user)
  before = user.read_bytes()
  assert _run(env, user, *args) == 2
  assert "not written by predict: pass --overwrite" in capsys.readouterr().err
  assert predict.main(["--checkpoint", env["models"]["samclip"], "--image", str(user), "--output", str(user),
                       *args, "--overwrite"]) == 2
  assert "is the input image" in capsys.readouterr().err
  assert user.read_bytes() == before
  (tmp_path / "dir.png").mkdir()
  assert _run(env, tmp_path / "dir.png", *args) == 2 and "is a directory" in capsys.readouterr().err
  assert _run(env, user, *args, "--overwrite") == 0 and user.read_bytes() != before


def test_command_line(env, tmp_path):
  out = tmp_path / "pic.png"
  cmd = [sys.executable, "-m", "samclip_jax.predict", "--checkpoint", env["models"]["samclip"],
         "--image", env["image"], "--classes", CLASSES, "--mode", "clip", "--templates", "photo",
         "--output", str(out)]
  run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0, run.stderr[-3000:]
  _check_picture(env, str(out))
  bad = subprocess.run(cmd[:-1] + [str(tmp_path / "x.gif")], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert bad.returncode == 2 and "must end in .png or .jpg" in bad.stderr


def test_prompts_need_no_text_tower(env, tmp_path, capsys):
  out = tmp_path / "out.png"
  assert _run(env, out, "--boxes", "20,30,200,220", checkpoint="samclip_no_text") == 0, capsys.readouterr().err
  _check_picture(env, str(out))


def test_everything_progress_and_summary(env, tmp_path, capsys):
  """--everything reports progress with an ETA and says where the candidate masks went."""
  out = tmp_path / "out.png"
  assert _run(env, out, "--everything", "--points-per-side", "12") == 0     # 144 points: 3 batches
  err = capsys.readouterr().err
  assert "[everything] 144/144 points" in err and "ETA" in err
  summary = [line for line in err.splitlines() if "candidate masks" in line]
  assert summary and summary[0].startswith("[everything] 12x12 points -> 432 candidate masks")
  # The test model sees 128 px: the small-model filters, not SAM's 1024-px ones.
  assert "predicted IoU > 0.8:" in summary[0] and "stability >= 0.8:" in summary[0], summary
  assert ("no mask passed the filters" in err) == summary[0].endswith(" 0 masks")


def test_everything_defaults_suit_the_model():
  """SAM's grid and thresholds for a 1024-px model, whatever the picture; a smaller model a
  point every 8 px of what it sees (8 to 32 a side) and looser filters."""
  from samclip_jax.automatic_mask_generator import suited_settings
  sam = {"points_per_side": 32, "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}
  assert suited_settings(480, 640, 1024) == sam and suited_settings(60, 90, 1024) == sam
  small = {"pred_iou_thresh": 0.8, "stability_score_thresh": 0.8}
  assert suited_settings(373, 268, 128) == dict(points_per_side=16, **small)
  assert suited_settings(551, 624, 256) == dict(points_per_side=32, **small)
  assert suited_settings(40, 300, 128)["points_per_side"] == 8
