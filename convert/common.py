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


def conv_to_torch(x):
  """Conv / ConvTranspose kernel (kh, kw, a, b) -> PyTorch weight (b, a, kh, kw): undoes conv and conv_transpose."""
  return x.transpose(3, 2, 0, 1)


# Each transform's inverse, for writing PyTorch checkpoints back from the same tables.
INVERSE = {identity: identity, linear: linear, conv: conv_to_torch, conv_transpose: conv_to_torch}


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


def _shape_problem(name, value, array, path, want):
  """The transformed tensor must have the parameter's shape."""
  if tuple(array.shape) != tuple(want.shape):
    return f"{name} {tuple(value.shape)} -> {path}: got {tuple(array.shape)}, model expects {tuple(want.shape)}"


def _is_float(dtype) -> bool:
  """float16/32/64 and bfloat16 alike."""
  return np.dtype(dtype).kind == "f" or "float" in np.dtype(dtype).name  # bfloat16's kind is 'V'


def _dtype_problem(name, value, array, path, want):
  """Float tensors for float parameters only (or integers for integer ones)."""
  # Casting integers to float weights (or back) would be a silent wrong answer, not a conversion.
  if _is_float(value.dtype) != _is_float(want.dtype):
    return f"{name} {value.dtype} -> {path}: model expects {np.dtype(want.dtype).name}"


def _finite_problem(name, value, array, path, want):
  """No NaN or infinite weights: they would make every output NaN, with exit 0."""
  if _is_float(value.dtype):
    bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
    if bad:
      return f"{name}: {bad} of {np.size(value)} values are NaN or infinite"


# Checks of each mapped tensor, in order; a tensor failing one is reported under its title only.
TENSOR_CHECKS = (
  ("shape mismatches", _shape_problem),
  ("dtype mismatches (integer or bool where the model holds floats, or the reverse)", _dtype_problem),
  ("non-finite tensors", _finite_problem),
)


def _first_problem(name, value, array, path, want):
  """(title, description) of the first of TENSOR_CHECKS the tensor fails, or None."""
  for title, check in TENSOR_CHECKS:
    problem = check(name, value, array, path, want)
    if problem:
      return title, problem
  return None


def apply_table(state: Mapping[str, np.ndarray], rules: Sequence[Rule], skeleton: Mapping,
                ignore: Sequence[str] = (), source: str = "checkpoint") -> dict:
  """Maps every PyTorch tensor through the first rule that matches its full name.

  `skeleton` is the Flax params tree (arrays or ShapeDtypeStructs) the result must fill
  exactly. Unmapped, missing and rejected (TENSOR_CHECKS) entries are collected and raised together.
  """
  compiled = [(re.compile(p), t, f) for p, t, f in rules]
  ignored = [re.compile(p) for p in ignore]
  expected = flatten(skeleton)
  out, unmapped, unknown, rejected = {}, [], [], set()
  failed = {title: [] for title, _ in TENSOR_CHECKS}
  for name, value in state.items():
    if any(r.fullmatch(name) for r in ignored):
      continue
    found = _lookup(compiled, name)
    if found is None:
      unmapped.append(f"{name} {tuple(value.shape)}")
      continue
    path, transform = found
    if path not in expected:
      unknown.append(f"{name} -> {path} (no such Flax parameter)")
      continue
    array = transform(value)
    problem = _first_problem(name, value, array, path, expected[path])
    if problem:
      failed[problem[0]].append(problem[1])
      rejected.add(path)
      continue
    out[path] = np.asarray(array, dtype=expected[path].dtype)
  missing = sorted(set(expected) - set(out) - rejected)  # a rejected parameter is reported once
  problems = []
  for title, items in (("unexpected keys (no rule maps them)", unmapped),
                       ("keys mapped to parameters the model does not have", unknown),
                       *failed.items(),
                       ("parameters missing from the checkpoint", missing)):
    if items:
      problems.append(f"{len(items)} {title}:\n    " + "\n    ".join(items[:50])
                      + ("\n    ..." if len(items) > 50 else ""))
  if problems:
    raise CheckpointError(f"{source} does not match the model:\n  " + "\n  ".join(problems))
  return unflatten(out)


# ----------------------------------------------------------------------------- the way back
_REGEX_META = set("[]{}()*+?|^$.")


def _split_pattern(pattern: str) -> list:
  """A table's PyTorch pattern -> [literal str | (group regex,)]: literals and flat capturing groups only."""
  parts, literal, i = [], "", 0
  while i < len(pattern):
    c = pattern[i]
    if c == "\\" and i + 1 < len(pattern) and not pattern[i + 1].isalnum():
      literal, i = literal + pattern[i + 1], i + 2  # an escaped character, as \.
    elif c == "(" and not pattern.startswith("(?", i):
      j = i + 1
      while j < len(pattern) and pattern[j] not in "()":
        j += 2 if pattern[j] == "\\" else 1
      if j >= len(pattern) or pattern[j] == "(":
        raise ValueError(f"cannot invert {pattern!r}: groups must be flat capturing groups")
      parts += [literal, (pattern[i + 1:j],)]
      literal, i = "", j + 1
    elif c in _REGEX_META or c == "\\":
      raise ValueError(f"cannot invert {pattern!r}: {pattern[i:i + 2]!r} outside a group")
    else:
      literal, i = literal + c, i + 1
  return parts + [literal]


def invert_rules(rules: Sequence[Rule]) -> list[Rule]:
  """A PyTorch -> Flax table read backwards: (Flax path regex, PyTorch name template, inverse transform).

  Each rule's groups move to the Flax side (named after their number), its literals to the
  template; a group the Flax template does not use could not be recovered and is an error.
  """
  out = []
  for pattern, template, transform in rules:
    parts = _split_pattern(pattern)
    groups = [p[0] for p in parts if isinstance(p, tuple)]
    name, n = "", 0
    for part in parts:
      if isinstance(part, tuple):
        n += 1
        name += rf"\g<g{n}>"
      else:
        name += part.replace("\\", "\\\\")  # literal backslashes survive Match.expand
    regex, used = "", set()
    for i, piece in enumerate(re.split(r"\\(\d+)", template)):
      if i % 2 == 0:
        regex += re.escape(piece)
      else:
        g = int(piece)
        regex += f"(?P=g{g})" if g in used else f"(?P<g{g}>{groups[g - 1]})"
        used.add(g)
    if used != set(range(1, len(groups) + 1)):
      raise ValueError(f"cannot invert {pattern!r} -> {template!r}: the template drops a group")
    if transform not in INVERSE:
      raise ValueError(f"cannot invert {pattern!r}: {transform.__name__} has no entry in INVERSE")
    out.append((regex, name, INVERSE[transform]))
  return out


def _lookup(compiled, name: str):
  """(the first matching rule's expanded target, its transform), or None: tables are ordered."""
  for regex, template, transform in compiled:
    m = regex.fullmatch(name)
    if m:
      return m.expand(template), transform
  return None


def exit_status(convert, *args, **kwargs) -> int:
  """A converter's CLI exit status: 0, or 1 with the refusal on stderr in one line (as every
  entry point: a ValueError or OSError, its traceback with SAMCLIP_TRACEBACK=1)."""
  from samclip_jax import cli
  try:
    convert(*args, **kwargs)
  except (ValueError, OSError) as e:
    if cli.traceback_asked():
      raise
    cli.say_error(e)
    return 1
  return 0


def unapply_table(params: Mapping, inverse_rules: Sequence[Rule], source: str = "model") -> dict[str, np.ndarray]:
  """Flax params -> {PyTorch name: numpy array} through invert_rules' table; every parameter must map, once."""
  compiled = [(re.compile(p), t, f) for p, t, f in inverse_rules]
  out, unmapped, twice = {}, [], []
  for path, value in flatten(params).items():
    found = _lookup(compiled, path)
    if found is None:
      unmapped.append(f"{path} {tuple(np.shape(value))}")
      continue
    name, transform = found
    if name in out:
      twice.append(f"{path} -> {name}")
    out[name] = np.array(transform(np.asarray(value)), order="C")  # a writable copy, as torch.from_numpy wants
  problems = [f"{len(items)} {title}:\n    " + "\n    ".join(items[:50])
              for title, items in (("parameters no rule maps", unmapped), ("PyTorch names written twice", twice))
              if items]
  if problems:
    raise CheckpointError(f"{source} does not match the table:\n  " + "\n  ".join(problems))
  return out


def check_output_place(output: str, source: str) -> None:
  """Refuses an --output that holds the input or the current directory, or lies inside an input directory."""
  out = os.path.realpath(output)
  for what, path in (("the input checkpoint", os.path.realpath(source)),
                     ("the current directory", os.path.realpath(os.getcwd()))):
    if os.path.commonpath([out, path]) == out:
      raise CheckpointError(f"--output {output} would replace {what} ({path}); choose a new directory")
  src = os.path.realpath(source)
  if os.path.isdir(src) and os.path.commonpath([out, src]) == src:  # a file input has no inside
    raise CheckpointError(f"--output {output} lies inside the input {source}; choose a directory outside it")


def check_output(output: str, checkpoint: str, overwrite: bool) -> None:
  """Refuses, before anything is read, an --output whose replacement would destroy what we did not write."""
  from samclip_jax import checkpoint as ckpt  # Orbax and jax: only for converting.
  check_output_place(output, checkpoint)
  out = os.path.realpath(output)
  if ckpt.is_model_dir(out) and not overwrite:
    raise CheckpointError(f"--output {output} holds a previous model "
                          f"({ckpt.load_config(out)['model_type']!r}); pass --overwrite to replace it")
  refusal = ckpt.replace_refusal(out)
  if refusal:
    raise CheckpointError(f"--output: {refusal}")


def summary(params) -> str:
  """'93.7M params, 374.7 MB' for a params tree."""
  leaves = list(flatten(params).values())
  n = sum(int(np.prod(x.shape)) for x in leaves)
  size = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
  return f"{n / 1e6:.1f}M params, {size / 1e6:.1f} MB"
