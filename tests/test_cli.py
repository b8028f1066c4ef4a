"""Command-line glue (samclip_jax/cli.py): --help exits 0 and shows the config's fields,
files keep the umask's permissions, progress lines with ETA, counted nouns."""
import os
import subprocess
import sys

import pytest

from samclip_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(*args, timeout=120, **env):
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu", **env})


def test_help_exits_0_and_tells_how_to_see_the_fields():
  run = _python("samclip_jax.main", "--help")
  assert run.returncode == 0, run.stderr[-2000:]
  assert "--workdir" in run.stdout and "--config=FILE[:ARG] --help" in run.stdout


def test_help_lists_config_fields_with_comments():
  run = _python("samclip_jax.evaluate", "--config=configs/eval/retrieval.py:local", "--help")
  assert run.returncode == 0, run.stderr[-2000:]
  lines = run.stdout.splitlines()
  i = lines.index("  data.captions_file = ''")
  assert "JSON list of" in lines[i + 1]                     # the comment above the field
  assert "  model = '/tmp/samclip_local'" in lines           # :local's default model
  assert any("global images per step" in line for line in lines)   # from configs/eval/common.py
  bad = _python("samclip_jax.evaluate", "--config=configs/eval/nope.py", "--help")
  assert bad.returncode == 2 and "no such file" in bad.stderr


@pytest.mark.parametrize("args,code,message", [
    (("samclip_jax.main", "--config=configs/merge.py:local", "--config.foo=1"), 2,
     "--config.foo: configs/merge.py:local has no field 'foo'"),
    (("samclip_jax.main", "--config=configs/merge.py:bogus"), 2, "unknown config arg(s) ['bogus']"),
    (("samclip_jax.main", "--config=configs/merge.py:local", "--config.total_steps=-5"), 1,
     "total_steps must be positive"),
    (("samclip_jax.world_eval", "--model", "samclip_jax/assets/teachers/clip", "--text"), 1,
     "holds a 'open_clip' model, expected 'samclip'"),
    (("samclip_jax.study", "--config=configs/merge.py:local", "--workdir=/nonexistent/w"), 2,
     "--config=configs/merge.py:local is a config for python -m samclip_jax.main, not for python -m samclip_jax.study"),
], ids=["unknown-field", "unknown-arg", "bad-value", "wrong-model", "another-entry-points-config"])
def test_user_errors_are_one_line(tmp_path, args, code, message):
  """Bad input gets one line naming the problem and a non-zero exit, no traceback, and the
  workdir is not created; SAMCLIP_TRACEBACK=1 brings the traceback back."""
  workdir = str(tmp_path / "w")
  args += (f"--workdir={workdir}",) if args[0] == "samclip_jax.main" else ()
  run = _python(*args)
  assert run.returncode == code, run.stderr[-2000:]
  assert message in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
  assert not os.path.exists(workdir)
  if code == 1:
    again = _python(*args, **{cli.TRACEBACK_ENV: "1"})
    assert "Traceback" in again.stderr and message in again.stderr


def test_a_config_for_another_entry_point_is_named(tmp_path):
  """Each entry point takes its own configs; another's (or a file that is no config) is one
  UsageError naming what it is, not an AttributeError from deep inside."""
  configs = {"samclip_jax.main": ["configs/merge.py:local", "configs/teachers.py:clip"],
             "samclip_jax.evaluate": ["configs/eval/classification.py:local", "configs/eval/retrieval.py"],
             "samclip_jax.extract": ["configs/extract.py"], "samclip_jax.study": ["configs/study.py:tiny"]}
  for entry in configs:
    for owner, specs in configs.items():
      for spec in specs:
        if owner == entry:
          cli.check_config([f"--config={spec}"], entry)
        else:
          with pytest.raises(cli.UsageError, match=f"is a config for python -m {owner}, not for python -m {entry}"):
            cli.check_config([f"--config={spec}"], entry)
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  (tmp_path / "own.py").write_text("import ml_collections\ndef get_config():\n  return ml_collections.ConfigDict({'lr': 1})\n")
  for spec, message in (("configs/common.py", "has no get_config\\(\\): not a config file"),
                        ("README.md", "is not a Python config file"),
                        (str(tmp_path), "is a directory, not a config file"),
                        (str(tmp_path / "broken.py"), "cannot load .*broken.py: SyntaxError"),
                        (str(tmp_path / "own.py"), "is not a config for python -m samclip_jax.main \\(no task, total_steps\\)")):
    with pytest.raises(cli.UsageError, match=message):
      cli.check_config([f"--config={spec}"], "samclip_jax.main")


def test_workdir_tilde_is_expanded_and_empty_refused(monkeypatch):
  """bash leaves --workdir=~/x alone (runs went into a directory named '~' under the current
  one); an empty --workdir would be the current directory."""
  monkeypatch.setenv("HOME", "/home/someone")
  assert cli.expand_workdir(["--config=c.py", "--workdir=~/runs/a", "--config.seed=1"]) == [
      "--config=c.py", "--workdir=/home/someone/runs/a", "--config.seed=1"]
  assert cli.expand_workdir(["--workdir", "~/b"]) == ["--workdir", "/home/someone/b"]
  assert cli.expand_workdir(["--workdir=/abs/~x"]) == ["--workdir=/abs/~x"]
  for argv in (["--workdir="], ["--workdir", " "]):
    with pytest.raises(cli.UsageError, match="--workdir is empty"):
      cli.expand_workdir(argv)


def test_comments_of_a_config(tmp_path):
  src = tmp_path / "cfg.py"
  src.write_text('import ml_collections\n\n\ndef get_config(arg=""):\n'
                 '  c = ml_collections.ConfigDict()\n'
                 '  # ---- section\n'
                 '  # Two lines\n  # above.\n  c.a = 1  # and a # in it\n'
                 '  c.b = "#not a comment"\n  c.s = ml_collections.ConfigDict()\n  c.s.x = 2  # nested\n'
                 '  return c\n')
  assert cli._comments(str(src)) == {"a": "Two lines above. and a # in it", "s.x": "nested"}
  text = cli.config_help(str(src))
  assert "  b = '#not a comment'" in text and "  s.x = 2\n      nested" in text


def test_atomic_write_respects_umask(tmp_path):
  old = os.umask(0o027)
  try:
    path = tmp_path / "out.json"
    with cli.atomic_write(str(path)) as tmp, open(tmp, "w") as f:
      f.write("{}")
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o640)
    with pytest.raises(RuntimeError):
      with cli.atomic_write(str(path)) as tmp:
        open(tmp, "w").write("half")
        raise RuntimeError("killed")
    assert path.read_text() == "{}" and os.listdir(tmp_path) == ["out.json"]
    # A place it cannot write: the error names the file asked for, not a temporary one.
    with pytest.raises(FileNotFoundError, match=r"cannot write .*/gone/out.json \(No such file"):
      with cli.atomic_write(str(tmp_path / "gone" / "out.json")):
        pass
  finally:
    os.umask(old)


def test_progress_eta_after_the_first_update(capsys, monkeypatch):
  clock = iter([0.0, 100.0, 110.0, 120.0, 130.0])    # the first update holds a 100 s compile
  monkeypatch.setattr(cli.time, "time", lambda: next(clock))
  p = cli.Progress("job", 4, "points")
  for _ in range(4):
    p.update(1)
  lines = capsys.readouterr().err.splitlines()
  assert lines[0] == "[job] 1/4 points, 0:01:40 elapsed"
  assert lines[1] == "[job] 2/4 points (0.1/s, ETA 0:00:20), 0:01:50 elapsed"   # 10 s a point, not 55
  assert lines[-1] == "[job] 4/4 points (0.1/s), 0:02:10 elapsed"


def test_plural():
  assert [cli.plural(n, "mask") for n in (0, 1, 2)] == ["0 masks", "1 mask", "2 masks"]


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
  """Ctrl-C in any entry point: 'interrupted' and exit 130 (128 + SIGINT), no traceback."""
  def interrupted():
    raise KeyboardInterrupt
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
  with pytest.raises(SystemExit) as e:
    cli.reported(interrupted)
  assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"
  monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
  with pytest.raises(KeyboardInterrupt):
    cli.reported(interrupted)
