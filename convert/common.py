"""Shared machinery of the PyTorch -> Orbax converters: read a state dict, apply a table."""
import os
import re
from typing import Callable, Mapping, Sequence

import numpy as np


class CheckpointError(ValueError):
  """A checkpoint that cannot be converted; the message lists every problem found."""


# Transforms from a PyTorch tensor layout to the Flax one.
def identity(x):
  return x


def linear(x):
  """nn.Linear weight (out, in) -> Dense kernel (in, out)."""
  return x.T


def conv(x):
  """nn.Conv2d weight (O, I, kh, kw) -> Conv kernel (kh, kw, I, O)."""
  return x.transpose(2, 3, 1, 0)


def conv_transpose(x):
  """nn.ConvTranspose2d weight (I, O, kh, kw) -> nn.ConvTranspose(transpose_kernel=True) kernel (kh, kw, O, I)."""
  return x.transpose(2, 3, 1, 0)


# (PyTorch name regex, Flax path template with \1-style groups, transform)
Rule = tuple[str, str, Callable[[np.ndarray], np.ndarray]]

_WRAPPER_KEYS = ("state_dict", "model", "module")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch or safetensors file into {name: float32 numpy array}, unwrapped."""
  if not os.path.isfile(path):
    raise CheckpointError(f"checkpoint file not found: {path}")
  if path.endswith(".safetensors"):
    state = _load_safetensors(path)
  else:
    state = _load_torch(path)
  for key in _WRAPPER_KEYS:  # {'state_dict': {...}} and friends
    if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
      state = state[key]
  if not isinstance(state, Mapping):
    raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
  out, bad = {}, []
  for name, value in state.items():
    name = name[len("module."):] if name.startswith("module.") else name
    if not hasattr(value, "shape"):
      bad.append(f"{name}: not a tensor ({type(value).__name__})")
      continue
    out[name] = _to_numpy(value)
  if bad:
    raise CheckpointError(f"{path}: entries that are not tensors:\n  " + "\n  ".join(bad))
  return out


def _load_torch(path):
  import torch  # Conversion-time dependency only (the [test] extra).
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle errors, truncated zips, refused globals
    raise CheckpointError(
        f"{path}: cannot be read as a PyTorch state dict with weights_only=True "
        f"(truncated, not a checkpoint, or it pickles arbitrary objects): {type(e).__name__}: {e}"
    ) from e


def _load_safetensors(path):
  from safetensors import safe_open
  try:
    out = {}
    with safe_open(path, framework="numpy") as f:
      for k in f.keys():
        out[k] = f.get_tensor(k)
    return out
  except Exception as e:
    try:  # bfloat16 tensors have no numpy dtype: read them through torch.
      from safetensors.torch import load_file
      return load_file(path)
    except Exception:
      raise CheckpointError(f"{path}: cannot be read as safetensors: {type(e).__name__}: {e}") from e


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor
    value = value.detach().cpu().float().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
  value = np.asarray(value)
  return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def flatten(tree: Mapping, prefix: str = "") -> dict:
  """Nested dict -> {'a/b/c': leaf}."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten(v, path))
    else:
      out[path] = v
  return out


def unflatten(flat: Mapping[str, object]) -> dict:
  """{'a/b/c': leaf} -> nested dict."""
  out: dict = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def apply_table(state: Mapping[str, np.ndarray], rules: Sequence[Rule], skeleton: Mapping,
                ignore: Sequence[str] = (), source: str = "checkpoint") -> dict:
  """Maps every PyTorch tensor through the first rule that matches its full name.

  `skeleton` is the Flax params tree (arrays or ShapeDtypeStructs) the result must fill
  exactly. Unmapped, missing and mis-shaped entries are collected and raised together.
  """
  compiled = [(re.compile(p), t, f) for p, t, f in rules]
  ignored = [re.compile(p) for p in ignore]
  expected = flatten(skeleton)
  out, unmapped, misshaped, unknown = {}, [], [], []
  for name, value in state.items():
    if any(r.fullmatch(name) for r in ignored):
      continue
    for regex, template, transform in compiled:
      m = regex.fullmatch(name)
      if m:
        break
    else:
      unmapped.append(f"{name} {tuple(value.shape)}")
      continue
    path = m.expand(template)
    if path not in expected:
      unknown.append(f"{name} -> {path} (no such Flax parameter)")
      continue
    array = transform(value)
    want = tuple(expected[path].shape)
    if tuple(array.shape) != want:
      misshaped.append(f"{name} {tuple(value.shape)} -> {path}: got {tuple(array.shape)}, model expects {want}")
      continue
    out[path] = np.asarray(array, dtype=expected[path].dtype)
  misshaped_paths = {m.split(" -> ")[1].split(":")[0] for m in misshaped}
  missing = sorted(set(expected) - set(out) - misshaped_paths)
  problems = []
  for title, items in (("unexpected keys (no rule maps them)", unmapped),
                       ("keys mapped to parameters the model does not have", unknown),
                       ("shape mismatches", misshaped),
                       ("parameters missing from the checkpoint", missing)):
    if items:
      problems.append(f"{len(items)} {title}:\n    " + "\n    ".join(items[:50])
                      + ("\n    ..." if len(items) > 50 else ""))
  if problems:
    raise CheckpointError(f"{source} does not match the model:\n  " + "\n  ".join(problems))
  return unflatten(out)


def summary(params) -> str:
  """'93.7M params, 374.7 MB' for a params tree."""
  leaves = list(flatten(params).values())
  n = sum(int(np.prod(x.shape)) for x in leaves)
  size = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
  return f"{n / 1e6:.1f}M params, {size / 1e6:.1f} MB"
