"""convert/sam.py: round trip, variant inference, and every way a checkpoint can be wrong."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from convert.common import CheckpointError, flatten
from convert.sam import convert_sam, infer_variant
from samclip_jax.models.sam import load_sam
from sam_reference import TINY, build_torch_sam

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_state():
  return build_torch_sam(TINY, seed=2).state_dict()


@pytest.fixture(scope="module")
def tiny_pth(tiny_state, tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
  torch.save(tiny_state, path)
  return str(path)


def _save(state, tmp_path, name="bad.pth"):
  path = tmp_path / name
  torch.save(state, path)
  return str(path)


def _assert_nothing_written(out):
  assert not os.path.exists(out)
  parent = os.path.dirname(out)
  assert not [f for f in os.listdir(parent) if ".tmp-" in f], os.listdir(parent)


# ---------------------------------------------------------------- good checkpoints
def test_round_trip_matches_torch_tensors(tiny_pth, tiny_state, tmp_path):
  out = str(tmp_path / "sam_tiny")
  config, params = convert_sam(tiny_pth, out, config=TINY, verbose=False)
  cfg2, loaded = load_sam(out)
  assert cfg2 == config == TINY
  a, b = flatten(params), flatten(loaded)
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
  sd = {k: v.numpy() for k, v in tiny_state.items()}
  # Spot checks of each transform against the torch tensors.
  eq = np.testing.assert_array_equal
  eq(b["image_encoder/blocks_1/attn/qkv/kernel"], sd["image_encoder.blocks.1.attn.qkv.weight"].T)
  eq(b["image_encoder/neck_2/kernel"], sd["image_encoder.neck.2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(b["image_encoder/neck_1/weight"], sd["image_encoder.neck.1.weight"])
  eq(b["prompt_encoder/point_embeddings_3/embedding"], sd["prompt_encoder.point_embeddings.3.weight"])
  np.testing.assert_array_equal(b["mask_decoder/output_upscaling_0/kernel"],
                                sd["mask_decoder.output_upscaling.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(b["mask_decoder/transformer/layers_1/norm4/scale"],
                                sd["mask_decoder.transformer.layers.1.norm4.weight"])
  assert len(a) == len(sd)


def test_safetensors_and_wrapped_state_dicts(tiny_state, tiny_pth, tmp_path):
  from safetensors.torch import save_file
  st = tmp_path / "sam_tiny.safetensors"
  save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(st))
  _, p1 = convert_sam(str(st), str(tmp_path / "a"), config=TINY, verbose=False)
  wrapped = _save({"model": dict(tiny_state)}, tmp_path, "wrapped.pth")
  _, p2 = convert_sam(wrapped, str(tmp_path / "b"), config=TINY, verbose=False)
  _, p0 = convert_sam(tiny_pth, str(tmp_path / "c"), config=TINY, verbose=False)
  for k, v in flatten(p0).items():
    np.testing.assert_array_equal(flatten(p1)[k], v)
    np.testing.assert_array_equal(flatten(p2)[k], v)


def _fake_encoder_state(dim, depth):
  """Only what the variant is read from: patch embedding and block indices."""
  return {"image_encoder.patch_embed.proj.weight": np.zeros((dim, 3, 16, 16), np.float32),
          **{f"image_encoder.blocks.{i}.norm1.weight": np.zeros((dim,), np.float32) for i in range(depth)}}


@pytest.mark.parametrize("name,dim,depth", [("vit_b", 768, 12), ("vit_l", 1024, 24), ("vit_h", 1280, 32)])
def test_infer_variant(name, dim, depth):
  assert infer_variant(_fake_encoder_state(dim, depth))[0] == name


def test_infer_variant_unknown():
  assert infer_variant(_fake_encoder_state(64, 2))[0] is None
  variant, why = infer_variant({"fc.weight": np.zeros((2, 2))})
  assert variant is None and "not a SAM checkpoint" in why


# ---------------------------------------------------------------- bad checkpoints
def _convert_error(path, out, **kw):
  with pytest.raises(CheckpointError) as e:
    convert_sam(path, out, verbose=False, **kw)
  _assert_nothing_written(out)
  return str(e.value)


def test_wrong_variant_vit_l_shapes_as_vit_b(tmp_path):
  state = {k: torch.from_numpy(v) for k, v in _fake_encoder_state(1024, 24).items()}
  msg = _convert_error(_save(state, tmp_path), str(tmp_path / "out"), model="vit_b")
  assert "--model vit_b but the checkpoint's shapes say vit_l" in msg
  assert "shape mismatches" in msg and "image_encoder.patch_embed.proj.weight" in msg
  assert "parameters missing" in msg


def test_tiny_sam_as_vit_b(tiny_pth, tmp_path):
  msg = _convert_error(tiny_pth, str(tmp_path / "out"), model="vit_b")
  assert "shape mismatches" in msg and "image_encoder/pos_embed" in msg


def test_non_sam_state_dict(tmp_path):
  state = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).state_dict()
  path = _save(state, tmp_path)
  msg = _convert_error(path, str(tmp_path / "out"), model="vit_b")
  assert "not a SAM checkpoint" in msg and "unexpected keys" in msg and "0.weight" in msg
  msg = _convert_error(path, str(tmp_path / "out"))
  assert "cannot infer the SAM variant" in msg and "pass --model" in msg


def test_truncated_file(tiny_pth, tmp_path):
  data = open(tiny_pth, "rb").read()
  path = tmp_path / "truncated.pth"
  path.write_bytes(data[: len(data) // 2])
  msg = _convert_error(str(path), str(tmp_path / "out"), config=TINY)
  assert "cannot be read" in msg and "truncated" in msg


class _Payload:
  """Pickles to a call of os.mkdir: what weights_only=True exists to refuse."""

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (os.mkdir, (self.target,))


def test_arbitrary_object_pickle_is_refused(tmp_path):
  marker = str(tmp_path / "payload_ran")
  path = _save({"image_encoder.pos_embed": torch.zeros(1), "extra": _Payload(marker)}, tmp_path)
  msg = _convert_error(path, str(tmp_path / "out"), config=TINY)
  assert "weights_only" in msg
  assert not os.path.exists(marker)


def test_extra_missing_misshaped_reported_together(tiny_state, tiny_pth, tmp_path):
  state = dict(tiny_state)
  state["mask_decoder.extra_head.weight"] = torch.zeros(3, 3)
  del state["mask_decoder.iou_token.weight"]
  state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, TINY.prompt_embed_dim + 1)
  out = tmp_path / "out"
  _, previous = convert_sam(tiny_pth, str(out), config=TINY, verbose=False)
  before = sorted(os.listdir(out))
  with pytest.raises(CheckpointError) as e:
    convert_sam(_save(state, tmp_path), str(out), config=TINY, verbose=False, overwrite=True)
  msg = str(e.value)
  assert "1 unexpected keys" in msg and "mask_decoder.extra_head.weight (3, 3)" in msg
  # A mis-shaped parameter is reported once, as a mismatch, not again as missing.
  assert "1 parameters missing" in msg and "mask_decoder/iou_token/embedding" in msg
  assert "1 shape mismatches" in msg and "prompt_encoder.no_mask_embed.weight" in msg
  # A failed conversion leaves the previous output whole, even with overwrite.
  assert sorted(os.listdir(out)) == before
  for k, v in flatten(load_sam(str(out))[1]).items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(flatten(previous)[k]), err_msg=k)
  assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_int64_and_nan_tensors_refused_together(tiny_state, tmp_path):
  """Integer weights were cast to float and NaN weights converted, both silently."""
  state = dict(tiny_state)
  state["mask_decoder.iou_token.weight"] = state["mask_decoder.iou_token.weight"].long()
  nan = state["image_encoder.neck.1.bias"].clone()
  nan[0] = float("nan")
  state["image_encoder.neck.1.bias"] = nan
  state["prompt_encoder.no_mask_embed.weight"] = torch.full_like(state["prompt_encoder.no_mask_embed.weight"],
                                                                 float("inf"))
  msg = _convert_error(_save(state, tmp_path), str(tmp_path / "out"), config=TINY)
  assert "1 dtype mismatches" in msg and "mask_decoder.iou_token.weight int64" in msg
  assert "2 non-finite tensors" in msg
  assert f"image_encoder.neck.1.bias: 1 of {nan.numel()} values are NaN or infinite" in msg
  assert "prompt_encoder.no_mask_embed.weight" in msg
  assert "parameters missing" not in msg  # a rejected tensor is reported once


@pytest.mark.parametrize("mutate", ["extra", "missing"])
def test_single_key_problems(tiny_state, tmp_path, mutate):
  state = dict(tiny_state)
  if mutate == "extra":
    state["image_encoder.blocks.7.attn.qkv.weight"] = torch.zeros(4, 4)  # a block the model lacks
    want = "image_encoder.blocks.7.attn.qkv.weight -> image_encoder/blocks_7/attn/qkv/kernel (no such Flax parameter)"
  else:
    del state["image_encoder.neck.3.bias"]
    want = "image_encoder/neck_3/bias"
  msg = _convert_error(_save(state, tmp_path), str(tmp_path / "out"), config=TINY)
  assert want in msg


def test_cli_failure_exit_code_and_no_output(tmp_path):
  bad = tmp_path / "not_a_checkpoint.pth"
  bad.write_bytes(b"definitely not a zip file")
  out = tmp_path / "out"
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "convert.sam", "--checkpoint", str(bad), "--output", str(out),
                      "--model", "vit_b"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert r.returncode != 0
  assert "error:" in r.stderr and "cannot be read" in r.stderr
  _assert_nothing_written(str(out))


def test_cli_rejects_unknown_model(tiny_pth, tmp_path):
  from convert.sam import main
  with pytest.raises(SystemExit) as e:
    main(["--checkpoint", tiny_pth, "--output", str(tmp_path / "out"), "--model", "vit_x"])
  assert e.value.code != 0
  assert main(["--checkpoint", tiny_pth, "--output", str(tmp_path / "out")]) == 1  # tiny: no variant fits
  _assert_nothing_written(str(tmp_path / "out"))


# ---------------------------------------------------------------- where the output goes
def _files(root):
  """{relative path: bytes} of every file under root."""
  return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
          for d, _, files in os.walk(root) for f in files}


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_holding_the_checkpoint_is_refused(tiny_pth, tmp_path, overwrite):
  """--output ck for ck/sam.pth used to delete ck/ whole, the checkpoint and the user's files."""
  ck = tmp_path / "ck"
  ck.mkdir()
  (ck / "sam.pth").write_bytes(open(tiny_pth, "rb").read())
  (ck / "notes.txt").write_text("mine")
  before = _files(tmp_path)
  with pytest.raises(CheckpointError, match="would replace the input checkpoint"):
    convert_sam(str(ck / "sam.pth"), str(ck), config=TINY, verbose=False, overwrite=overwrite)
  assert _files(tmp_path) == before


def test_output_cwd_or_user_directory_is_refused(tiny_pth, tmp_path, monkeypatch, capsys):
  """--output . emptied the current directory; any other non-empty directory is refused too."""
  from convert.sam import main
  work = tmp_path / "work"
  work.mkdir()
  (work / "data.txt").write_text("mine")
  monkeypatch.chdir(work)
  with pytest.raises(CheckpointError, match="would replace the current directory"):
    convert_sam(tiny_pth, ".", config=TINY, verbose=False, overwrite=True)
  assert main(["--checkpoint", tiny_pth, "--output", "."]) == 1
  assert "would replace the current directory" in capsys.readouterr().err
  other = tmp_path / "other"
  other.mkdir()
  (other / "data.txt").write_text("mine too")
  with pytest.raises(CheckpointError, match="not a samclip_jax model directory"):
    convert_sam(tiny_pth, str(other), config=TINY, verbose=False, overwrite=True)
  assert os.listdir(work) == ["data.txt"] and os.listdir(other) == ["data.txt"]
  assert sorted(os.listdir(tmp_path)) == ["other", "work"]


def test_overwrite_replaces_only_a_previous_output(tiny_state, tiny_pth, tmp_path):
  """A previous conversion needs --overwrite; then nothing of it stays, and files of others are never replaced."""
  out = tmp_path / "sam"
  convert_sam(tiny_pth, str(out), config=TINY, verbose=False)
  first = _files(out)
  (out / "params" / "stale_shard").write_bytes(b"from an older save")  # ours: params/ is replaced whole
  (out / "vocab.json").write_text("{}")                                 # ours: an earlier CLIP conversion's
  changed = {k: v + 1 if v.is_floating_point() else v for k, v in tiny_state.items()}
  path = _save(changed, tmp_path, "changed.pth")
  with pytest.raises(CheckpointError, match="pass --overwrite"):
    convert_sam(path, str(out), config=TINY, verbose=False)
  old_umask = os.umask(0o002)
  try:
    _, params = convert_sam(path, str(out), config=TINY, verbose=False, overwrite=True)
  finally:
    os.umask(old_umask)
  assert sorted(os.listdir(out)) == ["config.json", "params"]
  assert not os.path.exists(out / "params" / "stale_shard")
  assert _files(out) != first
  for k, v in flatten(load_sam(str(out))[1]).items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(flatten(params)[k]), err_msg=k)
  assert oct(os.stat(out).st_mode & 0o777) == oct(0o775)                 # the umask, not 0700
  assert oct(os.stat(out / "config.json").st_mode & 0o777) == oct(0o664)
  assert sorted(os.listdir(tmp_path)) == ["changed.pth", "sam"]          # no temporary left
  (out / "README.md").write_text("my notes")                            # not ours: never replaced
  with pytest.raises(CheckpointError, match="README.md"):
    convert_sam(path, str(out), config=TINY, verbose=False, overwrite=True)
  assert (out / "README.md").read_text() == "my notes"
