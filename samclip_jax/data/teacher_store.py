"""On-disk layout of offline teacher embeddings (written by samclip_jax.extract).

DIR/manifest.json: {"format": FORMAT, "version": 1, "data_files": [basenames of the CLIP
  split's ArrayRecord files, in order], "num_records": N, "shard_size": S,
  "views_per_image": V, "dim": D, "dtype": "float16"|"bfloat16", "resolutions": [...],
  "seed": int, "complete": bool, "teacher": {...}}
DIR/shard-00000/ covers record indices [i*S, min((i+1)*S, N)) of the split and holds
  keys.npy int64 [n] (record indices), views.npy int32 [n,V,6] (x0, y0, cw, ch, flip,
  resolution), embeddings.npy [n,V,D] (float16, or bfloat16 stored as uint16 bits), and
  checksums.json {file name: sha256 of its bytes}, computed when the shard is written.
A shard directory is written under a temporary name and renamed: it exists whole or not.
"""
import hashlib
import json
import os

import numpy as np

FORMAT = "samclip_teacher_embeddings"
MANIFEST = "manifest.json"
CHECKSUMS = "checksums.json"
ARRAYS = ("keys.npy", "views.npy", "embeddings.npy")


def shard_dir(directory: str, index: int) -> str:
  return os.path.join(directory, f"shard-{index:05d}")


def read_manifest(directory: str) -> dict:
  with open(os.path.join(directory, MANIFEST)) as f:
    m = json.load(f)
  if m.get("format") != FORMAT:
    raise ValueError(f"{directory} is not a teacher-embedding directory")
  return m


def write_manifest(directory: str, manifest: dict) -> None:
  tmp = os.path.join(directory, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=2)
  os.replace(tmp, os.path.join(directory, MANIFEST))


def num_shards(manifest: dict) -> int:
  return -(-manifest["num_records"] // manifest["shard_size"])


def write_shard(directory: str, index: int, keys, views, embeddings) -> None:
  """Writes one shard atomically (temporary directory + rename)."""
  final = shard_dir(directory, index)
  tmp = final + ".tmp"
  os.makedirs(tmp, exist_ok=True)
  emb = np.asarray(embeddings)
  if emb.dtype.name == "bfloat16":
    emb = emb.view(np.uint16)  # .npy has no bfloat16; keep the bits
  np.save(os.path.join(tmp, "keys.npy"), np.asarray(keys, np.int64))
  np.save(os.path.join(tmp, "views.npy"), np.asarray(views, np.int32))
  np.save(os.path.join(tmp, "embeddings.npy"), emb)
  with open(os.path.join(tmp, CHECKSUMS), "w") as f:
    json.dump({name: file_sha256(os.path.join(tmp, name)) for name in ARRAYS}, f, indent=2)
  if os.path.exists(final):
    raise FileExistsError(final)
  os.rename(tmp, final)


def shard_done(directory: str, index: int) -> bool:
  return os.path.isdir(shard_dir(directory, index))


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _load(path: str, mmap_mode=None) -> np.ndarray:
  """np.load with the file's path in the error."""
  try:
    return np.load(path, mmap_mode=mmap_mode)
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"teacher embeddings file {path} is unreadable ({e}): rerun the "
                     "extraction to redo its shard") from e


def shard_problems(directory: str, manifest: dict, index: int) -> list[str]:
  """What is wrong with one stored shard (each problem names its path); [] when it is good."""
  d = shard_dir(directory, index)
  if not os.path.isdir(d):
    return [f"missing shard {d}"]
  try:
    with open(os.path.join(d, CHECKSUMS)) as f:
      sums = json.load(f)
  except (OSError, ValueError) as e:
    return [f"{os.path.join(d, CHECKSUMS)}: no checksums ({e})"]
  for name in ARRAYS:
    path = os.path.join(d, name)
    if not os.path.isfile(path):
      return [f"{path}: missing"]
    if file_sha256(path) != sums.get(name):
      return [f"{path}: checksum mismatch (changed or damaged since it was written)"]
  try:
    keys, views, emb = (_load(os.path.join(d, name)) for name in ARRAYS)
  except ValueError as e:
    return [str(e)]
  n, s, v, dim = (manifest[k] for k in ("num_records", "shard_size", "views_per_image", "dim"))
  count = min(s, n - index * s)
  if not np.array_equal(keys, np.arange(index * s, index * s + count)):
    return [f"{d}: keys are not {index * s}..{index * s + count - 1}"]
  if views.shape != (count, v, 6) or emb.shape != (count, v, dim):
    return [f"{d}: shapes {views.shape} {emb.shape}, expected {(count, v, 6)} {(count, v, dim)}"]
  # bfloat16 is stored as its bits: all-ones exponent is inf or NaN.
  finite = np.isfinite(emb) if manifest["dtype"] == "float16" else (emb & 0x7F80) != 0x7F80
  if not finite.all():
    return [f"{d}: non-finite embeddings"]
  if not set(np.unique(views[..., 5]).tolist()) <= set(manifest["resolutions"]):
    return [f"{d}: unexpected resolutions"]
  zero = int((emb.reshape(-1, dim) == 0).all(-1).sum())
  if zero:
    return [f"{d}: {zero} all-zero embeddings (views never computed)"]
  return []


class TeacherStore:
  """Random access to stored views and embeddings by record index (memory-mapped, lazy)."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    self.manifest = read_manifest(self.directory)
    self._shards = {}

  def __getstate__(self):
    return {"directory": self.directory, "manifest": self.manifest, "_shards": {}}

  def __repr__(self):
    return f"TeacherStore({self.directory!r})"

  @property
  def dim(self) -> int:
    return self.manifest["dim"]

  def _shard(self, i: int):
    if i not in self._shards:
      d = shard_dir(self.directory, i)
      if not os.path.isdir(d):
        raise FileNotFoundError(f"teacher embeddings missing shard {d}: run extraction to completion")
      # Checked once per shard and process (its checksums, keys, shapes, finite values): a
      # damaged shard would otherwise be trained on without a word.
      problems = shard_problems(self.directory, self.manifest, i)
      if problems:
        raise ValueError(f"teacher embeddings: {problems[0]}; rerun the extraction (it redoes bad shards)")
      self._shards[i] = tuple(_load(os.path.join(d, name), mmap_mode="r") for name in ARRAYS)
    return self._shards[i]

  def lookup(self, key: int) -> tuple[np.ndarray, np.ndarray]:
    """(views int32 [V,6], embeddings float32 [V,D]) of record `key`."""
    s = self.manifest["shard_size"]
    keys, views, emb = self._shard(key // s)
    j = key % s
    if int(keys[j]) != key:
      raise ValueError(f"teacher store corrupt: shard holds key {int(keys[j])} where {key} belongs")
    e = np.asarray(emb[j])
    if self.manifest["dtype"] == "bfloat16":
      e = (e.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(views[j]), e.astype(np.float32)
