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
