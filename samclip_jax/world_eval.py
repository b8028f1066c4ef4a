"""Quality on held-out scenes of the embedded world, through the public API.

What the README, the tests and the merge study report for a SAM teacher, a CLIP teacher or a
merged model: box- and single-point-prompted mask mIoU against the true instance masks,
zero-shot top-1 on the largest shape (5 classes, OpenAI's 80 templates), caption retrieval
R@1, and zero-shot semantic segmentation mIoU (with a "background" class) in both modes.

  python -m samclip_jax.world_eval --model DIR [--scenes 64] [--side 128]

DIR: a SAM model dir, a CLIP model dir or a merged model (export or training workdir).
"""
import argparse
import json
import sys

import numpy as np
from scipy import ndimage

from samclip_jax import metrics
from samclip_jax.data import sample
from samclip_jax.data.world import WorldSource

BACKGROUND = "background"


def scenes(num: int = 64, side: int = 128, split: str = "test", seed: int = 0, max_side: int | None = None):
  """Held-out scenes (drawn, never seen in training: the 'test' split of the world)."""
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


def _labelled(world):
  return [(s, sample.label(s)) for s in world if sample.label(s) >= 0]


def clip_teacher_metrics(clip, world, templates="imagenet80") -> dict:
  """top1 (largest shape, zero-shot) and retrieval_r1 (image -> its caption among all) of a ClipModel."""
  classifier = clip.zero_shot_classifier(list(sample.CLASSES), templates)
  labelled = _labelled(world)
  img = np.asarray(clip.encode_image([s["image"] for s, _ in labelled], normalize=True))
  top1 = float(np.mean(np.argmax(img @ np.asarray(classifier).T, -1) == [l for _, l in labelled]))
  captions = [sample.caption(s) for s, _ in labelled]
  txt = np.asarray(clip.encode_text(captions, normalize=True))
  best = np.argmax(img @ txt.T, -1)
  r1 = float(np.mean([captions[j] == captions[i] for i, j in enumerate(best)]))
  return {"top1": top1, "retrieval_r1": r1}


def merged_clip_metrics(model, world, resolution: int, templates="imagenet80") -> dict:
  """top1 of a merged model's CLIP head (the largest shape, zero-shot)."""
  classifier = np.asarray(model.text_classifier(list(sample.CLASSES), templates))
  labelled = _labelled(world)
  emb = np.asarray(model.encode_image([s["image"] for s, _ in labelled], resolution))
  return {"top1": float(np.mean(np.argmax(emb @ classifier.T, -1) == [l for _, l in labelled]))}


def semseg_metrics(model, world, mode: str, resolution: int, templates="imagenet80") -> float:
  """mIoU over the 5 shapes + background of model.segment_semantic(mode) on the scenes."""
  names = list(sample.CLASSES) + [BACKGROUND]
  # Label index c < 5 is class id c + 1 in the scene's semantic map; "background" is id 0.
  to_id = np.array(list(range(1, len(sample.CLASSES) + 1)) + [0])
  cm = metrics.ConfusionMatrix(len(names))
  for s in world:
    kw = {"resolution": resolution} if mode == "clip" else {}
    pred = model.segment_semantic(s["image"], names, mode=mode, templates=templates, **kw)
    cm.update(to_id[pred], s["semantic"])
  return cm.compute()["mIoU"] / 100.0


def evaluate_model(path: str, num_scenes: int = 64, side: int = 128, semseg_scenes: int = 32,
                   parts=("sam", "clip", "semseg")) -> dict:
  """Every metric (of `parts`) the model at `path` can compute, on `num_scenes` held-out scenes."""
  from samclip_jax import api
  world = scenes(num_scenes, side)
  kind = api.model_type(path)
  if kind == "sam":
    from samclip_jax.predictor import SamPredictor
    return sam_metrics(SamPredictor.from_checkpoint(path), world)
  if kind == "open_clip":
    from samclip_jax.clip_model import ClipModel
    return clip_teacher_metrics(ClipModel.from_checkpoint(path), world)
  model = api.SamClip.from_checkpoint(path)
  res = model.config.sam.image_size  # the world's merged models see the SAM size everywhere
  out = {}
  if "sam" in parts:
    out.update(sam_metrics(model.predictor(), world))
  if "clip" in parts:
    out.update(merged_clip_metrics(model, world, res))
  if "semseg" in parts:
    out["semseg_miou_clip"] = semseg_metrics(model, world[:semseg_scenes], "clip", res)
    out["semseg_miou_clip_sam"] = semseg_metrics(model, world[:semseg_scenes], "clip+sam", res)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="SAM dir, CLIP dir, or merged model (export / workdir)")
  p.add_argument("--scenes", type=int, default=64, help="held-out scenes to measure on")
  p.add_argument("--side", type=int, default=128, help="scene side in pixels")
  args = p.parse_args(argv)
  print(json.dumps(evaluate_model(args.model, args.scenes, args.side), indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
