"""Segment one picture with a SAM-CLIP model and write an overlay image.

  python -m samclip_jax.predict --checkpoint DIR --image in.jpg --classes "cat,dog,grass" --output out.png
  python -m samclip_jax.predict --checkpoint DIR --image in.jpg --points "120,80;300,200" --labels "1,0" --output out.png
  python -m samclip_jax.predict --checkpoint DIR --image in.jpg --boxes "10,20,200,220" --classes "cat,dog" --output out.png
  python -m samclip_jax.predict --checkpoint DIR --image in.jpg --everything --output out.png
  python -m samclip_jax.predict --checkpoint DIR --image in.jpg --text "red star" --output out.png

Without prompts, --classes gives zero-shot semantic segmentation (--mode clip+sam or clip).
Points / boxes give SAM-head masks (named by the CLIP head when --classes is given);
--everything runs the automatic mask generator; --text draws the instances a free-text
query names (SamClip.segment_text; --contrast lists what else the picture may hold).
--checkpoint takes a merged model directory or a training workdir. The picture is written
whole or not at all.
"""
import argparse
import os
import re
import sys
import tempfile

import numpy as np

from samclip_jax import cli
from samclip_jax.cli import EXIT_FAILURE, EXIT_USAGE, UsageError

def _numbers(vals, part: str, flag: str) -> list[float]:
  """The finite numbers of one point or box, else a UsageError naming it."""
  try:
    out = [float(v) for v in vals]
  except ValueError:
    raise UsageError(f"{flag}: {part!r} holds a non-number") from None
  if not np.isfinite(out).all():
    raise UsageError(f"{flag}: {part!r} holds a non-finite number")
  return out


def parse_points(text: str) -> np.ndarray:
  """"x,y;x,y" -> float [N,2]."""
  pts = []
  for part in text.split(";"):
    part = part.strip()
    if not part:
      continue
    vals = part.split(",")
    if len(vals) != 2:
      raise UsageError(f"--points: {part!r} is not 'x,y' (points are separated by ';')")
    pts.append(_numbers(vals, part, "--points"))
  if not pts:
    raise UsageError("--points: no point given")
  return np.array(pts, np.float64)


def parse_labels(text: str, n: int) -> np.ndarray:
  """"1,0,1" -> int [n] in {0, 1}."""
  try:
    labels = [int(v) for v in text.replace(";", ",").split(",") if v.strip()]
  except ValueError:
    raise UsageError(f"--labels: {text!r} must be comma-separated 0/1 values") from None
  if len(labels) != n:
    raise UsageError(f"--labels gives {len(labels)} labels for {n} points")
  if any(v not in (0, 1) for v in labels):
    raise UsageError("--labels: each label is 1 (foreground) or 0 (background)")
  return np.array(labels, np.int32)


def parse_boxes(text: str) -> np.ndarray:
  """"x0,y0,x1,y1;..." -> float [N,4] (XYXY, x0 < x1, y0 < y1)."""
  boxes = []
  for part in text.split(";"):
    part = part.strip()
    if not part:
      continue
    vals = part.split(",")
    if len(vals) != 4:
      raise UsageError(f"--boxes: {part!r} is not 'x0,y0,x1,y1' (boxes are separated by ';')")
    b = _numbers(vals, part, "--boxes")
    if not (b[0] < b[2] and b[1] < b[3]):
      raise UsageError(f"--boxes: {part!r} needs x0 < x1 and y0 < y1")
    boxes.append(b)
  if not boxes:
    raise UsageError("--boxes: no box given")
  return np.array(boxes, np.float64)


def parse_classes(text: str, flag: str = "--classes") -> list[str]:
  from samclip_jax.clip_model import check_class_names
  names = [c.strip() for c in text.split(",") if c.strip()]
  if not names:
    raise UsageError(f"{flag}: give comma-separated class names")
  try:
    return check_class_names(names)
  except ValueError as e:
    raise UsageError(f"{flag}: {e}") from None


def join_negative_values(argv: list[str]) -> list[str]:
  """["--points", "-5,10"] -> ["--points=-5,10"]: argparse takes "-5,10" for an option."""
  out, i = [], 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--") and "=" not in a and i + 1 < len(argv) and re.match(r"-\.?\d", argv[i + 1]):
      out.append(f"{a}={argv[i + 1]}")
      i += 2
    else:
      out.append(a)
      i += 1
  return out


def _check_inside(coords: np.ndarray, h: int, w: int, what: str):
  xs, ys = coords[..., 0::2], coords[..., 1::2]
  if (xs < 0).any() or (ys < 0).any() or (xs > w).any() or (ys > h).any():
    raise UsageError(f"{what} fall outside the {w}x{h} image")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m samclip_jax.predict", description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="merged model directory or training workdir")
  p.add_argument("--image", required=True, help="input picture (any format PIL reads)")
  p.add_argument("--output", required=True, help="overlay picture to write (.png or .jpg); an existing "
                 "one is replaced only if predict wrote it (else pass --overwrite)")
  p.add_argument("--overwrite", action="store_true", help="replace --output even if predict did not write it")
  p.add_argument("--classes", help="comma-separated class names")
  p.add_argument("--mode", choices=("clip+sam", "clip"),
                 help="semantic segmentation without prompts (default clip+sam)")
  p.add_argument("--points", help="'x,y;x,y' point prompts in image pixels (one mask)")
  p.add_argument("--labels", help="'1,0' per point: 1 foreground (default), 0 background")
  p.add_argument("--boxes", help="'x0,y0,x1,y1;...' box prompts (one mask each)")
  p.add_argument("--everything", action="store_true", help="automatic mask generator")
  p.add_argument("--text", help="free-text query: its instance masks (e.g. 'red star')")
  p.add_argument("--contrast", help="--text: comma-separated prompts the query competes with per patch "
                                     "(default: background)")
  p.add_argument("--min-score", type=float, default=0.0,
                 help="--text: drop masks scored below this (p_mask x predicted IoU, 0 to 1; default 0 keeps all)")
  p.add_argument("--top", type=int,
                 help="--text: draw only the K best masks (default: every one, best first)")
  p.add_argument("--points-per-side", type=int,
                 help="--everything grid (default: SAM's 32 a side for a 1024-px model; for a smaller one "
                      "a point every 8 px of the image as it sees it, 8 to 32 a side)")
  p.add_argument("--pred-iou-thresh", type=float,
                 help="--everything: min predicted IoU (default: SAM's 0.88 for a 1024-px model, 0.8 for "
                      "a smaller one)")
  p.add_argument("--stability-score-thresh", type=float,
                 help="--everything: min stability (default: SAM's 0.95 for a 1024-px model, 0.8 for a "
                      "smaller one)")
  p.add_argument("--templates", default="imagenet80", help="prompt template set for class names")
  p.add_argument("--text-model", help="open_clip model directory if the checkpoint lacks its text tower")
  p.add_argument("--alpha", type=float, default=0.5, help="mask opacity (default 0.5)")
  return p


def run(args) -> str:
  """Does the work of one command line; returns the output path."""
  from samclip_jax import api, visualize
  prompted = args.points is not None or args.boxes is not None
  if args.labels is not None and args.points is None:
    raise UsageError("--labels needs --points")
  if args.contrast is not None and args.text is None:
    raise UsageError("--contrast needs --text")
  if args.min_score != 0.0 and args.text is None:
    raise UsageError("--min-score needs --text")
  if not 0.0 <= args.min_score <= 1.0:
    raise UsageError(f"--min-score must be in [0, 1], got {args.min_score}")
  if args.top is not None and args.text is None:
    raise UsageError("--top needs --text")
  if args.top is not None and args.top < 1:
    raise UsageError(f"--top must be at least 1, got {args.top}")
  if args.everything and prompted:
    raise UsageError("--everything takes no --points / --boxes")
  for flag, value in (("--points-per-side", args.points_per_side), ("--pred-iou-thresh", args.pred_iou_thresh),
                      ("--stability-score-thresh", args.stability_score_thresh)):
    if value is not None and not args.everything:
      raise UsageError(f"{flag} needs --everything")
  if args.mode is not None and (prompted or args.everything or args.text is not None):
    raise UsageError("--mode is for semantic segmentation (--classes alone); prompted masks, "
                     "--everything and --text take none")
  if args.text is not None:
    if prompted or args.everything or args.classes:
      raise UsageError("--text takes no --points / --boxes / --everything / --classes (see --contrast)")
    if not args.text.strip():
      raise UsageError("--text: give a non-empty query")
  if not (prompted or args.everything or args.classes or args.text is not None):
    raise UsageError("nothing to do: give --classes, --points / --boxes, --everything or --text")
  if not 0.0 <= args.alpha <= 1.0:
    raise UsageError("--alpha must be in [0, 1]")
  if args.points_per_side is not None and args.points_per_side < 1:
    raise UsageError("--points-per-side must be at least 1")
  out_ext = os.path.splitext(args.output)[1].lower()
  if out_ext not in (".png", ".jpg", ".jpeg"):
    raise UsageError(f"--output must end in .png or .jpg, got {args.output!r}")
  out_dir = os.path.dirname(os.path.abspath(args.output))
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UsageError(f"--output {args.output}: {out_dir} is a file, not a directory")
  if not os.path.isdir(out_dir):
    raise UsageError(f"output directory does not exist: {out_dir}")
  try:  # a real write, before the model runs (permissions alone miss read-only mounts, /sys)
    with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".predict-"):
      pass
  except OSError as e:
    raise UsageError(f"output directory is not writable: {out_dir} ({e.strerror})") from None
  for flag, value in (("--pred-iou-thresh", args.pred_iou_thresh),
                      ("--stability-score-thresh", args.stability_score_thresh)):
    if value is not None and not 0.0 <= value <= 1.0:
      raise UsageError(f"{flag} must be in [0, 1], got {value}")
  check_output(args.output, args.image, args.overwrite)
  classes = parse_classes(args.classes) if args.classes else None
  contrast = parse_classes(args.contrast, "--contrast") if args.contrast is not None else api.TEXT_CONTRAST
  points = parse_points(args.points) if args.points is not None else None
  labels = None
  if points is not None:
    labels = parse_labels(args.labels, len(points)) if args.labels is not None else np.ones(len(points), np.int32)
  boxes = parse_boxes(args.boxes) if args.boxes is not None else None
  if boxes is not None and points is not None and len(boxes) > 1:
    raise UsageError("points go with at most one box (one prompt); got several boxes")
  try:
    image = api.load_image(args.image)
  except (FileNotFoundError, IsADirectoryError, ValueError) as e:
    raise UsageError(str(e)) from None
  h, w = image.shape[:2]
  if points is not None:
    _check_inside(points, h, w, "--points")
  if boxes is not None:
    _check_inside(boxes, h, w, "--boxes")

  model = api.SamClip.from_checkpoint(args.checkpoint, text_model=args.text_model)
  if prompted:
    predictor = model.predictor()
    predictor.set_image(image)
    if boxes is not None and len(boxes) > 1:
      masks, scores, _ = predictor.predict_batch(boxes=boxes, multimask_output=False)
      masks, scores = masks[:, 0], scores[:, 0]
    else:
      # One prompt; a single point is ambiguous, so take SAM's best of three (as its demo).
      multi = boxes is None and len(points) == 1
      m, s, _ = predictor.predict(point_coords=points, point_labels=labels,
                                  box=None if boxes is None else boxes[0], multimask_output=multi)
      best = int(np.argmax(s))
      masks, scores = m[best:best + 1], s[best:best + 1]
    if classes:   # colour by class; each mask tagged with its class and probability
      named = model.label_masks(image, list(masks), classes, args.templates)
      names, tags = [n for n, _ in named], [f"{n} {p:.2f}" for n, p in named]
    else:
      names, tags = [f"mask {i + 1} (IoU {s:.2f})" for i, s in enumerate(scores)], None
    pic = visualize.overlay_masks(image, masks, names, alpha=args.alpha, points=points,
                                  point_labels=labels, boxes=boxes, tags=tags)
  elif args.text is not None:
    masks, scores = model.segment_text(image, args.text, contrast=contrast, templates=args.templates,
                                       min_score=args.min_score)
    shown = len(masks) if args.top is None else min(args.top, len(masks))
    print(text_summary(args.text, scores, args.min_score, shown), file=sys.stderr)
    title = f"{args.text!r}: {cli.plural(len(masks), 'mask')}" + drawn_note(shown, len(masks))
    pic = visualize.overlay_masks(image, masks[:shown], alpha=args.alpha,
                                  tags=[f"{s:.2f}" for s in scores[:shown]], title=title)
  elif args.everything:
    from samclip_jax.automatic_mask_generator import suited_settings
    settings = suited_settings(h, w, model.config.sam.image_size)
    settings.update({k: v for k, v in (("points_per_side", args.points_per_side),
                                       ("pred_iou_thresh", args.pred_iou_thresh),
                                       ("stability_score_thresh", args.stability_score_thresh)) if v is not None})
    side = settings["points_per_side"]
    progress = cli.Progress("everything", side * side, "points")
    generator = model.mask_generator(**settings, progress=progress.update)
    records = generator.generate(image)
    print(everything_summary(settings, generator.counts), file=sys.stderr)
    masks = [r["segmentation"] for r in records]
    names = [n for n, _ in model.label_masks(image, masks, classes, args.templates)] if classes else None
    pic = visualize.overlay_masks(image, masks, names, alpha=args.alpha, title=cli.plural(len(masks), "mask"))
  else:
    label_map = model.segment_semantic(image, classes, mode=args.mode or "clip+sam", templates=args.templates)
    skip = [i for i, n in enumerate(classes) if n.lower() == "background"]
    pic = visualize.overlay_semantic(image, label_map, classes, alpha=args.alpha, skip=skip)
  _save_atomic(pic, args.output, out_ext)
  return args.output


def everything_summary(settings: dict, c: dict) -> str:
  """Where --everything's candidate masks went, and what to lower when none is left."""
  side = settings["points_per_side"]
  line = (f"[everything] {side}x{side} points -> {cli.plural(c['candidates'], 'candidate mask')}; "
          f"predicted IoU > {settings['pred_iou_thresh']}: {c['pred_iou']} (best {c['best_pred_iou']:.2f}); "
          f"stability >= {settings['stability_score_thresh']}: {c['stability']} (best {c['best_stability']:.2f}); "
          f"after duplicate removal: {cli.plural(c['kept'], 'mask')}")
  if c["kept"] == 0:
    line += ("\n[everything] no mask passed the filters: lower --pred-iou-thresh / "
             "--stability-score-thresh (SAM's defaults suit well-trained models)")
  return line


def drawn_note(shown: int, found: int) -> str:
  """', the best K drawn' when --top leaves some of the found masks out, else ''."""
  return f", the best {shown} drawn" if shown < found else ""


def text_summary(text: str, scores, min_score: float = 0.0, shown: int | None = None) -> str:
  """How many instances --text found, with their scores (and how many are drawn), or what to
  try when none."""
  line = f"[text] {text!r}: {cli.plural(len(scores), 'mask')}"
  if len(scores):
    drawn = drawn_note(len(scores) if shown is None else shown, len(scores))
    return line + " (scores " + ", ".join(f"{s:.2f}" for s in scores) + ")" + drawn
  if min_score > 0:
    return line + (f"\n[text] none scored >= --min-score {min_score}: lower it (0 keeps every mask), "
                   "rephrase the query, or name fewer / other --contrast prompts")
  return line + "\n[text] no candidate point gave a non-empty mask"


MARK = "samclip_jax.predict"  # in every picture predict writes: a PNG text chunk, a JPEG comment


def written_by_predict(path: str) -> bool:
  """Whether `path` is a picture this command wrote (its mark is in the file's metadata)."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      mark = im.info.get("Software") or im.info.get("comment") or b""
  except Exception:  # noqa: BLE001 - not a picture we can read: not ours
    return False
  return (mark.decode(errors="replace") if isinstance(mark, bytes) else str(mark)) == MARK


def check_output(output: str, image: str, overwrite: bool) -> None:
  """Refuses, before the model runs, an --output that is a directory, the input image, or a file
  predict did not write (unless --overwrite): a user's picture is never replaced by accident."""
  if not os.path.lexists(output):
    return
  if os.path.isdir(output):
    raise UsageError(f"--output {output} is a directory")
  if os.path.exists(image) and os.path.samefile(output, image):
    raise UsageError(f"--output {output} is the input image: give another path")
  if not overwrite and not written_by_predict(output):
    raise UsageError(f"--output {output} exists and was not written by predict: pass --overwrite "
                     "to replace it, or give another path")


def _save_atomic(pic, path: str, ext: str):
  from PIL import PngImagePlugin
  with cli.atomic_write(path, suffix=ext, prefix=".predict-") as tmp:
    if ext == ".png":
      info = PngImagePlugin.PngInfo()
      info.add_text("Software", MARK)
      pic.save(tmp, format="PNG", pnginfo=info)
    else:
      pic.save(tmp, format="JPEG", comment=MARK.encode())


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser().parse_args(join_negative_values(argv))
  from samclip_jax import api
  try:
    out = run(args)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except api.CheckpointNotFound as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except (ValueError, OSError) as e:   # e.g. a checkpoint of the wrong kind, no text tower, no params
    print(f"error: {e}", file=sys.stderr)
    return EXIT_FAILURE
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
