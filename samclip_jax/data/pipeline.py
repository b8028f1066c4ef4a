"""grain input pipelines: CLIP batches (224/448 views) and SAM batches (1024, or image_size, + prompts).

Sources: `paths` is a split manifest (.json, as written by sample.py / prepare.py), an
ArrayRecord file, a glob, a directory of shards, a list of those, or any random-access
data source object (len + getitem), e.g. `tfds.data_source(name, split=...)` on a TFDS
dataset built in the array_record file format (works without TensorFlow) whose examples
are dicts with the keys of records.py ("image" as encoded bytes or a uint8 array, ...).

Randomness: grain's IndexSampler gives record i of the (sharded, shuffled) stream an rng
Philox(seed + i). Per-record choices (crop box, flip, masks, prompts) use that record's
rng; the CLIP resolution of a batch uses the rng of the batch's last record, so it is a
function of (seed, batch position) only (for a given worker_count, which changes how
records are grouped into batches). Every batch has a single resolution. seed: 0 <= seed < 2**32.

Multi-host: pass shard_index=jax.process_index(), shard_count=jax.process_count() and the
per-process batch size (global batch / process count); each process reads a disjoint
1/shard_count of the records (grain ShardOptions, remainder dropped).

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


def _shard_options(shard_index, shard_count):
  return grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count,
                                     drop_remainder=True)


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
  """Picks the batch's resolution, decodes and renders every view at it: uint8 [B,R,R,3]."""

  def __init__(self, resolutions: Sequence[int], return_index: bool = False):
    self.resolutions = tuple(int(r) for r in resolutions)
    self.return_index = return_index

  def random_map(self, batch, rng):
    r = self.resolutions[int(rng.integers(len(self.resolutions)))]
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
  _ensure_flags_parsed(worker_count)
  shard = _shard_options(shard_index, shard_count)
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=shard, shuffle=shuffle,
      num_epochs=num_epochs, seed=seed)
  return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                          worker_count=worker_count, shard_options=shard)


def clip_loader(paths, *, batch_size: int, seed: int, resolutions=(224, 448),
                shard_index: int = 0, shard_count: int = 1, teacher_embeddings=None,
                num_epochs=None, worker_count: int = 0, drop_remainder: bool = True,
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
         grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder,
                                batch_fn=_as_list),
         ClipRender(resolutions, return_index)]
  return make_loader(source, ops, seed=seed, shard_index=shard_index, shard_count=shard_count,
                 num_epochs=num_epochs, worker_count=worker_count, shuffle=shuffle)


def sam_loader(paths, *, batch_size: int, masks_per_image: int, points_per_prompt: int,
               seed: int, shard_index: int = 0, shard_count: int = 1, num_epochs=None,
               worker_count: int = 0, box_prob: float = 0.5, drop_remainder: bool = True,
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
         grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder)]
  return make_loader(KeyedSource(data_source(paths)), ops, seed=seed, shard_index=shard_index,
                 shard_count=shard_count, num_epochs=num_epochs, worker_count=worker_count,
                 shuffle=shuffle)


def _check_teacher(directory, paths, num_records, resolutions):
  m = teacher_store.read_manifest(directory)
  if m["num_records"] != num_records:
    raise ValueError(f"teacher embeddings cover {m['num_records']} records, the split has {num_records}")
  if isinstance(paths, (str, list, tuple)):
    names = [os.path.basename(f) for f in records.resolve_files(paths)]
    if names != m["data_files"]:
      raise ValueError(f"teacher embeddings were extracted from {m['data_files']}, not {names}")
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
