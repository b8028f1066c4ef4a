"""Zero-shot evaluation of SAM-CLIP (or its teachers): classification, retrieval, instance and
semantic segmentation.

  python -m samclip_jax.evaluate --config=configs/eval/classification.py \
      --config.model=workdir/export --workdir=eval_out
  python -m samclip_jax.evaluate --config=configs/eval/semantic_segmentation.py:local --workdir=/tmp/ev
      # :local: the embedded sample, and by default the model of the README's main job
      # (/tmp/samclip_local); any task: classification, retrieval, instance_segmentation
  python -m samclip_jax.evaluate --config=configs/eval/classification.py:local --help   # the fields

Writes WORKDIR/<task>.json (metrics, counts, config) and WORKDIR/<task>.md (a short table,
also printed); semantic segmentation's clip+sam mode writes semantic_segmentation_clip_sam.*,
so both modes' reports share a workdir. The model is picked by its directory's config.json
model_type: "samclip" (merged), "open_clip" (the CLIP teacher; classification, retrieval) or
"sam" (the SAM teacher; instance segmentation). Images are decoded on host threads and
evaluated in global batches split over all devices along a 1-D "data" mesh (NamedSharding),
under jit.

Several processes (launched as training's: --config.coordinator_address / num_processes /
process_id) split every global batch: each decodes only its own rows, embeddings are gathered
to every process, per-image results (masks, confusion counts) are computed where the rows are
and combined in the single-process order, so the numbers are those of one process; process 0
alone writes the files.
"""
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from samclip_jax import api, cli, metrics, sharding
from samclip_jax.data import transforms

TASKS = ("classification", "retrieval", "instance_segmentation", "semantic_segmentation")
# Report names besides the task's own: semantic segmentation's modes keep one report each.
MODE_REPORTS = {("semantic_segmentation", "clip+sam"): "semantic_segmentation_clip_sam"}
PREDICTIONS_FILE = "instance_segmentation_predictions.json"  # the masks behind the AP


def report_name(config) -> str:
  """WORKDIR/<name>.json and .md: the task's, or its mode's (MODE_REPORTS)."""
  return MODE_REPORTS.get((config.task, config.get("mode")), config.task)


# ----------------------------------------------------------------------------- devices
def data_mesh() -> jax.sharding.Mesh:
  """All devices on one "data" axis (Auto: jit propagates the batch sharding)."""
  n = len(jax.devices())
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def replicate(tree, mesh):
  """Every leaf (the same host value on every process) replicated over the mesh's devices."""
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if jax.process_count() == 1:
    return jax.device_put(tree, sh)

  def put(x):  # other processes' devices are filled by their own copy of x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])

  return jax.tree.map(put, tree)


def batch_sharding(mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def local_rows(global_size: int, mesh) -> slice:
  """The rows of a global batch this process's devices hold (all of them with one process)."""
  index = batch_sharding(mesh).addressable_devices_indices_map((global_size,)).values()
  bounds = sorted({(i[0].start or 0, global_size if i[0].stop is None else i[0].stop) for i in index})
  if any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
    raise ValueError(f"this process's devices hold rows {bounds} of the batch: not contiguous")
  return slice(bounds[0][0], bounds[-1][1])


def shard_batch(x: np.ndarray, mesh):
  """This process's rows of a global batch (local_rows; all rows with one process) -> the
  global array, leading axis split over the mesh's data axis."""
  n = len(x) * jax.process_count()
  return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(x),
                                                (n,) + tuple(x.shape[1:]))


def fetch(x) -> np.ndarray:
  """A global array, whole, on every process (numpy)."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def fetch_rows(x, rows: slice) -> np.ndarray:
  """This process's rows of a global array split on its leading axis (no traffic)."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)[rows]
  out = np.zeros((rows.stop - rows.start,) + x.shape[1:], x.dtype)
  filled = np.zeros(len(out), bool)
  for shard in x.addressable_shards:
    lead = shard.index[0]
    a, b = lead.start or 0, x.shape[0] if lead.stop is None else lead.stop
    lo, hi = max(a, rows.start), min(b, rows.stop)
    if lo < hi:
      out[lo - rows.start:hi - rows.start] = np.asarray(shard.data)[lo - a:hi - a]
      filled[lo - rows.start:hi - rows.start] = True
  if not filled.all():
    raise ValueError(f"rows {rows} are not all on this process's devices")
  return out


def global_batch_size(batch_size: int, mesh) -> int:
  n = mesh.devices.size
  return max(n, int(math.ceil(batch_size / n)) * n)


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
  if len(x) == size:
    return x
  return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])


def stack_rows(values: Sequence[Any], size: int, shape: Sequence[int], dtype) -> np.ndarray:
  """values stacked and zero-padded to `size` rows of `shape` (zeros only when there are none:
  the last global batch may hold no row of this process)."""
  if not len(values):
    return np.zeros((size, *shape), dtype)
  return pad_batch(np.asarray(np.stack(values), dtype), size)


# ----------------------------------------------------------------------------- host input
def prefetched_batches(items: Sequence[Any], load: Callable[[Any], Any], batch_size: int,
                       num_workers: int, rows: slice | None = None) -> Iterable[tuple[list, list]]:
  """(items, loaded) in chunks of batch_size; loading runs on threads, one chunk ahead. With
  `rows`, only the chunk's items at those positions are loaded (this process's share of a
  global batch; possibly none in the last chunk)."""
  chunks = [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
  rows = rows or slice(None)
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    pending = [pool.submit(lambda c=c: [load(i) for i in c[rows]]) for c in chunks[:2]]
    for k, chunk in enumerate(chunks):
      loaded = pending[k].result()
      if k + 2 < len(chunks):
        pending.append(pool.submit(lambda c=chunks[k + 2]: [load(i) for i in c[rows]]))
      pending[k] = None
      yield chunk, loaded


class Skipped:
  """Inputs that cannot be read (corrupt, truncated or missing images and label maps): each is
  skipped and counted, not the end of an evaluation. Loads run on threads (list.append is atomic)."""

  def __init__(self):
    self.local: list[tuple[str, str]] = []   # (file, reason) met by this process

  def guard(self, load: Callable[[Any], Any], file_of: Callable[[Any], str] = lambda item: item):
    """`load`, returning None (and recording the item) where its files cannot be read."""
    def guarded(item):
      try:
        return load(item)
      except (transforms.UnreadableInput, FileNotFoundError) as e:
        self.local.append((file_of(item), str(e)))
        return None
    return guarded

  def gather(self) -> list[dict]:
    """Every process's skipped inputs, by file: the same list on every process."""
    every = dict(x for part in sharding.gather_objects(self.local) for x in part)
    return [{"file": f, "reason": every[f]} for f in sorted(every)]


def _readable(kept: int, skipped: list[dict]) -> None:
  """Refuses a run where every input was skipped (with no input at all, a task says so itself)."""
  if not kept and skipped:
    raise ValueError(f"no input could be read ({len(skipped)} skipped; the first: "
                     f"{skipped[0]['file']}: {skipped[0]['reason']})")


def spread(items: list, n: int) -> list:
  """n of the items, evenly spaced and in order (all of them when n is 0 or not smaller): the
  first n of a sorted image folder would hold its first classes only."""
  if not n or n >= len(items):
    return items
  return [items[i * len(items) // n] for i in range(n)]


def list_images(directory: str, recursive: bool = False) -> list[str]:
  """Image files of a directory (with recursive, of its sub-folders too; hidden ones left out)."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"image directory not found: {directory}")
  # Only a recursive listing walks the tree (a flat image folder may sit above large ones).
  files = transforms.visible_files(directory) if recursive else sorted(
      f for f in os.listdir(directory) if not f.startswith("."))
  return [f for f in files if transforms.is_image_name(f)]


# ----------------------------------------------------------------------------- models
@dataclasses.dataclass
class Loaded:
  """The model under evaluation, whichever kind its directory holds."""
  kind: str                     # "samclip" | "open_clip" | "sam"
  path: str
  samclip: Any = None           # api.SamClip
  clip: Any = None              # ClipModel (the teacher)
  sam: Any = None               # (SamConfig, params)


def load(config) -> Loaded:
  if not config.model:
    raise cli.UsageError("set --config.model to a model directory or a training workdir")
  if not os.path.exists(config.model):
    raise cli.UsageError(
        f"no model at {config.model}: pass --config.model=DIR (a merged model directory, a training "
        f"workdir or a teacher), or train one there first (the README's main job): "
        f"python -m samclip_jax.main --config=configs/merge.py:local --workdir={config.model}")
  where = api.resolve_checkpoint(config.model)
  kind = where["meta"].get("model_type")
  model_dir = where["model_dir"]
  if kind == "samclip":
    sc = api.SamClip.from_checkpoint(config.model, text_model=config.text_model or None)
    path = model_dir or f"{config.model} (step {where['workdir_step']})"
    return Loaded(kind, path, samclip=sc)
  if model_dir is None:
    export = os.path.join(config.model, "export")
    hint = (f" (this training workdir's is {export})" if os.path.isdir(export) else
            " (a teacher's training workdir holds one in export/ once the run has finished)")
    raise ValueError(f"{config.model}: a {kind!r} model is evaluated from its model directory, not from "
                     f"a training workdir's checkpoints{hint}")
  if kind == "open_clip":
    from samclip_jax.clip_model import ClipModel
    return Loaded(kind, model_dir, clip=ClipModel.from_checkpoint(model_dir))
  if kind == "sam":
    from samclip_jax.models.sam import load_sam
    return Loaded(kind, model_dir, sam=load_sam(model_dir))
  raise ValueError(f"{model_dir}: model_type {kind!r} is not one evaluate knows (samclip, open_clip, sam)")


def _need(model: Loaded, kinds: Sequence[str], task: str):
  if model.kind not in kinds:
    raise ValueError(f"{task} evaluates {' or '.join(kinds)} models; {model.path} holds a {model.kind!r} model")


def image_tower(model: Loaded, mesh, resolution: int) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
  """(embed: uint8 [B,R,R,3] host batch -> unit embeddings [B,D] numpy, R)."""
  if model.kind == "samclip":
    sc = model.samclip
    sc.params = replicate(sc.params, mesh)
    return (lambda x: fetch(sc.encode_pixels(shard_batch(x, mesh)))), resolution
  from samclip_jax.models.clip import CLIP, normalize_images
  clip = model.clip
  module = CLIP(clip.config)
  params = replicate(clip.params, mesh)
  h, w = clip.image_size
  if h != w:
    raise ValueError(f"non-square CLIP input {h}x{w} is not supported here")

  @jax.jit
  def embed(p, x):
    e = module.apply({"params": p}, normalize_images(x), method=CLIP.encode_image)
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

  return (lambda x: fetch(embed(params, shard_batch(x, mesh)))), h


def text_side(model: Loaded):
  """(text model (ClipModel), logit scale)."""
  tm = model.samclip._require_text() if model.kind == "samclip" else model.clip
  return tm, float(tm.logit_scale)


def embed_images(model, mesh, config, paths: Sequence[str], task: str) -> tuple[np.ndarray, np.ndarray, list]:
  """(unit embeddings [N,D] of image files (shorter side resized, center crop), readable [N]
  bool, the skipped files): an unreadable image's row is an embedding of zeros, not used."""
  embed, res = image_tower(model, mesh, config.resolution)
  gb = global_batch_size(config.batch_size, mesh)
  rows = local_rows(gb, mesh)
  skipped = Skipped()
  load_fn = skipped.guard(lambda p: api.resize_center_crop(api.load_image(p), res))
  blank = np.zeros((res, res, 3), np.uint8)
  out, progress = [], _progress(task, len(paths))
  for chunk, imgs in prefetched_batches(paths, load_fn, gb, config.num_workers, rows):
    imgs = [blank if x is None else x for x in imgs]
    x = stack_rows(imgs, rows.stop - rows.start, (res, res, 3), np.uint8)
    out.append(embed(x)[:len(chunk)])   # every process gets the whole global batch's embeddings
    progress.update(len(chunk))
  skipped = skipped.gather()
  bad = {s["file"] for s in skipped}
  readable = np.array([p not in bad for p in paths], bool)
  _readable(int(readable.sum()), skipped)
  return np.concatenate(out).astype(np.float32), readable, skipped


# ----------------------------------------------------------------------------- tasks
def _sample(config, workdir) -> tuple[dict, list[str]] | tuple[None, None]:
  if not config.data.get("sample_dir"):
    return None, None
  from samclip_jax.data.sample import ensure_sample
  root = config.data.sample_dir
  root = root if os.path.isabs(root) else os.path.join(workdir, root)
  paths = ensure_sample(root)
  with open(paths["classes"]) as f:
    return paths, list(json.load(f)["classes"])


def classification_items(config, workdir) -> tuple[list[tuple[str, int]], list[str]]:
  sample, classes = _sample(config, workdir)
  d = config.data
  image_dir, labels_file, names = d.image_dir, d.labels_file, list(d.class_names)
  if sample:
    image_dir, labels_file, names = sample["classification_images"], sample["classification_labels"], classes
  if not image_dir:
    raise ValueError("set --config.data.image_dir (class sub-folders, or with data.labels_file)")
  if labels_file:
    if not names:
      raise ValueError("data.labels_file needs data.class_names")
    with open(labels_file) as f:
      entries = json.load(f)
    items = [(os.path.join(image_dir, e["file_name"]), int(e["label"])) for e in entries if int(e["label"]) >= 0]
    bad = [lab for _, lab in items if lab >= len(names)]
    if bad:
      raise ValueError(f"{labels_file}: labels {sorted(set(bad))} outside the {len(names)} class names")
    return items, names
  # Class folders: those holding an image at any depth, as torchvision's ImageFolder reads them.
  images = {f: list_images(os.path.join(image_dir, f), recursive=True) for f in sorted(os.listdir(image_dir))
            if not f.startswith(".") and os.path.isdir(os.path.join(image_dir, f))}
  folders = [f for f, found in images.items() if found]
  if not folders:
    raise ValueError(f"{image_dir}: no class sub-folders holding images (or give data.labels_file)")
  if names and len(names) != len(folders):
    raise ValueError(f"{len(names)} class names for {len(folders)} class folders")
  names = names or [f.replace("_", " ") for f in folders]
  items = [(os.path.join(image_dir, f, n), k) for k, f in enumerate(folders) for n in images[f]]
  return items, names


def run_classification(config, workdir, model: Loaded, mesh) -> tuple[dict, int]:
  from samclip_jax.templates import get_templates
  _need(model, ("samclip", "open_clip"), "classification")
  items, names = classification_items(config, workdir)
  items = spread(items, config.max_images)
  text, scale = text_side(model)
  classifier = np.asarray(text.zero_shot_classifier(names, get_templates(config.templates)))
  emb, ok, skipped = embed_images(model, mesh, config, [p for p, _ in items], "classification")
  logits = scale * emb[ok] @ classifier.T
  labels = np.array([lab for _, lab in items])[ok]
  # top-5 only where it can miss: with 5 classes or fewer it holds every image.
  out = metrics.topk_accuracy(logits, labels, ks=(1, 5) if len(names) > 5 else (1,))
  out["num_classes"] = len(names)
  out["skipped"] = skipped
  return out, int(ok.sum())


def retrieval_items(config, workdir) -> tuple[list[str], list[str], list[int]]:
  sample, _ = _sample(config, workdir)
  image_dir, captions_file = config.data.image_dir, config.data.captions_file
  if sample:
    image_dir, captions_file = sample["classification_images"], sample["classification_labels"]
  if not image_dir or not captions_file:
    raise ValueError("set --config.data.image_dir and --config.data.captions_file")
  with open(captions_file) as f:
    entries = json.load(f)
  if not isinstance(entries, list):
    raise ValueError(f"{captions_file}: expected a list of {{file_name, captions}} entries")
  by_image: dict[str, list[str]] = {}   # entries of one file (one per caption, say) are one image
  for i, e in enumerate(entries):
    name = e.get("file_name") if isinstance(e, dict) else None
    if not isinstance(name, str) or not name:
      raise ValueError(f"{captions_file}: entry {i} has no file_name")
    caps = e.get("captions") if "captions" in e else ([e["caption"]] if e.get("caption") else [])
    # A bare string would count each of its characters as a caption.
    if not isinstance(caps, list) or not all(isinstance(c, str) and c.strip() for c in caps):
      raise ValueError(f"{captions_file}: {name}'s captions must be a list of non-empty strings, "
                       f"got {caps!r}")
    if not caps:
      raise ValueError(f"{captions_file}: {name} has no caption")
    by_image.setdefault(name, []).extend(caps)
  if not by_image:
    raise ValueError(f"{captions_file} holds no entries")
  paths, captions, t2i = [], [], []
  for i, (name, caps) in enumerate(spread(list(by_image.items()), config.max_images)):
    paths.append(os.path.join(image_dir, name))
    captions += caps
    t2i += [i] * len(caps)
  return paths, captions, t2i


def run_retrieval(config, workdir, model: Loaded, mesh) -> tuple[dict, int]:
  _need(model, ("samclip", "open_clip"), "retrieval")
  paths, captions, t2i = retrieval_items(config, workdir)
  text, _ = text_side(model)
  txt = np.asarray(text.encode_text(captions, normalize=True), np.float32)
  img, ok, skipped = embed_images(model, mesh, config, paths, "retrieval")
  # An unreadable image leaves with its captions; the others' indices close up.
  new_index = np.cumsum(ok) - 1
  t2i = np.asarray(t2i)
  kept = ok[t2i]
  out = metrics.retrieval_recall(img[ok] @ txt[kept].T, new_index[t2i[kept]].tolist(), ks=(1, 5, 10))
  out["num_captions"] = int(kept.sum())
  out["skipped"] = skipped
  return out, int(ok.sum())


# -- instance segmentation ---------------------------------------------------------------
def _sam_parts(model: Loaded):
  if model.kind == "samclip":
    from samclip_jax.models.samclip import sam_params_from_samclip
    return model.samclip.config.sam, sam_params_from_samclip(model.samclip.params)
  import flax.linen as nn
  cfg, params = model.sam
  return cfg, nn.unbox(params)


def _detection_problem(d, categories, image_sizes) -> str | None:
  """What is wrong with one COCO detection (image_id, category_id, XYWH bbox, score), or None.
  image_sizes: {image id: (width, height)} of the annotations' images."""
  def number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)
  if not isinstance(d, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(d):
    return "needs image_id, category_id, bbox and score"
  if not isinstance(d["image_id"], int) or isinstance(d["image_id"], bool):
    return "has a non-integer image_id"
  if d["category_id"] not in categories:
    return "has a category_id the annotations do not define"
  box = d["bbox"]
  if not (isinstance(box, list) and len(box) == 4 and all(number(v) for v in box)):
    return "has a bbox that is not 4 finite numbers [x, y, width, height]"
  if box[2] <= 0 or box[3] <= 0:
    return "has a bbox of zero or negative size"
  if not number(d["score"]):
    return "has a score that is not a finite number"
  if d["image_id"] not in image_sizes:
    return None   # another image's (a file for the full set, annotations of a subset): counted, unused
  w, h = image_sizes[d["image_id"]]
  if box[0] >= w or box[1] >= h or box[0] + box[2] <= 0 or box[1] + box[3] <= 0:
    return f"has a bbox entirely outside its {w}x{h} image"
  return None


def _box_prompts(coco, config) -> tuple[dict[int, list[tuple[list[float], int, float | None]]], int]:
  """(image id -> [(XYWH box, category id, score or None for ground truth)], the number of
  detections of images the annotations do not hold, left out)."""
  out: dict[int, list] = {i: [] for i in coco.getImgIds()}
  elsewhere = 0
  if config.data.detections:
    with open(config.data.detections) as f:
      dets = json.load(f)
    if not isinstance(dets, list):
      raise ValueError(f"{config.data.detections}: expected a list of COCO detections")
    categories = set(coco.getCatIds())
    sizes = {i: (im["width"], im["height"]) for i, im in coco.imgs.items()}
    for i, d in enumerate(dets):
      problem = _detection_problem(d, categories, sizes)
      if problem:  # one bad detection would change the AP silently: the file is refused
        raise ValueError(f"{config.data.detections}: detection {i} {problem}: {d!r}"[:400])
      if d["image_id"] not in out:
        elsewhere += 1
      elif d["score"] >= config.data.min_score:
        out[d["image_id"]].append((d["bbox"], d["category_id"], float(d["score"])))
    for k in out:
      out[k] = sorted(out[k], key=lambda t: -t[2])[:config.data.max_detections]
  else:
    for ann in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
      out[ann["image_id"]].append((ann["bbox"], ann["category_id"], None))
  return out, elsewhere


def run_instance_segmentation(config, workdir, model: Loaded, mesh) -> tuple[dict, int]:
  import contextlib
  import io
  from pycocotools.coco import COCO
  from samclip_jax.models.sam import Sam, build_sparse_prompt
  from samclip_jax.predictor import apply_coords, get_preprocess_shape
  _need(model, ("samclip", "sam"), "instance_segmentation")
  sample, _ = _sample(config, workdir)
  image_dir, ann_file = config.data.image_dir, config.data.annotations
  if sample:
    image_dir, ann_file = sample["coco_images"], sample["coco_instances"]
  if not image_dir or not ann_file:
    raise ValueError("set --config.data.image_dir and --config.data.annotations")
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO(ann_file)
  prompts, elsewhere = _box_prompts(coco, config)
  image_ids = spread(sorted(coco.getImgIds()), config.max_images)
  work = [i for i in image_ids if prompts[i]]   # images without boxes give no predictions
  sam_cfg, params = _sam_parts(model)
  size = sam_cfg.image_size
  module = Sam(sam_cfg)
  params = replicate(params, mesh)

  @functools.partial(jax.jit, out_shardings=batch_sharding(mesh))  # rows stay where they are
  def segment(p, images, input_hw, coords, labels):
    x = api.normalize_sam(images)
    rows, cols = jnp.arange(size)[None, :, None], jnp.arange(size)[None, None, :]
    valid = (rows < input_hw[:, 0, None, None]) & (cols < input_hw[:, 1, None, None])
    x = jnp.where(valid[..., None], x, 0.0)     # SAM pads with zeros after normalising
    emb, _ = module.apply({"params": p}, x, method=Sam.encode_image)
    low, iou = module.apply({"params": p}, emb, coords, labels, None, False, method=Sam.predict_masks)
    return low[:, :, 0], iou[:, :, 0]

  file_of = lambda image_id: os.path.join(image_dir, coco.loadImgs(image_id)[0]["file_name"])

  def load_fn(image_id):
    info = coco.loadImgs(image_id)[0]
    annotated = (info.get("height"), info.get("width"))
    img = api.load_image(file_of(image_id), annotated)
    h, w = img.shape[:2]
    if None not in annotated and (h, w) != annotated:   # its masks would be of another frame
      raise transforms.UnreadableInput(f"{file_of(image_id)} is {h}x{w}, its annotations say "
                                       f"{annotated[0]}x{annotated[1]}")
    nh, nw = get_preprocess_shape(h, w, size)
    out = np.zeros((size, size, 3), np.uint8)
    out[:nh, :nw] = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    return out, (nh, nw), (h, w)

  skipped = Skipped()
  blank = (np.zeros((size, size, 3), np.uint8), (0, 0), (0, 0))   # an unreadable image's row

  gb = global_batch_size(config.batch_size, mesh)
  rows = local_rows(gb, mesh)
  n_local = rows.stop - rows.start
  # (position in `work`, prediction) of this process's rows; gathered in order at the end.
  preds, progress = [], _progress("instance_segmentation", len(work))
  for first, (chunk, loaded) in zip(range(0, len(work), gb),
                                    prefetched_batches(work, skipped.guard(load_fn, file_of), gb,
                                                       config.num_workers, rows)):
    read = [x is not None for x in loaded]
    loaded = [blank if x is None else x for x in loaded]
    # The prompt count of the whole global batch: one compiled shape on every process.
    k = max(8, 1 << math.ceil(math.log2(max(len(prompts[i]) for i in chunk))))  # few compiled shapes
    mine = chunk[rows]
    boxes = np.zeros((n_local, k, 4), np.float64)
    for b, (image_id, (_, _, orig)) in enumerate(zip(mine, loaded)):
      if not read[b]:
        continue
      xywh = np.array([p[0] for p in prompts[image_id]], np.float64).reshape(-1, 4)
      xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
      boxes[b, :len(xyxy)] = apply_coords(xyxy.reshape(-1, 2, 2), orig, size).reshape(-1, 4)
    coords, labels = build_sparse_prompt(box=boxes)
    images = stack_rows([l[0] for l in loaded], n_local, (size, size, 3), np.uint8)
    input_hw = stack_rows([l[1] for l in loaded], n_local, (2,), np.int32)
    low, iou = segment(params, shard_batch(images, mesh), shard_batch(input_hw, mesh),
                       shard_batch(coords, mesh), shard_batch(labels, mesh))
    low, iou = fetch_rows(low, rows), fetch_rows(iou, rows)
    for b, (image_id, (_, input_size, orig)) in enumerate(zip(mine, loaded)):
      if not read[b]:
        continue
      n = len(prompts[image_id])
      masks = api.upscale_low_res(low[b, :n], size, input_size, orig) > 0
      for j, (_, cat, score) in enumerate(prompts[image_id]):
        preds.append((first + rows.start + b, {
            "image_id": image_id, "category_id": cat, "segmentation": metrics.encode_mask(masks[j]),
            "score": float(iou[b, j]) if score is None else score}))
    progress.update(len(chunk))
  # Every process's predictions, in the order of `work` (as one process makes them).
  preds = [p for _, p in sorted((x for part in sharding.gather_objects(preds) for x in part),
                                key=lambda x: x[0])]
  if jax.process_index() == 0:
    _write_atomic(os.path.join(workdir, PREDICTIONS_FILE), json.dumps(preds))
  skipped = skipped.gather()
  bad = {s["file"] for s in skipped}
  image_ids = [i for i in image_ids if file_of(i) not in bad]   # their objects are not misses
  _readable(sum(file_of(i) not in bad for i in work), skipped)
  out = metrics.coco_mask_ap(coco, preds, image_ids=image_ids)
  out["num_prompts"] = len(preds)
  out["boxes"] = "detections" if config.data.detections else "ground truth"
  if config.data.detections:   # said, not silently dropped: a file of another image set scores 0
    out["num_detections_of_other_images"] = elsewhere
  out["skipped"] = skipped
  return out, len(image_ids)


# -- semantic segmentation ---------------------------------------------------------------
def semantic_items(config, workdir) -> tuple[list[tuple[str, str]], list[str]]:
  sample, classes = _sample(config, workdir)
  d = config.data
  image_dir, label_dir = d.image_dir, d.label_dir
  names = list(d.class_names)
  if sample:
    image_dir, label_dir = sample["coco_images"], sample["semantic_labels"]
    names = ["background"] + classes     # label value = category id, 0 = background
  elif not names and d.classes_file:
    with open(d.classes_file, encoding="utf-8-sig") as f:
      lines = f.read().splitlines()
    while lines and not lines[-1].strip():   # a trailing newline or two
      lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:  # line k names label value k - 1: a dropped blank would shift every later name
      raise ValueError(f"{d.classes_file}: line {blank[0]} is blank; name every label value "
                       "(a placeholder such as 'unused' for values that never occur)")
    names = [line.strip() for line in lines]
  if not image_dir or not label_dir:
    raise ValueError("set --config.data.image_dir and --config.data.label_dir")
  if not names:
    raise ValueError("set --config.data.class_names or --config.data.classes_file")
  items = []
  for fname in list_images(image_dir):
    label = os.path.join(label_dir, os.path.splitext(fname)[0] + ".png")
    if os.path.isfile(label):
      items.append((os.path.join(image_dir, fname), label))
  if not items:
    raise ValueError(f"no image in {image_dir} has a label map <stem>.png in {label_dir}")
  return items, names


def _load_label(path: str) -> np.ndarray:
  def read(im):
    if im.mode not in ("L", "P", "I", "I;16"):
      raise transforms.UnreadableInput(f"{path}: label maps must be single-channel (mode {im.mode})")
    return np.asarray(im).astype(np.int64)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"label map not found: {path}")
  return transforms.read_image_file(path, "a label map", read)


def run_semantic_segmentation(config, workdir, model: Loaded, mesh) -> tuple[dict, int]:
  _need(model, ("samclip",), "semantic_segmentation")
  items, names = semantic_items(config, workdir)
  items = spread(items, config.max_images)
  sc = model.samclip
  cm = metrics.ConfusionMatrix(len(names), config.data.ignore_index)   # this process's images
  progress = _progress("semantic_segmentation", len(items))
  skipped = Skipped()
  if config.mode == "clip":
    classifier = replicate(sc.text_classifier(names, config.templates), mesh)
    sc.params = replicate(sc.params, mesh)
    scale = sc.logit_scale

    @functools.partial(jax.jit, out_shardings=batch_sharding(mesh))  # rows stay where they are
    def patch_logits(p, x):
      patch = sc.module.apply({"params": p}, api.normalize_sam(x), method=api.SamClipNet.clip_features)[1]
      patch = patch / jnp.linalg.norm(patch, axis=-1, keepdims=True)
      return scale * jnp.einsum("bhwd,cd->bchw", patch, classifier, precision="highest")

    def load_fn(item):
      gt = _load_label(item[1])
      img = api.load_image(item[0], gt.shape)
      _check_label(gt, img.shape[:2], item[1], len(names), config.data.ignore_index)
      return api.resize_square(img, config.resolution), gt, img.shape[:2]

    gb = global_batch_size(config.batch_size, mesh)
    rows = local_rows(gb, mesh)
    r = config.resolution
    blank = np.zeros((r, r, 3), np.uint8)
    for chunk, loaded in prefetched_batches(items, skipped.guard(load_fn, lambda item: item[0]), gb,
                                            config.num_workers, rows):
      x = stack_rows([blank if l is None else l[0] for l in loaded], rows.stop - rows.start, (r, r, 3), np.uint8)
      logits = fetch_rows(patch_logits(sc.params, shard_batch(x, mesh)), rows)
      for b, l in enumerate(loaded):
        if l is None:
          continue
        _, gt, hw = l
        cm.update(np.argmax(api.resize_bilinear(logits[b], hw), axis=0), gt)
      progress.update(len(chunk))
  elif config.mode == "clip+sam":
    # Prompts depend on each image's CLIP output: one image at a time (the jitted parts
    # have fixed shapes, so they compile once), on this process's devices; process p takes
    # images p, p + P, ... of the P processes.
    def load_fn(item):
      gt = _load_label(item[1])
      img = api.load_image(item[0], gt.shape)
      _check_label(gt, img.shape[:2], item[1], len(names), config.data.ignore_index)
      return img, gt
    mine = items[jax.process_index()::jax.process_count()]
    for chunk, loaded in prefetched_batches(mine, skipped.guard(load_fn, lambda item: item[0]), 1,
                                            config.num_workers):
      if loaded[0] is None:
        progress.update(jax.process_count())
        continue
      img, gt = loaded[0]
      pred, _ = sc.segment_clip_sam(img, names, config.templates, config.threshold,
                                    config.points_per_class, config.prompt_grid or None)
      cm.update(pred, gt)
      progress.update(jax.process_count())
  else:
    raise ValueError(f"mode must be 'clip' or 'clip+sam', got {config.mode!r}")
  # Confusion counts summed over processes (integers: exactly those of one process).
  skipped = skipped.gather()
  _readable(len(items) - len(skipped), skipped)
  res = metrics.miou_from_confusion(sum(sharding.gather_objects(cm.matrix)))
  out = {"mIoU": res["mIoU"], "mAcc": res["mAcc"], "aAcc": res["aAcc"], "mode": config.mode,
         "per_class_IoU": dict(zip(names, res["per_class_IoU"])), "skipped": skipped}
  return out, len(items) - len(skipped)


def _progress(task: str, total: int) -> cli.Progress:
  """Progress lines from process 0 only (each process sees every global batch go by)."""
  return cli.Progress(task, total, quiet=jax.process_index() != 0)


def _check_label(gt, hw, path, num_classes, ignore_index):
  if gt.shape != tuple(hw):
    raise transforms.UnreadableInput(f"{path}: label map {gt.shape} does not match its image {tuple(hw)}")
  beyond = np.unique(gt[(gt >= num_classes) & (gt != ignore_index)])
  if beyond.size:  # counted as nothing, they would hide a short class list
    raise transforms.UnreadableInput(f"{path}: label values {beyond[:5].tolist()} beyond the {num_classes} "
                                     f"class names (ignore_index {ignore_index})")


RUNNERS = {"classification": run_classification, "retrieval": run_retrieval,
           "instance_segmentation": run_instance_segmentation,
           "semantic_segmentation": run_semantic_segmentation}


# ----------------------------------------------------------------------------- report
def markdown(result: dict, name: str) -> str:
  """The report of `result` as markdown; `name`: the report's file stem (report_name)."""
  skipped = result.get("skipped") or []
  note = f", {cli.plural(len(skipped), 'unreadable input')} skipped (listed in {name}.json)" if skipped else ""
  lines = [f"### {result['task']}: {result['model_type']} `{result['model']}` ({result['num_images']} images{note})",
           "", "| metric | value |", "|---|---|"]
  for k, v in result["metrics"].items():
    if isinstance(v, dict):
      continue
    lines.append(f"| {k} | {v:.2f} |" if isinstance(v, float) else
                 f"| {k} | n/a (nothing to measure) |" if v is None else f"| {k} | {v} |")
  return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str):
  with cli.atomic_write(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def check_config(config) -> None:
  """The fields every task reads, refused by name before anything loads (a negative
  max_images would drop images silently)."""
  if config.task not in RUNNERS:
    raise cli.UsageError(f"unknown task {config.task!r}; expected one of {TASKS}")
  for name, low in (("max_images", 0), ("batch_size", 1), ("num_workers", 0)):
    if not isinstance(config[name], int) or config[name] < low:
      raise cli.UsageError(f"--config.{name} must be an integer >= {low}, got {config[name]!r}")


def check_workdir(workdir: str) -> None:
  """The workdir is new, or holds only what evaluate writes (the sample, the reports of any
  task, instance segmentation's predictions): a user's files are never replaced by a report."""
  if not os.path.lexists(workdir):
    return
  if not os.path.isdir(workdir):
    raise cli.UsageError(f"--workdir {workdir} exists and is not a directory")
  names = list(TASKS) + list(MODE_REPORTS.values())
  ours = {"sample", PREDICTIONS_FILE} | {f"{t}{ext}" for t in names for ext in (".json", ".md")}
  other = sorted(f for f in os.listdir(workdir) if f not in ours)
  if other:
    raise cli.UsageError(f"--workdir {workdir} holds files evaluate did not write (e.g. {other[0]!r}); "
                         "give a new directory or an earlier evaluation's")


def evaluate(config, workdir: str) -> dict:
  """Runs config.task; writes WORKDIR/<report_name>.json and .md; returns the result dict."""
  check_config(config)
  check_workdir(workdir)
  t0 = time.time()
  model = load(config)            # before the workdir exists: a bad model leaves nothing behind
  mesh = data_mesh()
  # Process 0's view (another process may create it first).
  created = bool(sharding.from_process_0(np.int32(not os.path.exists(workdir))))
  os.makedirs(workdir, exist_ok=True)
  try:
    metrics_, n = RUNNERS[config.task](config, workdir, model, mesh)
    skipped = metrics_.pop("skipped")
  except BaseException:
    if created and jax.process_index() == 0 and not os.listdir(workdir):  # ours, still empty: no trace
      os.rmdir(workdir)
    raise
  result = {"task": config.task, "model": model.path, "model_type": model.kind, "num_images": n,
            "metrics": cli.finite_or_none(metrics_), "skipped": skipped, "seconds": round(time.time() - t0, 2),
            "devices": mesh.devices.size, "processes": jax.process_count(), "config": config.to_dict()}
  name = report_name(config)
  md = markdown(result, name)
  if jax.process_index() == 0:    # every process returns the result; process 0 writes it
    _write_atomic(os.path.join(workdir, f"{name}.json"), json.dumps(result, indent=2, default=str))
    _write_atomic(os.path.join(workdir, f"{name}.md"), md)
    print(md, flush=True)
  return result


def main(argv):
  from absl import flags
  del argv
  sharding.initialize_from_config(flags.FLAGS.config)  # before any device use
  try:
    evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except api.CheckpointNotFound as e:
    raise cli.UsageError(str(e)) from None


if __name__ == "__main__":
  from absl import flags
  from ml_collections import config_flags
  # Defined here, not at import: tests import this module beside main.py, which defines them too.
  config_flags.DEFINE_config_file("config", None, "evaluation config (configs/eval/TASK.py[:local])",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "directory for TASK.json / TASK.md (and the sample)")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main, __doc__, "samclip_jax.evaluate")
