"""SamClipNet: parameters built from SAM, CLIP head semantics, SAM-head parity, model dirs."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samclip_jax.models import samclip as sc
from samclip_jax.models.sam import Sam
from samclip_jax.models.vit_det import Block

CFG = sc.SamClipConfig(sam=sc.tiny_sam_config(image_size=64, embed_dim=32, depth=2, num_heads=2,
                                              window_size=2, prompt_embed_dim=16),
                       out_dim=24, head_mlp_hidden=(40, 48))


@pytest.fixture(scope="module")
def built():
  @jax.jit
  def build(k):
    sam_params = nn.unbox(Sam(CFG.sam).init(k, *sc.example_inputs(CFG)[:3])["params"])
    return sam_params, sc.samclip_params_from_sam(sam_params, CFG, jax.random.key(2))

  return build(jax.random.key(1, impl="unsafe_rbg"))  # rbg: init compiles ~3x faster


def test_config_round_trip():
  d = json.loads(json.dumps(CFG.to_dict()))
  assert d["model_type"] == "samclip"
  assert sc.SamClipConfig.from_dict(d) == CFG
  assert sc.SamClipConfig(sam=CFG.sam).mlp_hidden == (64, 64)  # default: two of 2 x embed
  with pytest.raises(ValueError, match="unknown"):
    sc.SamClipConfig.from_dict({**d, "bogus": 1})


def test_params_from_sam_copy_last_block(built):
  sam_params, params = built
  assert set(params) == {"image_encoder", "prompt_encoder", "mask_decoder", "clip_head"}
  abstract = sc.abstract_params(CFG)
  assert jax.tree.structure(abstract) == jax.tree.structure(params)
  assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, params)
  last = sam_params["image_encoder"]["blocks_1"]
  for i in range(CFG.head_depth):
    jax.tree.map(np.testing.assert_array_equal, params["clip_head"][f"blocks_{i}"], last)
  for k in ("image_encoder", "prompt_encoder", "mask_decoder"):
    jax.tree.map(np.testing.assert_array_equal, params[k], sam_params[k])
  # LN + MLP are fresh (seeded): deterministic for a key, different for another.
  other = jax.jit(lambda p: sc.samclip_params_from_sam(p, CFG, jax.random.key(3)))(sam_params)
  assert not np.allclose(other["clip_head"]["mlp"]["layers_0"]["kernel"],
                         params["clip_head"]["mlp"]["layers_0"]["kernel"])
  assert [params["clip_head"]["mlp"][f"layers_{i}"]["kernel"].shape for i in range(3)] == [
      (32, 40), (40, 48), (48, 24)]


def test_sam_head_matches_sam(built):
  sam_params, params = built
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32)
  coords = jnp.asarray(rng.uniform(0, 64, size=(2, 3, 2, 2)), jnp.float32)
  labels = jnp.array([[[1, -1], [2, 3], [1, 0]]] * 2, jnp.int32)
  net = sc.SamClipNet(CFG)

  @jax.jit
  def run(sam_params, params):
    want = Sam(CFG.sam).apply({"params": sam_params}, x, coords, labels, multimask_output=True)
    single = Sam(CFG.sam).apply({"params": sam_params}, x, coords, labels, multimask_output=False)[0]
    got = net.apply({"params": params}, x, coords, labels, multimask_output=True,
                    method=sc.SamClipNet.sam_masks)
    # From precomputed embeddings, single-mask output.
    emb, _ = net.apply({"params": params}, x, method=sc.SamClipNet.encode_image)
    one, _ = net.apply({"params": params}, emb, coords, labels, method=sc.SamClipNet.sam_masks)
    return want, got, one, single

  (want, want_iou), (got, got_iou), one, single = run(sam_params, params)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(got_iou, want_iou, atol=1e-5)
  assert one.shape == (2, 3, 1, 64 // 4, 64 // 4)
  np.testing.assert_allclose(one, single, atol=1e-5)


def test_clip_head_semantics(built):
  _, params = built
  net = sc.SamClipNet(CFG)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 48, 80, 3)), jnp.float32)  # non-square
  enc = CFG.sam.image_encoder

  @jax.jit
  def run(params):
    pooled, patch = net.apply({"params": params}, x, method=sc.SamClipNet.clip_features)
    # By hand: trunk tokens -> 3 blocks (global attention) -> max-pool -> LN -> MLP.
    _, aux = net.apply({"params": params}, x, method=sc.SamClipNet.encode_image)
    h = aux["tokens"]
    for i in range(3):
      h = Block(enc.embed_dim, enc.num_heads, enc.mlp_ratio, enc.qkv_bias, enc.use_rel_pos, 0,
                (enc.grid_size,) * 2).apply({"params": params["clip_head"][f"blocks_{i}"]}, h)
    return pooled, patch, h

  pooled, patch, h = run(params)
  assert pooled.shape == (2, 24) and patch.shape == (2, 3, 5, 24)
  head = params["clip_head"]

  def ln_mlp(t):
    mu, var = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
    t = (t - mu) / jnp.sqrt(var + 1e-6) * head["norm"]["scale"] + head["norm"]["bias"]
    for i in range(3):
      t = t @ head["mlp"][f"layers_{i}"]["kernel"] + head["mlp"][f"layers_{i}"]["bias"]
      if i < 2:
        t = jax.nn.gelu(t, approximate=False)
    return t

  np.testing.assert_allclose(pooled, ln_mlp(h.max(axis=(1, 2))), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(patch, ln_mlp(h), atol=1e-4, rtol=1e-4)


def test_save_load_round_trip(built, tmp_path):
  _, params = built
  sc.save_samclip(str(tmp_path / "m"), CFG, params, extra={"step": 7})
  cfg, loaded = sc.load_samclip(str(tmp_path / "m"))
  assert cfg == CFG
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))
  with open(tmp_path / "m" / "config.json") as f:
    assert json.load(f)["step"] == 7
