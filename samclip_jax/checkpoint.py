"""Model directories: Orbax params + config.json (+ extra files), written atomically."""
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_model(directory: str, params, config: Mapping[str, Any],
               extra_files: Mapping[str, str] | None = None) -> None:
  """Writes params and config to `directory`; it appears whole or not at all.

  `config` must hold a "model_type" key ("sam", "open_clip", "samclip") and be JSON.
  `extra_files` maps a file name inside `directory` to a source path to copy.
  """
  if "model_type" not in config:
    raise ValueError("model config needs a 'model_type' key")
  directory = os.path.abspath(directory)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
  try:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, PARAMS_DIR), jax.tree.map(np.asarray, params))
    ckptr.wait_until_finished()
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(dict(config), f, indent=2, sort_keys=True)
    for name, src in (extra_files or {}).items():
      shutil.copyfile(src, os.path.join(tmp, name))
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_config(directory: str) -> dict:
  """Reads the config.json of a model directory, with a clear error if it is not one."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} is not a samclip_jax model directory (no {CONFIG_FILE})")
  with open(path) as f:
    return json.load(f)


def load_model(directory: str, expected_type: str | None = None, target=None):
  """Returns (params, config) of a model directory.

  `target`, a tree of jax.ShapeDtypeStruct (with shardings), restores straight into the
  given layout; without it the arrays land on the default device.
  """
  config = load_config(directory)
  if expected_type is not None and config.get("model_type") != expected_type:
    raise ValueError(f"{directory} holds a {config.get('model_type')!r} model, expected {expected_type!r}")
  ckptr = ocp.StandardCheckpointer()
  path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  params = ckptr.restore(path, target) if target is not None else ckptr.restore(path)
  return params, config
