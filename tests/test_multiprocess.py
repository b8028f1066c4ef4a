"""Real multi-process jobs on 127.0.0.1: 2 processes x 4 CPU devices train the tiny merge with
mixed CLIP resolutions, killed mid-run and relaunched, as 1 process x 8 devices does; 2
processes extract teacher embeddings and evaluate as 1 process does.

Every process runs in its own process group, launched with the explicit
--config.coordinator_address / num_processes / process_id; each launch is bounded in time and
its groups are killed when anything fails.
"""
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

import eval_models
from cpu_devices import xla_flags
from samclip_jax import api
from samclip_jax.data import pipeline, sample, teacher_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 9  # CLIP resolutions of steps 1..4: 64, 64, 64, 96 (checked below)
RESOLUTIONS = (64, 96)
TOTAL = 4
LAUNCH_TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(workdir, sample_dir, extra=()):
  # The probe stage trains the CLIP head on the frozen backbone: the whole merge step (both
  # resolutions, data order, gradient all-reduce, Orbax) at a fraction of distill's compile time.
  # optim.eps=1e-6: the key part of each qkv bias has a zero gradient (softmax ignores it), and
  # Adam at 1e-8 turns its float noise, which differs with the reduction order, into full steps.
  return [sys.executable, "-m", "samclip_jax.main", "--config=configs/merge.py:probe,tiny",
          f"--workdir={workdir}", f"--config.data.sample_dir={sample_dir}", f"--config.seed={SEED}",
          f"--config.clip_resolutions={RESOLUTIONS}", f"--config.total_steps={TOTAL}",
          "--config.checkpoint_every_steps=2", f"--config.eval_every_steps={TOTAL}",
          "--config.export=False", "--config.optim.eps=1e-6", *extra]


def _dist_fields(port, nproc, i) -> dict:
  """The config fields that make process i of nproc join the job at 127.0.0.1:port."""
  return (dict(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=i,
               distributed_timeout_s=120, heartbeat_timeout_s=30) if nproc > 1 else {})


def _start(commands, log_prefix, devices, fast=False):
  """Starts one process per command line (all at once: commands[i] is process i's), each with
  `devices` CPU devices (and cheaper code generation: `fast`, where every run compared is such
  a job). Returns (procs, logs)."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices, fast),
             JAX_PLATFORMS="cpu")  # with the suite's compilation cache (conftest)
  procs, logs = [], []
  for i, cmd in enumerate(commands):
    logs.append(f"{log_prefix}.p{i}.log")
    with open(logs[-1], "w") as out:
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True))
  return procs, logs


def _launch(workdir, sample_dir, nproc, devices):
  """Starts a training job of `nproc` processes with `devices` CPU devices each."""
  port = _free_port()
  commands = [_command(workdir, sample_dir, [f"--config.{k}={v}" for k, v in _dist_fields(port, nproc, i).items()])
              for i in range(nproc)]
  return _start(commands, f"{workdir}.{nproc}x{devices}", devices, fast=True)


def _kill(procs):
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
  for p in procs:
    p.wait()


def _tails(logs):
  return "\n".join(f"--- {path}\n" + open(path, errors="replace").read()[-3000:] for path in logs)


def _finish(procs, logs) -> list[str]:
  """Waits (bounded) for a started job to end; fails with the logs unless all exit 0.
  Returns every process's output."""
  deadline = time.time() + LAUNCH_TIMEOUT_S
  try:
    while any(p.poll() is None for p in procs) and time.time() < deadline:
      if any(p.poll() not in (None, 0) for p in procs):
        break  # one failed: the others would wait for it until the heartbeat timeout
      time.sleep(0.2)
    codes = [p.poll() for p in procs]
  finally:
    _kill(procs)
  assert codes == [0] * len(procs), f"exit codes {codes}\n" + _tails(logs)
  return [open(path).read() for path in logs]


def _run(workdir, sample_dir, nproc, devices) -> str:
  """Runs a job to its end (bounded); returns process 0's output."""
  return _finish(*_launch(workdir, sample_dir, nproc, devices))[0]


def _run_killed(workdir, sample_dir, nproc, devices, at_step) -> int:
  """Starts a job and SIGKILLs all of it once checkpoint `at_step` is finalized; returns the
  newest finalized step."""
  procs, logs = _launch(workdir, sample_dir, nproc, devices)
  ckpt = os.path.join(workdir, "checkpoints", str(at_step))
  deadline = time.time() + LAUNCH_TIMEOUT_S
  try:
    while not os.path.isdir(ckpt) and time.time() < deadline:
      assert all(p.poll() is None for p in procs), "a process ended early\n" + _tails(logs)
      time.sleep(0.05)
    assert os.path.isdir(ckpt), "no checkpoint in time\n" + _tails(logs)
    assert all(p.poll() is None for p in procs), "the job ended before it was killed"
  finally:
    _kill(procs)
  return max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _flat(params):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def _eval(output):
  return float(re.search(rf"step {TOTAL} eval clip_cosine=(\S+)", output).group(1))


def _trained_delta(got, ref):
  """Relative L2 distance of the trained parameters (the CLIP head); frozen ones must be equal."""
  assert got.keys() == ref.keys()
  trained = [k for k in ref if k.startswith("['clip_head']")]
  for k in ref:
    if k not in trained:
      np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
  delta = np.sqrt(sum(np.sum((got[k] - ref[k]) ** 2) for k in trained))
  return delta / np.sqrt(sum(np.sum(ref[k] ** 2) for k in trained))


def test_two_processes_killed_and_relaunched_train_like_one(tmp_path, tmp_path_factory):
  """A 2 x 4-device job with mixed CLIP resolutions, SIGKILLed whole after its step-2
  checkpoint (while compiling the 96 px step) and relaunched, ends with the parameters and
  evaluation of the 1 x 8-device job. One test on purpose: xdist would rerun the reference."""
  schedule = [pipeline.clip_resolution(SEED, n, RESOLUTIONS) for n in range(TOTAL)]
  assert schedule == [64, 64, 64, 96]  # mixed, and the new size compiles after checkpoint 2
  sample_dir = eval_models.ensure_sample(tmp_path_factory.getbasetemp())["root"]

  one_dir, two_dir = str(tmp_path / "one"), str(tmp_path / "two")
  one = _run(one_dir, sample_dir, 1, 8)
  assert "1 process(es)" in one
  for r in RESOLUTIONS:
    assert f"image sizes {{'clip': {r}}}" in one
  # The relaunch reuses what the killed job compiled (the suite's compilation cache).
  assert _run_killed(two_dir, sample_dir, 2, 4, at_step=2) < TOTAL
  two = _run(two_dir, sample_dir, 2, 4)
  assert "2 process(es)" in two and "resumed from step 2" in two

  ref = {s: _flat(api.restore_workdir_params(one_dir, s)) for s in (2, TOTAL)}
  for s in (2, TOTAL):
    delta = _trained_delta(_flat(api.restore_workdir_params(two_dir, s)), ref[s])
    assert delta <= 1e-5, (s, delta)
  # The comparison is not vacuous: every trained tensor moved between the two checkpoints.
  assert all(not np.array_equal(ref[2][k], ref[TOTAL][k]) for k in ref[2] if k.startswith("['clip_head']"))
  assert abs(_eval(two) - _eval(one)) <= 1.5e-4  # printed with 4 decimals


_GONE = """
import os, sys
from samclip_jax import sharding
pid, port = int(sys.argv[1]), sys.argv[2]
sharding.maybe_initialize_distributed(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                      process_id=pid, timeout_s=60, heartbeat_timeout_s=5)
import jax, jax.numpy as jnp, numpy as np
sh = jax.sharding.NamedSharding(jax.make_mesh((4,), ("d",)), jax.sharding.PartitionSpec("d"))
total = jax.jit(jnp.sum)
for i in range(100000):
  if pid == 1 and i == 20:
    os._exit(3)  # gone without a word, as a crashed host
  float(total(jax.make_array_from_process_local_data(sh, np.ones(2, np.float32))))
"""


def test_a_process_that_dies_stops_the_job_and_is_named(tmp_path):
  """Process 1 vanishes mid-run: process 0, waiting in a collective, ends by itself soon after
  the configured 5 s heartbeat timeout (well before jax's 100 s default, which the 90 s bound
  below would not reach), with a message naming process 1."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
  port, procs = _free_port(), []
  logs = [str(tmp_path / f"p{i}.log") for i in range(2)]
  for i in range(2):
    with open(logs[i], "w") as out:
      procs.append(subprocess.Popen([sys.executable, "-c", _GONE, str(i), str(port)], cwd=REPO,
                                    env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True))
  try:
    codes = [p.wait(timeout=90) for p in procs]
  finally:
    _kill(procs)
  assert codes[1] == 3, _tails(logs)
  assert codes[0] != 0, _tails(logs)
  out = open(logs[0]).read()
  assert re.search(r"stopped sending heartbeats\):\s*1\b", out), _tails(logs)


# ---------------------------------------------------------------- extraction and evaluation
EXTRACT_RECORDS = 10  # shards of 3: 0 and 2 on process 0, 1 and 3 (the short one) on process 1
EXTRACT_FIELDS = dict(shard_size=3, resolutions=(64,), batch_size=4)  # 64 px views: cheap renders


def test_two_processes_extract_every_record_once_as_one_does(tmp_path):
  """`python -m samclip_jax.extract` as a 2 x 2-device job writes each record once (each
  process its own shards), verified and complete, with the views and embeddings of a
  1-process run (in this process, while the job runs)."""
  from samclip_jax import extract
  paths = sample.ensure_sample(str(tmp_path / "sample"), num_clip_train=EXTRACT_RECORDS,
                               num_clip_val=2, num_sam_train=1, num_sam_val=1)
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  port = _free_port()
  fields = lambda i: dict(EXTRACT_FIELDS, data=paths["clip_train"], output_dir=two, **_dist_fields(port, 2, i))
  commands = [[sys.executable, "-m", "samclip_jax.extract", "--config=configs/extract.py:local",
               f"--workdir={tmp_path}", *[f"--config.{k}={v}" for k, v in fields(i).items()]]
              for i in range(2)]
  job = _start(commands, str(tmp_path / "extract"), devices=2)
  try:
    import configs.extract
    c = configs.extract.get_config("local")
    c.update(dict(EXTRACT_FIELDS, data=paths["clip_train"], output_dir=one))
    ref = extract.run(c, str(tmp_path))
  except BaseException:
    _kill(job[0])
    raise
  logs = _finish(*job)
  for i, log in enumerate(logs):
    assert f"2 to do on this process ({i} of 2)" in log, log[-3000:]
  man = teacher_store.read_manifest(two)
  assert man["complete"] and ref["complete"] and teacher_store.num_shards(man) == 4
  assert man == ref
  assert not [n for n in os.listdir(two) if n.endswith(".tmp")]
  load = lambda d, i, name: np.load(os.path.join(teacher_store.shard_dir(d, i), name))
  keys = np.concatenate([load(two, i, "keys.npy") for i in range(4)])
  np.testing.assert_array_equal(keys, np.arange(EXTRACT_RECORDS))  # each record once, in order
  for i in range(4):
    np.testing.assert_array_equal(load(two, i, "views.npy"), load(one, i, "views.npy"))
    got, want = (load(d, i, "embeddings.npy").astype(np.float32) for d in (two, one))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())


# Evaluation: each task's 2-process numbers against 1 process. 8 images per global batch over 8
# devices either way; retrieval's last batch (images 8-9) holds none of process 1's rows, and
# its image 5 (process 1's rows 4-7 of the first batch) is corrupt: skipped on every process.
# (Retrieval, not classification: with these random models its recalls are not at 0 or 100.)
EVAL_JOBS = (("retrieval", {"max_images": 10}),
             ("instance_segmentation", {"max_images": 5}),
             ("semantic_segmentation", {"max_images": 6, "mode": "clip"}))


def _eval_config(task, fields):
  c = importlib.import_module(f"configs.eval.{task}").get_config("local")
  for k, v in fields.items():
    *parents, name = k.split(".")
    node = c
    for part in parents:
      node = node[part]
    node[name] = v
  return c


def _eval_fields(models, sample_dir, extra):
  return dict({"model": models["samclip"], "data.sample_dir": sample_dir, "templates": "photo"},
              resolution=64, **extra)


def _eval_job():
  """A process of the evaluation job: argv = JSON of [(task, fields)], JSON of the distributed
  fields, output root. Joins the job as `python -m samclip_jax.evaluate` does, then runs the
  tasks one after the other (one start and one model load for all of them)."""
  from samclip_jax import evaluate, sharding
  jobs, dist, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
  for i, (task, fields) in enumerate(jobs):
    config = _eval_config(task, dict(fields, **dist))
    if i == 0:
      sharding.initialize_from_config(config)
    evaluate.evaluate(config, os.path.join(out, task))


def test_two_processes_evaluate_as_one_does(tmp_path_factory):
  """Retrieval (gathered embeddings), instance segmentation (per-process masks, gathered
  predictions) and semantic segmentation (summed confusion counts) on a 2 x 4-device job give
  the numbers and files of 1 x 8 devices (this process, while the job runs); only process 0
  writes them."""
  from samclip_jax import evaluate
  base = tmp_path_factory.getbasetemp()
  models, sample_root = eval_models.ensure_models(base), eval_models.ensure_sample(base)["root"]
  out = str(tmp_path_factory.mktemp("eval_two"))
  jobs = [(task, _eval_fields(models, sample_root, extra)) for task, extra in EVAL_JOBS]
  jobs[0][1].update(_retrieval_with_a_corrupt_image(tmp_path_factory.mktemp("ret"), sample_root))
  port = _free_port()
  driver = "import sys; sys.path.insert(0, 'tests'); import test_multiprocess; test_multiprocess._eval_job()"
  commands = [[sys.executable, "-c", driver, json.dumps(jobs), json.dumps(_dist_fields(port, 2, i)), out]
              for i in range(2)]
  job = _start(commands, os.path.join(out, "eval"), devices=4)
  try:
    one = str(tmp_path_factory.mktemp("eval_one"))
    ref = {task: evaluate.evaluate(_eval_config(task, fields), os.path.join(one, task))
           for task, fields in jobs}
  except BaseException:
    _kill(job[0])
    raise
  logs = _finish(*job)
  for task, want in ref.items():
    with open(os.path.join(out, task, f"{task}.json")) as f:
      got = json.load(f)
    assert got["processes"] == 2 and got["devices"] == want["devices"] == 8, task
    assert got["num_images"] == want["num_images"], task
    assert got["skipped"] == want["skipped"] and len(got["skipped"]) == (1 if task == "retrieval" else 0), task
    assert got["metrics"] == want["metrics"] or _close(got["metrics"], want["metrics"]), (task, got["metrics"], want["metrics"])
    with open(os.path.join(out, task, f"{task}.md")) as f:
      assert f.read() == evaluate.markdown(dict(got), task), task
  with open(os.path.join(out, "instance_segmentation", "instance_segmentation_predictions.json")) as f:
    got = json.load(f)
  with open(os.path.join(one, "instance_segmentation", "instance_segmentation_predictions.json")) as f:
    want = json.load(f)
  assert [(p["image_id"], p["category_id"], p["segmentation"]) for p in got] == \
      [(p["image_id"], p["category_id"], p["segmentation"]) for p in want]
  np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in want], atol=1e-5)
  assert "[retrieval]" in logs[0] and "[retrieval]" not in logs[1]  # progress: process 0 only


def _retrieval_with_a_corrupt_image(directory, sample_root) -> dict:
  """The sample's first 10 retrieval images and captions, image 5 overwritten with noise bytes."""
  import shutil
  paths = sample.ensure_sample(sample_root)   # built already: its paths
  with open(paths["classification_labels"]) as f:
    entries = json.load(f)[:10]
  src = paths["classification_images"]
  for e in entries:
    shutil.copy(os.path.join(src, e["file_name"]), directory)
  with open(os.path.join(directory, entries[5]["file_name"]), "wb") as f:
    f.write(np.random.default_rng(0).bytes(1000))
  with open(os.path.join(directory, "captions.json"), "w") as f:
    json.dump(entries, f)
  return {"data.sample_dir": "", "data.image_dir": str(directory),
          "data.captions_file": os.path.join(str(directory), "captions.json")}


def _close(got, want, tol=1e-5):
  if isinstance(want, dict):
    return got.keys() == want.keys() and all(_close(got[k], want[k], tol) for k in want)
  if isinstance(want, float):
    return (np.isnan(want) and np.isnan(got)) or abs(got - want) <= tol * max(1.0, abs(want))
  return got == want
