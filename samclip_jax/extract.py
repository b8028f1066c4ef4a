"""Offline CLIP-teacher embeddings: every image's views, stored for training to replay.

  python -m samclip_jax.extract --config=configs/extract.py[:local] --workdir=DIR

For record k of the CLIP split and view v < views_per_image, the view (crop box, flip) is
drawn from rng(seed, k, v) and rendered at resolutions[v % len] by the same code the
training loader uses (data/transforms.py); the teacher sees it normalised and resized on
device to teacher_image_size. Output (data/teacher_store.py): shards of shard_size records
(keys, views, fp16/bf16 embeddings) + manifest. Each process handles the shards with
index % process_count == process_index over a mesh of its local devices (the teacher
forward needs no cross-host traffic; a job of several processes is launched as training's,
--config.coordinator_address / num_processes / process_id). A shard is written whole (tmp dir
+ rename) with checksums of its files, so a killed run resumes at shard granularity; a rerun
redoes any shard that fails its checks, and a final verify (process 0, once every process is
done) checks every shard and marks the manifest complete; every process ends with its verdict.
"""
import collections
import concurrent.futures
import functools
import json
import os
import shutil
import signal
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from samclip_jax import sharding
from samclip_jax.data import pipeline, records, sample, teacher_store, transforms
from samclip_jax.models import clip as clip_lib

FLAGS = flags.FLAGS
# Test hook: SIGKILL this process after it has written this many shards.
KILL_ENV = "SAMCLIP_EXTRACT_KILL_AFTER_SHARDS"


def teacher_config(config):
  """(ClipConfig, description) of the teacher, without loading or creating weights."""
  if config.clip_checkpoint:
    return (clip_lib.load_clip_config(config.clip_checkpoint),
            {"checkpoint": os.path.abspath(config.clip_checkpoint)})
  m = config.model
  if m.clip_variant == "tiny":
    cfg = clip_lib.ClipConfig(
        embed_dim=m.tiny_clip_embed_dim,
        vision=clip_lib.VisionConfig(image_size=224, patch_size=m.tiny_clip_patch,
                                     width=m.tiny_clip_width, layers=m.tiny_clip_layers,
                                     head_width=32),
        text=clip_lib.TextConfig(width=m.tiny_clip_width, heads=2, layers=1))
  else:
    cfg = clip_lib.ClipConfig.from_name(m.clip_variant)
  return cfg, {"checkpoint": "", "random_variant": m.clip_variant, "seed": int(config.seed)}


def teacher_params(config, clip_cfg):
  """Teacher weights: the converted checkpoint, or a seeded random image tower."""
  if config.clip_checkpoint:
    return clip_lib.load_clip(config.clip_checkpoint)[1]
  import flax.linen as nn
  h, w = clip_cfg.vision.image_hw
  # Only the image tower runs here: initialising through encode_image skips the text tower.
  init = functools.partial(clip_lib.CLIP(clip_cfg).init, method=clip_lib.CLIP.encode_image)
  variables = jax.jit(init)(jax.random.PRNGKey(config.seed), jnp.zeros((1, h, w, 3), jnp.float32))
  return jax.tree.map(np.asarray, nn.unbox(variables)["params"])


def build_teacher(config):
  """(ClipConfig, params, description) of the teacher the config names."""
  clip_cfg, info = teacher_config(config)
  return clip_cfg, teacher_params(config, clip_cfg), info


def teacher_forward(clip_config, teacher_image_size: int, dtype=jnp.float32):
  """(params, uint8 views [N,R,R,3]) -> float32 [N,D]: normalise, resize, encode_image."""
  model = clip_lib.CLIP(clip_config, dtype=dtype)

  def fwd(params, images):
    x = clip_lib.normalize_images(images, jnp.float32)
    n, r = x.shape[0], x.shape[1]
    if teacher_image_size and r != teacher_image_size:
      x = jax.image.resize(x, (n, teacher_image_size, teacher_image_size, 3), "bilinear",
                           antialias=True)
    out = model.apply({"params": params}, x.astype(dtype), method=clip_lib.CLIP.encode_image)
    return out.astype(jnp.float32)

  return fwd


def view_of(seed: int, key: int, v: int, h: int, w: int, resolutions):
  """The stored view v of record key: ((x0, y0, cw, ch), flip, resolution)."""
  rng = np.random.default_rng([seed, key, v])
  box, flip = transforms.sample_view(rng, h, w)
  return box, flip, int(resolutions[v % len(resolutions)])


def _render_record(source, key, seed, n_views, resolutions):
  rec = records.decode(source[key])
  data = rec["image"]
  if "height" in rec and "width" in rec:
    h, w = int(rec["height"]), int(rec["width"])
  else:
    h, w = transforms.image_size(data)
  out = []
  for v in range(n_views):
    box, flip, r = view_of(seed, key, v, h, w, resolutions)
    out.append((v, (*box, int(flip), r), transforms.render_view_encoded(data, box, flip, r)))
  return key, out


def _local_mesh():
  devices = np.array(jax.local_devices())
  return jax.sharding.Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _expected_manifest(config, files, num_records, clip_cfg, teacher_info):
  """The output's manifest, as JSON will give it back (tuples as lists), so a rerun compares equal."""
  return json.loads(json.dumps({
      "format": teacher_store.FORMAT, "version": 1,
      "data_files": [os.path.basename(f) for f in files], "num_records": num_records,
      "data_fingerprints": [records.file_fingerprint(f) for f in files],
      "shard_size": int(config.shard_size), "views_per_image": int(config.views_per_image),
      "dim": int(clip_cfg.embed_dim), "dtype": config.embedding_dtype,
      "resolutions": [int(r) for r in config.resolutions], "seed": int(config.seed),
      "teacher": dict(teacher_info, teacher_image_size=int(config.teacher_image_size),
                      model=clip_cfg.to_dict()),
      "complete": False,
  }))


_IDENTITY_KEYS = ("data_files", "num_records", "data_fingerprints", "shard_size", "views_per_image",
                  "dim", "dtype", "resolutions", "seed", "teacher")


def _open_output(out_dir, expected):
  """Creates or checks the output manifest; removes half-written shard dirs."""
  path = os.path.join(out_dir, teacher_store.MANIFEST)
  # (The manifest's temporary file: process 0 may be writing it while another process looks.)
  foreign = sorted(set(os.listdir(out_dir)) - {teacher_store.MANIFEST + ".tmp"}) if os.path.isdir(out_dir) else []
  if foreign and not os.path.exists(path):
    raise ValueError(f"output_dir {out_dir} holds files extraction did not write (e.g. "
                     f"{foreign[0]!r}); give a new or empty directory")
  os.makedirs(out_dir, exist_ok=True)
  if os.path.exists(path):
    have = teacher_store.read_manifest(out_dir)
    # Extractions made before data fingerprints were recorded are checked without them.
    diff = [k for k in _IDENTITY_KEYS if have.get(k) != expected[k]
            and not (k == "data_fingerprints" and k not in have)]
    if diff:
      what = " (other data under the same file names)" if diff == ["data_fingerprints"] else ""
      raise ValueError(f"{out_dir} holds an extraction with different {diff}{what}; use another output_dir")
    return have
  if jax.process_index() == 0:
    teacher_store.write_manifest(out_dir, expected)
  return expected


def verify(out_dir: str) -> dict:
  """Checks every shard (checksums, keys, shapes, values); marks the manifest complete, or
  incomplete and raises naming each bad shard's path."""
  m = teacher_store.read_manifest(out_dir)
  problems = [p for i in range(teacher_store.num_shards(m))
              for p in teacher_store.shard_problems(out_dir, m, i)]
  if problems:
    if m["complete"]:
      m["complete"] = False
      teacher_store.write_manifest(out_dir, m)
    raise RuntimeError(f"teacher embeddings in {out_dir} failed verification (rerun the "
                       "extraction to redo the bad shards): " + "; ".join(problems))
  if not m["complete"]:
    m["complete"] = True
    teacher_store.write_manifest(out_dir, m)
  return m


def _shards_to_do(out_dir, manifest, mine) -> list[int]:
  """This process's shards that are missing or fail their checks; bad ones are removed."""
  todo = []
  for i in mine:
    if not teacher_store.shard_done(out_dir, i):
      todo.append(i)
      continue
    problems = teacher_store.shard_problems(out_dir, manifest, i)
    if problems:
      print(f"[extract] redoing shard {i}: " + "; ".join(problems), flush=True)
      shutil.rmtree(teacher_store.shard_dir(out_dir, i))
      todo.append(i)
  # Any process with work: the manifest says incomplete (process 0 writes it) before anyone
  # writes a shard, until the final verify.
  if sum(sharding.gather_objects(len(todo))) and manifest["complete"] and jax.process_index() == 0:
    manifest["complete"] = False
    teacher_store.write_manifest(out_dir, manifest)
  sharding.barrier("samclip_extract_manifest_open")
  return todo


def run(config, workdir: str) -> dict:
  """Extracts (or resumes) the teacher embeddings; returns the verified manifest."""
  if config.data:
    data = config.data
  else:
    data = sample.ensure_sample(config.sample_dir or os.path.join(workdir, "sample"))["clip_train"]
  out_dir = config.output_dir or os.path.join(workdir, "teacher_embeddings")
  files = records.resolve_files(data)
  source = pipeline.data_source(files) if files else []
  num_records = len(source)
  if not num_records:
    raise ValueError(f"{data} holds no records: nothing to extract")
  if config.views_per_image % len(config.resolutions):
    raise ValueError("views_per_image must be a multiple of len(resolutions)")
  clip_cfg, teacher_info = teacher_config(config)
  manifest = _open_output(out_dir, _expected_manifest(config, files, num_records, clip_cfg, teacher_info))
  n_shards = teacher_store.num_shards(manifest)
  mine = [i for i in range(n_shards) if i % jax.process_count() == jax.process_index()]
  for i in mine:  # leftovers of a killed run; only this process's (others may be writing theirs)
    if os.path.isdir(teacher_store.shard_dir(out_dir, i) + ".tmp"):
      shutil.rmtree(teacher_store.shard_dir(out_dir, i) + ".tmp")
  todo = _shards_to_do(out_dir, manifest, mine)

  mesh = _local_mesh()
  n_dev = mesh.devices.size
  batch = -(-int(config.batch_size) // n_dev) * n_dev
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if todo:
    params = jax.device_put(teacher_params(config, clip_cfg), replicated)
  fwd = jax.jit(teacher_forward(clip_cfg, config.teacher_image_size, jnp.dtype(config.compute_dtype)),
                in_shardings=(replicated, data_sharding), out_shardings=data_sharding)
  emb_dtype = jnp.bfloat16 if config.embedding_dtype == "bfloat16" else np.float16

  todo_images = sum(min(manifest["shard_size"], num_records - i * manifest["shard_size"]) for i in todo)
  logging.info("extract: %d records, %d shards (%d of this process, %d to do), %d views/image, "
               "%d devices, batch %d", num_records, n_shards, len(mine), len(todo),
               config.views_per_image, n_dev, batch)
  print(f"[extract] {num_records} records, {n_shards} shards, {len(mine) - len(todo)} done, "
        f"{len(todo)} to do on this process ({jax.process_index()} of {jax.process_count()})",
        flush=True)
  kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
  t0, done_images = time.time(), 0
  V = int(config.views_per_image)
  with concurrent.futures.ThreadPoolExecutor(max(1, config.num_threads)) as pool:
    for written, i in enumerate(todo, 1):
      start = i * manifest["shard_size"]
      keys = list(range(start, min(start + manifest["shard_size"], num_records)))
      views = np.zeros((len(keys), V, 6), np.int32)
      embs = np.zeros((len(keys), V, clip_cfg.embed_dim), np.float32)
      queues = collections.defaultdict(list)
      pending = collections.deque()

      def drain(limit):
        while len(pending) > limit:
          out, slots = pending.popleft()
          arr = np.asarray(out)
          for j, (row, v) in enumerate(slots):
            embs[row, v] = arr[j]

      def launch(r):
        items = queues.pop(r)
        imgs = np.stack([it[2] for it in items])
        if len(imgs) < batch:  # fixed shapes: one compilation per resolution
          imgs = np.concatenate([imgs, np.zeros((batch - len(imgs),) + imgs.shape[1:], np.uint8)])
        pending.append((fwd(params, jax.device_put(imgs, data_sharding)),
                        [(row, v) for row, v, _ in items]))
        drain(2)

      lookahead = max(1, config.prefetch_batches) * batch // V + 1
      futures = collections.deque()
      it = iter(keys)
      for k in it:
        futures.append(pool.submit(_render_record, source, k, config.seed, V, config.resolutions))
        if len(futures) >= lookahead:
          break
      while futures:
        key, rendered = futures.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
          futures.append(pool.submit(_render_record, source, nxt, config.seed, V, config.resolutions))
        row = key - start
        for v, params_v, img in rendered:
          views[row, v] = params_v
          r = params_v[5]
          queues[r].append((row, v, img))
          if len(queues[r]) == batch:
            launch(r)
      for r in list(queues):
        launch(r)
      drain(0)
      teacher_store.write_shard(out_dir, i, keys, views, embs.astype(emb_dtype))
      done_images += len(keys)
      rate = done_images / max(time.time() - t0, 1e-9)
      eta = (todo_images - done_images) / rate
      print(f"[extract] shard {i + 1}/{n_shards}: {len(keys)} images, {len(keys) * V} views; "
            f"{rate:.1f} images/s, ETA {eta:.0f}s", flush=True)
      if kill_after and written >= kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
  sharding.barrier("samclip_extract_done")  # every shard written before process 0 verifies
  failure = None
  if jax.process_index() == 0:
    try:
      manifest = verify(out_dir)
      print(f"[extract] verified {manifest['num_records']} records x {V} views in {out_dir}", flush=True)
    except Exception as e:  # noqa: BLE001 - re-raised below, after the others hear of it
      failure = e
  # Every process ends with process 0's verdict (none returns while the output is unverified).
  if int(sharding.from_process_0(np.int32(failure is not None))):
    if failure is not None:
      raise failure
    raise RuntimeError(f"process 0 found the teacher embeddings in {out_dir} bad (its output "
                       "names the shards); rerun the extraction to redo them")
  return teacher_store.read_manifest(out_dir) if jax.process_index() else manifest


def main(argv):
  del argv
  if FLAGS.workdir is None or FLAGS.config is None:
    raise app.UsageError("--config and --workdir are required")
  sharding.initialize_from_config(FLAGS.config)  # before any device use
  run(FLAGS.config, FLAGS.workdir)


def cli():
  # Flags are defined here, not at import, so tests and other entry points can import run().
  flags.DEFINE_string("workdir", None, "Directory for the sample and the output.")
  config_flags.DEFINE_config_file("config", None, "configs/extract.py[:local]", lock_config=True)
  from samclip_jax.cli import run as run_entry_point   # --help exits 0 and lists the fields; quiet Orbax
  run_entry_point(main, __doc__, "samclip_jax.extract")


if __name__ == "__main__":
  cli()
