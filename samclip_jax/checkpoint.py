"""Model directories: Orbax params + config.json (+ extra files), written atomically."""
import json
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


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
  it, a name identical on all processes, and renamed into place by process 0; an existing
  `directory` is replaced only on success.
  """
  if "model_type" not in config:
    raise ValueError("model config needs a 'model_type' key")
  # Serialise first: a bad config then fails on every process alike, before any collective.
  config_text = json.dumps(dict(config), indent=2, sort_keys=True)
  directory = os.path.abspath(directory)
  parent = os.path.dirname(directory)
  tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp-save")
  primary = jax.process_index() == 0
  if primary:
    os.makedirs(parent, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
    os.makedirs(tmp)
  _sync(f"samclip_save_model_start:{directory}")
  try:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, PARAMS_DIR), jax.tree.map(_savable, params))
    ckptr.wait_until_finished()
    if primary:
      with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        f.write(config_text)
      for name, src in (extra_files or {}).items():
        shutil.copyfile(src, os.path.join(tmp, name))
      if os.path.exists(directory):
        shutil.rmtree(directory)
      os.rename(tmp, directory)
  except BaseException:
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  # Nobody returns (and, say, reads the directory) before process 0 has put it in place.
  _sync(f"samclip_save_model_done:{directory}")


def load_config(directory: str) -> dict:
  """Reads the config.json of a model directory, with a clear error if it is not one."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} is not a samclip_jax model directory (no {CONFIG_FILE})")
  with open(path) as f:
    return json.load(f)


def load_model(directory: str, expected_type: str | None = None, target=None):
  """Returns (params, config) of a model directory.

  `target`, a tree of jax.ShapeDtypeStruct with `sharding` set (e.g. from jax.eval_shape
  plus the mesh's NamedShardings), restores straight into that layout: each process reads
  only its shards and gets global jax.Arrays, so on multi-host jobs every process calls it
  with the same target. Without a target the arrays land on the default device.
  """
  config = load_config(directory)
  if expected_type is not None and config.get("model_type") != expected_type:
    raise ValueError(f"{directory} holds a {config.get('model_type')!r} model, expected {expected_type!r}")
  ckptr = ocp.StandardCheckpointer()
  path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  params = ckptr.restore(path, target) if target is not None else ckptr.restore(path)
  return params, config
