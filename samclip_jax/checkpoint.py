"""Model directories: Orbax params + config.json (+ extra files), written atomically."""
import json
import os
import shutil
import sys
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from samclip_jax.tokenizer import MERGES_FILE, VOCAB_FILE

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# What save_model and its callers put in a model directory: nothing else is ever replaced.
OWN_FILES = (CONFIG_FILE, PARAMS_DIR, VOCAB_FILE, MERGES_FILE)


def _sync(name: str) -> None:
  """Barrier across processes (nothing to wait for in a single-process job)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _savable(x):
  # A global array spread over hosts cannot become one numpy array: Orbax writes its shards
  # from every process. Everything else is fetched to host, as a single-process save does.
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x
  return np.asarray(x)


def save_model(directory: str, params, config: Mapping[str, Any],
               extra_files: Mapping[str, str] | None = None) -> None:
  """Writes params and config to `directory`; collective: every process calls it (whole or not at all).

  `params` may hold numpy arrays (written by process 0) or jax.Arrays, possibly sharded across
  hosts (each process writes its shards). `config` must hold a "model_type" key ("sam",
  "open_clip", "samclip") and be JSON. `extra_files` maps a file name inside `directory` to a
  source path to copy (by process 0). The directory is assembled in `.<name>.tmp-save` beside
  it, a name identical on all processes, and swapped into place by process 0. An existing
  `directory` is replaced only on success, and only when it is empty or a model directory
  holding nothing but what save_model writes (see replace_refusal); anything else is refused.
  """
  if "model_type" not in config:
    raise ValueError("model config needs a 'model_type' key")
  # Serialise first: a bad config then fails on every process alike, before any collective.
  config_text = json.dumps(dict(config), indent=2, sort_keys=True)
  name = os.path.abspath(directory)  # as given: the barriers' name, identical on all processes
  directory = os.path.realpath(directory)  # a symlinked output is written where it points
  parent = os.path.dirname(directory)
  tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp-save")
  primary = jax.process_index() == 0
  # Process 0 decides for all: processes looking at different moments could disagree and hang.
  refusal = replace_refusal(directory, extra_files or ()) if primary else None
  if not _primary_says(refusal is None):
    raise ValueError(refusal or f"process 0 refused to replace {directory} (see its error)")
  if primary:
    os.makedirs(parent, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
    os.makedirs(tmp)  # mode from the umask, like every file written below
  _sync(f"samclip_save_model_start:{name}")
  try:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, PARAMS_DIR), jax.tree.map(_savable, params))
    ckptr.wait_until_finished()
    if primary:
      with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        f.write(config_text)
      for file_name, src in (extra_files or {}).items():
        shutil.copyfile(src, os.path.join(tmp, file_name))
      swap_in(tmp, directory)
  except BaseException:
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  # Nobody returns (and, say, reads the directory) before process 0 has put it in place.
  _sync(f"samclip_save_model_done:{name}")


def _primary_says(flag: bool) -> bool:
  """Process 0's value of `flag`, on every process."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def swap_in(tmp: str, directory: str) -> None:
  """Puts the finished `tmp` at `directory`; a previous one is removed only once the new one is in place."""
  if not os.path.lexists(directory):
    os.rename(tmp, directory)
    return
  old = os.path.join(os.path.dirname(directory), f".{os.path.basename(directory)}.old-save")
  shutil.rmtree(old, ignore_errors=True)  # left by a save that was killed mid-swap
  os.rename(directory, old)
  try:
    os.rename(tmp, directory)
  except BaseException:
    os.rename(old, directory)  # put the previous one back
    raise
  shutil.rmtree(old)


def is_model_dir(directory: str) -> bool:
  """True for a directory save_model wrote: config.json with a "model_type", and params/."""
  if not os.path.isdir(os.path.join(directory, PARAMS_DIR)):
    return False
  try:
    config = load_config(directory)
  except (OSError, ValueError):  # absent, unreadable, not JSON
    return False
  return isinstance(config, dict) and "model_type" in config


def replace_refusal(directory: str, extra_names: Iterable[str] = ()) -> str | None:
  """Why save_model must not replace `directory`, or None: it is absent, empty, or a model
  directory of ours holding only what save_model writes (nested model dirs, as text_model/, included)."""
  if not os.path.lexists(directory):
    return None
  if os.path.islink(directory) or not os.path.isdir(directory):
    return f"{directory} exists and is not a directory; refusing to replace it"
  if not os.listdir(directory):
    return None
  if not is_model_dir(directory):
    return (f"{directory} is not empty and is not a samclip_jax model directory "
            f"({CONFIG_FILE} with a model_type, and {PARAMS_DIR}/); refusing to replace it")
  foreign = _foreign_entries(directory, set(OWN_FILES) | set(extra_names))
  if foreign:
    shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
    return (f"{directory} is a samclip_jax model directory but also holds files samclip_jax did not "
            f"write ({shown}); refusing to replace it: move them elsewhere first")
  return None


def _foreign_entries(directory: str, ours: set[str]) -> list[str]:
  """Entries of a model directory that save_model did not write, searching nested model dirs."""
  out = []
  for entry in sorted(os.listdir(directory)):
    path = os.path.join(directory, entry)
    if entry in ours:
      continue
    if os.path.isdir(path) and not os.path.islink(path) and is_model_dir(path):
      out += [os.path.join(entry, e) for e in _foreign_entries(path, ours)]
    else:
      out.append(entry)
  return out


def load_config(directory: str, expected_type: str | None = None) -> dict:
  """Reads the config.json of a model directory, with a clear error if it is not one (or, given
  `expected_type`, holds another kind of model)."""
  path = os.path.join(directory, CONFIG_FILE)
  if os.path.isfile(directory):
    raise NotADirectoryError(f"{directory} is a file; give the model directory that holds it "
                             f"({os.path.dirname(directory) or '.'})")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} is not a samclip_jax model directory (no {CONFIG_FILE})")
  try:
    with open(path) as f:
      config = json.load(f)
  except ValueError as e:  # truncated or not JSON (UnicodeDecodeError is a ValueError too)
    raise ValueError(f"{path} is not valid JSON ({e}): not a usable model directory") from None
  if not isinstance(config, dict):
    raise ValueError(f"{path} holds a {type(config).__name__}, not a model config: not a usable model directory")
  if expected_type is not None and config.get("model_type") != expected_type:
    raise ValueError(f"{directory} holds a {config.get('model_type')!r} model, expected {expected_type!r}")
  return config


def check_finite(params, directory: str) -> None:
  """Refuses weights holding NaN or infinity (a diverged or corrupted model), naming the first
  such tensor: such a model answers every query with garbage, silently."""
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    if not np.issubdtype(x.dtype, np.inexact):
      continue
    # Sharded over several hosts: a global reduction, so every process gets the same answer.
    finite = np.isfinite(np.asarray(x)).all() if getattr(x, "is_fully_addressable", True) else (
        bool(jax.numpy.isfinite(x).all()))
    if not finite:
      raise ValueError(f"{directory} is not a usable model: its weights hold NaN or infinite values "
                       f"(first in {jax.tree_util.keystr(path)})")


def load_model(directory: str, expected_type: str | None = None, target=None, partial: bool = False):
  """Returns (params, config) of a model directory.

  `target`, a tree of jax.ShapeDtypeStruct with `sharding` set (sharding.shaped), restores
  straight into that layout: each process reads only its shards and gets global jax.Arrays,
  so on multi-host jobs every process calls it with the same target. `partial=True` restores
  only the subtrees the target names (a CLIP's image tower). Without a target the arrays land
  on the default device.
  """
  config = load_config(directory, expected_type)
  path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{directory} has no {PARAMS_DIR}/: not a complete model directory")
  try:
    if target is None:
      params = ocp.StandardCheckpointer().restore(path)
    else:
      args = ocp.args.PyTreeRestore(item=target, partial_restore=partial,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(target))
      params = ocp.PyTreeCheckpointer().restore(path, args=args)
  except (ValueError, RuntimeError) as e:  # tensorstore's errors on corrupt or truncated files
    _drop_straggler_reads()
    reason = str(e).split(" [tensorstore_spec=")[0]  # the spec is a page of JSON
    raise ValueError(f"{directory}: the weights in {PARAMS_DIR}/ cannot be read (corrupt or "
                     f"truncated files?): {reason}") from e
  check_finite(params, directory)
  return params, config


def _drop_straggler_reads() -> None:
  """After a failed restore, the reads still in flight finish on tensorstore's threads and call
  back into Orbax's closed event loop, each printing 'RuntimeError: Event loop is closed' (dozens,
  after the real error); those exact reports are dropped, every other one goes to the hook."""
  hook = sys.unraisablehook
  if getattr(hook, "drops_straggler_reads", False):
    return

  def drop(u):
    if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
      hook(u)
  drop.drops_straggler_reads = True
  sys.unraisablehook = drop
