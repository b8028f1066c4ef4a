"""Glue shared by the command-line entry points: absl runs with quiet logs and a --help that
exits 0 and lists the config's fields, errors of the user's input as one line, progress
lines, files written whole with the umask's permissions."""
import contextlib
import importlib.util
import io
import math
import os
import re
import sys
import tempfile
import time
import tokenize

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
TRACEBACK_ENV = "SAMCLIP_TRACEBACK"  # =1: user errors re-raise with their traceback
HELP_ARGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")


class UsageError(ValueError):
  """Bad command-line input or config (what to pass instead): one line on stderr, exit 2."""


def plural(n: int, noun: str) -> str:
  """'1 mask', '3 masks'."""
  return f"{n} {noun}{'' if n == 1 else 's'}"


# ----------------------------------------------------------------------------- files
def _umask() -> int:
  mask = os.umask(0)   # the only portable way to read it
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_write(path: str, suffix: str = "", prefix: str = ".tmp-"):
  """Yields a temporary path beside `path`, renamed over it on success, removed on error.

  mkstemp creates 0600 files: the result gets the permissions open() would give (0666 less
  the umask), so a picture or report is as readable as any other file the user writes.
  """
  try:
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=os.path.dirname(os.path.abspath(path)))
  except OSError as e:  # name the file asked for, not the temporary one
    raise OSError(e.errno, f"cannot write {path} ({e.strerror})") from None
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def differences(a, b, prefix: str = "") -> list[str]:
  """Dotted keys where two nested records (dicts) differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{prefix}{k}.")]
  return [] if a == b else [prefix.rstrip(".") or "value"]


def finite_or_none(obj):
  """obj with every non-finite float (a metric with nothing to measure) made None, so that
  json.dumps writes valid JSON (null, not NaN)."""
  if isinstance(obj, dict):
    return {k: finite_or_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_or_none(v) for v in obj]
  is_float = isinstance(obj, float) or getattr(getattr(obj, "dtype", None), "kind", "") == "f"
  if is_float and getattr(obj, "ndim", 0) == 0 and not math.isfinite(float(obj)):
    return None
  return obj


# ----------------------------------------------------------------------------- progress
def duration(seconds: float) -> str:
  """h:mm:ss (the training loop's ETA format)."""
  h, rem = divmod(int(max(seconds, 0)), 3600)
  m, s = divmod(rem, 60)
  return f"{h:d}:{m:02d}:{s:02d}"


class Progress:
  """About one line per 10% (and the last) on stderr: done/total, rate, ETA, elapsed.

  Rate and ETA are measured from the first update on, so the compile time of the first
  batch does not inflate them (the first line shows the elapsed time only).
  """

  def __init__(self, task: str, total: int, unit: str = "images", quiet: bool = False):
    self.task, self.total, self.unit, self.done = task, total, unit, 0
    self.quiet = quiet  # count, print nothing (e.g. processes other than 0 of a job)
    self.t0 = time.time()
    self.first = None      # (time, done) at the first update
    self.next = 0

  def update(self, n: int):
    self.done += n
    now = time.time()
    if self.first is None:
      self.first = (now, self.done)
    if self.quiet or (self.done < self.next and self.done < self.total):
      return
    self.next = self.done + max(1, self.total // 10)
    line = f"[{self.task}] {self.done}/{self.total} {self.unit}"
    t1, d1 = self.first
    if self.done > d1 and now > t1:
      rate = (self.done - d1) / (now - t1)
      line += f" ({rate:.1f}/s"
      line += f", ETA {duration((self.total - self.done) / rate)})" if self.done < self.total else ")"
    print(f"{line}, {duration(now - self.t0)} elapsed", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- config help
def _comments(path: str) -> dict[str, str]:
  """Dotted field -> its comment(s) in a config source: the block above `c.x.y = ...` and the
  comment at the end of that line."""
  with open(path) as f:
    source = f.read()
  lines = source.splitlines()
  trailing, full = {}, set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      row, col = tok.start
      text = tok.string.lstrip("#").strip()
      if lines[row - 1][:col].strip():
        trailing[row] = text
      elif not text.startswith("-"):   # "# ---- section" headers describe no field
        full.add(row)
  out = {}
  for row, line in enumerate(lines, 1):
    m = re.match(r"\s*[A-Za-z_]\w*((?:\.\w+)+)\s*=(?!=)", line)
    if not m:
      continue
    notes, r = [], row - 1
    while r in full:
      notes.insert(0, lines[r - 1].strip().lstrip("#").strip())
      r -= 1
    if row in trailing:
      notes.append(trailing[row])
    key = m.group(1)[1:]
    if notes and key not in out:
      out[key] = " ".join(notes)
  return out


def _leaves(config, prefix: str = ""):
  for k, v in config.items():
    if hasattr(v, "items"):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def _load_config(spec: str):
  """(module, config) of `--config=FILE[:ARG]`; a bad FILE or ARG is a UsageError."""
  path, _, arg = spec.partition(":")
  if os.path.isdir(path):
    raise UsageError(f"--config: {path!r} is a directory, not a config file")
  if not os.path.isfile(path):
    raise UsageError(f"--config: no such file {path!r}")
  if not path.endswith(".py"):
    raise UsageError(f"--config: {path!r} is not a Python config file (configs/*.py)")
  module_spec = importlib.util.spec_from_file_location("_config_for_help", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # the user's file: a syntax error, a failing import
    raise UsageError(f"--config: cannot load {path}: {type(e).__name__}: {e}") from None
  if not callable(getattr(module, "get_config", None)):
    raise UsageError(f"--config: {path} has no get_config(): not a config file (configs/*.py are)")
  try:
    return module, (module.get_config(arg) if arg else module.get_config())
  except ValueError as e:
    raise UsageError(f"--config={spec}: {e}") from None


# The fields that mark each entry point's config (configs/*.py): another one's is refused by name.
ENTRY_CONFIG_FIELDS = {
    "samclip_jax.main": ("task", "total_steps"),            # configs/merge.py, configs/teachers.py
    "samclip_jax.evaluate": ("task", "model", "max_images"),  # configs/eval/*.py
    "samclip_jax.extract": ("output_dir", "clip_checkpoint"),  # configs/extract.py
    "samclip_jax.study": ("variants", "wise_alpha"),          # configs/study.py
}


def check_config_kind(spec: str, entry: str, config=None) -> None:
  """A config written for another entry point is a UsageError naming the one it is for
  (`config`: the one `spec` gives, when already loaded)."""
  if config is None:
    _, config = _load_config(spec)
  has = lambda fields: all(f in config.keys() for f in fields)  # noqa: E731
  if has(ENTRY_CONFIG_FIELDS[entry]):
    return
  owner = next((e for e, fields in ENTRY_CONFIG_FIELDS.items() if has(fields)), None)
  missing = ", ".join(f for f in ENTRY_CONFIG_FIELDS[entry] if f not in config.keys())
  raise UsageError(f"--config={spec} is " + (f"a config for python -m {owner}" if owner else
                                              f"not a config for python -m {entry} (no {missing})")
                   + (f", not for python -m {entry}" if owner else ""))


def config_help(spec: str) -> str:
  """The fields of `--config=FILE[:ARG]` with their values and source comments."""
  path = spec.partition(":")[0]
  module, config = _load_config(spec)
  # Comments from the file, then from the config modules it builds on, and theirs
  # (configs/eval/common.py, which builds on configs/common.py).
  comments, sources, todo, seen = {}, [path], [module], set()
  while todo:
    for v in vars(todo.pop(0)).values():
      if (type(v) is type(module) and str(getattr(v, "__name__", "")).startswith("configs")
          and v.__name__ not in seen):
        seen.add(v.__name__)
        sources.append(getattr(v, "__file__", None))
        todo.append(v)
  for src in sources:
    if src:
      for k, v in _comments(src).items():
        comments.setdefault(k, v)
  lines = [f"Fields of --config={spec} (override any with --config.FIELD=VALUE):"]
  for key, value in _leaves(config):
    lines.append(f"  {key} = {value!r}")
    if key in comments:
      lines.append(f"      {comments[key]}")
  return "\n".join(lines)


def _config_arg(argv) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def help_text(doc: str, argv) -> str:
  """--help: the entry point's docstring, its flags, and how to see the config's fields."""
  from absl import flags
  prog = f"python -m {sys.modules['__main__'].__spec__.name}" if getattr(
      sys.modules["__main__"], "__spec__", None) else os.path.basename(argv[0])
  parts = [doc.strip(), "", "Flags:"]
  for name in ("config", "workdir"):
    if name in flags.FLAGS:
      parts.append(f"  --{name}: {flags.FLAGS[name].help}")
  parts.append("  --verbosity=0: show INFO logs (Orbax's per-checkpoint lines are hidden by default)")
  spec = _config_arg(argv[1:])
  if spec:
    parts += ["", config_help(spec)]
  else:
    parts += ["", "Config fields: give --config=FILE[:ARG] with --help to list FILE's fields with their "
              f"values and comments (`{prog} --config=FILE[:ARG] --help`); override any field with "
              "--config.FIELD=VALUE. All absl flags: --helpfull."]
  if "--helpfull" in argv:
    parts += ["", flags.FLAGS.get_help()]
  return "\n".join(parts)


# ----------------------------------------------------------------------------- running
def reported(fn, *args):
  """fn(*args), with errors of the user's input as one line on stderr instead of a traceback:
  a UsageError exits 2; a ValueError or OSError (a config value, a file, a model directory)
  exits 1, Ctrl-C 130, unless SAMCLIP_TRACEBACK=1 asks for the traceback."""
  try:
    return fn(*args)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
  except (ValueError, OSError) as e:
    if traceback_asked():
      raise
    say_error(e)
    sys.exit(EXIT_FAILURE)
  except KeyboardInterrupt:   # Ctrl-C: the user knows why; a training run has said how to resume
    if traceback_asked():
      raise
    print("interrupted", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


def traceback_asked() -> bool:
  return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def say_error(e: BaseException) -> None:
  """A user's error in one line on stderr, and how to see its traceback."""
  print(f"error: {e}\n(the traceback: rerun with {TRACEBACK_ENV}=1)", file=sys.stderr)


def check_config(argv, entry: str | None = None) -> None:
  """The config is one for `entry`, and every --config.FIELD=VALUE names a field of it, else
  one UsageError naming the problem (ml_collections raises a bare AttributeError from inside
  absl's flag parsing)."""
  spec = _config_arg(argv)
  if not spec:
    return
  _, config = _load_config(spec)
  if entry:
    check_config_kind(spec, entry, config)
  for a in argv:
    if not a.startswith("--config."):
      continue
    key = a[len("--config."):].split("=", 1)[0]
    node = config
    for part in key.split("."):
      if not (hasattr(node, "keys") and part in node.keys()):
        raise UsageError(f"--config.{key}: {spec} has no field {key!r} "
                         f"(its fields: --config={spec} --help)")
      node = node[part]


def expand_workdir(argv: list[str]) -> list[str]:
  """--workdir=~/x as the shell expands --workdir ~/x (it does not after '='; the run went
  into a directory named '~'); an empty --workdir (the current directory) is a UsageError."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--workdir="):
      value, prefix = a[len("--workdir="):], "--workdir="
    elif a == "--workdir" and i + 1 < len(out):
      value, prefix, i = out[i + 1], "", i + 1
    else:
      continue
    if not value.strip():
      raise UsageError("--workdir is empty: give the run's directory")
    out[i] = prefix + os.path.expanduser(value)
  return out


def run(main, doc: str, entry: str | None = None):
  """absl's app.run for an entry point (`entry`, its module: the config must be one for it):
  --help exits 0 (absl's exits 1) and lists the config's fields; Orbax's INFO lines are hidden
  unless --verbosity is given; a UsageError is printed as one line (exit 2)."""
  from absl import app, flags, logging
  argv = sys.argv
  if any(a in HELP_ARGS for a in argv[1:]):
    try:
      print(help_text(doc, argv), flush=True)
    except BrokenPipeError:   # `--help | head`: the reader left early, which is fine
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except UsageError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(EXIT_USAGE)
    sys.exit(0)

  def quiet_main(args):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)   # Orbax logs every checkpoint step at INFO
    return reported(main, args)

  reported(check_config, argv[1:], entry)
  app.run(quiet_main, argv=[argv[0]] + reported(expand_workdir, argv[1:]))
