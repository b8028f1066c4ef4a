"""A run's Orbax checkpoints (train state + data-iterator states): save, verify, restore.

Every finished step directory gets a checksum record (sha256 of each file) in
CHECKPOINTS/checksums/STEP.json. Restoring walks the steps newest first and takes the first
one that verifies and loads with finite values; a corrupt, truncated or half-deleted step is
reported (with the reason) and moved to WORKDIR/unusable_checkpoints/, so a run resumes exactly
from its newest good step. With checkpoints but no good one, the run refuses (starting over
would overwrite them).
"""
import hashlib
import json
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from samclip_jax import optim, sharding

CHECKSUM_DIR = "checksums"
CHECKPOINT_DIR = "checkpoints"  # WORKDIR/: Orbax steps
UNUSABLE_DIR = "unusable_checkpoints"  # WORKDIR/: bad steps moved out of the way (kept, not deleted)


def manager(workdir, config):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.max_checkpoints_to_keep, create=True,
      enable_async_checkpointing=config.async_checkpointing, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), options=options)


def saved_steps(workdir) -> list[int]:
  """The finished steps in WORKDIR/checkpoints, ascending, from the listing alone (Orbax saves a
  step under a temporary name and renames it when complete)."""
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


class _Snapshot:
  """An iterator state captured now, saved later (async checkpoints must not see later batches)."""

  def __init__(self, iterator):
    self._state = iterator.get_state()

  def get_state(self):
    return self._state


def _step_dir(mngr, step):
  return os.path.join(str(mngr.directory), str(step))


def _record_path(mngr, step):
  return os.path.join(str(mngr.directory), CHECKSUM_DIR, f"{step}.json")


def _file_digests(directory):
  """{relative path: sha256} of every file under a step directory."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          h.update(chunk)
      out[os.path.relpath(path, directory)] = h.hexdigest()
  return out


def record_checksums(mngr):
  """Writes the checksum record of every finished step that has none (process 0; cheap to call)."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.join(str(mngr.directory), CHECKSUM_DIR), exist_ok=True)
  for step in mngr.all_steps():
    path = _record_path(mngr, step)
    if not os.path.exists(path):
      with open(path + ".tmp", "w") as f:
        json.dump(_file_digests(_step_dir(mngr, step)), f)
      os.replace(path + ".tmp", path)
  for name in os.listdir(os.path.join(str(mngr.directory), CHECKSUM_DIR)):
    stem = name.split(".")[0]
    if stem.isdigit() and int(stem) not in mngr.all_steps():
      os.remove(os.path.join(str(mngr.directory), CHECKSUM_DIR, name))  # ours; its step is gone


def verify(mngr, step) -> str | None:
  """None if step's files match their checksum record (or it has none yet), else the problem."""
  path = _record_path(mngr, step)
  if not os.path.exists(path):
    return None  # saved but killed before recording: the load and finiteness checks decide
  with open(path) as f:
    want = json.load(f)
  got = _file_digests(_step_dir(mngr, step))
  problems = ([f"{k} missing" for k in sorted(set(want) - set(got))]
              + [f"{k} differs from its checksum" for k in sorted(want) if k in got and got[k] != want[k]]
              + [f"{k} not in the checksum record" for k in sorted(set(got) - set(want))])
  if problems:
    more = ", ..." if len(problems) > 3 else ""
    return f"{len(problems)} bad file(s): " + ", ".join(problems[:3]) + more
  return None


def save(mngr, step, state, iterators, force=False):
  """Saves state + iterator states at `step`; earlier saves get their checksum records first."""
  args = {"state": ocp.args.StandardSave(state)}
  for name, it in iterators.items():
    args[f"{name}_iter"] = grain.checkpoint.CheckpointSave(_Snapshot(it))
  # Orbax waits for the previous save before starting this one anyway: record it meanwhile.
  finish(mngr)
  return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def finish(mngr):
  """Waits for pending saves and records their checksums."""
  mngr.wait_until_finished()
  record_checksums(mngr)


def _restore_step(mngr, step, abstract_state, iterators):
  args = {"state": ocp.args.StandardRestore(abstract_state)}
  for name, it in iterators.items():
    args[f"{name}_iter"] = grain.checkpoint.CheckpointRestore(it)
  state = mngr.restore(step, args=ocp.args.Composite(**args))["state"]
  # On device: a state sharded over hosts cannot be fetched to one host.
  if not bool(jax.jit(optim.all_finite)(state)):
    raise ValueError("it holds non-finite values")
  return state


# grain's words on restore when the data order changed: the sampler (batch size, seed, process
# count), the data source (paths) or the worker count.
DATA_ORDER_CHANGED = ("does not match dataloader sampler", "does not match datasource in dataloader",
                      "does not match dataloader worker count")


def _problem(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def restore_latest(mngr, abstract_state, make_iterators, say=print):
  """(step, state, iterators) from the newest good checkpoint, or (None, None, fresh iterators)
  when there is no checkpoint at all.

  Bad steps newer than the good one are moved to WORKDIR/unusable_checkpoints/ (the run saves
  those steps again). Raises when there are checkpoints but none is good: starting over would
  overwrite them. make_iterators() gives fresh iterators (a failed restore may leave them half-set).

  Several processes: process 0 names each step to try (the newest it lists and has not tried)
  and checks its checksums; every process restores that step, and it is good only if it
  loaded on all of them. So all processes resume from the same step (and move aside the same
  bad ones) whatever their own, possibly lagging, listing of the shared directory says.
  """
  bad, tried, problems = [], set(), []
  while True:
    step, problem = -1, ""
    if jax.process_index() == 0:
      left = [s for s in mngr.all_steps() if s not in tried]
      if left:
        step = max(left)
        try:
          problem = verify(mngr, step) or ""
        except Exception as e:  # noqa: BLE001 - unreadable files mean: not a good checkpoint
          problem = _problem(e)
    if jax.process_count() > 1:
      step, ok = (int(v) for v in sharding.from_process_0(np.array([step, not problem], np.int32)))
      if not ok and not problem:
        problem = "its checksums do not match (process 0's message says which files)"
    if step < 0:
      break
    tried.add(step)
    iterators = state = None
    if not problem:
      iterators = make_iterators()
      try:
        state = _restore_step(mngr, step, abstract_state, iterators)
      except Exception as e:  # noqa: BLE001 - any failure to load means: not a good checkpoint
        problem = _problem(e)
      if jax.process_count() > 1:  # good only where it loaded on every process
        heard = sharding.gather_objects(problem)
        problem = next((f"process {i}: {p}" for i, p in enumerate(heard) if p), "")
    if not problem:
      _move_aside(mngr, bad, say)
      return step, state, iterators
    say(f"checkpoint step {step} in {_step_dir(mngr, step)} is unusable ({problem}); trying an older one")
    bad.append(step)
    problems.append(problem)
  if bad and all(any(m in p for m in DATA_ORDER_CHANGED) for p in problems):  # the config changed, not the files
    raise ValueError(f"the checkpoints in {mngr.directory} (steps {sorted(bad)}) record another data "
                     "order than this run's: a batch size, data path, seed or process count differs "
                     "from the run that wrote them. Rerun with that run's settings, or start another "
                     "--workdir with --config.init_from=EXPORT_DIR (weights kept, optimizer and data "
                     "order new); they were left as they are.")
  if bad:
    raise ValueError(f"no usable checkpoint in {mngr.directory} (steps {sorted(bad)}, see the "
                     "messages above); they were left as they are. Fix the cause, move that "
                     "directory away to train from scratch, or start another --workdir from this "
                     "run's export with --config.init_from=EXPORT_DIR (weights kept, optimizer and "
                     "data order new).")
  return None, None, make_iterators()


def _move_aside(mngr, steps, say):
  """Moves unusable steps (and their checksum records) out of the checkpoint directory."""
  if not steps:
    return
  if jax.process_index() == 0:
    aside = os.path.join(os.path.dirname(str(mngr.directory)), UNUSABLE_DIR)
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      dest, n = os.path.join(aside, str(step)), 1
      while os.path.exists(dest):  # the same step may go bad twice: keep both
        dest, n = os.path.join(aside, f"{step}.{n}"), n + 1
      os.replace(_step_dir(mngr, step), dest)
      if os.path.exists(_record_path(mngr, step)):
        os.replace(_record_path(mngr, step), dest + ".checksums.json")
      say(f"moved unusable checkpoint step {step} to {dest}")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("samclip_jax unusable checkpoints moved")
  mngr.reload()  # its list of steps must not name the moved ones
