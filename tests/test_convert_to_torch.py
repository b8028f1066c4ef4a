"""convert/to_torch.py: model directories back to segment_anything / PyTorch and ONNX, against the JAX model."""
import json
import os

import jax
import numpy as np
import pytest
import torch
from segment_anything import SamPredictor as TorchSamPredictor

import eval_models
from convert import sam as sam_table, torch_models
from convert.common import CheckpointError, apply_table, flatten, invert_rules, linear, unapply_table
from convert.sam import convert_sam
from convert.to_torch import CLIP_HEAD_RULES, main, to_torch
from samclip_jax import api
from samclip_jax.models import samclip as samclip_lib
from sam_reference import TINY, build_torch_sam, random_image


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  return eval_models.ensure_models(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def merged(paths, tmp_path_factory):
  """(JAX SamClip, its to_torch --onnx output, the files written)."""
  out = str(tmp_path_factory.mktemp("to_torch") / "merged")
  files = to_torch(paths["samclip"], out, onnx=True, verbose=False)
  return api.SamClip.from_checkpoint(paths["samclip"]), out, files


def _normalised(images_uint8):
  return np.array(api.normalize_sam(images_uint8))  # [B,S,S,3] as the JAX model reads them (writable)


def _rel(got, want):
  """max |got - want| relative to max |want|."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


# ---------------------------------------------------------------- SAM: bit for bit
def test_sam_round_trip_is_bit_identical(tmp_path):
  """segment_anything -> convert.sam -> convert.to_torch gives back every tensor, unchanged."""
  reference = build_torch_sam(TINY, seed=4).state_dict()
  torch.save(reference, tmp_path / "sam.pth")
  convert_sam(str(tmp_path / "sam.pth"), str(tmp_path / "jax"), config=TINY, verbose=False)
  files = to_torch(str(tmp_path / "jax"), str(tmp_path / "torch"), verbose=False)
  assert files == ["sam.pth", "sam_config.json"]
  state = torch.load(tmp_path / "torch" / "sam.pth", map_location="cpu", weights_only=True)
  assert list(state) == list(reference)  # segment_anything's own order
  for name, tensor in reference.items():
    assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
  # segment_anything's classes rebuilt from the JSON take it strictly (windowed tiny sizes included).
  torch_models.build_sam(str(tmp_path / "torch" / "sam_config.json")).load_state_dict(state, strict=True)


def test_invert_rules_refuses_what_it_cannot_read_back():
  with pytest.raises(ValueError, match="drops a group"):
    invert_rules([(r"a\.(\d+)\.(w|b)", r"a_\1/kernel", linear)])
  with pytest.raises(ValueError, match="outside a group"):
    invert_rules([(r"a\.\d+\.weight", r"a/kernel", linear)])
  with pytest.raises(CheckpointError, match="1 parameters no rule maps:\n    image_encoder/extra \\(2,\\)"):
    unapply_table({"image_encoder": {"extra": np.zeros(2)}}, invert_rules(sam_table.RULES))


# ---------------------------------------------------------------- merged model: PyTorch against JAX
def test_merged_masks_match_jax(merged):
  model, out, files = merged
  assert files == ["clip_head.safetensors", "clip_head_config.json", "decoder.onnx", "image_encoder.onnx",
                   "sam.pth", "sam_config.json"]
  sam, _ = torch_models.load(out)
  image = random_image(150, 210, seed=5)
  jp, tp = model.predictor(), TorchSamPredictor(sam)
  jp.set_image(image)
  tp.set_image(image)
  for prompt in ({"point_coords": np.array([[60.0, 70.0], [150.0, 40.0]]), "point_labels": np.array([1, 0])},
                 {"box": np.array([30.0, 20.0, 170.0, 120.0])}):
    masks, _, _ = jp.predict(**prompt, multimask_output=True)
    tmasks, _, _ = tp.predict(**prompt, multimask_output=True)
    assert masks.shape == tmasks.shape == (3, 150, 210)
    for m, t in zip(masks, tmasks):
      assert (m & t).sum() / max((m | t).sum(), 1) >= 0.99


def test_merged_clip_head_matches_jax(merged, paths):
  model, out, _ = merged
  sam, head = torch_models.load(out)
  images = np.stack([random_image(128, 128, seed=s) for s in (6, 7)])
  want_pooled = np.asarray(model.encode_pixels(images))                 # unit vectors
  want_patch = np.asarray(model.encode_pixels(images, dense=True))
  x = torch.from_numpy(_normalised(images)).permute(0, 3, 1, 2)
  with torch.no_grad():
    _, pooled, patch = torch_models.image_encoder_with_head(sam, head)(x)
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  assert (unit(pooled.numpy()) * want_pooled).sum(-1).min() >= 0.9999
  assert (unit(patch.numpy()) * want_patch).sum(-1).min() >= 0.9999
  # The head's table read forwards recovers the JAX parameters exactly: one table, both ways.
  from safetensors.torch import load_file
  state = {k: v.numpy() for k, v in load_file(os.path.join(out, "clip_head.safetensors")).items()}
  skeleton = jax.eval_shape(lambda: model.params["clip_head"])
  back = flatten(apply_table(state, CLIP_HEAD_RULES, skeleton))
  for k, v in flatten(model.params["clip_head"]).items():
    np.testing.assert_array_equal(back[k], np.asarray(v), err_msg=k)


# ---------------------------------------------------------------- ONNX against JAX
def test_onnx_image_encoder_matches_jax(merged):
  import onnxruntime as ort
  model, out, _ = merged
  x = _normalised(np.stack([random_image(128, 128, seed=s) for s in (8, 9)]))  # batch 2: the dynamic axis
  net = samclip_lib.SamClipNet(model.config)
  emb, aux = jax.jit(lambda p, x: net.apply({"params": p}, x, method=net.encode_image))(model.params, x)
  pooled, patch = jax.jit(lambda p, t: net.apply({"params": p}, t, method=net.clip_features_from_tokens))(
      model.params, aux["tokens"])
  session = ort.InferenceSession(os.path.join(out, "image_encoder.onnx"), providers=["CPUExecutionProvider"])
  got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": x.transpose(0, 3, 1, 2)})))
  assert _rel(got["image_embeddings"], np.asarray(emb).transpose(0, 3, 1, 2)) <= 1e-3
  assert _rel(got["clip_embedding"], pooled) <= 1e-3
  assert _rel(got["clip_patch_embeddings"], patch) <= 1e-3


@pytest.mark.parametrize("with_mask", [False, True], ids=["points", "box+mask"])
def test_onnx_decoder_matches_jax(merged, with_mask):
  import onnxruntime as ort
  model, out, _ = merged
  cfg = model.config.sam
  net = samclip_lib.SamClipNet(model.config)
  x = _normalised(random_image(128, 128, seed=10)[None])
  emb, _ = jax.jit(lambda p, x: net.apply({"params": p}, x, method=net.encode_image))(model.params, x)
  rng = np.random.default_rng(11)
  if with_mask:  # a point, then the box corners (labels 2, 3)
    coords, labels = np.array([[[64.0, 50.0], [20.0, 30.0], [110.0, 100.0]]]), np.array([[1, 2, 3]])
    mask = rng.normal(0, 4, (1, 1) + cfg.mask_input_size).astype(np.float32)
  else:  # points, then the padding point SamPredictor adds when there is no box
    coords, labels = np.array([[[64.0, 50.0], [90.0, 20.0], [0.0, 0.0]]]), np.array([[1, 0, -1]])
    mask = np.zeros((1, 1) + cfg.mask_input_size, np.float32)
  low, iou = jax.jit(lambda p, e, c, l, m: net.apply({"params": p}, e, c, l, m, None, method=net.predict_masks))(
      model.params, emb, coords[None].astype(np.float32), labels[None].astype(np.int32),
      mask[:, :, :, :, None] if with_mask else None)
  low, iou = np.asarray(low)[0], np.asarray(iou)[0]     # [1, 4, 4h, 4w], [1, 4]: every mask token
  session = ort.InferenceSession(os.path.join(out, "decoder.onnx"), providers=["CPUExecutionProvider"])
  masks, scores, low_res = session.run(None, {
      "image_embeddings": np.asarray(emb).transpose(0, 3, 1, 2), "point_coords": coords.astype(np.float32),
      "point_labels": labels.astype(np.float32), "mask_input": mask,
      "has_mask_input": np.array([float(with_mask)], np.float32), "orig_im_size": np.array([150.0, 200.0], np.float32)})
  assert _rel(low_res, low) <= 1e-3 and _rel(scores, iou) <= 1e-3
  # SAM's postprocessing inside the graph: 128 px input, image 150x200 resized to 96x128.
  assert _rel(masks, api.upscale_low_res(low, cfg.image_size, (96, 128), (150, 200))) <= 1e-3


def test_onnx_of_a_sam_directory(paths, tmp_path):
  """A SAM export: the encoder gives the image embedding alone; --return-single-mask gives, for one
  point (plus the padding point), the best of the three multimask outputs."""
  import onnxruntime as ort
  from samclip_jax.models.sam import Sam, load_sam
  to_torch(paths["sam"], str(tmp_path / "out"), onnx=True, return_single_mask=True, verbose=False)
  config, params = load_sam(paths["sam"])
  x = _normalised(random_image(128, 128, seed=12)[None])
  encoder = ort.InferenceSession(str(tmp_path / "out" / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
  assert [o.name for o in encoder.get_outputs()] == ["image_embeddings"]
  (emb,) = encoder.run(None, {"image": x.transpose(0, 3, 1, 2)})
  coords, labels = np.array([[[40.0, 70.0], [0.0, 0.0]]], np.float32), np.array([[1, -1]])
  want_emb, (low, iou) = jax.jit(lambda p, x: (
      Sam(config).apply({"params": p}, x, method=Sam.encode_image)[0],
      Sam(config).apply({"params": p}, x, coords[None], labels[None], None, None)))(params, x)
  assert _rel(emb, np.asarray(want_emb).transpose(0, 3, 1, 2)) <= 1e-3
  best = 1 + int(np.argmax(np.asarray(iou)[0, 0, 1:]))
  decoder = ort.InferenceSession(str(tmp_path / "out" / "decoder.onnx"), providers=["CPUExecutionProvider"])
  masks, scores, low_res = decoder.run(None, {
      "image_embeddings": emb, "point_coords": coords, "point_labels": labels.astype(np.float32),
      "mask_input": np.zeros((1, 1) + config.mask_input_size, np.float32),
      "has_mask_input": np.zeros(1, np.float32), "orig_im_size": np.array([128.0, 128.0], np.float32)})
  assert masks.shape == (1, 1, 128, 128) and scores.shape == (1, 1)
  assert _rel(low_res[0, 0], np.asarray(low)[0, 0, best]) <= 1e-3


def test_onnx_over_two_gigabytes_keeps_one_data_file(tmp_path, monkeypatch):
  """Past protobuf's 2 GB the TorchScript exporter writes one file per tensor beside the model;
  they are gathered into PATH.data (checked with an exporter that always does so: no 2 GB model here)."""
  import onnx
  import onnxruntime as ort
  from convert import to_torch as module
  export = torch.onnx.export

  def per_tensor_files(model, args, f, **kwargs):
    export(model, args, f, **kwargs)
    onnx.save_model(onnx.load(f), f, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)

  monkeypatch.setattr(torch.onnx, "export", per_tensor_files)
  layer = torch.nn.Linear(4, 3).eval()
  module._onnx_export(layer, (torch.ones(2, 4),), str(tmp_path / "m.onnx"), input_names=["x"])
  assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
  x = np.random.default_rng(13).normal(size=(2, 4)).astype(np.float32)
  got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
  np.testing.assert_allclose(got, layer(torch.from_numpy(x)).detach().numpy(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- refusals
def _nothing_written(out):
  assert not os.path.exists(out)
  assert not [f for f in os.listdir(os.path.dirname(out)) if ".tmp-" in f]


def test_not_a_model_directory(paths, tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  for model, message in ((str(tmp_path / "empty"), "is not a samclip_jax model directory"),
                         (str(tmp_path / "absent"), "is not a samclip_jax model directory"),
                         (paths["clip"], "holds a 'open_clip' model")):
    with pytest.raises(CheckpointError, match=message):
      to_torch(model, str(tmp_path / "out"), verbose=False)
    _nothing_written(str(tmp_path / "out"))
  assert main(["--model", paths["clip"], "--output", str(tmp_path / "out")]) == 1
  assert "error:" in capsys.readouterr().err


def test_output_inside_or_holding_the_model(paths, tmp_path):
  with pytest.raises(CheckpointError, match="lies inside the input"):
    to_torch(paths["sam"], os.path.join(paths["sam"], "torch"), verbose=False)
  assert not os.path.exists(os.path.join(paths["sam"], "torch"))
  for output in (paths["sam"], os.path.dirname(paths["sam"])):
    with pytest.raises(CheckpointError, match="would replace the input"):
      to_torch(paths["sam"], output, overwrite=True, verbose=False)


def test_existing_output_needs_overwrite_and_holds_only_an_export(paths, tmp_path):
  out = tmp_path / "out"
  assert to_torch(paths["sam"], str(out), verbose=False) == ["sam.pth", "sam_config.json"]
  before = (out / "sam.pth").read_bytes()
  with pytest.raises(CheckpointError, match="pass --overwrite"):
    to_torch(paths["sam"], str(out), verbose=False)
  to_torch(paths["samclip"], str(out), overwrite=True, verbose=False)  # an earlier export is replaced whole
  assert sorted(os.listdir(out)) == ["clip_head.safetensors", "clip_head_config.json", "sam.pth", "sam_config.json"]
  assert (out / "sam.pth").read_bytes() != before
  (out / "notes.txt").write_text("mine")
  for overwrite in (False, True):  # without --overwrite too, the refusal does not suggest it
    with pytest.raises(CheckpointError, match=r"did not write \(notes.txt\); refusing to replace it: choose"):
      to_torch(paths["sam"], str(out), overwrite=overwrite, verbose=False)
  assert (out / "notes.txt").read_text() == "mine" and "clip_head_config.json" in os.listdir(out)
  with open(out / "clip_head_config.json") as f:
    assert json.load(f)["out_dim"] == eval_models.EMBED_DIM


def test_parameters_that_do_not_fit_the_config(paths, tmp_path):
  """A config.json that disagrees with params/ is refused with torch's strict-load report; nothing is written."""
  import shutil
  model = tmp_path / "sam"
  shutil.copytree(paths["sam"], model)
  config = json.loads((model / "config.json").read_text())
  config["decoder_mlp_dim"] += 8
  (model / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="size mismatch for mask_decoder.transformer.layers.0.mlp.lin1.weight"):
    to_torch(str(model), str(tmp_path / "out"), verbose=False)
  _nothing_written(str(tmp_path / "out"))


def test_written_files_follow_the_umask(merged):
  """Every file is as readable as open() would make it (safetensors alone writes 0600)."""
  _, out, _ = merged
  umask = os.umask(0)
  os.umask(umask)
  for name in os.listdir(out):
    path = os.path.join(out, name)
    if os.path.isfile(path):
      assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, name
