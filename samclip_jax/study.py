"""The merge study: teachers, head probing, distillation without and with rehearsal, SAM-CLIP,
weight averaging and a lambda sweep, side by side on held-out world scenes.

  python -m samclip_jax.study --config=configs/study.py:local --workdir=DIR

Each stage is a real merge run (configs/merge.py, the one loop, its export) in DIR/runs/NAME,
chained through init_from; each variant's metrics (samclip_jax.world_eval) are kept in
DIR/variants/NAME.json, so a rerun skips what is finished. DIR/runs/NAME.run.json records what
made each run (its merge config and its parents' records): a rerun whose config would make a
run differently refuses to reuse it, and a measurement of another model or scenes is made
again. `ablations` add the samclip recipe with one design choice changed (configs/study.py
ABLATIONS) as variants samclip_NAME. Writes DIR/study.json
({"variants": {NAME: {METRIC: value}}}), DIR/study.md and DIR/study.png (SAM metric against
CLIP metric per variant, as the paper's figure 1).
"""
import json
import os
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from samclip_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Study config (configs/study.py:local).", lock_config=True)
flags.DEFINE_string("workdir", None, "Runs, per-variant metrics, study.json/.md/.png go here.")
flags.mark_flags_as_required(["config", "workdir"])

METRICS = ("box_miou", "point_miou", "top1", "colour_top1", "retrieval_r1", "semseg_miou_clip",
           "semseg_miou_clip_sam", "semseg_colour_miou_clip", "semseg_colour_miou_clip_sam")
METRICS_VERSION = 2  # cached measurements of another version are measured again
# Plots (file, CLIP metric on x): the shape top-1 as the paper's figure 1, and the colour
# top-1, the semantics the world's CLIP teacher has learned (README: the world's teachers).
PLOTS = (("study.png", "top1"), ("study_colour.png", "colour_top1"))


class Study:
  """Runs and measures the variants of `config` in `workdir` (resumable)."""

  def __init__(self, config, workdir, devices=None, say=print):
    validate(config)  # before the workdir exists: a bad config leaves nothing behind
    self.config, self.workdir, self.devices, self.say = config, os.path.abspath(workdir), devices, say
    os.makedirs(os.path.join(self.workdir, "variants"), exist_ok=True)

  # ---------------------------------------------------------------- runs
  def merge_config(self, stage, steps, **overrides):
    from configs import merge
    c = merge.get_config(f"{stage},{self.config.merge}")
    c.total_steps = int(steps)
    c.eval_every_steps = 0  # the study measures exports with world_eval instead
    c.checkpoint_every_steps = max(int(steps), 1)
    c.warmup_steps = min(c.warmup_steps, max(int(steps) - 1, 0))
    c.update_from_flattened_dict(overrides)  # "optim.no_decay" names a nested field
    return c

  def run(self, name, stage, steps, **overrides) -> str:
    """Runs (or finds finished) the merge run NAME; returns its export directory."""
    from samclip_jax import train
    workdir = os.path.join(self.workdir, "runs", name)
    export = os.path.join(workdir, "export")
    config = self.merge_config(stage, steps, **overrides)
    settings = json.loads(config.to_json_best_effort(sort_keys=True))
    if settings.get("init_from", "").startswith(self.workdir + os.sep):  # a moved study still matches
      settings["init_from"] = os.path.relpath(settings["init_from"], self.workdir)
    self.claim(name, {"config": settings, "parent": self.record_of(config.init_from)})
    if not os.path.isdir(export):
      t0 = time.time()
      self.say(f"[study] run {name}: stage {stage}, {steps} steps")
      train.train_and_evaluate(config, workdir, devices=self.devices)
      self.say(f"[study] run {name} done in {time.time() - t0:.0f} s")
    return export

  def record_path(self, name):
    return os.path.join(self.workdir, "runs", name + ".run.json")

  def record_of(self, path):
    """The record of the study run whose export (or directory) is `path`; {"path": ...} for a
    model from outside the study; None for no path."""
    if not path:
      return None
    rel = os.path.relpath(os.path.abspath(path), os.path.join(self.workdir, "runs"))
    name = rel.split(os.sep)[0]
    if rel.startswith("..") or not os.path.isfile(self.record_path(name)):
      return {"path": os.path.abspath(path)}
    with open(self.record_path(name)) as f:
      return json.load(f)

  def claim(self, name, record):
    """Writes NAME's record, or checks that the one there says the same (else raises)."""
    path = self.record_path(name)
    if os.path.isfile(path):
      with open(path) as f:
        old = json.load(f)
      if old != record:
        raise ValueError(
            f"{os.path.join(self.workdir, 'runs', name)} was made by another configuration "
            f"(differs in: {', '.join(cli.differences(old, record))}); "
            "use a new --workdir, or delete that run (and the runs built on it) to redo it")
      return
    if os.path.isdir(os.path.join(self.workdir, "runs", name)):
      raise ValueError(f"{os.path.join(self.workdir, 'runs', name)} exists but has no record "
                       f"({path}): it was not made by this study; use a new --workdir")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with cli.atomic_write(path) as tmp, open(tmp, "w") as f:
      json.dump(record, f, indent=2, sort_keys=True)

  def probe(self):
    return self.run("probe", "probe", self.config.probe_steps)

  def distill(self, lam, ablation=None):
    suffix = f"_{ablation}" if ablation else ""
    return self.run(f"distill_lambda{lam:g}{suffix}", "distill", self.config.distill_steps,
                    init_from=self.probe(), lambda_sam=float(lam), **_ablation(ablation))

  def no_rehearsal(self):
    # Stage 2 without L_SAM: same steps, backbone trainable, no SAM batch.
    return self.run("no_rehearsal", "distill", self.config.distill_steps, init_from=self.probe(),
                    sam_batch_size=0, lambda_sam=0.0)

  def samclip(self, ablation=None):
    """Stage 1 -> stage 2 (lambda 10) -> stage 3; an ablation changes stages 2 and 3."""
    return self.run(f"samclip_{ablation}" if ablation else "samclip", "resolution",
                    self.config.resolution_steps, init_from=self.distill(10.0, ablation),
                    **_ablation(ablation))

  def weight_average(self):
    """Wise-FT: alpha * no_rehearsal + (1 - alpha) * SAM for the backbone and SAM head."""
    from samclip_jax.models import samclip as sc
    out = os.path.join(self.workdir, "runs", "weight_average")
    a = float(self.config.wise_alpha)
    tuned_dir, base_dir = self.no_rehearsal(), self.probe()  # stage 1 froze the SAM parts: they are SAM's
    self.claim("weight_average", {"wise_alpha": a, "parents": [self.record_of(tuned_dir), self.record_of(base_dir)]})
    if os.path.isdir(out):
      return out
    cfg, tuned = sc.load_samclip(tuned_dir)
    _, base = sc.load_samclip(base_dir)
    mixed = dict(tuned)
    for part in ("image_encoder", "mask_decoder"):
      mixed[part] = _mix(tuned[part], base[part], a)
    sc.save_samclip(out, cfg, mixed, {"stage": "weight_average", "wise_alpha": a,
                                      **_text_facts(tuned_dir)})
    return out

  # ---------------------------------------------------------------- measurements
  def measure(self, name, path, parts=("sam", "clip", "semseg")) -> dict:
    """Metrics of variant NAME (cached in DIR/variants/NAME.json, with what was measured and how)."""
    c = self.config
    what = {"model": self.record_of(path), "parts": list(parts), "scenes": [c.eval_scenes, c.scene_side, c.semseg_scenes]}
    cached = os.path.join(self.workdir, "variants", name + ".json")
    if os.path.isfile(cached):
      with open(cached) as f:
        record = json.load(f)
      # Another metrics version, model, or set of scenes measured it: measure again.
      if record.get("metrics_version") == METRICS_VERSION and record.get("measured") == what:
        return record["metrics"]
    from samclip_jax import world_eval
    t0 = time.time()
    values = world_eval.evaluate_model(path, c.eval_scenes, c.scene_side, c.semseg_scenes, parts=parts)
    self.say(f"[study] {name}: " + " ".join(f"{k}={v:.3f}" for k, v in values.items()
                                            if isinstance(v, float)) + f" ({time.time() - t0:.0f} s)")
    with cli.atomic_write(cached) as tmp, open(tmp, "w") as f:
      json.dump({"metrics_version": METRICS_VERSION, "measured": what, "metrics": values}, f, indent=2)
    return values

  def variant(self, name) -> dict:
    merge_cfg = self.merge_config("distill", 1)
    if name == "sam_teacher":
      # A random-teacher study (:tiny) has no SAM dir: stage 1 keeps SAM's weights frozen.
      return self.measure(name, merge_cfg.sam_checkpoint or self.probe(), parts=("sam",))
    if name == "clip_teacher":
      path = merge_cfg.clip_checkpoint or os.path.join(self.workdir, "runs", "probe", "text_model")
      self.probe()
      return self.measure(name, path)
    if name == "head_probe":
      return self.measure(name, self.probe())
    if name == "no_rehearsal":
      return self.measure(name, self.no_rehearsal())
    if name == "samclip":
      return self.measure(name, self.samclip())
    if name == "weight_average":
      return self.measure(name, self.weight_average())
    if name.startswith("samclip_lambda"):
      return self.measure(name, self.distill(float(name[len("samclip_lambda"):])))
    if name.startswith("samclip_"):
      return self.measure(name, self.samclip(name[len("samclip_"):]))
    raise ValueError(f"unknown study variant {name!r}")

  def names(self):
    return (list(self.config.variants) + [f"samclip_lambda{lam:g}" for lam in self.config.lambda_sweep]
            + [f"samclip_{a}" for a in self.config.ablations])

  def run_all(self) -> dict:
    results = {}
    names = self.names()
    progress = cli.Progress("study", len(names), "variants")
    for name in names:
      results[name] = self.variant(name)
      progress.update(1)
    self.write(results)
    return results

  # ---------------------------------------------------------------- report
  def write(self, results):
    with cli.atomic_write(os.path.join(self.workdir, "study.json")) as tmp, open(tmp, "w") as f:
      json.dump({"variants": results, "config": self.config.to_dict()}, f, indent=2)
    with cli.atomic_write(os.path.join(self.workdir, "study.md")) as tmp, open(tmp, "w") as f:
      f.write(table(results))
    for name, x_key in PLOTS:
      with cli.atomic_write(os.path.join(self.workdir, name), suffix=".png") as tmp:
        plot(results, x_key=x_key).save(tmp, format="PNG")


def validate(config) -> None:
  """The study's own fields, checked before anything runs (a lambda sweep's third run would
  otherwise fail minutes in)."""
  import math
  from configs.study import VARIANTS
  for field in ("variants", "lambda_sweep", "ablations"):
    if isinstance(config[field], str) or not isinstance(config[field], (tuple, list)):
      raise ValueError(f"{field} must be a tuple, e.g. --config.{field}='(...,)', got {config[field]!r}")
  unknown = [v for v in config.variants if v not in VARIANTS]
  if unknown:
    raise ValueError(f"unknown study variant {unknown[0]!r}; expected some of {list(VARIANTS)}")
  for lam in config.lambda_sweep:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
      raise ValueError(f"lambda_sweep holds {lam!r}; lambdas are finite positive numbers, e.g. '(1.0,100.0)'")
  for ablation in config.ablations:
    _ablation(ablation)
  for field, low in (("probe_steps", 1), ("distill_steps", 1), ("resolution_steps", 1),
                     ("eval_scenes", 1), ("semseg_scenes", 1), ("scene_side", 64)):
    if isinstance(config[field], bool) or not isinstance(config[field], int) or config[field] < low:
      raise ValueError(f"{field} must be an integer >= {low}, got {config[field]!r}")
  alpha = config.wise_alpha
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
    # outside [0, 1] weight_average would extrapolate past its two endpoints
    raise ValueError(f"wise_alpha must be in [0, 1], got {alpha!r}")


def _ablation(name) -> dict:
  """The merge-config overrides of ablation NAME (configs/study.py ABLATIONS); {} for None."""
  from configs.study import ABLATIONS
  if name is None:
    return {}
  if name not in ABLATIONS:
    raise ValueError(f"unknown study ablation {name!r}; expected one of {sorted(ABLATIONS)}")
  return ABLATIONS[name]


def _mix(a, b, alpha):
  import jax
  return jax.tree.map(lambda x, y: (alpha * np.asarray(x, np.float32) + (1 - alpha) * np.asarray(y, np.float32)), a, b)


def _text_facts(export):
  """The text tower a merged export names (so the averaged model classifies like its parent)."""
  from samclip_jax import checkpoint
  meta = checkpoint.load_config(export)
  out = {k: meta[k] for k in ("clip_checkpoint", "clip_teacher_config") if k in meta}
  text = os.path.join(export, "text_model")
  if os.path.isdir(text):
    out["text_model"] = text
  return out


def table(results) -> str:
  """The study as a markdown table (— where a variant cannot compute a metric)."""
  rows = ["| variant | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
  for name, m in results.items():
    rows.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" if k in m else "—" for k in METRICS) + " |")
  return "\n".join(rows) + "\n"


def nice_range(values, pad: float = 0.02, max_ticks: int = 7):
  """(lo, hi, step): round axis bounds around `values` (within [0, 1]) and a tick step that
  gives at most `max_ticks` ticks, so tick labels are the exact values of their ticks."""
  lo, hi = (max(min(values) - pad, 0.0), min(max(values) + pad, 1.0)) if values else (0.0, 1.0)
  for step in (0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.2, 0.25):
    a, b = np.floor(lo / step + 1e-9) * step, np.ceil(hi / step - 1e-9) * step
    if b <= a:
      b = a + step
    if round((b - a) / step) + 1 <= max_ticks:
      return float(a), float(b), step
  return 0.0, 1.0, 0.25


def plot(results, x_key="top1", y_key="box_miou"):
  """SAM metric (box mIoU) against CLIP metric (zero-shot top-1) per merged variant, as a PIL
  image; the teachers are reference lines (each has only one of the two metrics); a legend
  on the right lists every variant's colour and values."""
  from PIL import Image, ImageDraw
  from samclip_jax.visualize import _font, palette
  w, h, m, legend_w = 720, 520, 70, 230
  img = Image.new("RGB", (w + legend_w, h), "white")
  d = ImageDraw.Draw(img)
  font = _font(13)
  points = [(n, r[x_key], r[y_key]) for n, r in results.items() if x_key in r and y_key in r]
  refs = {"sam_teacher": (None, results.get("sam_teacher", {}).get(y_key)),
          "clip_teacher": (results.get("clip_teacher", {}).get(x_key), None)}
  xs = [p[1] for p in points] + [v[0] for v in refs.values() if v[0] is not None]
  ys = [p[2] for p in points] + [v[1] for v in refs.values() if v[1] is not None]
  (x0, x1, xstep), (y0, y1, ystep) = nice_range(xs), nice_range(ys)
  to_xy = lambda x, y: (m + (x - x0) / (x1 - x0) * (w - 2 * m), h - m - (y - y0) / (y1 - y0) * (h - 2 * m))
  d.rectangle([m, m, w - m, h - m], outline="black")
  digits = max(2, *(len(f"{v:g}".split(".")[-1]) for v in (xstep, ystep)))  # 0.025 -> 3: labels exact
  for i in range(int(round((x1 - x0) / xstep)) + 1):
    v = x0 + i * xstep
    x, _ = to_xy(v, y0)
    d.line([x, h - m, x, h - m + 5], fill="black")
    d.text((x - 12, h - m + 8), f"{v:.{digits}f}", fill="black", font=font)
  for i in range(int(round((y1 - y0) / ystep)) + 1):
    v = y0 + i * ystep
    _, y = to_xy(x0, v)
    d.line([m - 5, y, m, y], fill="black")
    d.text((m - 45, y - 7), f"{v:.{digits}f}", fill="black", font=font)
  d.text((w // 2 - 90, h - 30), f"{x_key} (zero-shot, CLIP)", fill="black", font=font)
  d.text((8, 20), f"{y_key} (box prompts, SAM)", fill="black", font=font)
  placed = []  # (x, y, width) of every label drawn: later labels must not overlap them
  if refs["sam_teacher"][1] is not None:
    _, y = to_xy(x0, refs["sam_teacher"][1])
    d.line([m, y, w - m, y], fill=(150, 150, 150))
    d.text((w - m - 110, y - 16), "SAM teacher", fill=(110, 110, 110), font=font)
    placed.append((w - m - 110, y - 16, d.textlength("SAM teacher", font=font)))
  if refs["clip_teacher"][0] is not None:
    x, _ = to_xy(refs["clip_teacher"][0], y0)
    d.line([x, m, x, h - m], fill=(150, 150, 150))
    d.text((x + 4, m + 4), "CLIP teacher", fill=(110, 110, 110), font=font)
    placed.append((x + 4, m + 4, d.textlength("CLIP teacher", font=font)))
  lx, ly = w + 5, m
  d.text((lx, ly), f"variant: {x_key}, {y_key}", fill="black", font=font)
  for name, ref in (("SAM teacher", refs["sam_teacher"][1]), ("CLIP teacher", refs["clip_teacher"][0])):
    if ref is not None:
      ly += 20
      d.text((lx + 18, ly), f"{name}: {ref:.3f}", fill=(110, 110, 110), font=font)
  for (name, x, y), c in zip(points, palette(max(len(points), 1))):
    px, py = to_xy(x, y)
    d.ellipse([px - 6, py - 6, px + 6, py + 6], fill=c, outline="black")
    tw = d.textlength(name, font=font)
    # Right of the point, else left of it, else lower, else further up or down: no overlaps.
    spots = [(px + 9, py - 8), (px - 9 - tw, py - 8), (px + 9, py + 6), (px - 9 - tw, py + 6),
             (px + 9, py - 24), (px + 9, py + 20), (px - 9 - tw, py - 24), (px - 9 - tw, py + 20)]
    free = lambda x, y: all(abs(y - qy) >= 14 or x + tw < qx or x > qx + qw for qx, qy, qw in placed)
    tx, ty = next(((x, y) for x, y in spots if free(x, y)), spots[0])
    placed.append((tx, ty, tw))
    d.text((tx, ty), name, fill="black", font=font)
    ly += 20  # the legend: each variant's colour and exact values
    d.ellipse([lx + 2, ly + 2, lx + 12, ly + 12], fill=c, outline="black")
    d.text((lx + 18, ly), f"{name}: {x:.3f}, {y:.3f}", fill="black", font=font)
  return img


def main(argv):
  del argv
  results = Study(FLAGS.config, FLAGS.workdir).run_all()
  print(table(results))
  print(f"wrote {os.path.join(os.path.abspath(FLAGS.workdir), 'study.json')}, study.md, study.png")


if __name__ == "__main__":
  cli.run(main, __doc__, "samclip_jax.study")
