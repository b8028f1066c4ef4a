"""The loop under faults (issue 12): non-finite updates, corrupt checkpoints, two runs on one
workdir, a workdir moved elsewhere, a finished run rerun, bad configs. One straight tiny run
(the CLIP-head probe: cheap to compile) is the reference every resumed run must equal bit
for bit."""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eval_models
from cpu_devices import xla_flags
from configs import merge
from samclip_jax import api, optim, run_checkpoints, train
from samclip_jax.tasks import merge as merge_task
from samclip_jax.models import samclip as sc
from samclip_jax.workdir_lock import WorkdirBusy, WorkdirLock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """A shared embedded sample (with the suite's one compilation cache, every run below compiles
  the same step once)."""
  return {"root": tmp_path_factory.mktemp("faults"),
          "sample": eval_models.ensure_sample(tmp_path_factory.getbasetemp())["root"]}


def tiny(env, **overrides):
  """5 steps of the tiny probe, a checkpoint after each (all kept), no evaluation."""
  c = merge.get_config("probe,tiny")
  c.data.sample_dir = env["sample"]
  c.total_steps, c.checkpoint_every_steps, c.max_checkpoints_to_keep = TOTAL, 1, TOTAL
  c.eval_every_steps, c.log_every_steps = 0, TOTAL
  for k, v in overrides.items():
    node, *rest = k.split(".")
    if rest:
      c[node][rest[0]] = v
    else:
      c[k] = v
  return c


def run(cfg, workdir, **kw):
  return train.train_and_evaluate(cfg, str(workdir), devices=jax.devices()[:1], **kw)


def _params(state):
  return jax.tree.map(np.asarray, optim.merge_params(state.params, state.frozen))


def _assert_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _all_finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


@pytest.fixture(scope="module")
def ref(env):
  """The straight run: its workdir (never modified by the tests) and final state."""
  workdir = str(env["root"] / "ref")
  out = run(tiny(env), workdir)
  assert out["step"] == TOTAL and _steps(workdir) == list(range(1, TOTAL + 1))
  return {"workdir": workdir, "params": _params(out["state"]),
          "opt_state": jax.device_get(out["state"].opt_state)}


def _copy_unfinished(ref, dest):
  """The reference workdir as if killed before its export: a rerun restores instead of
  saying 'already finished'."""
  shutil.copytree(ref["workdir"], dest)
  shutil.rmtree(os.path.join(dest, "export"))
  return str(dest)


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("key,value", [
    ("learning_rate", float("nan")), ("learning_rate", float("inf")), ("learning_rate", 0.0),
    ("learning_rate", -1e-3), ("learning_rate", 1e39),  # 1e39 is inf in float32
    ("optim.b1", 1.0), ("optim.b1", -0.1), ("optim.b2", float("nan")),
    ("clip_batch_size", -8), ("sam_batch_size", -2), ("stage", "bogus"), ("seed", -1), ("seed", 2 ** 31),
])
def test_bad_config_is_refused_before_anything_runs(env, key, value):
  with pytest.raises(ValueError, match=key.split(".")[-1]):
    merge_task.validate_config(tiny(env, **{key: value}))


# ----------------------------------------------------------------------------- non-finite updates
def _poison_updates_from(monkeypatch, count):
  """The optimizer's update turns NaN once its count reaches `count` (loss and gradient stay
  finite): only the check of the *updated* state can catch it."""
  real = optim.build_optimizer

  def build(config, trainable, all_paths=None):
    tx, schedule = real(config, trainable, all_paths)

    def update(grads, state, params=None):
      updates, new_state = tx.update(grads, state, params)
      _, counts = zip(*optax.tree_utils.tree_get_all_with_path(state, "count"))
      bad = counts[0] >= count
      return jax.tree.map(lambda u: jnp.where(bad, jnp.nan, u), updates), new_state

    return optax.GradientTransformation(tx.init, update), schedule

  monkeypatch.setattr(optim, "build_optimizer", build)


def test_nonfinite_update_stop_and_skip(env, ref, monkeypatch, capsys):
  """stop: raises naming step 3, nothing after step 2 saved, and a rerun resumes and ends as
  the straight run. skip: steps 3-5 change nothing but the counters, so every checkpoint
  and the export hold step 2's state exactly."""
  p2 = api.restore_workdir_params(ref["workdir"], 2)
  _poison_updates_from(monkeypatch, count=2)  # the update of step 3 on
  workdir = str(env["root"] / "nan_stop")
  with pytest.raises(FloatingPointError, match="at step 3 "):
    run(tiny(env), workdir)
  assert _steps(workdir) == [1, 2]
  _assert_equal(api.restore_workdir_params(workdir, 2), p2)

  workdir = str(env["root"] / "nan_skip")
  out = run(tiny(env, nan_policy="skip"), workdir)
  assert out["step"] == TOTAL and int(out["state"].nonfinite) == 3
  assert out["history"][-1]["nonfinite_steps"] == 3
  for step in _steps(workdir):
    params = api.restore_workdir_params(workdir, step)
    assert _all_finite(params)
    if step >= 2:
      _assert_equal(params, p2)
  _assert_equal(sc.load_samclip(os.path.join(workdir, "export"))[1], p2)

  monkeypatch.undo()  # the fault is gone: the stopped run resumes from step 2 to the end
  capsys.readouterr()
  out = run(tiny(env), str(env["root"] / "nan_stop"))
  assert "resumed from step 2" in capsys.readouterr().out
  _assert_equal(_params(out["state"]), ref["params"])


def test_own_data_is_not_mixed_with_the_embedded_sample(env, tmp_path):
  """A run given some of its data paths: the rest are named, not filled from the embedded world
  sample (which validated a user's run silently); without evaluation no held-out set is needed."""
  own = tmp_path / "train.json"
  own.write_text("{}")
  c = tiny(env, **{"data.clip_train": str(own), "eval_every_steps": 5})
  c.data.sample_dir = ""
  with pytest.raises(ValueError, match="config.data.clip_val is not set while other data paths are"):
    merge_task.create(c, jax.devices()[:1]).data_paths(str(tmp_path))
  c.eval_every_steps = 0
  assert merge_task.create(c, jax.devices()[:1]).data_paths(str(tmp_path))["clip_train"] == str(own)
  assert not os.path.exists(tmp_path / "sample")


def test_a_held_out_set_smaller_than_one_batch_is_named():
  """Batches drop their remainder: a held-out set smaller than one batch gave no batch, and
  its metrics were missing from every evaluation without a word."""
  from types import SimpleNamespace
  from samclip_jax import loop
  task = SimpleNamespace(config=SimpleNamespace(eval_batches=4),
                         make_loaders=lambda paths, split: {"clip": [{"x": 1}] * 3, "sam": []},
                         device_batches=lambda host: host)
  step = lambda state, aux, batches: {"clip_cosine": 0.5}
  with pytest.raises(ValueError, match=r"held-out sam set \(/data/sam_val.json\) holds fewer records than one batch"):
    loop.evaluate(task, step, None, None, {"clip_val": "/data/clip_val.json", "sam_val": "/data/sam_val.json"})
  task.make_loaders = lambda paths, split: {"clip": [{"x": 1}] * 3, "sam": [{"y": 1}]}  # one batch is enough
  assert loop.evaluate(task, step, None, None, {}) == {"clip_cosine": 0.5}


def test_another_model_in_a_run_workdir_is_refused_before_anything_changes(env, ref):
  """A model field changed between runs of one workdir: refused by name before anything is
  written (model_config.json was rewritten first, so the workdir then described a model its
  checkpoints do not hold, and samclip_jax.api loaded them into it without a word)."""
  workdir = _copy_unfinished(ref, env["root"] / "other_model")
  config_file = os.path.join(workdir, merge_task.MODEL_CONFIG_FILE)
  before = open(config_file).read()
  with pytest.raises(ValueError, match="holds a run of another model \\(head_depth differ"):
    run(tiny(env, **{"model.head_depth": 1}), workdir)
  assert open(config_file).read() == before
  _assert_equal(api.restore_workdir_params(workdir, TOTAL), ref["params"])


@pytest.mark.parametrize("change", ["batch_size", "data"])
def test_a_changed_data_order_is_named_not_blamed_on_the_checkpoints(env, ref, change, capsys):
  """Another batch size, or other data, on a run's workdir: every checkpoint's data iterator
  refuses it. Said as what it is (the config changed), in one error, and every checkpoint stays."""
  workdir = _copy_unfinished(ref, env["root"] / f"other_{change}")
  c = tiny(env)
  if change == "batch_size":
    c.clip_batch_size //= 2
  else:  # the CLIP split of the sample's val images instead of its train images
    c.data.clip_train = os.path.join(env["sample"], "clip_val.json")
  changed = ("clip_batch_size 8 -> 4" if change == "batch_size" else
             f"data.clip_train '' -> {c.data.clip_train!r}")   # the setting is named too
  with pytest.raises(ValueError, match="record another data order than this run's: a batch size(.|\n)*"
                     f"Changed since the run's last start: {re.escape(changed)}"):
    run(c, workdir)
  assert _steps(workdir) == list(range(1, TOTAL + 1))
  assert not os.path.exists(os.path.join(workdir, "unusable_checkpoints"))
  said = capsys.readouterr()
  assert said.out.count("checkpoint step 5 ") == 1 and "checkpoint step 5 " not in said.err  # said once


def test_ctrl_c_says_where_a_rerun_resumes(env, ref, monkeypatch, capsys):
  """Ctrl-C during step 3 (its batch drawn): the loop names the checkpoint a rerun resumes
  from (step 2), nothing later is saved, and the rerun ends as the straight run."""
  real = run_checkpoints.save

  def save(mngr, step, *args, **kwargs):
    real(mngr, step, *args, **kwargs)
    if step == 2:
      raise KeyboardInterrupt
  monkeypatch.setattr(run_checkpoints, "save", save)
  workdir = str(env["root"] / "ctrl_c")
  with pytest.raises(KeyboardInterrupt):
    run(tiny(env), workdir)
  assert "interrupted: rerun the same command to resume from step 2 (the last checkpoint)" in capsys.readouterr().out
  assert _steps(workdir) == [1, 2]
  monkeypatch.undo()
  out = run(tiny(env), workdir)
  assert "resumed from step 2" in capsys.readouterr().out
  _assert_equal(_params(out["state"]), ref["params"])


def test_a_resume_with_changed_settings_names_them(env, ref, capsys):
  """Another learning rate on a run's workdir: the resume goes on with it (as a longer schedule
  would) and says so, naming the old and new values; run_config.json then holds the new ones."""
  workdir = _copy_unfinished(ref, env["root"] / "other_lr")
  for step in (4, 5):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  old_lr = tiny(env).learning_rate
  capsys.readouterr()
  out = run(tiny(env, learning_rate=old_lr / 2), workdir)
  said = capsys.readouterr().out
  assert "resumed from step 3 " in said, said
  assert f"resuming with 1 setting(s) changed since the run's last start: learning_rate {old_lr!r} -> {old_lr / 2!r}" in said, said
  assert out["step"] == TOTAL
  with open(os.path.join(workdir, "run_config.json")) as f:
    assert json.load(f)["learning_rate"] == old_lr / 2
  # How a multi-host job is launched is no setting: another coordinator or process id is not a change.
  from samclip_jax import loop
  launch = tiny(env, learning_rate=old_lr / 2, coordinator_address="node7:1234", process_id=1)
  assert loop.run_config_changes(workdir, launch, print) == []
  # The unchanged command resumes without a word about settings.
  shutil.rmtree(os.path.join(workdir, "export"))
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(TOTAL)))
  run(tiny(env, learning_rate=old_lr / 2), workdir)
  assert "setting(s) changed" not in capsys.readouterr().out


def test_a_resume_keeps_its_init_from_and_does_not_need_it(env, ref, capsys):
  """A run started from a parent export: a resume without --config.init_from, or after the
  parent was deleted, goes on (it failed: the parent was read again) and keeps the parent as
  the run's init_from while it exists."""
  parent = str(env["root"] / "parent_export")
  shutil.copytree(os.path.join(ref["workdir"], "export"), parent)
  workdir = str(env["root"] / "child")
  run(tiny(env, init_from=parent, warmup_steps=TOTAL), workdir, stop_at_step=2)
  # (a warmup as long as the run is clamped by the schedule: said, not silent)
  assert f"note: warmup_steps {TOTAL} >= total_steps {TOTAL}: the LR warms up over {TOTAL - 1} steps" in capsys.readouterr().out
  run(tiny(env, warmup_steps=TOTAL), workdir, stop_at_step=3)   # the command without init_from
  said = capsys.readouterr().out
  assert f"a resume keeps the run's first init_from ({parent}); --config.init_from=(none) is not used" in said
  assert "setting(s) changed" not in said
  with open(os.path.join(workdir, "run_config.json")) as f:
    assert json.load(f)["init_from"] == parent
  shutil.rmtree(parent)
  out = run(tiny(env, init_from=parent, warmup_steps=TOTAL), workdir)
  assert out["step"] == TOTAL and f"init_from {parent} is gone" in capsys.readouterr().out


# ----------------------------------------------------------------------------- corrupt checkpoints
def _flip_bytes(path, n=400):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    pos = np.random.default_rng(0).choice(len(data), size=min(n, len(data)), replace=False)
    for p in pos:
      data[p] ^= 0xFF
    f.seek(0)
    f.write(data)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _largest_file(directory):
  files = [os.path.join(r, n) for r, _, ns in os.walk(directory) for n in ns]
  return max(files, key=os.path.getsize)


def test_corrupt_checkpoints_fall_back_to_the_newest_good_one(env, ref, capsys):
  """Steps 5..2 each broken another way (2 and 3 also lost their checksum records, as after a
  kill before recording): the rerun names each, resumes from step 1 and ends as the straight run."""
  workdir = _copy_unfinished(ref, env["root"] / "corrupt")
  ckpt = os.path.join(workdir, "checkpoints")
  _flip_bytes(_largest_file(os.path.join(ckpt, "5", "state")))
  _truncate(_largest_file(os.path.join(ckpt, "4", "state")))
  os.remove(os.path.join(ckpt, "3", "state", "_METADATA"))
  _truncate(os.path.join(ckpt, "2", "clip_iter", "process_0-of-1.json"))
  for step in (2, 3):
    os.remove(os.path.join(ckpt, "checksums", f"{step}.json"))
  capsys.readouterr()
  out = run(tiny(env), workdir)
  said = capsys.readouterr().out
  for step in (5, 4, 3, 2):
    assert f"checkpoint step {step} in {os.path.join(ckpt, str(step))} is unusable" in said, said
  assert "resumed from step 1 " in said, said
  _assert_equal(_params(out["state"]), ref["params"])
  _assert_equal(jax.device_get(out["state"].opt_state), ref["opt_state"])
  # The broken steps are kept aside (named in the output), not deleted, and not reused.
  aside = os.path.join(workdir, "unusable_checkpoints")
  assert sorted(os.listdir(aside)) == ["2", "3", "4", "4.checksums.json", "5", "5.checksums.json"]
  assert f"moved unusable checkpoint step 5 to {os.path.join(aside, '5')}" in said
  assert _steps(workdir) == list(range(1, TOTAL + 1))


def test_no_usable_checkpoint_is_refused_not_restarted(env, ref):
  """Every checkpoint bad: starting over would overwrite them; the run refuses instead."""
  workdir = _copy_unfinished(ref, env["root"] / "all_bad")
  for step in _steps(workdir):
    os.remove(os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA"))
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(ValueError, match="no usable checkpoint"):
    run(tiny(env), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


# ----------------------------------------------------------------------------- moved workdir
def test_workdir_copied_elsewhere_resumes(env, ref, capsys):
  """The sample inside the workdir (its default place): stop at 2, copy, resume the copy."""
  workdir = str(env["root"] / "moved_from")
  shutil.copytree(env["sample"], os.path.join(workdir, "sample"))
  run(tiny(env, **{"data.sample_dir": ""}), workdir, stop_at_step=2)
  copy = str(env["root"] / "moved_to")
  shutil.copytree(workdir, copy)
  shutil.rmtree(workdir)  # the original is gone: nothing may still point at it
  capsys.readouterr()
  out = run(tiny(env, **{"data.sample_dir": ""}), copy)
  assert "resumed from step 2 " in capsys.readouterr().out
  _assert_equal(_params(out["state"]), ref["params"])


# ----------------------------------------------------------------------------- finished run
def test_finished_run_rerun_changes_nothing(env, ref, capsys):
  workdir = ref["workdir"]

  def snapshot():
    return {os.path.relpath(os.path.join(r, n), workdir): os.stat(os.path.join(r, n)).st_mtime_ns
            for r, _, ns in os.walk(workdir) for n in ns if n != ".lock"}

  before = snapshot()
  capsys.readouterr()
  out = run(tiny(env), workdir)
  assert out["finished_before"] and f"already finished at step {TOTAL}" in capsys.readouterr().out
  assert snapshot() == before  # no new event file, checkpoint or checksum; export untouched


# ----------------------------------------------------------------------------- workdir lock
_HOLD = ("import sys, time\nfrom samclip_jax.workdir_lock import WorkdirLock\n"
         "with WorkdirLock(sys.argv[1]):\n  print('locked', flush=True)\n  time.sleep(120)\n")


def test_second_run_on_a_workdir_is_refused(env, tmp_path):
  """A run holding the workdir (this process, then another one) makes a second run refuse,
  naming the holder, before it writes anything."""
  workdir = str(tmp_path / "busy")
  os.makedirs(workdir)
  with WorkdirLock(workdir, say=lambda m: None):
    with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()} "):
      run(tiny(env), workdir)
  assert os.listdir(workdir) == [".lock"]

  proc = subprocess.Popen([sys.executable, "-c", _HOLD, workdir], cwd=REPO, stdout=subprocess.PIPE,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), text=True)
  try:
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirBusy, match=f"pid {proc.pid} "):
      run(tiny(env), workdir)
    assert os.listdir(workdir) == [".lock"]
    # From the command line: one line naming the holder, no traceback.
    done = subprocess.run([sys.executable, "-m", "samclip_jax.main", "--config=configs/merge.py:tiny",
                           f"--workdir={workdir}", f"--config.data.sample_dir={env['sample']}"],
                          cwd=REPO, capture_output=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu",
                                   XLA_FLAGS=xla_flags(1)),
                          text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"error: {workdir} is in use by another run (pid {proc.pid} " in done.stderr
    assert os.listdir(workdir) == [".lock"]
  finally:
    proc.kill()
    proc.wait(timeout=60)

  said = []  # the holder was killed: its lock is taken over, with a message naming it
  with WorkdirLock(workdir, say=said.append):
    pass
  assert len(said) == 1 and f"pid {proc.pid} " in said[0] and "taking over" in said[0]


def test_a_users_directory_is_not_a_workdir(env, tmp_path):
  """--workdir pointed at a user's non-empty directory (or a file): refused before anything is
  written there; a new or empty directory, or an earlier run's, is taken."""
  user = tmp_path / "mine"
  user.mkdir()
  (user / "model_config.json").write_text('{"mine": 1}')
  with pytest.raises(FileExistsError, match="holds files of something else"):
    run(tiny(env), str(user))
  assert os.listdir(user) == ["model_config.json"] and (user / "model_config.json").read_text() == '{"mine": 1}'
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(FileExistsError, match="not a directory"):
    run(tiny(env), str(tmp_path / "a_file"))
  assert (tmp_path / "a_file").read_text() == "x"


def test_lock_file_of_a_dead_process_is_taken_over(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait(timeout=60)
  with open(tmp_path / ".lock", "w") as f:
    f.write(f"pid {dead.pid} on somehost")
  said = []
  with WorkdirLock(str(tmp_path), say=said.append):
    with open(tmp_path / ".lock") as f:
      assert f.read().startswith(f"pid {os.getpid()} ")
  assert len(said) == 1 and f"pid {dead.pid} on somehost" in said[0]
  with WorkdirLock(str(tmp_path), say=said.append):  # a clean exit leaves nothing to take over
    pass
  assert len(said) == 1
