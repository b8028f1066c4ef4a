"""The merge loop end to end on the embedded sample: loss goes down, resume is exact, SIGKILL
is survived, freezing freezes, NaN policies, config errors fail before compiling."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import eval_models
from cpu_devices import xla_flags
from configs import merge
from samclip_jax import loop, optim, train
from samclip_jax.tasks import merge as merge_task
from samclip_jax.models import samclip as sc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """A shared embedded sample (the suite's one compilation cache, conftest, lets the loop, the
  resumed loop and the `main` subprocesses compile the same step once)."""
  root = tmp_path_factory.mktemp("merge")
  sample = eval_models.ensure_sample(tmp_path_factory.getbasetemp())["root"]
  return {"root": root, "sample": sample}


def tiny(env, arg="tiny", **overrides):
  c = merge.get_config(arg)
  c.data.sample_dir = env["sample"]
  for k, v in overrides.items():
    node, *rest = k.split(".")
    if rest:
      c[node][rest[0]] = v
    else:
      c[k] = v
  return c


def one_device():
  """Loop tests run on one device, as on a laptop (conftest makes 8)."""
  return jax.devices()[:1]


def _params(state):
  return jax.tree.map(np.asarray, optim.merge_params(state.params, state.frozen))


def _finalized_steps(ckpt_dir):
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def _check_user_api(workdir, env):
  """A random-teacher export carries its own text tower (export/text_model/): the user API
  classifies and the predict CLI draws class overlays with no open_clip directory given."""
  from PIL import Image
  from samclip_jax import api, predict
  assert os.path.isfile(os.path.join(workdir, "export", api.TEXT_MODEL_DIR, "vocab.json"))
  image = np.asarray(Image.open(_sample_image(env)).convert("RGB"))
  probs = api.SamClip.from_checkpoint(workdir).classify(image, ["circle", "square"], templates="photo", resolution=64)
  assert sorted(n for n, _ in probs) == ["circle", "square"]
  np.testing.assert_allclose(sum(p for _, p in probs), 1.0, rtol=1e-5)
  out = os.path.join(workdir, "overlay.png")
  assert predict.main(["--checkpoint", workdir, "--image", _sample_image(env), "--output", out,
                       "--classes", "circle,square", "--templates", "photo"]) == 0
  assert Image.open(out).format == "PNG"


def _sample_image(env):
  d = os.path.join(env["sample"], "coco", "images")
  return os.path.join(d, sorted(os.listdir(d))[0])


def test_merge_end_to_end_resume_and_sigkill(env):
  """One test on purpose (xdist would otherwise rerun the reference run per worker):
  the tiny merge runs 8 steps straight, the loss goes down, the export loads; a run stopped
  at step 3 and resumed ends bit-identical; a `main` subprocess SIGKILLed right after its
  first checkpoint and rerun ends bit-identical too."""
  # -- straight run
  workdir = str(env["root"] / "straight")
  ref = train.train_and_evaluate(tiny(env), workdir, devices=one_device())
  ref_params = _params(ref["state"])
  hist = ref["history"]
  assert ref["step"] == 8 and [h["step"] for h in hist] == [2, 4, 6, 8]
  assert hist[-1]["total_loss"] < hist[0]["total_loss"], hist
  assert hist[-1]["clip_loss"] < hist[0]["clip_loss"], hist
  assert np.isfinite(hist[-1]["sam_loss"]) and 0 <= hist[-1]["sam_iou"] <= 1
  assert {"eval/clip_cosine", "eval/sam_iou"} <= set(ref)
  assert hist[-1]["images_per_sec"] > 0 and hist[-1]["learning_rate"] >= 0
  assert "images_per_sec" not in hist[0]   # the first window compiles: its rate would mislead
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  cfg, params = sc.load_samclip(os.path.join(workdir, "export"))
  assert cfg.out_dim == 16 and cfg.sam.image_size == 64
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  _check_user_api(workdir, env)

  # -- graceful stop at step 3, resume to 8: same params and optimizer state, bit for bit
  workdir = str(env["root"] / "resumed")
  first = train.train_and_evaluate(tiny(env), workdir, stop_at_step=3, devices=one_device())
  assert first["step"] == 3 and "export" not in os.listdir(workdir)
  # A run without an export is described by WORKDIR/model_config.json, and its checkpoint
  # holds the student (samclip_jax.api loads unfinished runs this way).
  with open(os.path.join(workdir, merge_task.MODEL_CONFIG_FILE)) as f:
    assert sc.SamClipConfig.from_dict({k: v for k, v in json.load(f).items() if k in (
        "model_type", "sam", "head_depth", "head_mlp_hidden", "out_dim")}) == cfg
  from samclip_jax import api
  jax.tree.map(np.testing.assert_array_equal, api.restore_workdir_params(workdir, 3), _params(first["state"]))
  # The random teacher's text tower is written at the first start, so the workdir has one pre-export.
  assert api.SamClip.from_checkpoint(workdir).text_model is not None
  text_config = os.path.join(workdir, api.TEXT_MODEL_DIR, "config.json")
  stamp = os.stat(text_config).st_mtime_ns
  second = train.train_and_evaluate(tiny(env), workdir, devices=one_device())
  assert second["step"] == 8
  assert os.stat(text_config).st_mtime_ns == stamp   # a resume keeps it
  jax.tree.map(np.testing.assert_array_equal, _params(second["state"]), ref_params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(second["state"].opt_state),
               jax.device_get(ref["state"].opt_state))

  # -- SIGKILL a real `main` process once its first checkpoint exists (possibly mid-save)
  workdir = str(env["root"] / "killed")
  cmd = [sys.executable, "-m", "samclip_jax.main", "--config=configs/merge.py:tiny",
         f"--workdir={workdir}", f"--config.data.sample_dir={env['sample']}",
         "--config.checkpoint_every_steps=2", "--config.eval_every_steps=0"]
  penv = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
  # Its output goes to a file: an unread pipe fills up and stalls a chatty run (JAX_LOG_COMPILES).
  log = env["root"] / "killed.log"
  with open(log, "wb") as out:
    proc = subprocess.Popen(cmd, cwd=REPO, env=penv, stdout=out, stderr=subprocess.STDOUT)
  ckpt = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 600
  try:
    while not _finalized_steps(ckpt) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert proc.poll() is None, log.read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  killed_at = _finalized_steps(ckpt)
  assert killed_at and killed_at[-1] < 8
  done = subprocess.run(cmd, cwd=REPO, env=penv, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert "resumed from step" in done.stdout
  assert _finalized_steps(ckpt)[-1] == 8
  _, params = sc.load_samclip(os.path.join(workdir, "export"))
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)


# ----------------------------------------------------------------------------- step level
@pytest.fixture(scope="module")
def probe(env):
  exp = merge_task.create(tiny(env, "probe,tiny"), one_device())
  teachers = exp.init_aux()
  return exp, teachers, loop.make_train_step(exp)


def test_freezing_really_freezes(probe):
  exp, teachers, step = probe
  assert all(p.startswith("clip_head/") for p in exp.trainable_paths)
  assert any(p.startswith("image_encoder/") for p in exp.frozen_paths)
  state = exp.init_state(teachers)
  frozen0 = jax.tree.map(np.asarray, state.frozen)
  train0 = jax.tree.map(np.asarray, state.params)
  # No optimizer state for frozen params: every params-like leaf is a clip_head tensor.
  mu = state.opt_state[1][0].mu  # chain(clip, adamw(scale_by_adam, ...), ...)
  assert set(optim.flat_paths(mu)) == set(exp.trainable_paths)
  for i in range(2):
    state, metrics = step(state, teachers, exp.device_batches(exp.fake_batches(i)))
  assert bool(metrics["finite"])
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.frozen), frozen0)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.params, train0))
  assert all(changed)


def test_nan_step_is_skipped_and_counted(probe):
  exp, teachers, step = probe
  state = exp.init_state(teachers)
  before = jax.tree.map(np.asarray, state.params)
  batches = exp.fake_batches(0)
  batches["clip"]["teacher_embedding"] = np.full((exp.config.clip_batch_size, 16), np.nan, np.float32)
  state, metrics = step(state, teachers, exp.device_batches(batches))
  m = jax.device_get(metrics)
  assert not m["finite"] and int(state.nonfinite) == 1 and int(state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)
  with pytest.raises(FloatingPointError, match="at step 5"):
    loop.check_finite(m, 5, "stop")
  assert loop.check_finite(m, 5, "skip") is True


def test_nan_policy_stop_in_the_loop(env, monkeypatch):
  """A NaN teacher embedding in batch 3 stops the run with that step number."""
  real = merge_task.MergeTask.make_loaders

  def poisoned(exp, paths, split="train"):
    loaders = real(exp, paths, split=split)
    if split == "train":
      loaders["clip"] = _Poison(loaders["clip"], at=3, dim=exp.clip_config.embed_dim)
    return loaders

  monkeypatch.setattr(merge_task.MergeTask, "make_loaders", poisoned)
  # Same config as the `probe` fixture's but for the logging: the compiled step is reused.
  cfg = tiny(env, "probe,tiny", log_every_steps=8, eval_every_steps=0)
  with pytest.raises(FloatingPointError, match="at step 3"):
    train.train_and_evaluate(cfg, str(env["root"] / "nan_stop"), devices=one_device())
  cfg.nan_policy = "skip"
  out = train.train_and_evaluate(cfg, str(env["root"] / "nan_skip"), devices=one_device())
  assert out["step"] == 8 and out["history"][-1]["nonfinite_steps"] == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(out["state"])))


class _Poison:
  """Wraps a CLIP loader: every batch carries teacher embeddings (zeros-free random), batch `at` NaN."""

  def __init__(self, loader, at, dim):
    self.loader, self.at, self.dim = loader, at, dim

  def __iter__(self):
    return _PoisonIter(iter(self.loader), self.at, self.dim)


class _PoisonIter:
  def __init__(self, it, at, dim):
    self.it, self.at, self.dim, self.i = it, at, dim, 0

  def __next__(self):
    b = dict(next(self.it))
    self.i += 1
    emb = np.random.default_rng(self.i).normal(size=(b["image"].shape[0], self.dim)).astype(np.float32)
    if self.i == self.at:
      emb[:] = np.nan
    b["teacher_embedding"] = emb
    return b

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def test_grad_accumulation_matches_one_big_batch(env, probe):
  """2 micro-batches (lax.scan) == one batch of twice the size (CLIP head probe: cheap backward)."""
  exp1, teachers, step1 = probe
  exp2 = merge_task.create(tiny(env, "probe,tiny", grad_accum_steps=2), one_device())
  step2 = loop.make_train_step(exp2)
  out = []
  for exp, step in ((exp1, step1), (exp2, step2)):
    state = exp.init_state(teachers)
    state, m = step(state, teachers, exp.device_batches(exp.fake_batches(7)))
    out.append((_params(state), jax.device_get(m)))
  (p1, m1), (p2, m2) = out
  np.testing.assert_allclose(m1["clip_loss"], m2["clip_loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p2)


# ----------------------------------------------------------------------------- config errors
def test_config_errors_fail_before_compiling(env, tmp_path):
  c = merge.get_config("local")
  with pytest.raises(AttributeError):
    c.total_step = 5  # typo: the config is locked
  with pytest.raises(ValueError, match="unknown config arg"):
    merge.get_config("prob")
  with pytest.raises(FileNotFoundError, match="sam_checkpoint"):
    merge_task.validate_config(tiny(env, sam_checkpoint=str(tmp_path / "missing")))
  with pytest.raises(ValueError, match="nan_policy"):
    merge_task.validate_config(tiny(env, nan_policy="ignore"))
  # The world is a data source like any split (drawn on the fly); a malformed spec is named.
  world = tiny(env)
  world.data.clip_train = "world:train:1000:128:256"
  merge_task.validate_config(world)
  world.data.clip_train = "world:trian:1000"
  with pytest.raises(ValueError, match="world split"):
    merge_task.validate_config(world)
  bad_mesh = tiny(env)
  bad_mesh.mesh.fsdp = 3
  with pytest.raises(ValueError, match="do not divide the 8 available devices"):
    merge_task.create(bad_mesh)
  with pytest.raises(ValueError, match="sam_batch_size=2 .* data-parallel size 8"):
    merge_task.create(tiny(env))  # 8 devices, data=-1 -> 8-way; 2 SAM images
  with pytest.raises(ValueError, match="matches no parameter"):
    cfg = tiny(env)
    cfg.optim.frozen = ["promt_encoder/.*"]
    merge_task.create(cfg, one_device())


def test_stage_configs():
  s2, s1, s3 = merge.get_config(""), merge.get_config("probe"), merge.get_config("resolution")
  assert (s2.learning_rate, s2.lambda_sam, s2.clip_batch_size, s2.sam_batch_size, s2.masks_per_image) == (
      4e-5, 10.0, 2048, 32, 32)
  assert s1.learning_rate == 8e-4 and s1.sam_batch_size == 0 and "image_encoder/.*" in s1.optim.frozen
  assert tuple(s3.clip_resolutions) == (224, 448, 1024)
  local = merge.get_config("local,probe")
  assert local.stage == "probe" and local.model.sam_variant == "tiny"
