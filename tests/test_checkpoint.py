"""samclip_jax/checkpoint.py save_model: what it may replace (only model directories of ours)."""
import os

import numpy as np
import pytest

from samclip_jax import checkpoint

PARAMS = {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}


def _save(directory, value=0.0, model_type="sam"):
  checkpoint.save_model(str(directory), {"dense": {"kernel": PARAMS["dense"]["kernel"] + value}},
                        {"model_type": model_type})


def _kernel(directory):
  return np.asarray(checkpoint.load_model(str(directory))[0]["dense"]["kernel"])


def test_refuses_a_directory_that_is_not_ours(tmp_path):
  """save_model removed any existing directory whole before renaming its own into place."""
  user = tmp_path / "user"
  user.mkdir()
  (user / "thesis.tex").write_text("years of work")
  with pytest.raises(ValueError, match="not a samclip_jax model directory"):
    _save(user)
  assert os.listdir(user) == ["thesis.tex"]
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(ValueError, match="not a directory"):
    _save(tmp_path / "a_file")
  assert sorted(os.listdir(tmp_path)) == ["a_file", "user"]  # no temporary left


def test_replaces_its_own_directory_whole_and_nothing_else(tmp_path):
  """A previous export (with a nested text_model/) is replaced, stale parts included; a stray user file blocks it."""
  export = tmp_path / "export"
  _save(export, 0.0, "samclip")
  _save(export / "text_model", 0.0, "open_clip")
  _save(export, 1.0, "samclip")
  assert sorted(os.listdir(export)) == ["config.json", "params"]
  np.testing.assert_array_equal(_kernel(export), PARAMS["dense"]["kernel"] + 1.0)
  (export / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="notes.txt"):
    _save(export, 2.0, "samclip")
  np.testing.assert_array_equal(_kernel(export), PARAMS["dense"]["kernel"] + 1.0)
  assert (export / "notes.txt").read_text() == "mine"
  assert sorted(os.listdir(tmp_path)) == ["export"]


def test_empty_directory_and_symlink(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  _save(empty)
  np.testing.assert_array_equal(_kernel(empty), PARAMS["dense"]["kernel"])
  os.symlink(empty, tmp_path / "link")
  _save(tmp_path / "link", 5.0)  # written where the link points; the link stays
  assert os.path.islink(tmp_path / "link")
  np.testing.assert_array_equal(_kernel(empty), PARAMS["dense"]["kernel"] + 5.0)


def test_restores_into_a_target_layout_and_only_the_subtrees_it_names(tmp_path):
  """init_from and the merge's teachers restore straight into the run's shardings (each host
  reads its shards: no full copy on one device first); a CLIP teacher restores its image tower only."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from samclip_jax import sharding
  params = {"visual": {"kernel": np.arange(32, dtype=np.float32).reshape(8, 4)},
            "text": {"embedding": np.ones((3, 5), np.float32)}}
  checkpoint.save_model(str(tmp_path / "m"), params, {"model_type": "clip"})
  mesh = jax.make_mesh((8,), ("fsdp",), devices=jax.devices()[:8])
  row = NamedSharding(mesh, P("fsdp"))
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  shardings = {"visual": {"kernel": row}, "text": {"embedding": sharding.replicated(mesh)}}
  whole, _ = checkpoint.load_model(str(tmp_path / "m"), "clip", target=sharding.shaped(shapes, shardings))
  for path, leaf in jax.tree_util.tree_leaves_with_path(whole):
    name = jax.tree_util.keystr(path)
    assert leaf.sharding == (row if "visual" in name else sharding.replicated(mesh)), name
  np.testing.assert_array_equal(np.asarray(whole["visual"]["kernel"]), params["visual"]["kernel"])
  np.testing.assert_array_equal(np.asarray(whole["text"]["embedding"]), params["text"]["embedding"])
  assert {s.data.shape for s in whole["visual"]["kernel"].addressable_shards} == {(1, 4)}

  part, _ = checkpoint.load_model(str(tmp_path / "m"), "clip", partial=True,
                                  target={"visual": sharding.shaped(shapes["visual"], shardings["visual"])})
  assert list(part) == ["visual"]
  np.testing.assert_array_equal(np.asarray(part["visual"]["kernel"]), params["visual"]["kernel"])
  with pytest.raises(ValueError, match="not compatible with the stored shape"):  # never truncated
    bad = {"visual": {"kernel": jax.ShapeDtypeStruct((4, 8), np.float32, sharding=sharding.replicated(mesh))}}
    checkpoint.load_model(str(tmp_path / "m"), "clip", partial=True, target=bad)


def test_weights_with_nan_or_inf_are_refused(tmp_path):
  """A diverged or corrupted model would answer every query with garbage, silently: refused
  at load, naming the tensor."""
  for bad in (np.nan, np.inf):
    kernel = PARAMS["dense"]["kernel"].copy()
    kernel[1, 2] = bad
    checkpoint.save_model(str(tmp_path / "m"), {"dense": {"kernel": kernel}, "ok": np.zeros(2, np.float32)},
                          {"model_type": "sam"})
    with pytest.raises(ValueError, match=r"NaN or infinite values \(first in \['dense'\]\['kernel'\]\)"):
      checkpoint.load_model(str(tmp_path / "m"))
  _save(tmp_path / "m")  # finite again: loads
  np.testing.assert_array_equal(_kernel(tmp_path / "m"), PARAMS["dense"]["kernel"])


def test_broken_model_directories_are_named(tmp_path):
  """A truncated or foreign config.json, or a missing params/, is an error naming the file."""
  _save(tmp_path / "m")
  config = tmp_path / "m" / checkpoint.CONFIG_FILE
  text = config.read_text()
  config.write_text(text[: len(text) // 2])
  with pytest.raises(ValueError, match=f"{config} is not valid JSON"):
    checkpoint.load_model(str(tmp_path / "m"))
  config.write_text("[1, 2]")
  with pytest.raises(ValueError, match="holds a list, not a model config"):
    checkpoint.load_model(str(tmp_path / "m"))
  config.write_text(text)
  import shutil
  shutil.rmtree(tmp_path / "m" / checkpoint.PARAMS_DIR)
  with pytest.raises(FileNotFoundError, match="has no params/"):
    checkpoint.load_model(str(tmp_path / "m"))


def _corrupt_weights(model_dir, how):
  """Every weight data file under params/: bytes flipped in the middle, or cut to 100 bytes."""
  import glob
  files = [f for f in glob.glob(os.path.join(model_dir, checkpoint.PARAMS_DIR, "**", "d", "*"), recursive=True)
           if os.path.getsize(f) > 1000]
  assert files
  for f in files:
    data = bytearray(open(f, "rb").read())
    if how == "flip":
      data[len(data) // 2: len(data) // 2 + 64] = bytes(255 - b for b in data[len(data) // 2: len(data) // 2 + 64])
    else:
      data = data[:100]
    open(f, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupt_weights_are_one_clear_error(tmp_path, how):
  """Damaged weight files (a bad copy, a full disk): load_model names the directory; on the
  command line one line, with none of the dozens of 'Event loop is closed' tracebacks that
  Orbax's reads still in flight used to print after it."""
  import shutil
  import subprocess
  import sys
  from configs.common import shipped_teacher
  model = str(tmp_path / "sam")
  shutil.copytree(shipped_teacher("sam"), model)
  _corrupt_weights(model, how)
  with pytest.raises(ValueError, match=r"sam: the weights in params/ cannot be read \(corrupt or truncated"):
    checkpoint.load_model(model)
  done = subprocess.run([sys.executable, "-m", "samclip_jax.world_eval", "--model", model, "--scenes", "1"],
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 1
  assert done.stderr.startswith(f"error: {model}: the weights in params/ cannot be read"), done.stderr[-3000:]
  assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 2, done.stderr[-3000:]
