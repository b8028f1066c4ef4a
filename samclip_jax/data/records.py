"""Record format of the ArrayRecord shards, shard writing and split manifests.

One record is a msgpack map (`msgpack.packb(d, use_bin_type=True)`; no pickle):
  "key":     str, unique id of the example inside its dataset (file stem, COCO id, ...)
  "image":   bytes, the encoded image file (JPEG or PNG) exactly as stored
  "height", "width": int, the decoded image size
  "caption": str (optional; CLIP sets)
  "label":   int (optional; class index, for classification sets)
  "masks":   list of COCO RLE dicts {"size": [h, w], "counts": str} (SAM sets)
  "classes": list of int category ids, one per mask (optional)
Strings are UTF-8; RLE "counts" are pycocotools' compressed strings (ASCII).

A split is a list of shard files `<name>-00000-of-00004.array_record` plus a manifest
JSON (`<name>.json`: {"files": [...], "num_records": n, "records_per_file": [...]}).
"""
import glob
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import msgpack
import numpy as np
from array_record.python import array_record_module

# group_size:1 makes every record its own chunk: cheap random access for grain.
WRITER_OPTIONS = "group_size:1"


def encode(record: Mapping[str, Any]) -> bytes:
  """Serialises a record dict to msgpack bytes."""
  return msgpack.packb(dict(record), use_bin_type=True)


def decode(raw) -> dict:
  """Parses a record: msgpack bytes, or a dict already (TFDS data sources)."""
  if isinstance(raw, Mapping):
    return dict(raw)
  return msgpack.unpackb(raw, raw=False)


def write_shard(path: str, records: Iterable[bytes]) -> int:
  """Writes encoded records to one ArrayRecord file atomically (tmp + rename)."""
  tmp = path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
  n = 0
  try:
    for r in records:
      writer.write(r)
      n += 1
  finally:
    writer.close()
  os.replace(tmp, path)
  return n


def shard_name(name: str, index: int, count: int) -> str:
  return f"{name}-{index:05d}-of-{count:05d}.array_record"


def read_all(paths) -> list[dict]:
  """Reads and decodes every record of a split (small data, tests)."""
  files = resolve_files(paths)
  out = []
  for f in files:
    reader = array_record_module.ArrayRecordReader(f)
    try:
      out.extend(decode(r) for r in reader.read_all())
    finally:
      reader.close()
  return out


def count_records(path: str) -> int:
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


FINGERPRINT_BYTES = 1 << 16  # read from each end of a shard: 128 KiB, even on a remote mount


def file_fingerprint(path: str) -> str:
  """sha256 of a data file's size and first and last 64 KiB: which data a derived artefact
  (teacher embeddings) was made from, without reading whole shards (the head holds the first
  records, the tail ArrayRecord's index of every record's offset)."""
  import hashlib
  size = os.path.getsize(path)
  h = hashlib.sha256(str(size).encode())
  with open(path, "rb") as f:
    h.update(f.read(FINGERPRINT_BYTES))
    if size > FINGERPRINT_BYTES:
      f.seek(max(size - FINGERPRINT_BYTES, FINGERPRINT_BYTES))
      h.update(f.read())
  return h.hexdigest()


def write_split_manifest(path: str, files: Sequence[str], extra: Mapping | None = None) -> None:
  """Writes the manifest of a split: shard files (relative names) and counts."""
  counts = [count_records(f) for f in files]
  data = {"files": [os.path.basename(f) for f in files], "records_per_file": counts,
          "num_records": int(sum(counts))}
  data.update(extra or {})
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2)
  os.replace(tmp, path)


def _is_split_manifest(path: str) -> bool:
  try:
    with open(path) as f:
      return isinstance(json.load(f).get("files"), list)
  except (OSError, ValueError, AttributeError):
    return False


def resolve_files(paths) -> list[str]:
  """Turns a split manifest (.json), a glob, a file, a directory or a list into files."""
  if isinstance(paths, (list, tuple)):
    return [f for p in paths for f in resolve_files(p)]
  paths = os.fspath(paths)
  if paths.endswith(".json"):
    with open(paths) as f:
      manifest = json.load(f)
    base = os.path.dirname(paths)
    return [os.path.join(base, f) for f in manifest["files"]]
  if os.path.isdir(paths):
    splits = sorted(os.path.basename(m) for m in glob.glob(os.path.join(paths, "*.json"))
                    if _is_split_manifest(m))
    if len(splits) == 1:  # prepare's output with one split: that split's shards
      return resolve_files(os.path.join(paths, splits[0]))
    if splits:  # its shards are those of every split: training on it would train on val too
      raise ValueError(f"{paths} holds the splits {', '.join(splits)}: give one of them "
                       f"(e.g. {os.path.join(paths, splits[-1])})")
    files = sorted(glob.glob(os.path.join(paths, "*.array_record")))
  elif any(c in paths for c in "*?["):
    files = sorted(glob.glob(paths))
  else:
    files = [paths]
  if not files:
    raise FileNotFoundError(f"no ArrayRecord files at {paths}")
  return files


def rle_to_json(rle: Mapping) -> dict:
  """pycocotools RLE (counts as bytes) -> JSON/msgpack friendly dict."""
  counts = rle["counts"]
  if isinstance(counts, bytes):
    counts = counts.decode("ascii")
  return {"size": [int(s) for s in rle["size"]], "counts": counts}


def rle_from_json(rle: Mapping) -> dict:
  """Inverse of rle_to_json: the dict pycocotools' decode() accepts."""
  counts = rle["counts"]
  if isinstance(counts, str):
    counts = counts.encode("ascii")
  return {"size": list(rle["size"]), "counts": counts}


def encode_masks(masks: np.ndarray) -> list[dict]:
  """Binary masks [N,H,W] -> list of JSON RLE dicts."""
  from pycocotools import mask as mask_utils
  if len(masks) == 0:
    return []
  rles = mask_utils.encode(np.asfortranarray(np.moveaxis(masks.astype(np.uint8), 0, -1)))
  return [rle_to_json(r) for r in rles]


def rle_counts(counts: str | bytes) -> np.ndarray:
  """Run lengths of a compressed COCO RLE string (pycocotools' rleFrString, vectorised).

  Raises ValueError on a malformed string; pycocotools itself does not check, and decoding
  runs that overflow h*w writes past its buffer.
  """
  if isinstance(counts, str):
    counts = counts.encode("ascii", errors="replace")
  c = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
  if len(c) == 0:
    return np.zeros((0,), np.int64)
  if ((c < 0) | (c > 63)).any():
    raise ValueError("RLE string has characters outside the encoding")
  end = (c & 0x20) == 0
  if not end[-1]:
    raise ValueError("RLE string ends inside a number")
  starts = np.flatnonzero(np.concatenate([[True], end[:-1]]))
  gid = np.cumsum(np.concatenate([[0], end[:-1]]))
  k = np.arange(len(c)) - starts[gid]
  if k.max() > 11:
    raise ValueError("RLE number too long")
  x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
  last = np.flatnonzero(end)
  neg = (c[last] & 0x10) != 0
  x = np.where(neg, x - (np.int64(1) << (5 * (k[last] + 1))), x)
  out = x.copy()
  # counts[m] += counts[m - 2] for m > 2: cumulative sums of the two interleaved runs.
  if len(out) > 3:
    out[1::2] = np.cumsum(x[1::2]) if len(out) > 1 else out[1::2]
    out[2::2] = np.cumsum(x[2::2])
  return out


def check_rle(rle: Mapping) -> None:
  """Raises ValueError unless the RLE's runs are non-negative and cover exactly h*w pixels."""
  h, w = (int(v) for v in rle["size"])
  counts = rle["counts"]
  runs = np.asarray(counts, np.int64) if isinstance(counts, list) else rle_counts(counts)
  if (runs < 0).any():
    raise ValueError("negative run length")
  if int(runs.sum()) != h * w:
    raise ValueError(f"runs cover {int(runs.sum())} pixels, size says {h}x{w}")


def decode_mask(rle: Mapping) -> np.ndarray:
  """One JSON RLE dict -> bool mask [H,W]."""
  from pycocotools import mask as mask_utils
  return mask_utils.decode(rle_from_json(rle)).astype(bool)
