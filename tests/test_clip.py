"""OpenCLIP towers, ClipModel and templates against open_clip (random weights, fixed seeds)."""
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP as TorchCLIP
from open_clip.model import resize_pos_embed
from PIL import Image

from convert.open_clip import convert_open_clip, convert_state_dict
from samclip_jax import templates
from samclip_jax.interpolate import bicubic_matrix
from samclip_jax.clip_model import ClipModel
from samclip_jax.models import clip

torch.set_num_threads(1)  # CI runs two pytest workers on two cores.

TINY = {
  "embed_dim": 32,
  "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
TEXTS = ["a photo of a cat.", "Ünïcödé text with emoji 🐱 and more words than the first one"]


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Every parameter random (open_clip leaves LayerNorms, biases and logit_scale constant)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if name == "logit_scale":
        p.copy_(2.5 + 0.1 * noise)
      elif p.ndim == 1 and name.endswith("weight"):  # LayerNorm scales
        p.copy_(1.0 + 0.1 * noise)
      elif name.endswith(("bias", "gamma")):
        p.copy_(0.05 * noise)
      else:  # Keep each tensor's own init scale.
        p.copy_(noise * max(float(p.std()), 0.02))
  return model.eval()


def torch_tiny(cfg=TINY, seed=0, image_size=None):
  cfg = json.loads(json.dumps(cfg))
  if image_size is not None:
    cfg["vision_cfg"]["image_size"] = image_size
  torch.manual_seed(seed)
  return randomize_(TorchCLIP(**cfg), seed)


def state_of(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def torch_image(model, pixels_nhwc):
  with torch.no_grad():
    return model.encode_image(torch.from_numpy(pixels_nhwc).permute(0, 3, 1, 2)).numpy()


def torch_text(model, ids):
  with torch.no_grad():
    return model.encode_text(torch.from_numpy(np.asarray(ids, np.int64))).numpy()


@functools.partial(jax.jit, static_argnames=("config", "dtype", "dense", "attention"))
def jax_image(config, params, pixels, dtype=jnp.float32, dense=False, attention=None):
  return clip.CLIP(config, dtype=dtype, attention=attention).apply(
      {"params": params}, pixels, dense=dense, method=clip.CLIP.encode_image)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "attention"))
def jax_text(config, params, ids, dtype=jnp.float32, attention=None):
  return clip.CLIP(config, dtype=dtype, attention=attention).apply(
      {"params": params}, ids, method=clip.CLIP.encode_text)


def pixels(n, h, w, seed=0):
  return np.random.RandomState(seed).randn(n, h, w, 3).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
  model = torch_tiny()
  config = clip.ClipConfig.from_open_clip_config(TINY)
  return model, config, convert_state_dict(state_of(model), config)


# ----------------------------------------------------------------------------------------------
# Position-embedding resampling.

@pytest.mark.parametrize("antialias", [True, False])
def test_bicubic_matrix_matches_torch_interpolate(antialias):
  for n_in in (2, 3, 7, 14, 16):
    for n_out in (1, 2, 5, 7, 14, 16, 24, 37):
      x = torch.randn(1, 1, n_in, 3, dtype=torch.float64)  # width 3: torch's aa path mishandles width 1
      ref = F.interpolate(x, size=(n_out, 3), mode="bicubic", align_corners=False, antialias=antialias)
      ours = bicubic_matrix(n_in, n_out, antialias, np.float64) @ x[0, 0].numpy()
      np.testing.assert_allclose(ours, ref[0, 0].numpy(), atol=1e-12, err_msg=f"{n_in}->{n_out}")


# ----------------------------------------------------------------------------------------------
# Tiny configs: parity for every option.

def test_tiny_parity(tiny):
  model, config, params = tiny
  x = pixels(2, 32, 32)
  np.testing.assert_allclose(jax_image(config, params, x), torch_image(model, x), atol=1e-5, rtol=0)
  ids = open_clip.tokenize(TEXTS).numpy()
  ref = torch_text(model, ids)
  np.testing.assert_allclose(jax_text(config, params, ids), ref, atol=1e-5, rtol=0)
  # transformers pads with eot (49407) instead of 0: pooling at the first eot gives the same.
  hf_ids = np.where(ids == 0, clip.EOT_TOKEN_ID, ids)
  np.testing.assert_allclose(jax_text(config, params, hf_ids), ref, atol=1e-5, rtol=0)
  # A shorter id sequence (L < context_length) is fine too: causal attention.
  np.testing.assert_allclose(jax_text(config, params, ids[:, :24]), ref, atol=1e-5, rtol=0)
  # jax.nn.dot_product_attention (the accelerator path) agrees with the CPU per-head loop.
  np.testing.assert_allclose(jax_image(config, params, x, attention="xla"), torch_image(model, x), atol=1e-5, rtol=0)
  np.testing.assert_allclose(jax_text(config, params, ids, attention="xla"), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(48, 48), (48, 40), (24, 24)])
def test_tiny_other_input_sizes(tiny, size):
  """JAX resamples at run time what open_clip's resize_pos_embed does at load time."""
  model, config, params = tiny
  resized = torch_tiny(image_size=list(size))
  state = model.state_dict()
  resize_pos_embed(state, resized)
  resized.load_state_dict(state)
  x = pixels(2, *size, seed=1)
  np.testing.assert_allclose(jax_image(config, params, x), torch_image(resized, x), atol=1e-5, rtol=0)


def test_quickgelu_parity():
  cfg = {**TINY, "quick_gelu": True}
  model = torch_tiny(cfg, seed=1)
  config = clip.ClipConfig.from_open_clip_config(cfg)
  assert config.quick_gelu
  params = convert_state_dict(state_of(model), config)
  x, ids = pixels(2, 32, 32, seed=2), open_clip.tokenize(TEXTS).numpy()
  np.testing.assert_allclose(jax_image(config, params, x), torch_image(model, x), atol=1e-5, rtol=0)
  np.testing.assert_allclose(jax_text(config, params, ids), torch_text(model, ids), atol=1e-5, rtol=0)


def test_other_open_clip_options_parity():
  """Layer scale, no ln_pre, avg pool with LN after pooling, eos pooling, text proj bias."""
  cfg = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 16, "patch_size": 8,
                   "mlp_ratio": 2.5, "ls_init_value": 0.5, "no_ln_pre": True, "pool_type": "avg",
                   "final_ln_after_pool": True},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                 "ls_init_value": 0.5, "pool_type": "eos", "eos_id": clip.EOT_TOKEN_ID, "proj_bias": True,
                 "norm_kwargs": {"eps": 1e-6}},
  }
  model = torch_tiny(cfg, seed=2)
  config = clip.ClipConfig.from_open_clip_config(cfg)
  params = convert_state_dict(state_of(model), config)
  x, ids = pixels(2, 32, 32, seed=3), open_clip.tokenize(TEXTS).numpy()
  np.testing.assert_allclose(jax_image(config, params, x), torch_image(model, x), atol=1e-5, rtol=0)
  np.testing.assert_allclose(jax_text(config, params, ids), torch_text(model, ids), atol=1e-5, rtol=0)


def test_dense_tokens(tiny):
  model, config, params = tiny
  x = pixels(2, 40, 32, seed=4)
  pooled, aux = jax_image(config, params, x, dense=True)
  np.testing.assert_array_equal(pooled, jax_image(config, params, x))
  assert aux["tokens"].shape == (2, 5, 4, 64) and aux["patch_embeddings"].shape == (2, 5, 4, 32)
  resized = torch_tiny(image_size=[40, 32])
  state = model.state_dict()
  resize_pos_embed(state, resized)
  resized.load_state_dict(state)
  resized.visual.output_tokens = True
  with torch.no_grad():
    _, tokens = resized.visual(torch.from_numpy(x).permute(0, 3, 1, 2))
  np.testing.assert_allclose(aux["tokens"].reshape(2, 20, 64), tokens.numpy(), atol=1e-5, rtol=0)


def test_bfloat16_compute(tiny):
  _, config, params = tiny
  x, ids = pixels(2, 32, 32, seed=5), open_clip.tokenize(TEXTS).numpy()
  for f32, bf16 in ((jax_image(config, params, x), jax_image(config, params, x, jnp.bfloat16)),
                    (jax_text(config, params, ids), jax_text(config, params, ids, jnp.bfloat16))):
    assert bf16.dtype == jnp.bfloat16
    cos = np.sum(np.asarray(f32) * np.asarray(bf16, np.float32), -1) / (
        np.linalg.norm(f32, axis=-1) * np.linalg.norm(np.asarray(bf16, np.float32), axis=-1))
    assert cos.min() > 0.99


def test_remat_gives_the_same_gradients(tiny):
  _, config, params = tiny
  x = pixels(2, 32, 32, seed=9)

  def loss(p, remat):
    tower = clip.VisionTransformer(config.vision, config.embed_dim, remat=remat)
    return jnp.sum(tower.apply({"params": p}, x)[0] ** 2)

  plain, rematted = (jax.jit(jax.grad(functools.partial(loss, remat=r)))(params["visual"]) for r in (False, True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), plain, rematted)


# ----------------------------------------------------------------------------------------------
# Configs, parameter names, logical axes.

@pytest.mark.parametrize("name", ["RN50", "RN101-quickgelu", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14",
                                  "ViT-g-14", "ViT-bigG-14", "ViT-B-32-quickgelu", "ViT-B-16-quickgelu",
                                  "ViT-L-14-quickgelu", "ViT-L-14-336-quickgelu", "ViT-H-14-quickgelu"])
def test_from_name_matches_open_clip_model_configs(name):
  config = clip.ClipConfig.from_name(name)
  assert config == clip.ClipConfig.from_open_clip_config(open_clip.get_model_config(name))
  assert config.quick_gelu == name.endswith("quickgelu")
  assert clip.ClipConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_config_errors_and_round_trip():
  odd = clip.ClipConfig.from_open_clip_config(
      {**TINY, "vision_cfg": {**TINY["vision_cfg"], "image_size": [48, 32]}})
  assert odd.vision.grid_size == (6, 4)
  assert clip.ClipConfig.from_dict(json.loads(json.dumps(odd.to_dict()))) == odd
  with pytest.raises(ValueError, match="unknown open_clip model"):
    clip.ClipConfig.from_name("ViT-Q-99")
  for bad, what in ((open_clip.get_model_config("ViT-B-16-SigLIP"), "timm_model_name"),
                    ({**TINY, "custom_text": True}, "custom_text"),
                    ({**TINY, "text_cfg": {**TINY["text_cfg"], "hf_model_name": "bert"}}, "hf_model_name"),
                    ({**TINY, "vision_cfg": {**TINY["vision_cfg"], "colour": 1}}, "unknown key vision_cfg.colour")):
    with pytest.raises(ValueError, match=what):
      clip.ClipConfig.from_open_clip_config(bad)


def test_parameter_names_and_logical_axes():
  config = clip.ClipConfig.from_open_clip_config(TINY)
  boxed = jax.eval_shape(lambda: clip.init_variables(config))
  specs = nn.get_partition_spec(boxed)["params"]
  assert tuple(specs["visual"]["transformer"]["resblocks_1"]["attn"]["in_proj"]["kernel"]) == ("embed", "heads")
  assert tuple(specs["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"]) == ("embed", "mlp")
  assert tuple(specs["token_embedding"]["embedding"]) == ("vocab", "embed")
  assert tuple(specs["visual"]["conv1"]["kernel"]) == (None, None, "conv_in", "embed")
  params = clip.abstract_params(config)
  flat = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  for path in ("visual/conv1/kernel", "visual/class_embedding", "visual/positional_embedding",
               "visual/ln_pre/scale", "visual/transformer/resblocks_1/mlp/c_proj/bias", "visual/ln_post/bias",
               "visual/proj", "token_embedding/embedding", "positional_embedding",
               "transformer/resblocks_1/attn/out_proj/kernel", "ln_final/scale", "text_projection", "logit_scale"):
    assert path in flat, path
  assert params["visual"]["positional_embedding"].shape == (17, 64)


# ----------------------------------------------------------------------------------------------
# Full-size ViT-B-16 (the real open_clip config).

def test_vit_b16_parity():
  model = randomize_(open_clip.create_model("ViT-B-16", pretrained=None), seed=3)
  config = clip.ClipConfig.from_name("ViT-B-16")
  params = convert_state_dict(state_of(model), config)
  x = pixels(2, 224, 224, seed=6)
  ids = open_clip.tokenize(TEXTS).numpy()
  img_ref, txt_ref = torch_image(model, x), torch_text(model, ids)
  img, txt = jax_image(config, params, x), jax_text(config, params, ids)
  assert np.abs(img - img_ref).max() <= 1e-4, np.abs(img - img_ref).max()
  assert np.abs(txt - txt_ref).max() <= 1e-4, np.abs(txt - txt_ref).max()


# ----------------------------------------------------------------------------------------------
# ClipModel and templates.

@pytest.fixture(scope="module")
def clip_model(tiny, tmp_path_factory):
  model, _, _ = tiny
  directory = tmp_path_factory.mktemp("clip") / "tiny"
  path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pth")
  torch.save(model.state_dict(), path)
  convert_open_clip(TINY, path, str(directory), log=lambda m: None)
  return ClipModel.from_checkpoint(str(directory), batch_size=4, text_batch_size=8)


def test_clip_model_encoders(tiny, clip_model):
  model, _, _ = tiny
  x = pixels(6, 32, 32, seed=7)  # 6 > batch_size 4: two padded chunks.
  np.testing.assert_allclose(clip_model.encode_pixels(x), torch_image(model, x), atol=1e-5, rtol=0)
  ref = torch_text(model, open_clip.tokenize(TEXTS).numpy())
  np.testing.assert_allclose(clip_model.encode_text(TEXTS), ref, atol=1e-5, rtol=0)
  unit = clip_model.encode_text(TEXTS, normalize=True)
  np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, atol=1e-6)


def test_zero_shot_classifier_matches_open_clip(tiny, clip_model):
  from open_clip.zero_shot_classifier import build_zero_shot_classifier
  model, _, _ = tiny
  names = ["cat", "dog", "école bus", "goldfish", "great white shark"]
  ours = np.asarray(clip_model.zero_shot_classifier(names, templates.get_templates("simple"), classes_per_batch=2))
  ref = build_zero_shot_classifier(model, open_clip.get_tokenizer("ViT-B-16"), names,
                                   templates.SIMPLE_IMAGENET_TEMPLATES, num_classes_per_batch=3).T.numpy()
  assert ours.shape == (5, 32)
  np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
  x = pixels(3, 32, 32, seed=8)
  logits, probs = clip_model.classify_pixels(x, ours)
  with torch.no_grad():
    img = F.normalize(model.encode_image(torch.from_numpy(x).permute(0, 3, 1, 2)), dim=-1)
    ref_logits = (model.logit_scale.exp() * img @ torch.from_numpy(ref).T).numpy()
  np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.sum(probs, -1), 1.0, atol=1e-5)


def test_preprocess_matches_open_clip_eval_transform(clip_model):
  transform = open_clip.image_transform(32, is_train=False)
  rng = np.random.RandomState(0)
  images = [Image.fromarray(rng.randint(0, 256, (50, 75, 3), np.uint8)),        # landscape
            Image.fromarray(rng.randint(0, 256, (61, 40, 4), np.uint8), "RGBA"),  # portrait, RGBA
            Image.fromarray(rng.randint(0, 256, (20, 23, 3), np.uint8)),        # upscaled
            Image.fromarray(rng.randint(0, 256, (32, 32), np.uint8), "L")]      # already 32, grey
  ours = clip_model.preprocess(images)
  ref = np.stack([transform(im).permute(1, 2, 0).numpy() for im in images])
  assert ours.shape == (4, 32, 32, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
  np.testing.assert_allclose(clip_model.preprocess(np.asarray(images[0])), ref[:1], atol=1e-6, rtol=0)
  # On-device normalisation of uint8 batches gives the same numbers.
  raw = np.asarray(images[3].convert("RGB"))[None]
  np.testing.assert_allclose(clip.normalize_images(raw), ref[3:], atol=1e-6, rtol=0)


def test_templates_match_open_clip():
  from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
  assert templates.IMAGENET_TEMPLATES == tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
  assert len(templates.get_templates("imagenet80")) == 80
  assert templates.get_templates("simple") == tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES)
  with pytest.raises(ValueError, match="unknown template set"):
    templates.get_templates("nope")
