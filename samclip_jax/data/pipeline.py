"""grain input pipelines: CLIP batches (224/448 views) and SAM batches (1024, or image_size, + prompts).

Sources: `paths` is a split manifest (.json, as written by sample.py / prepare.py), an
ArrayRecord file, a glob, a directory of shards, a list of those, or any random-access
data source object (len + getitem), e.g. `tfds.data_source(name, split=...)` on a TFDS
dataset built in the array_record file format (works without TensorFlow) whose examples
are dicts with the keys of records.py ("image" as encoded bytes or a uint8 array, ...).

Randomness and multi-host: every process reads the same stream of record positions (one
grain IndexSampler over the whole split, seeded by `seed`); global batch n is positions
[n*G, (n+1)*G) of it (G = batch_size * shard_count) and process shard_index takes rows
[shard_index*batch_size, (shard_index+1)*batch_size) of it (GlobalBatchSampler). Record g
of the stream draws its per-record choices (crop box, flip, masks, prompts) from
Philox(seed + g), grain's convention; the CLIP resolution of global batch n is
clip_resolution(seed, n, resolutions). So a global batch, its resolution and its pixels are
functions of (seed, n) alone: the same for any number of processes or grain workers.
seed: 0 <= seed < 2**32. Pass shard_index=jax.process_index(),
shard_count=jax.process_count() and the per-process batch size (global batch / processes).

Checkpointing: `iter(loader)` is a grain DataLoaderIterator with get_state()/set_state();
save it in Orbax with `ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it))`
and restore with `grain.checkpoint.CheckpointRestore(it)` (see save_args/restore_args).
"""
import multiprocessing
import os
from typing import Sequence

import grain
import numpy as np

from samclip_jax.data import prompts, records, teacher_store, transforms, workers, world
from samclip_jax.data.teacher_store import TeacherStore

SAM_IMAGE_SIZE = 1024


def data_source(paths):
  """An ArrayRecordDataSource over the split's files, a world split ('world:SPLIT:N', see
  world.py), or `paths` if it is a source already."""
  if world.is_world(paths):
    return world.source(paths)
  if hasattr(paths, "__getitem__") and hasattr(paths, "__len__") and not isinstance(
      paths, (str, list, tuple)):
    return paths
  return grain.sources.ArrayRecordDataSource(records.resolve_files(paths))


class KeyedSource(grain.sources.RandomAccessDataSource):
  """Wraps a source so each element carries its record index: (index, raw)."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    return int(index), self._source[index]

  def __setstate__(self, state):
    # Unpickled in a grain worker as it starts: from then on it ends with its job.
    self.__dict__.update(state)
    if multiprocessing.parent_process() is not None:
      workers.exit_with_parent()

  def __repr__(self):
    # grain checks this against the iterator state on restore. ArrayRecordDataSource's own
    # repr hashes the absolute paths, so a workdir (with its sample) copied elsewhere could
    # not resume: name the files and the record count instead.
    paths = getattr(self._source, "paths", None)
    if isinstance(self._source, grain.sources.ArrayRecordDataSource) and isinstance(paths, list):
      names = [os.path.basename(p) for p in paths]  # data_source() gives a list of str paths
      return f"KeyedSource(ArrayRecordDataSource(files={names}, num_records={len(self)}))"
    return f"KeyedSource({self._source!r})"


class GlobalBatchSampler:
  """Process shard_index's rows of every global batch, read from one stream all processes share.

  Global batch n is positions [n*G, (n+1)*G) of an unsharded IndexSampler (G = batch_size *
  shard_count); this process takes rows shard_index*batch_size + [0, batch_size) of it. Only
  whole global batches are served. grain worker w of W batches the local indices w, w+W,
  w+2W, ... and the loader yields the workers' batches in turn, so local index l is placed
  where worker l % W's batch lands: the loader's n-th batch is always global batch n.
  """

  def __init__(self, num_records, *, seed, shuffle, num_epochs, batch_size, shard_index,
               shard_count, worker_count):
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    self._stream = grain.samplers.IndexSampler(
        num_records=num_records, shard_options=grain.sharding.NoSharding(), shuffle=shuffle,
        num_epochs=num_epochs, seed=seed)
    self.batch_size, self.shard_index, self.shard_count = batch_size, shard_index, shard_count
    self.global_batch = batch_size * shard_count
    self.workers = max(int(worker_count), 1)  # 0 (in-process) batches like one worker
    self._len = len(self._stream) // self.global_batch * batch_size

  def __len__(self):
    return self._len

  def __repr__(self):
    # grain stores it with the iterator state: name everything that shapes the stream.
    return (f"GlobalBatchSampler({self._stream!r}, batch_size={self.batch_size}, "
            f"shard={self.shard_index}/{self.shard_count}, workers={self.workers})")

  def position(self, index: int) -> int:
    """Stream position of local index `index`."""
    worker, m = index % self.workers, index // self.workers
    batch = m // self.batch_size * self.workers + worker
    return batch * self.global_batch + self.shard_index * self.batch_size + m % self.batch_size

  def __getitem__(self, index):
    if not 0 <= index < self._len:
      raise IndexError(f"index {index} out of range [0, {self._len})")
    meta = self._stream[self.position(index)]
    return grain.RecordMetadata(index=index, record_key=meta.record_key, rng=meta.rng)


def stream_position(rng: np.random.Generator, seed: int) -> int:
  """Stream position g of the record whose rng this is (IndexSampler keys it Philox(seed + g))."""
  lo, hi = (int(k) for k in rng.bit_generator.state["state"]["key"])
  return lo + (hi << 64) - seed


def clip_resolution(seed: int, batch: int, resolutions: Sequence[int]) -> int:
  """The CLIP resolution of global batch `batch`: a function of (seed, batch) only."""
  return int(resolutions[np.random.default_rng((seed, batch)).integers(len(resolutions))])


def _as_list(values):
  """Batch function keeping the elements as a list (shapes differ before rendering)."""
  return list(values)


class ClipPrepare(grain.transforms.RandomMap):
  """Draws the record's view for every resolution (or picks stored ones); no decoding yet."""

  def __init__(self, resolutions: Sequence[int], teacher_dir: str | None = None):
    self.resolutions = tuple(int(r) for r in resolutions)
    self.teacher = TeacherStore(teacher_dir) if teacher_dir else None

  def __repr__(self):
    return f"ClipPrepare({self.resolutions}, {self.teacher!r})"

  def random_map(self, element, rng):
    key, raw = element
    rec = records.decode(raw)
    data = rec["image"]
    if "height" in rec and "width" in rec:
      h, w = int(rec["height"]), int(rec["width"])
    else:
      h, w = transforms.image_size(data)
    if self.teacher is None:
      box, flip = transforms.sample_view(rng, h, w)
      return {"data": data, "key": key, "views": {r: (box, flip, None) for r in self.resolutions}}
    stored, emb = self.teacher.lookup(key)
    views = {}
    for r in self.resolutions:
      cand = np.nonzero(stored[:, 5] == r)[0]
      if len(cand) == 0:
        raise ValueError(f"teacher store has no view at resolution {r} for record {key}")
      v = int(cand[rng.integers(len(cand))])
      views[r] = (tuple(int(x) for x in stored[v, :4]), bool(stored[v, 4]), emb[v])
    return {"data": data, "key": key, "views": views}


class ClipRender(grain.transforms.RandomMap):
  """Renders every view of the batch at the global batch's resolution: uint8 [B,R,R,3]."""

  def __init__(self, resolutions: Sequence[int], seed: int, global_batch: int,
               return_index: bool = False):
    self.resolutions = tuple(int(r) for r in resolutions)
    self.seed, self.global_batch = int(seed), int(global_batch)
    self.return_index = return_index

  def random_map(self, batch, rng):
    # rng is the batch's last record's: its stream position says which global batch this is.
    n = stream_position(rng, self.seed) // self.global_batch
    r = clip_resolution(self.seed, n, self.resolutions)
    images, embs = [], []
    for el in batch:
      box, flip, emb = el["views"][r]
      images.append(transforms.render_view_encoded(el["data"], box, flip, r))
      embs.append(emb)
    out = {"image": np.stack(images)}
    if embs[0] is not None:
      out["teacher_embedding"] = np.stack(embs).astype(np.float32)
    if self.return_index:
      out["index"] = np.array([el["key"] for el in batch], np.int32)
    return out


class SamPrepare(grain.transforms.RandomMap):
  """Decodes, resizes to image_size (1024) + pads, and samples K prompts from the record's masks."""

  def __init__(self, masks_per_image: int, points_per_prompt: int, box_prob: float = 0.5,
               image_size: int = SAM_IMAGE_SIZE, return_index: bool = False, gt_mask_size: int = 0):
    self.gt_mask_size = gt_mask_size
    self.masks_per_image = masks_per_image
    self.points_per_prompt = points_per_prompt
    self.box_prob = box_prob
    self.image_size = image_size
    self.return_index = return_index

  def random_map(self, element, rng):
    key, raw = element
    rec = records.decode(raw)
    h, w = transforms.image_size(rec["image"])
    image = transforms.decode_image(rec["image"], min_long_side=self.image_size)
    padded, (nh, nw) = transforms.resize_longest_pad(image, self.image_size, (h, w))
    coords, labels, valid, mask_index = prompts.sample_prompts(
        rng, rec.get("masks", []), (h, w), (nh, nw), self.masks_per_image,
        self.points_per_prompt, box_prob=self.box_prob)
    out = {"image": padded, "point_coords": coords, "point_labels": labels,
           "prompt_valid": valid, "image_size": np.array([nh, nw], np.int32)}
    if self.gt_mask_size:
      out["gt_masks"] = self._gt_masks(rec.get("masks", []), mask_index, (nh, nw))
    if self.return_index:
      out["index"] = np.int32(key)
    return out

  def _gt_masks(self, masks, mask_index, new_hw):
    """The mask behind each prompt slot in the padded S frame, area-downsampled to
    gt_mask_size (SAM's low-res logits grid): bool [K, m, m], all False for padding slots."""
    s, m = self.image_size, self.gt_mask_size
    if s % m:
      raise ValueError(f"gt_mask_size {m} must divide the SAM image size {s}")
    out = np.zeros((len(mask_index), m, m), bool)
    for k, i in enumerate(mask_index):
      if i < 0:
        continue
      full = np.zeros((s, s), np.float32)
      full[:new_hw[0], :new_hw[1]] = prompts.full_resized_mask(records.decode_mask(masks[i]), *new_hw)
      out[k] = full.reshape(m, s // m, m, s // m).mean(axis=(1, 3)) >= 0.5
    return out


def _ensure_flags_parsed(worker_count):
  # grain's worker processes read absl flags; a library caller may not have parsed them.
  if worker_count:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()


def make_loader(source, operations, *, seed, shard_index, shard_count, num_epochs,
            worker_count, shuffle=True):
  """A grain DataLoader serving this process's rows of every global batch (GlobalBatchSampler).

  `operations` map records one to one up to their grain.transforms.Batch, whose batch_size
  is the per-process batch.
  """
  _ensure_flags_parsed(worker_count)
  batch_size = next(op.batch_size for op in operations if isinstance(op, grain.transforms.Batch))
  sampler = GlobalBatchSampler(len(source), seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                               batch_size=batch_size, shard_index=shard_index,
                               shard_count=shard_count, worker_count=worker_count)
  return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                          worker_count=worker_count, shard_options=grain.sharding.NoSharding())


def clip_loader(paths, *, batch_size: int, seed: int, resolutions=(224, 448),
                shard_index: int = 0, shard_count: int = 1, teacher_embeddings=None,
                num_epochs=None, worker_count: int = 0,
                shuffle: bool = True, return_index: bool = False) -> grain.DataLoader:
  """CLIP batches {"image": uint8 [B,R,R,3]} (+ "teacher_embedding" f32 [B,D]).

  teacher_embeddings: an extraction directory (samclip_jax.extract); the loader then
  replays the stored views (crop box, flip, resolution) and yields their embeddings.
  return_index adds "index" int32 [B], the record indices in the split (debugging, tests).
  """
  source = KeyedSource(data_source(paths))
  if teacher_embeddings is not None:
    _check_teacher(teacher_embeddings, paths, len(source), resolutions)
  ops = [ClipPrepare(resolutions, teacher_embeddings),
         grain.transforms.Batch(batch_size=batch_size, drop_remainder=True, batch_fn=_as_list),
         ClipRender(resolutions, seed, batch_size * shard_count, return_index)]
  return make_loader(source, ops, seed=seed, shard_index=shard_index, shard_count=shard_count,
                 num_epochs=num_epochs, worker_count=worker_count, shuffle=shuffle)


def sam_loader(paths, *, batch_size: int, masks_per_image: int, points_per_prompt: int,
               seed: int, shard_index: int = 0, shard_count: int = 1, num_epochs=None,
               worker_count: int = 0, box_prob: float = 0.5,
               shuffle: bool = True, return_index: bool = False,
               image_size: int = SAM_IMAGE_SIZE, gt_mask_size: int = 0) -> grain.DataLoader:
  """SAM batches: image uint8 [B,S,S,3] (S = image_size: longest side resized to S, zero
  padded bottom/right), point_coords f32 [B,K,P,2] (x, y in that S frame), point_labels
  i32 [B,K,P], prompt_valid bool [B,K], image_size i32 [B,2] (resized content h, w before
  padding); return_index adds "index" int32 [B] (record indices); gt_mask_size=m adds
  "gt_masks" bool [B,K,m,m], each slot's ground-truth mask (pretraining SAM itself)."""
  # Small S (CPU configs) keeps the host from decoding and padding at 1024 only to shrink later.
  ops = [SamPrepare(masks_per_image, points_per_prompt, box_prob, image_size=int(image_size),
                    return_index=return_index, gt_mask_size=int(gt_mask_size)),
         grain.transforms.Batch(batch_size=batch_size, drop_remainder=True)]
  return make_loader(KeyedSource(data_source(paths)), ops, seed=seed, shard_index=shard_index,
                 shard_count=shard_count, num_epochs=num_epochs, worker_count=worker_count,
                 shuffle=shuffle)


def _check_teacher(directory, paths, num_records, resolutions):
  m = teacher_store.read_manifest(directory)
  if m["num_records"] != num_records:
    raise ValueError(f"teacher embeddings cover {m['num_records']} records, the split has {num_records}")
  if isinstance(paths, (str, list, tuple)):
    files = records.resolve_files(paths)
    names = [os.path.basename(f) for f in files]
    if names != m["data_files"]:
      raise ValueError(f"teacher embeddings were extracted from {m['data_files']}, not {names}")
    if "data_fingerprints" in m and [records.file_fingerprint(f) for f in files] != m["data_fingerprints"]:
      raise ValueError(f"teacher embeddings in {directory} were extracted from other data under "
                       f"the same file names {names} (their contents differ): extract them again")
  missing = set(int(r) for r in resolutions) - set(m["resolutions"])
  if missing:
    raise ValueError(f"teacher embeddings have no views at resolutions {sorted(missing)}")
  if not m.get("complete"):
    raise ValueError(f"teacher extraction in {directory} is not complete")


def save_args(iterator):
  """Orbax args saving a loader iterator (put it in an ocp.args.Composite)."""
  return grain.checkpoint.CheckpointSave(iterator)


def restore_args(iterator):
  """Orbax args restoring into a fresh iterator of the same loader."""
  return grain.checkpoint.CheckpointRestore(iterator)
