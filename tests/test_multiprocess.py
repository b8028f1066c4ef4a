"""Real multi-process jobs on 127.0.0.1: 2 processes x 4 CPU devices train the tiny merge with
mixed CLIP resolutions, killed mid-run and relaunched, as 1 process x 8 devices does.

Every process is a `python -m samclip_jax.main` in its own process group, launched with the
explicit --config.coordinator_address / num_processes / process_id; each launch is bounded in
time and its groups are killed when anything fails.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from samclip_jax import api
from samclip_jax.data import pipeline, sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Cheaper CPU codegen: each process compiles its own steps and the machine has two cores.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
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


def _launch(workdir, sample_dir, nproc, devices, cache=None):
  """Starts a job of `nproc` processes with `devices` CPU devices each; returns (procs, logs)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
             JAX_PLATFORMS="cpu")
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  port, procs, logs = _free_port(), [], []
  for i in range(nproc):
    dist = ([f"--config.coordinator_address=127.0.0.1:{port}", f"--config.num_processes={nproc}",
             f"--config.process_id={i}", "--config.distributed_timeout_s=120",
             "--config.heartbeat_timeout_s=30"] if nproc > 1 else [])
    logs.append(f"{workdir}.{nproc}x{devices}.p{i}.log")
    with open(logs[-1], "w") as out:
      procs.append(subprocess.Popen(_command(workdir, sample_dir, dist), cwd=REPO, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
  return procs, logs


def _kill(procs):
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
  for p in procs:
    p.wait()


def _tails(logs):
  return "\n".join(f"--- {path}\n" + open(path, errors="replace").read()[-3000:] for path in logs)


def _run(workdir, sample_dir, nproc, devices, cache=None) -> str:
  """Runs a job to its end (bounded); returns process 0's output."""
  procs, logs = _launch(workdir, sample_dir, nproc, devices, cache)
  deadline = time.time() + LAUNCH_TIMEOUT_S
  try:
    while any(p.poll() is None for p in procs) and time.time() < deadline:
      if any(p.poll() not in (None, 0) for p in procs):
        break  # one failed: the others would wait for it until the heartbeat timeout
      time.sleep(0.2)
    codes = [p.poll() for p in procs]
  finally:
    _kill(procs)
  assert codes == [0] * nproc, f"exit codes {codes}\n" + _tails(logs)
  return open(logs[0]).read()


def _run_killed(workdir, sample_dir, nproc, devices, at_step, cache=None) -> int:
  """Starts a job and SIGKILLs all of it once checkpoint `at_step` is finalized; returns the
  newest finalized step."""
  procs, logs = _launch(workdir, sample_dir, nproc, devices, cache)
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


def test_two_processes_killed_and_relaunched_train_like_one(tmp_path):
  """A 2 x 4-device job with mixed CLIP resolutions, SIGKILLed whole after its step-2
  checkpoint (while compiling the 96 px step) and relaunched, ends with the parameters and
  evaluation of the 1 x 8-device job. One test on purpose: xdist would rerun the reference."""
  schedule = [pipeline.clip_resolution(SEED, n, RESOLUTIONS) for n in range(TOTAL)]
  assert schedule == [64, 64, 64, 96]  # mixed, and the new size compiles after checkpoint 2
  sample_dir = os.path.dirname(sample.ensure_sample(str(tmp_path / "sample"))["manifest"])

  one_dir, two_dir = str(tmp_path / "one"), str(tmp_path / "two")
  one = _run(one_dir, sample_dir, 1, 8)
  assert "1 process(es)" in one
  for r in RESOLUTIONS:
    assert f"image sizes {{'clip': {r}}}" in one
  cache = str(tmp_path / "jax_cache")  # the relaunch reuses what the killed job compiled
  assert _run_killed(two_dir, sample_dir, 2, 4, at_step=2, cache=cache) < TOTAL
  two = _run(two_dir, sample_dir, 2, 4, cache=cache)
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
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
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
