"""Teacher-embedding extraction: kill + resume, verify, and exact replay by the CLIP loader."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from cpu_devices import xla_flags

from samclip_jax import extract
from samclip_jax.data import pipeline, records, sample, teacher_store, transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "extract.py")
SMALL = dict(num_clip_train=20, num_clip_val=2, num_sam_train=1, num_sam_val=1)


def _config(data, out):
  import configs.extract as ce
  c = ce.get_config("local")
  c.data, c.output_dir, c.shard_size = data, out, 8
  return c


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
  """Runs extraction as a subprocess killed after its first shard, then resumes it."""
  root = tmp_path_factory.mktemp("x")
  paths = sample.ensure_sample(str(root / "sample"), **SMALL)
  out = str(root / "emb")
  cmd = [sys.executable, "-m", "samclip_jax.extract", f"--config={CONFIG}:local",
         f"--workdir={root}", f"--config.data={paths['clip_train']}",
         f"--config.output_dir={out}", "--config.shard_size=8"]
  env = dict(os.environ, **{extract.KILL_ENV: "1"}, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  killed = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  man = teacher_store.read_manifest(out)
  assert not man["complete"]
  assert teacher_store.shard_done(out, 0) and not teacher_store.shard_done(out, 1)
  first = np.load(os.path.join(teacher_store.shard_dir(out, 0), "embeddings.npy"))
  # Leave a half-written shard behind, as a kill during np.save would.
  os.makedirs(teacher_store.shard_dir(out, 1) + ".tmp")
  # Resume in this process (8 simulated devices: the batch is sharded over them).
  man = extract.run(_config(paths["clip_train"], out), str(root))
  return paths, out, man, first


def test_resume_has_no_duplicates_or_gaps(extracted):
  paths, out, man, first = extracted
  assert man["complete"] and man["num_records"] == SMALL["num_clip_train"]
  keys = np.concatenate([np.load(os.path.join(teacher_store.shard_dir(out, i), "keys.npy"))
                         for i in range(teacher_store.num_shards(man))])
  np.testing.assert_array_equal(keys, np.arange(SMALL["num_clip_train"]))
  # The shard written before the kill was kept, not recomputed.
  np.testing.assert_array_equal(
      np.load(os.path.join(teacher_store.shard_dir(out, 0), "embeddings.npy")), first)
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
  assert extract.verify(out)["complete"]


def test_stored_views_are_the_drawn_views(extracted):
  paths, out, man, _ = extracted
  store = teacher_store.TeacherStore(out)
  recs = records.read_all(paths["clip_train"])
  for key in (0, 9, 19):
    views, emb = store.lookup(key)
    assert emb.shape == (2, man["dim"]) and emb.dtype == np.float32
    for v in range(2):
      box, flip, r = extract.view_of(man["seed"], key, v, recs[key]["height"], recs[key]["width"],
                                     man["resolutions"])
      assert list(views[v]) == [*box, int(flip), r]


def test_loader_replays_views_and_embeddings(extracted):
  paths, out, man, _ = extracted
  cfg = _config(paths["clip_train"], out)
  clip_cfg, params, _ = extract.build_teacher(cfg)
  fwd = jax.jit(extract.teacher_forward(clip_cfg, cfg.teacher_image_size))
  loader = pipeline.clip_loader(paths["clip_train"], batch_size=4, seed=3, teacher_embeddings=out,
                                return_index=True)
  store = teacher_store.TeacherStore(out)
  recs = records.read_all(paths["clip_train"])
  seen = set()
  it = iter(loader)
  for _ in range(4):
    b = next(it)
    r = b["image"].shape[1]
    seen.add(r)
    assert b["teacher_embedding"].shape == (4, man["dim"])
    assert b["teacher_embedding"].dtype == np.float32
    for i, key in enumerate(b["index"]):
      views, emb = store.lookup(int(key))
      # The replayed pixels are the stored view rendered again, bit for bit.
      v = [j for j in range(len(views)) if views[j, 5] == r][0]
      want = transforms.render_view_encoded(recs[key]["image"], views[v, :4], bool(views[v, 4]), r)
      np.testing.assert_array_equal(b["image"][i], want)
      np.testing.assert_array_equal(b["teacher_embedding"][i], emb[v])
    # Re-running the teacher on the replayed batch gives the stored embeddings (fp16 storage).
    fresh = np.asarray(fwd(params, b["image"]))
    np.testing.assert_allclose(b["teacher_embedding"], fresh, rtol=0, atol=2e-3 * np.abs(fresh).max())
  assert seen == {224, 448}


def test_loader_refuses_mismatched_embeddings(extracted, tmp_path):
  paths, out, man, _ = extracted
  with pytest.raises(ValueError, match="cover"):
    pipeline.clip_loader(paths["clip_val"], batch_size=2, seed=0, teacher_embeddings=out)
  with pytest.raises(ValueError, match="resolutions"):
    pipeline.clip_loader(paths["clip_train"], batch_size=2, seed=0, teacher_embeddings=out,
                         resolutions=(224, 1024))
  broken = tmp_path / "broken"
  os.makedirs(broken)
  with open(broken / "manifest.json", "w") as f:
    json.dump(dict(man, complete=False), f)
  with pytest.raises(ValueError, match="not complete"):
    pipeline.clip_loader(paths["clip_train"], batch_size=2, seed=0, teacher_embeddings=str(broken))


def test_rerun_on_finished_output_is_a_no_op(extracted, tmp_path):
  paths, out, man, _ = extracted
  before = {i: os.path.getmtime(teacher_store.shard_dir(out, i)) for i in range(3)}
  extract.run(_config(paths["clip_train"], out), str(tmp_path))
  assert before == {i: os.path.getmtime(teacher_store.shard_dir(out, i)) for i in range(3)}
  other = _config(paths["clip_train"], out)
  other.views_per_image = 4
  with pytest.raises(ValueError, match="different"):
    extract.run(other, str(tmp_path))


def test_rerun_of_a_resnet_teacher_compares_equal(extracted):
  """The manifest is what JSON gives back: a teacher config holding tuples (ModifiedResNet's
  layers) once made every rerun a refusal ("different ['teacher']")."""
  from samclip_jax.models import clip as clip_lib
  paths, out, _, _ = extracted
  cfg = clip_lib.ClipConfig(embed_dim=16, vision=clip_lib.VisionConfig(
      image_size=64, patch_size=None, width=8, layers=(1, 1, 1, 1), head_width=8))
  files = records.resolve_files(paths["clip_train"])
  m = extract._expected_manifest(_config(paths["clip_train"], out), files, 20, cfg, {"seed": 0})
  assert m["teacher"]["model"]["vision"]["layers"] == [1, 1, 1, 1]
  assert m == json.loads(json.dumps(m))


def test_other_data_under_the_same_file_names_is_refused(extracted, tmp_path):
  """Embeddings belong to the images they were extracted from: another dataset with the same
  shard names and record count (a rerun of prepare with other inputs) is refused by the
  extraction and by the loader, instead of pairing its images with these embeddings."""
  paths, out, _, _ = extracted
  other = sample.ensure_sample(str(tmp_path / "other"), seed=1, **SMALL)
  assert [os.path.basename(f) for f in records.resolve_files(other["clip_train"])] == \
      [os.path.basename(f) for f in records.resolve_files(paths["clip_train"])]
  with pytest.raises(ValueError, match=r"different \['data_fingerprints'\] \(other data under the same file names\)"):
    extract.run(_config(other["clip_train"], out), str(tmp_path))
  with pytest.raises(ValueError, match="other data under the same file names"):
    pipeline.clip_loader(other["clip_train"], batch_size=2, seed=0, teacher_embeddings=out)


def test_output_dir_of_a_user_and_empty_data_are_refused(extracted, tmp_path):
  paths, _, _, _ = extracted
  user = tmp_path / "mine"
  user.mkdir()
  (user / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="holds files extraction did not write \\(e.g. 'notes.txt'\\)"):
    extract.run(_config(paths["clip_train"], str(user)), str(tmp_path))
  assert os.listdir(user) == ["notes.txt"]
  empty = tmp_path / "empty.json"
  records.write_split_manifest(str(empty), [])
  with pytest.raises(ValueError, match="holds no records"):
    extract.run(_config(str(empty), str(tmp_path / "out")), str(tmp_path))


def test_a_merge_run_refuses_embeddings_of_another_teacher(extracted):
  """Embeddings of another width failed after the first evaluation with a broadcasting
  traceback; those and a converted teacher's run given a random stand-in's are named up front."""
  from configs import merge
  from samclip_jax.tasks import common, merge as merge_task
  _, out, man, _ = extracted
  c = merge.get_config("tiny")
  c.data.teacher_embeddings = out
  c.model.tiny_clip_embed_dim = man["dim"]
  size = c.clip_teacher_image_size = man["teacher"]["teacher_image_size"]
  c.clip_resolutions = tuple(man["resolutions"])
  merge_task.check_teacher_embeddings(c, common.clip_config_from(c))   # the extraction's teacher
  # Views at a resolution the run does not train at: named before anything is written (the
  # loader said it after the workdir was filled).
  c.clip_resolutions = (max(man["resolutions"]) + 16,)
  with pytest.raises(ValueError, match=f"have no views at resolutions \\[{max(man['resolutions']) + 16}\\]"):
    merge_task.check_teacher_embeddings(c, common.clip_config_from(c))
  c.clip_resolutions = tuple(man["resolutions"])
  c.clip_teacher_image_size = size + 32   # another input size: other targets (mean cosine 0.77 at 224 vs 96)
  with pytest.raises(ValueError, match=f"their teacher saw the views at {man['teacher']['teacher_image_size'] or 'their own size'}, "
                                       f"this run's sees them at {size + 32}"):
    merge_task.check_teacher_embeddings(c, common.clip_config_from(c))
  c.clip_teacher_image_size = size
  c.model.tiny_clip_embed_dim = 16
  with pytest.raises(ValueError, match=f"they are {man['dim']}-dim, this teacher embeds into 16"):
    merge_task.check_teacher_embeddings(c, common.clip_config_from(c))
  from configs.common import shipped_teacher
  c.clip_checkpoint = shipped_teacher("clip")
  with pytest.raises(ValueError, match="their teacher is a random stand-in, this run's .*teachers/clip"):
    merge_task.check_teacher_embeddings(c, common.clip_config_from(c))


def test_corrupt_shards_are_reported_and_redone(extracted, tmp_path):
  paths, out, man, _ = extracted
  copy = str(tmp_path / "emb")
  shutil.copytree(out, copy)
  files = {i: os.path.join(teacher_store.shard_dir(copy, i), "embeddings.npy") for i in (1, 2)}
  want = {i: np.load(f) for i, f in files.items()}
  os.truncate(files[1], os.path.getsize(files[1]) - 7)  # a truncated file
  with open(files[2], "r+b") as f:  # zeroed data behind an intact header
    f.seek(os.path.getsize(files[2]) - want[2].nbytes)
    f.write(bytes(want[2].nbytes))
  with pytest.raises(RuntimeError) as e:
    extract.verify(copy)
  assert files[1] in str(e.value) and files[2] in str(e.value)
  assert not teacher_store.read_manifest(copy)["complete"]  # loaders refuse it now
  with pytest.raises(ValueError, match=re.escape(files[1])):
    teacher_store.TeacherStore(copy).lookup(8)
  # A training loader reads the store: the zeroed shard behind an intact header was read as
  # embeddings without a word; its checksum names it now.
  with pytest.raises(ValueError, match=re.escape(f"{files[2]}: checksum mismatch")):
    teacher_store.TeacherStore(copy).lookup(2 * man["shard_size"])
  # A rerun redoes exactly the bad shards.
  untouched = os.path.getmtime(teacher_store.shard_dir(copy, 0))
  assert extract.run(_config(paths["clip_train"], copy), str(tmp_path))["complete"]
  assert os.path.getmtime(teacher_store.shard_dir(copy, 0)) == untouched
  for i, f in files.items():
    np.testing.assert_array_equal(np.load(f), want[i])
