"""Quality on held-out scenes of the embedded world, through the public API.

What the README, the tests and the merge study report for a SAM teacher, a CLIP teacher or a
merged model: box- and single-point-prompted mask mIoU against the true instance masks, the
automatic mask generator's recall and precision at predict --everything's settings, zero-shot
top-1 on the largest shape (5 classes, OpenAI's 80 templates) and on its colour (8 colours),
caption retrieval R@1, how often masks are named by their right colour / shape (label_masks,
both modes), and zero-shot semantic segmentation mIoU (with a "background" class) over shapes
and over colours, in both modes; with --text, a merged
model's text-prompted instance segmentation (SamClip.segment_text, see text_metrics).

  python -m samclip_jax.world_eval --model DIR [--scenes 64] [--side 128 [--max-side 256]] [--renderer other] [--text]

DIR: a SAM model dir, a CLIP model dir or a merged model (export or training workdir).
"""
import argparse
import json
import sys

import numpy as np
from scipy import ndimage

from samclip_jax import metrics
from samclip_jax.data import other_world, sample
from samclip_jax.data.world import MIN_SIDE, WorldSource

BACKGROUND = "background"
HIT_IOU = 0.5   # a mask "hits" a true instance (or a text query its target) at this IoU


RENDERERS = ("world", "other")


def scenes(num: int = 64, side: int = 128, split: str = "test", seed: int = 0, max_side: int | None = None,
           renderer: str = "world"):
  """Held-out scenes: the world's `split` (drawn, never seen in training), or with renderer
  "other" scenes of the same names drawn by other code (data/other_world.py; no split)."""
  if renderer == "other":
    return [other_world.draw_scene(seed, i, side, max_side or side) for i in range(num)]
  if renderer != "world":
    raise ValueError(f"renderer must be one of {RENDERERS}, got {renderer!r}")
  src = WorldSource(split, num, seed, side, max_side or side)
  return [src.scene(i) for i in range(num)]


def _interior_point(mask: np.ndarray) -> tuple[float, float]:
  """(x, y) of the mask pixel farthest from its boundary: an unambiguous click on it."""
  dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
  y, x = np.unravel_index(np.argmax(dist), dist.shape)
  return float(x), float(y)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  union = np.logical_or(a, b).sum()
  return float(np.logical_and(a, b).sum() / union) if union else 1.0


def sam_metrics(predictor, world) -> dict:
  """box_miou (tight box, single output) and point_miou (one central click, best of 3)."""
  box_ious, point_ious = [], []
  for scene in world:
    if len(scene["masks"]) == 0:
      continue
    predictor.set_image(scene["image"])
    for m in scene["masks"]:
      ys, xs = np.nonzero(m)
      box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)
      masks, _, _ = predictor.predict(box=box, multimask_output=False)
      box_ious.append(_iou(masks[0], m))
      masks, _, _ = predictor.predict(point_coords=np.array([_interior_point(m)]),
                                      point_labels=np.array([1]), multimask_output=True)
      point_ious.append(max(_iou(p, m) for p in masks))
  return {"box_miou": float(np.mean(box_ious)), "point_miou": float(np.mean(point_ious)),
          "num_masks": len(box_ious)}


# What a zero-shot label names: the shape, or the colour, of the largest shape (classify) or of
# every pixel (segment). Names, and the scene's id map (0 = background, i + 1 = names[i]).
SEMANTICS = {
    "shape": (list(sample.CLASSES), lambda s: s["semantic"]),
    "colour": (list(sample.COLOURS), lambda s: _colour_map(s)),
}


def everything_metrics(predictor, world, model_size: int) -> dict:
  """The automatic mask generator at the settings predict --everything takes by default
  (suited_settings): everything_recall, the true instances some output mask matches at IoU >=
  HIT_IOU; everything_precision, the output masks that match a true instance; everything_masks,
  output masks per scene."""
  from samclip_jax.automatic_mask_generator import SamAutomaticMaskGenerator, suited_settings
  found = truths = matched = outputs = 0
  for scene in world:
    h, w = scene["image"].shape[:2]
    generator = SamAutomaticMaskGenerator(predictor, **suited_settings(h, w, model_size))
    out = [r["segmentation"] for r in generator.generate(scene["image"])]
    iou = np.array([[_iou(o, t) for t in scene["masks"]] for o in out]).reshape(len(out), len(scene["masks"]))
    found += int((iou >= HIT_IOU).any(0).sum())
    matched += int((iou >= HIT_IOU).any(1).sum())
    truths, outputs = truths + len(scene["masks"]), outputs + len(out)
  return {"everything_recall": found / max(truths, 1), "everything_precision": matched / max(outputs, 1),
          "everything_masks": outputs / max(len(world), 1)}


def _colour_map(scene) -> np.ndarray:
  out = np.zeros(scene["semantic"].shape, np.uint8)
  for m, c in zip(scene["masks"], scene["colours"]):
    out[m] = list(sample.COLOURS).index(c) + 1
  return out


def _largest_labels(world, by: str):
  """(scenes with a shape, index into SEMANTICS[by] names of their largest shape's label)."""
  names, id_map = SEMANTICS[by]
  kept = [s for s in world if len(s["masks"])]
  ids = [int(id_map(s)[s["masks"][int(np.argmax([m.sum() for m in s["masks"]]))]].max()) - 1 for s in kept]
  return kept, np.array(ids)


def _top1(embed, classifier, world, by: str) -> float:
  kept, labels = _largest_labels(world, by)
  emb = np.asarray(embed([s["image"] for s in kept]))
  return float(np.mean(np.argmax(emb @ np.asarray(classifier(SEMANTICS[by][0])).T, -1) == labels))


def clip_teacher_metrics(clip, world, templates="imagenet80") -> dict:
  """top1 / colour_top1 (largest shape's class / colour, zero-shot), retrieval_r1 (image ->
  its caption among all) and naming_* (clip_naming_metrics) of a ClipModel."""
  embed = lambda images: clip.encode_image(images, normalize=True)
  classifier = lambda names: clip.zero_shot_classifier(names, templates)
  out = {"top1": _top1(embed, classifier, world, "shape"),
         "colour_top1": _top1(embed, classifier, world, "colour")}
  kept, _ = _largest_labels(world, "shape")
  img = np.asarray(embed([s["image"] for s in kept]))
  captions = [sample.caption(s) for s in kept]
  best = np.argmax(img @ np.asarray(clip.encode_text(captions, normalize=True)).T, -1)
  out["retrieval_r1"] = float(np.mean([captions[j] == captions[i] for i, j in enumerate(best)]))
  out.update(clip_naming_metrics(clip, world, templates))
  return out


def clip_naming_metrics(clip, world, templates="imagenet80") -> dict:
  """naming_{colour,shape}: how often a ClipModel names each true instance's colour (shape)
  from its crop (api.mask_crop, as label_masks' "crop" mode shows a merged model a mask)."""
  from samclip_jax.api import mask_crop
  crops, truth = [], {by: [] for by in SEMANTICS}
  for s in world:
    for k, m in enumerate(s["masks"]):
      crops.append(mask_crop(s["image"], m))
      truth["shape"].append(s["classes"][k] - 1)
      truth["colour"].append(list(sample.COLOURS).index(s["colours"][k]))
  if not crops:
    return {f"naming_{by}": None for by in SEMANTICS}
  emb = np.asarray(clip.encode_image(crops, normalize=True))
  return {f"naming_{by}": float(np.mean(np.argmax(emb @ np.asarray(clip.zero_shot_classifier(
      names, templates)).T, -1) == np.array(truth[by]))) for by, (names, _) in SEMANTICS.items()}


def merged_clip_metrics(model, world, resolution: int, templates="imagenet80") -> dict:
  """top1 / colour_top1 of a merged model's CLIP head (the largest shape's class / colour)."""
  embed = lambda images: model.encode_image(images, resolution)
  classifier = lambda names: model.text_classifier(names, templates)
  return {"top1": _top1(embed, classifier, world, "shape"),
          "colour_top1": _top1(embed, classifier, world, "colour")}


def naming_metrics(model, world, templates="imagenet80") -> dict:
  """naming_{colour,shape}_{crop,dense}: how often model.label_masks names each true instance
  mask's colour (shape) right, in each of its modes (a mask's crop, or its mean dense logits)."""
  from samclip_jax import api
  out = {}
  for by, (names, id_map) in SEMANTICS.items():
    for mode in api.LABEL_MODES:
      hits = []
      for s in world:
        if len(s["masks"]):
          ids = id_map(s)
          truth = [names[int(ids[m].max()) - 1] for m in s["masks"]]
          named = model.label_masks(s["image"], list(s["masks"]), names, templates, mode=mode)
          hits += [n == t for (n, _), t in zip(named, truth)]
      out[f"naming_{by}_{mode}"] = float(np.mean(hits)) if hits else None
  return out


def semseg_metrics(model, world, mode: str, resolution: int, templates="imagenet80", by="shape") -> float:
  """mIoU over the shapes (or colours) + background of model.segment_semantic(mode)."""
  labels, id_map = SEMANTICS[by]
  names = labels + [BACKGROUND]
  # Prediction index c < len(labels) is id c + 1 in the scene's map; "background" is id 0.
  to_id = np.array(list(range(1, len(labels) + 1)) + [0])
  cm = metrics.ConfusionMatrix(len(names))
  for s in world:
    kw = {"resolution": resolution} if mode == "clip" else {}
    pred = model.segment_semantic(s["image"], names, mode=mode, templates=templates, **kw)
    cm.update(to_id[pred], id_map(s))
  return cm.compute()["mIoU"] / 100.0


# Text queries for one instance: what it is called, and what else the world could call a patch
# (segment_text's contrast set: the rest of the query's vocabulary, and the background).
TEXT_QUERIES = {
    "colour_shape": lambda colour, shape: f"{colour} {shape}",
    "colour": lambda colour, shape: colour,
}
TEXT_VOCABULARY = {
    "colour_shape": [f"{c} {s}" for c in sample.COLOURS for s in sample.CLASSES],
    "colour": list(sample.COLOURS),
}


def text_metrics(model, world, templates="imagenet80", seed: int = 0, **segment_kw) -> dict:
  """Text-prompted instance segmentation (model.segment_text) on held-out scenes.

  Each scene with shapes gets a target instance (seeded) and queries "<colour> <shape>"
  ("red star"), and "<colour>" alone when no other shape in the scene has that colour; the
  contrast set is the rest of the query's vocabulary (all other colour+shape names, or all
  other colours) and "background". Per kind: miou (mean over queries of the best returned
  mask's IoU with the target's true mask, 0 when nothing comes back), top1_miou (the most
  confident mask's), random_miou (a returned mask picked at random: what the ranking adds
  to top1), hit_rate (best IoU >= 0.5), empty_rate (no mask), masks (returned per query),
  each None without queries, and the query count.
  """
  ious = {k: [] for k in TEXT_QUERIES}
  for i, s in enumerate(world):
    if len(s["masks"]) == 0:
      continue
    t = int(np.random.default_rng([seed, i]).integers(len(s["masks"])))
    colour, shape = s["colours"][t], sample.CLASSES[s["classes"][t] - 1]
    for kind, name in TEXT_QUERIES.items():
      if kind == "colour" and s["colours"].count(colour) > 1:
        continue
      contrast = TEXT_VOCABULARY[kind] + [BACKGROUND]   # segment_text drops the query itself
      masks, _ = model.segment_text(s["image"], name(colour, shape), contrast=contrast,
                                    templates=templates, **segment_kw)
      ious[kind].append([_iou(m, s["masks"][t]) for m in masks])
  out = {}
  for kind, per_query in ious.items():
    best = [max(q, default=0.0) for q in per_query]
    stats = {"miou": best, "top1_miou": [q[0] if q else 0.0 for q in per_query],
             "random_miou": [float(np.mean(q)) if q else 0.0 for q in per_query],
             "hit_rate": [b >= HIT_IOU for b in best], "empty_rate": [not q for q in per_query],
             "masks": [len(q) for q in per_query]}
    out.update({f"text_{kind}_{k}": float(np.mean(v)) if v else None for k, v in stats.items()})
    out[f"text_{kind}_queries"] = len(per_query)
  return out


def evaluate_model(path: str, num_scenes: int = 64, side: int = 128, semseg_scenes: int = 32,
                   parts=("sam", "everything", "clip", "naming", "semseg"), max_side: int | None = None,
                   renderer: str = "world") -> dict:
  """Every metric (of `parts`) the model at `path` can compute, on `num_scenes` held-out scenes."""
  from samclip_jax import api
  world = scenes(num_scenes, side, max_side=max_side, renderer=renderer)
  kind = api.model_type(path)
  out = {}
  if kind == "sam":
    from samclip_jax.predictor import SamPredictor
    predictor = SamPredictor.from_checkpoint(path)
    if "sam" in parts:
      out.update(sam_metrics(predictor, world))
    if "everything" in parts:
      out.update(everything_metrics(predictor, world, predictor.image_size))
    return out
  if kind == "open_clip":
    from samclip_jax.clip_model import ClipModel
    return clip_teacher_metrics(ClipModel.from_checkpoint(path), world)
  model = api.SamClip.from_checkpoint(path)
  res = model.config.sam.image_size  # the world's merged models see the SAM size everywhere
  if "sam" in parts:
    out.update(sam_metrics(model.predictor(), world))
  if "everything" in parts:
    out.update(everything_metrics(model.predictor(), world, res))
  if "clip" in parts:
    out.update(merged_clip_metrics(model, world, res))
  if "naming" in parts:
    out.update(naming_metrics(model, world))
  if "semseg" in parts:
    for by, prefix in (("shape", "semseg_miou"), ("colour", "semseg_colour_miou")):
      for mode, suffix in (("clip", "clip"), ("clip+sam", "clip_sam")):
        out[f"{prefix}_{suffix}"] = semseg_metrics(model, world[:semseg_scenes], mode, res, by=by)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="SAM dir, CLIP dir, or merged model (export / workdir)")
  p.add_argument("--scenes", type=int, default=64, help="held-out scenes to measure on")
  p.add_argument("--side", type=int, default=128, help="scene side in pixels (the smallest, with --max-side)")
  p.add_argument("--max-side", type=int, default=None, help="sides drawn in [side, max-side] (default: side)")
  p.add_argument("--renderer", choices=RENDERERS, default="world",
                 help="'other': the same classes and colours drawn by independent code (data/other_world.py)")
  p.add_argument("--text", action="store_true",
                 help="text-prompted instance segmentation of a merged model (text_metrics) instead")
  args = p.parse_args(argv)
  max_side = args.max_side or args.side
  if args.scenes < 1 or args.side < MIN_SIDE or max_side < args.side:
    p.error(f"--scenes must be >= 1, --side >= {MIN_SIDE} and --max-side >= --side, got {args.scenes}, "
            f"{args.side} and {args.max_side}")
  if args.text:
    from samclip_jax import api
    model = api.SamClip.from_checkpoint(args.model)
    world = scenes(args.scenes, args.side, max_side=max_side, renderer=args.renderer)
    print(_json(text_metrics(model, world)))
    return 0
  print(_json(evaluate_model(args.model, args.scenes, args.side, max_side=max_side, renderer=args.renderer)))
  return 0


def _json(metrics: dict) -> str:
  """Valid JSON: a metric with nothing to measure (NaN) is null."""
  from samclip_jax import cli
  return json.dumps(cli.finite_or_none(metrics), indent=2)


if __name__ == "__main__":
  from samclip_jax import cli
  sys.exit(cli.reported(main))
