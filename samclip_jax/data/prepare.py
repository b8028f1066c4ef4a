"""Converts raw datasets to ArrayRecord shards (records.py format) + manifests.

  python -m samclip_jax.data.prepare --source {folder,coco,sa1b,wds} --input PATH \
      [--annotations FILE] --output DIR [--shard-size N] [--val-fraction 0.01] [--workers N]

Sources (inputs are listed in sorted order, so the shard of every input is fixed):
  folder  a directory tree of images; key.txt beside key.jpg is its caption; if every image
          sits in a first-level class folder, "label" is the class index (classes in manifest)
  coco    --input image directory, --annotations COCO instances JSON (polygons or RLE);
          crowd annotations (iscrowd=1) are left out by design
  sa1b    an extracted SA-1B tar (sa_*.jpg + sa_*.json per image), a .tar or a folder of .tar
  wds     webdataset shards (.tar files, a folder of them or a glob): key.jpg|png [+ key.txt]
          [+ key.json with "caption"]
Output: DIR/{train,val}-XXXXX-of-YYYYY.array_record, DIR/{train,val}.json (split manifests
the loaders take), DIR/manifest.json (counts, sizes, skipped inputs with reasons).
A bad input (corrupt or truncated image, unsupported file, malformed or mismatched
annotation, polygon with non-finite or far out-of-image coordinates, malformed COCO image
entry, annotation of a missing image) is skipped, counted and listed; it never stops the run.
Resumable: each shard is written to a temporary file and renamed, then committed by a
progress file (DIR/progress/<shard>.json) holding a fingerprint of the shard's input listing;
a rerun skips a shard committed with the same fingerprint and rewrites any other, and removes
the shard files of an earlier listing that the current one no longer has (only ours: those
named in DIR/progress), so neither a killed run nor inputs changed in between duplicate or
lose records. Splits: an input goes to val
when crc32(key) / 2**32 < val_fraction (stable under reruns and input growth).
"""
import argparse
import concurrent.futures
import glob
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
import zlib

import numpy as np
from PIL import Image

from samclip_jax.data import records, transforms
from samclip_jax.data.workers import exit_with_parent

IMAGE_EXTS = set(transforms.IMAGE_EXTS)
SIDECAR_EXTS = {".txt", ".json"}
PROGRESS = "progress"
LISTING = "listing.json"  # in PROGRESS: the shard files the latest run planned
SHARD_RE = re.compile(r"(train|val)-\d{5}-of-\d{5}\.array_record")
# Test hook: exit (as a kill would) after this many shard files were renamed into place,
# before their progress file is written, i.e. at the worst moment.
STOP_ENV = "SAMCLIP_PREPARE_STOP_AFTER_SHARDS"
# Polygon coordinates may overshoot the image a little (they are clipped when rasterised);
# beyond this multiple of its longest side they are corrupt.
POLYGON_LIMIT = 4


class Skip(Exception):
  """An input that cannot become a record; the message is the reason."""


# ----------------------------------------------------------------------------- blobs
def read_blob(ref) -> bytes:
  """ref = (path, offset, size): a whole file (offset None) or a member inside a tar."""
  path, offset, size = ref
  with open(path, "rb") as f:
    if offset is None:
      return f.read()
    f.seek(offset)
    data = f.read(size)
  if len(data) != size:
    raise Skip(f"truncated tar member in {path}")
  return data


def _tar_members(tar_path):
  """(member name, blob ref) of the regular files of an uncompressed tar, sorted."""
  out = []
  with tarfile.open(tar_path, "r:") as tf:
    for m in tf:
      if m.isfile():
        out.append((m.name, (tar_path, m.offset_data, m.size)))
  return sorted(out)


def _tar_files(path):
  if os.path.isdir(path):
    return sorted(glob.glob(os.path.join(path, "*.tar")))
  if any(c in path for c in "*?["):
    return sorted(glob.glob(path))
  return [path]


def safe_name(name: str) -> str:
  """A file name as valid UTF-8 text: bytes that are not UTF-8 (which os and tarfile hand
  over as lone surrogates) become \\xNN escapes, so keys can be encoded and stored."""
  try:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
  except UnicodeEncodeError:  # other lone surrogates
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _split_ext(name):
  base = os.path.basename(name)
  stem, ext = os.path.splitext(base)
  return os.path.join(os.path.dirname(name), stem), ext.lower()


# ----------------------------------------------------------------------------- validation
def checked_image(data: bytes, annotated_hw=None) -> tuple[bytes, int, int]:
  """Fully decodes the image (catches corrupt/truncated files); non JPEG/PNG, wide (16-bit,
  float) samples or an EXIF orientation to apply (transforms.oriented, with the annotations'
  (h, w)) -> 8-bit RGB PNG, so every reader decodes the same, upright pixels."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      upright = transforms.oriented(im, annotated_hw)
      reencode = im.format not in ("JPEG", "PNG") or transforms.is_wide(im.mode) or upright is not im
      try:
        rgb = transforms.to_rgb(upright)
      except ValueError as e:   # read fine, but its values are no picture's
        raise Skip(f"unsupported image: {e}") from None
  except Skip:
    raise
  except Image.UnidentifiedImageError:
    raise Skip("corrupt image: not a recognised image format") from None
  except Image.DecompressionBombError as e:  # not corrupt: larger than PIL reads by default
    raise Skip(f"image too large: {e}") from None
  except Exception as e:  # PIL raises many types on bad data
    raise Skip(f"corrupt image: {type(e).__name__}: {e}") from None
  w, h = rgb.size
  if w < 1 or h < 1:
    raise Skip("empty image")
  if reencode:
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    data = buf.getvalue()
  return data, h, w


def _decode_text(data: bytes) -> str:
  """A caption file's text; an empty one is a broken sample (a caption set would train on "")."""
  try:
    text = data.decode("utf-8-sig").strip()   # -sig: a byte-order mark is not text
  except UnicodeDecodeError:
    text = data.decode("latin-1").strip()
  if not text:
    raise Skip("empty caption file")
  return text


def _checked_polygon(poly, h, w) -> list[float]:
  """Polygon coordinates as floats; ValueError unless finite and near the image.

  pycocotools rasterises without bounds checks: a coordinate of 1e9 makes it hang or
  crash the process, NaN gives an empty mask.
  """
  xy = np.asarray(poly, np.float64)
  if not np.isfinite(xy).all():
    raise ValueError("non-finite coordinate")
  limit = POLYGON_LIMIT * max(h, w)
  if np.abs(xy).max() > limit:
    raise ValueError(f"coordinate {np.abs(xy).max():g} is beyond {POLYGON_LIMIT}x the image size "
                     f"{h}x{w}")
  return xy.tolist()


def _segmentation_to_rle(seg, h, w):
  """COCO segmentation (polygons, uncompressed or compressed RLE) -> JSON RLE of size h, w."""
  from pycocotools import mask as mask_utils
  if isinstance(seg, list):
    polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
    if not polys or len(polys) != len(seg):
      raise Skip("invalid polygon")
    try:
      polys = [_checked_polygon(p, h, w) for p in polys]
      rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    except (TypeError, ValueError) as e:
      raise Skip(f"invalid polygon: {e}") from None
    return records.rle_to_json(rle)
  if isinstance(seg, dict) and "counts" in seg and "size" in seg:
    size = list(seg["size"]) if isinstance(seg["size"], (list, tuple)) else None
    if size is None or len(size) != 2 or [int(size[0]), int(size[1])] != [h, w]:
      raise Skip(f"RLE size {seg['size']} does not match image size {[h, w]}")
    try:
      records.check_rle(seg)
      rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else (
          records.rle_from_json(seg))
    except (ValueError, TypeError) as e:
      raise Skip(f"invalid RLE: {e}") from None
    return records.rle_to_json(rle)
  raise Skip("segmentation is neither polygons nor RLE")


def _masks_from_annotations(anns, h, w, where, category_ids=None):
  """(masks, classes, skipped) keeping the valid annotations of one image; with category_ids
  (COCO's categories) each annotation's category_id must be one of them."""
  from pycocotools import mask as mask_utils
  masks, classes, skipped = [], [], []
  for i, a in enumerate(anns):
    aid = a.get("id", i) if isinstance(a, dict) else i
    try:
      if not isinstance(a, dict) or "segmentation" not in a:
        raise Skip("annotation without segmentation")
      cid = a.get("category_id")
      if category_ids is not None and (isinstance(cid, bool) or cid not in category_ids):
        raise Skip(f"category_id {cid!r} is not one of the categories")
      rle = _segmentation_to_rle(a["segmentation"], h, w)
      if not mask_utils.area(records.rle_from_json(rle)):
        raise Skip("empty mask: no pixel inside the image")
    except Skip as e:
      skipped.append({"item": f"{where}#ann{aid}", "kind": "annotation", "reason": str(e)})
      continue
    masks.append(rle)
    classes.append(cid if isinstance(cid, int) and not isinstance(cid, bool) else 0)
  return masks, classes, skipped


# ----------------------------------------------------------------------------- sources
def list_folder(root):
  """Items of an image folder (hidden entries left out), sorted by relative path."""
  files = transforms.visible_files(root)
  fileset = set(files)
  # Classes: the first-level folders holding an image (not one of notes alone).
  subdirs = sorted({f.split(os.sep)[0] for f in files if os.sep in f and _split_ext(f)[1] in IMAGE_EXTS})
  labelled = bool(subdirs) and all(os.sep in f for f in files if _split_ext(f)[1] in IMAGE_EXTS)
  items = []
  for f in files:
    stem, ext = _split_ext(f)
    if ext in SIDECAR_EXTS and any(stem + e in fileset for e in IMAGE_EXTS):
      continue  # caption/metadata of an image
    item = {"key": safe_name(f), "image": (os.path.join(root, f), None, None), "ext": ext}
    if stem + ".txt" in fileset:
      item["caption"] = (os.path.join(root, stem + ".txt"), None, None)
    if labelled and f.split(os.sep)[0] in subdirs:
      item["label"] = subdirs.index(f.split(os.sep)[0])
    items.append(item)
  return items, {"classes": [safe_name(d) for d in subdirs]} if labelled else {}


def build_folder(item):
  if item["ext"] not in IMAGE_EXTS:
    raise Skip(f"unsupported file type {item['ext'] or '(none)'}")
  img, h, w = checked_image(read_blob(item["image"]))
  rec = {"key": item["key"], "image": img, "height": h, "width": w}
  if "caption" in item:
    rec["caption"] = _decode_text(read_blob(item["caption"]))
  if "label" in item:
    rec["label"] = item["label"]
  return rec, []


def list_coco(image_dir, annotations):
  """Items of a COCO set; bad image entries and orphan annotations are skipped and listed."""
  try:
    with open(annotations) as f:
      coco = json.load(f)
    images, anns_in = coco["images"], coco.get("annotations", [])
    cats = coco.get("categories", [])
    if not all(isinstance(v, list) for v in (images, anns_in, cats)):
      raise TypeError('"images", "annotations" and "categories" must be lists')
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise SystemExit(f"prepare: cannot read COCO annotations {annotations}: {e}")
  entries, keys, skipped = {}, set(), []
  for i, im in enumerate(images):
    problem = _coco_image_problem(im, keys)
    if problem:
      skipped.append({"item": f"images[{i}]", "kind": "input", "reason": problem})
    else:
      entries[im["id"]] = im
      keys.add(str(im["id"]))
  anns = {}
  for i, a in enumerate(anns_in):
    iid = a.get("image_id") if isinstance(a, dict) else None
    if not isinstance(a, dict):
      skipped.append({"item": f"annotations[{i}]", "kind": "annotation",
                      "reason": "annotation is not an object"})
    elif not isinstance(iid, (int, str)) or iid not in entries:
      skipped.append({"item": f"{iid}#ann{a.get('id', i)}", "kind": "annotation",
                      "reason": f"annotation refers to missing image id {iid!r}"})
    elif a.get("iscrowd", 0) not in (0, 1):  # "0" as a string would be read as crowd
      skipped.append({"item": f"{iid}#ann{a.get('id', i)}", "kind": "annotation",
                      "reason": f"iscrowd must be 0 or 1, got {a['iscrowd']!r}"})
    elif not a.get("iscrowd", 0):  # crowd regions are not object masks: left out by design
      anns.setdefault(iid, []).append(a)
  cats = sorted((c for c in cats if isinstance(c, dict)), key=_category_order)
  ids = [c.get("id") for c in cats]
  repeated = sorted({str(c) for c in ids if ids.count(c) > 1})
  if repeated:
    raise SystemExit(f"prepare: COCO annotations {annotations}: category ids repeat: {', '.join(repeated)}")
  # Without categories (a class-agnostic mask set) any category_id is kept as it is.
  category_ids = frozenset(c for c in ids if isinstance(c, int) and not isinstance(c, bool)) if cats else None
  items = []
  for iid, im in sorted(entries.items(), key=lambda e: (e[1]["file_name"], str(e[0]))):
    items.append({"key": str(iid), "file_name": im["file_name"],
                  "height": im.get("height"), "width": im.get("width"),
                  "image": (os.path.join(image_dir, im["file_name"]), None, None),
                  "anns": anns.get(iid, []), "category_ids": category_ids})
  return items, {"categories": cats, "skipped": skipped}


def _category_order(cat):
  """Numeric ids in order, then any others by their text."""
  cid = cat.get("id", 0)
  return (0, cid, "") if isinstance(cid, (int, float)) else (1, 0, str(cid))


def _coco_image_problem(im, keys) -> str | None:
  """Why a COCO image entry cannot be used (keys: the ids taken, as str), or None."""
  if not isinstance(im, dict):
    return f"image entry is not an object: {im!r:.80}"
  if not isinstance(im.get("id"), (int, str)) or isinstance(im.get("id"), bool):
    return f"image entry without a valid id: {im.get('id')!r:.80}"
  if not isinstance(im.get("file_name"), str) or not im["file_name"]:
    return f"image {im['id']} has no file_name"
  if str(im["id"]) in keys:
    return f"duplicate image id {im['id']!r}"
  for side in ("height", "width"):
    v = im.get(side)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
      return f"image {im['id']} has a {side} that is not a positive integer: {v!r:.40}"
  return None


def build_coco(item):
  if not os.path.isfile(item["image"][0]):
    raise Skip(f"missing image {item['file_name']}")
  img, h, w = checked_image(read_blob(item["image"]), (item.get("height"), item.get("width")))
  if item.get("height") not in (None, h) or item.get("width") not in (None, w):
    raise Skip(f"image is {h}x{w}, annotations say {item.get('height')}x{item.get('width')}")
  masks, classes, skipped = _masks_from_annotations(item["anns"], h, w, item["key"], item["category_ids"])
  return {"key": item["key"], "image": img, "height": h, "width": w,
          "masks": masks, "classes": classes}, skipped


def _grouped_members(input_path, from_tar):
  """[{key, files: {ext: blob ref}}] of a folder or of tar files, sorted by key. Groups are
  per tar, so two tars that share a name give one key twice (skipped as duplicate, not merged)."""
  groups = {}
  if from_tar:
    for tar in _tar_files(input_path):
      prefix = os.path.splitext(os.path.basename(tar))[0]
      try:
        members = _tar_members(tar)
      except (tarfile.TarError, OSError) as e:
        groups.setdefault((f"{prefix}/", tar), {})["__error__"] = f"unreadable tar: {e}"
        continue
      for name, ref in members:
        stem, ext = _split_ext(name)
        groups.setdefault((f"{prefix}/{stem}", tar), {})[ext] = ref
  else:
    for d, _, fs in os.walk(input_path):
      for f in fs:
        p = os.path.join(d, f)
        stem, ext = _split_ext(os.path.relpath(p, input_path))
        groups.setdefault((stem, ""), {})[ext] = (p, None, None)
  return [dict(key=safe_name(k), files=groups[k, t]) for k, t in sorted(groups)]


def _is_tar_input(path):
  return (os.path.isfile(path) and path.endswith(".tar")) or any(c in path for c in "*?[") or (
      os.path.isdir(path) and bool(glob.glob(os.path.join(path, "*.tar"))))


def list_sa1b(path):
  return _grouped_members(path, _is_tar_input(path)), {}


def _image_ref(files):
  for ext in (".jpg", ".jpeg", ".png", ".webp"):
    if ext in files:
      return files[ext]
  return None


def build_sa1b(item):
  files = item["files"]
  if "__error__" in files:
    raise Skip(files["__error__"])
  ref = _image_ref(files)
  if ref is None:
    raise Skip("missing image" if ".json" in files else
               f"unsupported file(s) {sorted(files)}")
  if ".json" not in files:
    raise Skip("missing annotation JSON")
  try:
    meta = json.loads(read_blob(files[".json"]))
    anns = meta["annotations"]
    if not isinstance(anns, list):
      raise TypeError("annotations is not a list")
  except (ValueError, KeyError, TypeError) as e:
    raise Skip(f"malformed annotation JSON: {type(e).__name__}: {e}") from None
  info = meta.get("image") or {}
  if not isinstance(info, dict):
    raise Skip("malformed annotation JSON: image is not an object")
  img, h, w = checked_image(read_blob(ref), (info.get("height"), info.get("width")))
  if info.get("height") not in (None, h) or info.get("width") not in (None, w):
    raise Skip(f"image is {h}x{w}, annotation JSON says {info.get('height')}x{info.get('width')}")
  masks, classes, skipped = _masks_from_annotations(anns, h, w, item["key"])
  return {"key": os.path.basename(item["key"]), "image": img, "height": h, "width": w,
          "masks": masks}, skipped


def list_wds(path):
  return _grouped_members(path, True), {}


def build_wds(item):
  files = item["files"]
  if "__error__" in files:
    raise Skip(files["__error__"])
  ref = _image_ref(files)
  if ref is None:
    raise Skip(f"no supported image in sample (files {sorted(files)})")
  img, h, w = checked_image(read_blob(ref))
  rec = {"key": item["key"], "image": img, "height": h, "width": w}
  if ".txt" in files:
    rec["caption"] = _decode_text(read_blob(files[".txt"]))
  elif ".json" in files:
    try:
      meta = json.loads(read_blob(files[".json"]))
      if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
        rec["caption"] = meta["caption"]
    except ValueError:
      return rec, [{"item": item["key"], "kind": "caption", "reason": "malformed sidecar JSON"}]
  return rec, []


SOURCES = {
    "folder": (lambda a: list_folder(a.input), build_folder),
    "coco": (lambda a: list_coco(a.input, a.annotations), build_coco),
    "sa1b": (lambda a: list_sa1b(a.input), build_sa1b),
    "wds": (lambda a: list_wds(a.input), build_wds),
}


# ----------------------------------------------------------------------------- shards
def split_of(key: str, val_fraction: float) -> str:
  return "val" if zlib.crc32(key.encode("utf-8")) / 2**32 < val_fraction else "train"


def write_one_shard(source: str, items, path: str, progress_path: str, fingerprint: str):
  """Builds the records of one shard's inputs and writes it atomically; returns its progress."""
  build = SOURCES[source][1]
  encoded, skipped = [], []
  for item in items:
    try:
      rec, skips = build(item)
      encoded.append(records.encode(rec))
      skipped.extend(skips)
    except Skip as e:
      skipped.append({"item": item["key"], "kind": "input", "reason": str(e)})
    except Exception as e:  # never die on one input
      skipped.append({"item": item["key"], "kind": "input",
                      "reason": f"unexpected {type(e).__name__}: {e}"})
  n = records.write_shard(path, encoded)
  return {"file": os.path.basename(path), "records": n, "inputs": len(items),
          "skipped": skipped, "bytes": os.path.getsize(path),
          "fingerprint": fingerprint}, progress_path


def _identity(value):
  """An item as JSON-able data, blob refs reduced to (file name, offset, size): what the
  input is, not where the input directory lies."""
  if isinstance(value, tuple):
    return [os.path.basename(value[0]), value[1], value[2]]
  if isinstance(value, dict):
    return {k: _identity(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_identity(v) for v in value]
  return value


def shard_fingerprint(source: str, items) -> str:
  """Hash of a shard's input listing (keys, file names, tar offsets and sizes, annotations)."""
  text = json.dumps([source, _identity(list(items))], sort_keys=True, default=str)
  return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _committed_fingerprint(progress_path):
  """The fingerprint a shard was committed with; None when it is not committed."""
  try:
    with open(progress_path) as f:
      return json.load(f).get("fingerprint", "")
  except (OSError, ValueError):
    return None


def _listed_before(output) -> set[str]:
  """Shard files earlier runs planned or committed here: ours to replace."""
  names = set()
  try:
    with open(os.path.join(output, PROGRESS, LISTING)) as f:
      names.update(json.load(f)["shards"])
  except (OSError, ValueError, KeyError, TypeError):
    pass
  names.update(n[:-len(".json")] for n in os.listdir(os.path.join(output, PROGRESS)))
  return {n for n in names if isinstance(n, str) and SHARD_RE.fullmatch(n)}


def _remove_stale(output, split_files) -> list[str]:
  """Removes our shard files (and their progress, split manifests) that the plan dropped."""
  planned = {os.path.basename(p) for files in split_files.values() for p in files}
  stale = sorted(_listed_before(output) - planned)
  for name in stale:
    for path in (os.path.join(output, name), os.path.join(output, name + ".tmp"),
                 os.path.join(output, PROGRESS, name + ".json")):
      if os.path.exists(path):
        os.remove(path)
  for split, files in split_files.items():
    manifest = os.path.join(output, split + ".json")
    if not files and any(n.startswith(split + "-") for n in stale) and os.path.exists(manifest):
      os.remove(manifest)
  _commit(os.path.join(output, PROGRESS, LISTING), {"shards": sorted(planned)})
  return stale


def _unique_keys(items):
  """(items with the first of each key, skips for the others): keys identify records."""
  seen, unique, skipped = set(), [], []
  for item in items:
    if item["key"] in seen:
      skipped.append({"item": item["key"], "kind": "input", "reason": "duplicate key"})
    else:
      seen.add(item["key"])
      unique.append(item)
  return unique, skipped


def _commit(progress_path, info):
  tmp = progress_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(info, f)
  os.replace(tmp, progress_path)


def _check_output(output: str) -> None:
  """--output is new, empty, or an earlier prepare's output (it holds PROGRESS/): a user's
  files are never overwritten."""
  if not os.path.lexists(output):
    return
  if not os.path.isdir(output):
    raise SystemExit(f"prepare: --output {output} exists and is not a directory")
  if os.listdir(output) and not os.path.isdir(os.path.join(output, PROGRESS)):
    raise SystemExit(f"prepare: --output {output} holds files that are not an earlier prepare's "
                     "output; give a new or empty directory")


def prepare(source: str, input_path: str, output: str, annotations: str | None = None,
            shard_size: int = 1000, val_fraction: float = 0.01, workers: int = 0,
            log=print) -> dict:
  """Converts a dataset (see module doc); returns the final manifest."""
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; choose from {sorted(SOURCES)}")
  args = argparse.Namespace(input=input_path, annotations=annotations)
  if source == "coco" and not annotations:
    raise SystemExit("prepare: --source coco needs --annotations")
  if not os.path.exists(input_path) and not any(c in input_path for c in "*?["):
    raise SystemExit(f"prepare: input {input_path} does not exist")
  if shard_size < 1:
    raise SystemExit(f"prepare: --shard-size must be at least 1, got {shard_size}")
  if not 0.0 <= val_fraction <= 1.0:  # NaN fails this too
    raise SystemExit(f"prepare: --val-fraction must be in [0, 1], got {val_fraction}")
  if workers < 0:
    raise SystemExit(f"prepare: --workers must be >= 0, got {workers}")
  _check_output(output)
  inside = os.path.commonpath([os.path.realpath(output), os.path.realpath(input_path)])
  if os.path.isdir(input_path) and inside == os.path.realpath(input_path):
    # Its own shards would be listed as inputs on the next run.
    raise SystemExit(f"prepare: --output {output} lies inside the input {input_path}; choose a directory outside it")
  items, extra = SOURCES[source][0](args)
  items, duplicates = _unique_keys(items)
  extra = dict(extra, skipped=extra.get("skipped", []) + duplicates)
  os.makedirs(os.path.join(output, PROGRESS), exist_ok=True)
  jobs, changed = [], []
  split_files = {}
  for split in ("train", "val"):
    sitems = [it for it in items if split_of(it["key"], val_fraction) == split]
    n_shards = -(-len(sitems) // shard_size)
    split_files[split] = []
    for j in range(n_shards):
      name = records.shard_name(split, j, n_shards)
      path = os.path.join(output, name)
      split_files[split].append(path)
      prog = os.path.join(output, PROGRESS, name + ".json")
      chunk = sitems[j * shard_size:(j + 1) * shard_size]
      fingerprint = shard_fingerprint(source, chunk)
      committed = _committed_fingerprint(prog)
      if committed != fingerprint:
        jobs.append((split, chunk, path, prog, fingerprint))
        if committed is not None:
          changed.append(name)
  stale = _remove_stale(output, split_files)
  if changed or stale:
    log(f"[prepare] the inputs changed since the previous run: redoing {len(changed)} shards "
        f"whose inputs differ {changed[:3]}, removed {len(stale)} shards of the old listing "
        f"{stale[:3]}")
  total = sum(len(j[1]) for j in jobs)
  log(f"[prepare] {source}: {len(items)} inputs, "
      f"{sum(len(v) for v in split_files.values()) - len(jobs)} shards already done, "
      f"{len(jobs)} to write ({total} inputs)")
  stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
  t0, done, written = time.time(), 0, 0

  def finish(info, prog):
    nonlocal done, written
    written += 1
    if stop_after and written >= stop_after:
      log(f"[prepare] {STOP_ENV}={stop_after}: exiting before committing {info['file']}")
      os._exit(3)
    _commit(prog, info)
    done += info["inputs"]
    rate = done / max(time.time() - t0, 1e-9)
    eta = (total - done) / rate if rate > 0 else 0.0
    log(f"[prepare] {info['file']}: {info['records']} records, {len(info['skipped'])} skipped; "
        f"{done}/{total} inputs, {rate:.1f} inputs/s, ETA {eta:.0f}s")

  if workers > 0:
    with concurrent.futures.ProcessPoolExecutor(workers, initializer=exit_with_parent) as pool:
      futures = [pool.submit(write_one_shard, source, *job[1:]) for job in jobs]
      for fut in concurrent.futures.as_completed(futures):
        finish(*fut.result())
  else:
    for job in jobs:
      finish(*write_one_shard(source, *job[1:]))
  return _finalize(output, source, split_files, extra, val_fraction, shard_size, log)


def _finalize(output, source, split_files, extra, val_fraction, shard_size, log):
  extra = dict(extra)
  listing_skips = extra.pop("skipped", [])  # found while listing the inputs, in no shard
  manifest = {"source": source, "val_fraction": val_fraction, "shard_size": shard_size,
              "splits": {}, "skipped": list(listing_skips), **extra}
  for split, files in split_files.items():
    infos = []
    for path in files:
      with open(os.path.join(output, PROGRESS, os.path.basename(path) + ".json")) as f:
        infos.append(json.load(f))
    for info in infos:
      manifest["skipped"].extend(dict(s, split=split) for s in info["skipped"])
    if files:
      records.write_split_manifest(os.path.join(output, split + ".json"), files,
                                   {"split": split, "source": source})
    manifest["splits"][split] = {
        "records": sum(i["records"] for i in infos), "inputs": sum(i["inputs"] for i in infos),
        "files": len(files), "bytes": sum(i["bytes"] for i in infos)}
  manifest["num_skipped_inputs"] = sum(1 for s in manifest["skipped"] if s["kind"] == "input")
  manifest["num_skipped_annotations"] = sum(1 for s in manifest["skipped"] if s["kind"] == "annotation")
  reasons = {}
  for s in manifest["skipped"]:
    r = s["reason"].split(":")[0]
    reasons[r] = reasons.get(r, 0) + 1
  manifest["skip_reasons"] = reasons
  tmp = os.path.join(output, "manifest.json.tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=2)
  os.replace(tmp, os.path.join(output, "manifest.json"))
  log("[prepare] done: " + ", ".join(f"{k} {v['records']} records in {v['files']} files"
                                       for k, v in manifest["splits"].items())
      + f"; skipped {manifest['num_skipped_inputs']} inputs, "
      f"{manifest['num_skipped_annotations']} annotations {reasons}")
  return manifest


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--source", required=True, choices=sorted(SOURCES), help="input format (above)")
  p.add_argument("--input", required=True, help="image folder, SA-1B tar(s) / folder, or webdataset shards")
  p.add_argument("--annotations", help="coco: the COCO instances JSON")
  p.add_argument("--output", required=True, help="new directory for the shards and manifests (or an earlier "
                 "output of prepare, resumed)")
  p.add_argument("--shard-size", type=int, default=1000, help="records per ArrayRecord shard (default 1000)")
  p.add_argument("--val-fraction", type=float, default=0.01,
                 help="share of inputs put in the val split, by a hash of their key (default 0.01)")
  p.add_argument("--workers", type=int, default=0, help="processes writing shards in parallel")
  a = p.parse_args(argv)
  prepare(a.source, a.input, a.output, a.annotations, a.shard_size, a.val_fraction, a.workers,
          log=lambda s: print(s, flush=True))


if __name__ == "__main__":
  from samclip_jax import cli
  sys.exit(cli.reported(main))
