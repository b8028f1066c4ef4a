"""On-disk layout of offline teacher embeddings (written by samclip_jax.extract).

DIR/manifest.json: {"format": FORMAT, "version": 1, "data_files": [basenames of the CLIP
  split's ArrayRecord files, in order], "num_records": N, "shard_size": S,
  "views_per_image": V, "dim": D, "dtype": "float16"|"bfloat16", "resolutions": [...],
  "seed": int, "complete": bool, "teacher": {...}}
DIR/shard-00000/ covers record indices [i*S, min((i+1)*S, N)) of the split and holds
  keys.npy int64 [n] (record indices), views.npy int32 [n,V,6] (x0, y0, cw, ch, flip,
  resolution), embeddings.npy [n,V,D] (float16, or bfloat16 stored as uint16 bits).
A shard directory is written under a temporary name and renamed: it exists whole or not.
"""
import json
import os

import numpy as np

FORMAT = "samclip_teacher_embeddings"
MANIFEST = "manifest.json"


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
  if os.path.exists(final):
    raise FileExistsError(final)
  os.rename(tmp, final)


def shard_done(directory: str, index: int) -> bool:
  return os.path.isdir(shard_dir(directory, index))


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
      self._shards[i] = (np.load(os.path.join(d, "keys.npy"), mmap_mode="r"),
                         np.load(os.path.join(d, "views.npy"), mmap_mode="r"),
                         np.load(os.path.join(d, "embeddings.npy"), mmap_mode="r"))
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
