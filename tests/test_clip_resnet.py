"""OpenCLIP's ModifiedResNet tower (RN50 family): converted weights match open_clip, in both BatchNorm modes."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from open_clip.model import CLIP as TorchCLIP

from convert import open_clip as convert
from samclip_jax.models import clip

torch.set_num_threads(1)

# Every stage of the real tower (stem, 4 stages with downsampling, attention pool), tiny widths.
TINY_RN = {
  "embed_dim": 16,
  "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 8, "head_width": 32},
  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def reference():
  """(torch CLIP with a ModifiedResNet, our config, converted params); BatchNorms made non-trivial."""
  torch.manual_seed(0)
  model = TorchCLIP(**TINY_RN).eval()
  with torch.no_grad():
    for name, p in model.visual.named_parameters():  # open_clip starts BNs at 1/0 and bn3 at 0
      if p.ndim == 1:
        p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    for name, b in model.visual.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(torch.randn_like(b) * 0.2)
      elif name.endswith("running_var"):
        b.copy_(torch.rand_like(b) + 0.5)
  config = clip.ClipConfig.from_open_clip_config(TINY_RN)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  params = convert.convert_state_dict(state, config)
  return model, config, params


def _images(n=3, side=64, seed=1):
  return np.random.default_rng(seed).standard_normal((n, side, side, 3)).astype(np.float32)


def _torch_pixels(x):
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def test_config_parses_resnet_towers(reference):
  _, config, _ = reference
  assert config.vision.is_resnet and config.vision.layers == (1, 2, 1, 1)
  assert config.vision.heads == 8  # open_clip: width * 32 // head_width
  assert clip.ClipConfig.from_dict(config.to_dict()) == config  # JSON round trip keeps the tuple
  with pytest.raises(ValueError, match="4 stages"):
    clip.VisionConfig(image_size=64, layers=(1, 1, 1), width=8, patch_size=None)


def test_every_resnet_tensor_converts(reference):
  """Each state-dict tensor but BatchNorm's step counters lands on exactly one parameter."""
  model, _, params = reference
  state = model.state_dict()
  counted = [k for k in state if not k.endswith("num_batches_tracked")]
  assert len(jax.tree.leaves(params)) == len(counted)


def test_eval_mode_matches_open_clip(reference):
  """Running statistics (torch eval mode): pooled embeddings equal open_clip's."""
  model, config, params = reference
  x = _images()
  with torch.no_grad():
    want = model.encode_image(_torch_pixels(x)).numpy()
  got = np.asarray(clip.CLIP(config).apply({"params": params}, jnp.asarray(x), method=clip.CLIP.encode_image))
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_batch_statistics_match_torch_training_mode(reference):
  """batch_stats=True normalises as torch's training mode does (biased batch variance)."""
  model, config, params = reference
  x = _images(4, seed=2)
  train_model = copy.deepcopy(model).train()  # training mode also updates running stats: a copy
  with torch.no_grad():
    want = train_model.encode_image(_torch_pixels(x)).numpy()
    eval_out = model.encode_image(_torch_pixels(x)).numpy()
  got = np.asarray(clip.CLIP(config, batch_stats=True).apply(
      {"params": params}, jnp.asarray(x), method=clip.CLIP.encode_image))
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
  assert np.abs(eval_out - want).max() > 1e-2 * np.abs(want).max()  # the two modes do differ here


def test_dense_features_are_values_through_the_output_projection(reference):
  """MaskCLIP for ResNets: per-position embedding = c_proj(v_proj(feature + its position))."""
  model, config, params = reference
  x = _images(2, seed=3)
  pooled, aux = clip.CLIP(config).apply({"params": params}, jnp.asarray(x), True,
                                        method=clip.CLIP.encode_image)
  v = model.visual
  with torch.no_grad():
    feats = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(_torch_pixels(x))))))  # [B, C, h, w]
    tokens = feats.flatten(2).transpose(1, 2) + v.attnpool.positional_embedding[1:]
    want = v.attnpool.c_proj(v.attnpool.v_proj(tokens)).numpy().reshape(2, 2, 2, -1)
  got = np.asarray(aux["patch_embeddings"])
  assert got.shape == (2, 2, 2, 16) and aux["tokens"].shape == (2, 2, 2, 256)
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
  assert pooled.shape == (2, 16)


def test_precise_bn_sets_population_statistics(reference):
  """After training on batch statistics, running statistics = those of the training batches
  together: for the first BatchNorm, the mean and (biased) variance of open_clip's conv1
  output over all the batches' pixels."""
  from samclip_jax.models.modified_resnet import precise_bn
  model, config, params = reference
  train_model = clip.CLIP(config, batch_stats=True)
  collect = jax.jit(lambda p, x: train_model.apply({"params": p}, x, method=clip.CLIP.encode_image,
                                                   mutable=["batch_stats"])[1]["batch_stats"])
  batches = [_images(4, seed=10 + i) for i in range(3)]
  out = precise_bn(params, collect, batches)
  with torch.no_grad():
    conv1 = model.visual.conv1(_torch_pixels(np.concatenate(batches))).numpy()  # [B, C, h, w]
  want_mean, want_var = conv1.mean(axis=(0, 2, 3)), conv1.var(axis=(0, 2, 3))
  np.testing.assert_allclose(np.asarray(out["visual"]["bn1"]["running_mean"]), want_mean,
                             atol=1e-5 * np.abs(want_mean).max())
  np.testing.assert_allclose(np.asarray(out["visual"]["bn1"]["running_var"]), want_var, rtol=1e-5)
  # Every BatchNorm got new statistics; nothing else changed.
  flat_in, flat_out = (dict(jax.tree_util.tree_leaves_with_path(t)) for t in (params, out))
  for path, before in flat_in.items():
    name = jax.tree_util.keystr(path)
    changed = not np.array_equal(np.asarray(before), np.asarray(flat_out[path]))
    assert changed == ("running_" in name), name
