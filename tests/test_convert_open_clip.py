"""convert/open_clip.py: round trips through every file layout, and every bad-checkpoint path."""
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP as TorchCLIP
from safetensors.torch import save_file

from convert import open_clip as convert
from convert.common import CheckpointError
from samclip_jax import checkpoint
from samclip_jax.models import clip
from samclip_jax.tokenizer import Tokenizer

torch.set_num_threads(1)

TINY = {
  "embed_dim": 16,
  "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NotATensor:
  """A pickled object that torch.load(weights_only=True) refuses."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(torch model, its state dict, the open_clip config .json path)."""
  torch.manual_seed(0)
  model = TorchCLIP(**TINY).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():  # open_clip leaves LayerNorms/biases constant.
      if name.endswith("bias") or (p.ndim == 1 and name.endswith("weight")):
        p.add_(0.1 * torch.randn_like(p))
    model.logit_scale.fill_(3.0)
  root = tmp_path_factory.mktemp("ref")
  config_path = str(root / "tiny-clip.json")
  with open(config_path, "w") as f:
    json.dump(TINY, f)
  return model, model.state_dict(), config_path


def _flat(params):
  return {"/".join(k.key for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(params)}


def _write(path, state, layout):
  if layout.endswith("safetensors"):
    save_file({k: v.contiguous() for k, v in state.items()}, path)
  else:
    torch.save(state, path)
  return path


LAYOUTS = {
  "plain.pth": lambda s: dict(s),
  "wrapped_module.pth": lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}, "epoch": 3},
  "plain.safetensors": lambda s: dict(s),
  "module.safetensors": lambda s: {f"module.{k}": v for k, v in s.items()},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_round_trip(reference, tmp_path, layout):
  model, state, config_path = reference
  ckpt = _write(str(tmp_path / layout), LAYOUTS[layout](state), layout)
  out = str(tmp_path / "out")
  messages = []
  convert.convert_open_clip(config_path, ckpt, out, log=messages.append)
  assert any("converted tiny-clip" in m for m in messages)
  config, params = clip.load_clip(out)
  assert config == clip.ClipConfig.from_open_clip_config(TINY)
  meta = checkpoint.load_config(out)
  assert meta["model_type"] == "open_clip" and meta["open_clip_model"] == "tiny-clip"
  assert sorted(os.listdir(out)) == ["config.json", "merges.txt", "params", "vocab.json"]
  flat = _flat(params)
  np.testing.assert_array_equal(flat["visual/conv1/kernel"], state["visual.conv1.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(flat["transformer/resblocks_0/attn/in_proj/kernel"],
                                state["transformer.resblocks.0.attn.in_proj_weight"].numpy().T)
  np.testing.assert_array_equal(flat["logit_scale"], np.float32(3.0))
  x = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
  ids = open_clip.tokenize(["a cat", "a dog on a mat"]).numpy()
  module = clip.CLIP(config)
  encode_image = jax.jit(functools.partial(module.apply, method=clip.CLIP.encode_image))
  encode_text = jax.jit(functools.partial(module.apply, method=clip.CLIP.encode_text))
  with torch.no_grad():
    img_ref = model.encode_image(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    txt_ref = model.encode_text(torch.from_numpy(ids.astype(np.int64))).numpy()
  np.testing.assert_allclose(encode_image({"params": params}, x), img_ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(encode_text({"params": params}, ids), txt_ref, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(Tokenizer.from_directory(out)(["a cat"]), open_clip.tokenize(["a cat"]).numpy())


def test_cli_subprocess_and_user_tokenizer_files(reference, tmp_path):
  """The real entry point in a subprocess, then --vocab/--merges taken from its output."""
  _, state, config_path = reference
  ckpt = _write(str(tmp_path / "tiny.safetensors"), state, "safetensors")
  out = str(tmp_path / "tiny")
  result = subprocess.run([sys.executable, "-m", "convert.open_clip", "--model", config_path, "--checkpoint", ckpt,
                           "--output", out], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
  assert "[open_clip] mapping 38 tensors" in result.stderr
  assert "converted tiny-clip: 1.6M params, 6.5 MB" in result.stderr
  assert clip.load_clip(out)[0] == clip.ClipConfig.from_open_clip_config(TINY)
  out2 = str(tmp_path / "tiny_vocab")
  assert convert.main(["--model", config_path, "--checkpoint", ckpt, "--output", out2,
                       "--vocab", os.path.join(out, "vocab.json"), "--merges", os.path.join(out, "merges.txt")]) == 0
  assert checkpoint.load_config(out2)["tokenizer"]["source"].endswith("merges.txt")
  np.testing.assert_array_equal(Tokenizer.from_directory(out2)(["naïve café"]),
                                open_clip.tokenize(["naïve café"]).numpy())


def test_model_names(reference):
  """Bundled names, open_clip names found in the installed package's model_configs, config dicts."""
  assert convert.resolve_config("ViT-L-14") == ("ViT-L-14", clip.ClipConfig.from_name("ViT-L-14"))
  name, config = convert.resolve_config("ViT-L-16")  # not bundled: read from open_clip/model_configs
  assert name == "ViT-L-16" and config.vision.patch_size == 16 and config.vision.width == 1024
  assert convert.resolve_config(TINY)[1] == clip.ClipConfig.from_open_clip_config(TINY)
  with pytest.raises(ValueError, match="timm_model_name"):
    convert.resolve_config("ViT-B-16-SigLIP")


def _bad(state):
  """Bad checkpoints: name -> (state dict or writer, expected message fragments)."""
  extra = dict(state, **{"visual.extra_head.weight": torch.zeros(3)})
  missing = {k: v for k, v in state.items() if k != "visual.proj"}
  misshaped = dict(state, text_projection=torch.zeros(32, 17))
  return {
    "extra key": (extra, ["1 unexpected keys", "visual.extra_head.weight (3,)"]),
    "missing key": (missing, ["1 parameters missing", "visual/proj"]),
    "misshaped key": (misshaped, ["shape mismatches", "text_projection (32, 17)", "model expects (32, 16)"]),
  }


@pytest.mark.parametrize("case", ["extra key", "missing key", "misshaped key"])
def test_bad_state_dicts(reference, tmp_path, case, capsys):
  _, state, config_path = reference
  bad, fragments = _bad(state)[case]
  ckpt = _write(str(tmp_path / "bad.pth"), bad, "pth")
  out = str(tmp_path / "out")
  with pytest.raises(CheckpointError) as err:
    convert.convert_open_clip(config_path, ckpt, out, log=lambda m: None)
  for fragment in fragments:
    assert fragment in str(err.value)
  assert convert.main(["--model", config_path, "--checkpoint", ckpt, "--output", out]) == 1
  stderr = capsys.readouterr().err
  assert "error:" in stderr and fragments[0] in stderr
  assert not os.path.exists(out) and os.listdir(tmp_path) == ["bad.pth"]


def test_wrong_model_for_weights(reference, tmp_path, capsys):
  _, state, _ = reference
  ckpt = _write(str(tmp_path / "tiny.pth"), state, "pth")
  out = str(tmp_path / "out")
  assert convert.main(["--model", "ViT-B-16", "--checkpoint", ckpt, "--output", out]) == 1
  stderr = capsys.readouterr().err
  assert "(as open_clip ViT-B-16) does not match the model" in stderr
  assert "visual.conv1.weight (32, 3, 8, 8) -> visual/conv1/kernel" in stderr
  assert "model expects (16, 16, 3, 768)" in stderr
  assert "parameters missing from the checkpoint" in stderr  # resblocks 1..11
  assert not os.path.exists(out)


def test_unreadable_files(reference, tmp_path, capsys):
  _, state, config_path = reference
  good = _write(str(tmp_path / "good.pth"), state, "pth")
  with open(good, "rb") as f:
    data = f.read()
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(data[: len(data) // 2])
  pickled = str(tmp_path / "pickled.pth")
  torch.save({"visual.proj": NotATensor()}, pickled)
  bad_safetensors = tmp_path / "bad.safetensors"
  bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
  cases = [(str(truncated), "cannot be read as a PyTorch state dict"),
           (pickled, "weights_only=True"),
           (str(bad_safetensors), "cannot be read as safetensors"),
           (str(tmp_path / "absent.pth"), "checkpoint file not found")]
  for path, fragment in cases:
    out = str(tmp_path / "out")
    assert convert.main(["--model", config_path, "--checkpoint", path, "--output", out]) == 1, path
    stderr = capsys.readouterr().err
    assert fragment in stderr, (path, stderr)
    assert not os.path.exists(out)
  # An unknown model name and half a tokenizer are refused before anything is read.
  assert convert.main(["--model", "ViT-Q-99", "--checkpoint", good, "--output", str(tmp_path / "o")]) == 1
  assert "unknown open_clip model 'ViT-Q-99'" in capsys.readouterr().err
  assert convert.main(["--model", config_path, "--checkpoint", good, "--output", str(tmp_path / "o"),
                       "--vocab", good]) == 1
  assert "--vocab and --merges go together" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["bad.safetensors", "good.pth", "pickled.pth", "truncated.pth"]


def test_every_rule_is_used_and_buffers_are_ignored(reference):
  """attn_mask buffers (older checkpoints keep them) are ignored explicitly; nothing else is."""
  _, state, _ = reference
  config = clip.ClipConfig.from_open_clip_config(TINY)
  numpy_state = {k: v.numpy() for k, v in state.items()}
  numpy_state["attn_mask"] = np.zeros((77, 77), np.float32)
  params = convert.convert_state_dict(numpy_state, config)
  assert len(_flat(params)) == len(state)
  with pytest.raises(CheckpointError, match="logit_bias"):
    convert.convert_state_dict(dict(numpy_state, logit_bias=np.zeros(())), config)


def test_int64_and_nan_tensors_refused(reference):
  """Integer tensors were cast to float weights and NaN tensors converted, silently."""
  _, state, _ = reference
  config = clip.ClipConfig.from_open_clip_config(TINY)
  numpy_state = {k: v.numpy() for k, v in state.items()}
  numpy_state["ln_final.weight"] = numpy_state["ln_final.weight"].astype(np.int64)
  numpy_state["visual.proj"] = np.full_like(numpy_state["visual.proj"], np.nan)
  with pytest.raises(CheckpointError) as err:
    convert.convert_state_dict(numpy_state, config, source="tiny.pth")
  msg = str(err.value)
  assert "1 dtype mismatches" in msg and "ln_final.weight int64 -> ln_final/scale: model expects float32" in msg
  assert "1 non-finite tensors" in msg and "visual.proj: 512 of 512 values are NaN or infinite" in msg


def test_output_never_deletes_what_we_did_not_write(reference, tmp_path, capsys):
  """--output holding the checkpoint was emptied; a previous output is replaced only with --overwrite."""
  _, state, config_path = reference
  ck = tmp_path / "ck"
  ck.mkdir()
  ckpt = _write(str(ck / "tiny.pth"), state, "pth")
  (ck / "notes.txt").write_text("mine")
  for flags in ([], ["--overwrite"]):
    assert convert.main(["--model", config_path, "--checkpoint", ckpt, "--output", str(ck), *flags]) == 1
    assert "would replace the input checkpoint" in capsys.readouterr().err
    assert sorted(os.listdir(ck)) == ["notes.txt", "tiny.pth"]
  out = tmp_path / "out"
  assert convert.main(["--model", config_path, "--checkpoint", ckpt, "--output", str(out)]) == 0
  (out / "params" / "stale_shard").write_text("from an older save")
  assert convert.main(["--model", config_path, "--checkpoint", ckpt, "--output", str(out)]) == 1
  assert "pass --overwrite" in capsys.readouterr().err
  assert convert.main(["--model", config_path, "--checkpoint", ckpt, "--output", str(out), "--overwrite"]) == 0
  assert sorted(os.listdir(out)) == ["config.json", "merges.txt", "params", "vocab.json"]
  assert not os.path.exists(out / "params" / "stale_shard")
  assert clip.load_clip(str(out))[0] == clip.ClipConfig.from_open_clip_config(TINY)
  assert sorted(os.listdir(tmp_path)) == ["ck", "out"]
