"""The merge study: the :tiny study runs every variant through the real entry points (the
merge configs, the loop, exports, world_eval) and writes a complete study.json, study.md and
plots; a rerun runs and measures nothing again, unless the config changed what it would make;
the plot's axes."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import study as study_config
from samclip_jax import study

MERGED = {"box_miou", "point_miou", "top1", "colour_top1", "semseg_miou_clip", "semseg_miou_clip_sam",
          "semseg_colour_miou_clip", "semseg_colour_miou_clip_sam"}
EXPECTED = {"sam_teacher": {"box_miou", "point_miou"}, "clip_teacher": {"top1", "colour_top1", "retrieval_r1"},
            "head_probe": MERGED, "no_rehearsal": MERGED, "samclip": MERGED, "weight_average": MERGED}


def tiny_config(**changes):
  c = study_config.get_config("tiny")
  c.unlock()
  for key, value in changes.items():
    c[key] = value
  return c


def test_tiny_study_is_complete_and_resumes(tmp_path):
  config = tiny_config()
  said = []
  results = study.Study(config, str(tmp_path), devices=jax.devices()[:1], say=said.append).run_all()
  with open(tmp_path / "study.json") as f:
    written = json.load(f)["variants"]
  assert list(written) == list(config.variants) == list(EXPECTED)
  for name, keys in EXPECTED.items():
    assert keys <= set(written[name]), (name, written[name])
    assert all(0.0 <= written[name][k] <= 1.0 for k in keys), (name, written[name])
  rows = (tmp_path / "study.md").read_text().splitlines()
  assert [r.split(" | ")[0].lstrip("| ") for r in rows[2:]] == list(EXPECTED)
  for name, _ in study.PLOTS:
    with Image.open(tmp_path / name) as img:
      assert img.format == "PNG" and img.size[0] > 500
  # Wise-FT: the averaged backbone is alpha * no_rehearsal + (1 - alpha) * stage 1 (SAM's weights).
  from samclip_jax.models import samclip as sc
  runs = tmp_path / "runs"
  leaf = lambda p: np.asarray(p["image_encoder"]["patch_embed"]["proj"]["kernel"])
  tuned, base, mixed = (leaf(sc.load_samclip(str(runs / n / e))[1])
                        for n, e in (("no_rehearsal", "export"), ("probe", "export"), ("weight_average", "")))
  assert not np.allclose(tuned, base)  # no_rehearsal moved the backbone
  np.testing.assert_allclose(mixed, config.wise_alpha * tuned + (1 - config.wise_alpha) * base, rtol=1e-6)
  # A rerun finds every run and measurement: nothing is run or measured again.
  again = []
  assert study.Study(config, str(tmp_path), devices=jax.devices()[:1], say=again.append).run_all() == results
  assert again == []
  # Another config: a run it would make differently is refused, not silently reused ...
  changed = tiny_config(distill_steps=config.distill_steps + 1)
  with pytest.raises(ValueError, match="another configuration .*total_steps"):
    study.Study(changed, str(tmp_path), devices=jax.devices()[:1], say=again.append).run_all()
  # ... and a measurement on other scenes is made again, from the same runs.
  changed = tiny_config(eval_scenes=config.eval_scenes + 1, variants=("samclip",))
  said = []
  study.Study(changed, str(tmp_path), devices=jax.devices()[:1], say=said.append).run_all()
  assert len(said) == 1 and said[0].startswith("[study] samclip: "), said


def test_ablations_change_stages_2_and_3_of_the_samclip_recipe(tmp_path, monkeypatch):
  """samclip_NAME chains probe -> distill -> resolution with NAME's overrides on the last two
  (the runs themselves are the real ones of the test above; here only what is asked of them)."""
  asked = []
  monkeypatch.setattr(study.Study, "run", lambda self, name, stage, steps, **kw: asked.append(
      (name, stage, self.merge_config(stage, steps, **kw))) or f"/runs/{name}/export")
  monkeypatch.setattr(study.Study, "measure", lambda self, name, path, parts=(): {"path": path})
  s = study.Study(tiny_config(variants=(), ablations=("decay_all", "soft_targets")), str(tmp_path))
  assert s.run_all() == {"samclip_decay_all": {"path": "/runs/samclip_decay_all/export"},
                         "samclip_soft_targets": {"path": "/runs/samclip_soft_targets/export"}}
  runs = {name: (stage, c) for name, stage, c in asked}
  assert runs["distill_lambda10_decay_all"][1].init_from == "/runs/probe/export"
  assert runs["samclip_decay_all"][1].init_from == "/runs/distill_lambda10_decay_all/export"
  for name in ("distill_lambda10_decay_all", "samclip_decay_all"):
    assert list(runs[name][1].optim.no_decay) == [".*pos_embed", ".*rel_pos_.*"], name
    assert not runs[name][1].sam_soft_targets
  for name in ("distill_lambda10_soft_targets", "samclip_soft_targets"):
    assert runs[name][1].sam_soft_targets, name
  assert not runs["probe"][1].sam_soft_targets  # stage 1 is shared and unchanged
  assert runs["samclip_soft_targets"][0] == "resolution" and runs["distill_lambda10_soft_targets"][1].lambda_sam == 10


@pytest.mark.parametrize("field,value,message", [
    ("ablations", ("soft",), "unknown study ablation 'soft'"),
    ("variants", ("samclip", "samclp"), "unknown study variant 'samclp'"),
    ("lambda_sweep", ("a", "b", "c"), "lambda_sweep holds 'a'"),  # the command line turns abc into this
    ("lambda_sweep", (-1.0,), "lambda_sweep holds -1.0"),
    ("lambda_sweep", (float("nan"),), "lambda_sweep holds nan"),
    ("wise_alpha", 2.0, "wise_alpha must be in \\[0, 1\\], got 2.0"),   # would extrapolate
    ("semseg_scenes", -1, "semseg_scenes must be an integer >= 1, got -1"),  # world[:-1]
    ("probe_steps", 0, "probe_steps must be an integer >= 1"),   # failed after the first measurement
    ("scene_side", 16, "scene_side must be an integer >= 64"),   # scenes without shapes
])
def test_bad_study_config_is_refused_before_anything_runs(tmp_path, field, value, message):
  config = tiny_config()
  config.unlock()
  config[field] = value
  with pytest.raises(ValueError, match=message):
    study.Study(config, str(tmp_path / "study")).run_all()
  assert not os.path.exists(tmp_path / "study")


@pytest.mark.parametrize("values", [[0.354, 0.417, 0.744], [0.5], [], [0.0, 1.0], [0.7391, 0.7396]])
def test_plot_axes_are_round_and_hold_every_value(values):
  lo, hi, step = study.nice_range(values)
  ticks = round((hi - lo) / step) + 1
  assert 2 <= ticks <= 7 and 0.0 <= lo < hi <= 1.0
  assert abs(lo / step - round(lo / step)) < 1e-6  # tick labels are their ticks' exact values
  assert all(lo <= v <= hi for v in values)
