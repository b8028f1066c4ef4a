"""Parity of the Flax SAM image encoder with segment_anything's PyTorch ImageEncoderViT."""
import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import image_encoder as sam_ie
from segment_anything.modeling.common import LayerNorm2d as TorchLayerNorm2d

from samclip_jax import sharding
from samclip_jax.models import vit_det

TINY = vit_det.ImageEncoderConfig(img_size=128, embed_dim=64, depth=3, num_heads=4,
                                  out_chans=32, window_size=4, global_attn_indexes=(1,))
TOL = 1e-4


# ---------------------------------------------------------------- helpers
def randomize_(module, seed=0):
  """Random values for every torch param (rel-pos and pos_embed init to zeros in torch)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if "rel_pos" in name or "pos_embed" in name:
        p.normal_(0.0, 0.25)
      elif p.ndim == 1 and name.endswith("weight"):  # LayerNorm / LayerNorm2d scales
        p.normal_(1.0, 0.1)
      elif name.endswith("bias"):
        p.normal_(0.0, 0.1)
      # Linear / conv weights keep torch's (seeded, random) default init.
  return module.eval()


def to_flax(module):
  """Torch state dict -> Flax params by the naming rule of CONTRACTS.md."""
  tree = {}
  for name, t in module.state_dict().items():
    path = []
    for part in name.split("."):
      if part.isdigit():
        path[-1] += f"_{part}"
      else:
        path.append(part)
    a = t.detach().cpu().numpy()
    if path[-1] == "weight":
      if a.ndim == 4:  # Conv2d OIHW -> HWIO
        path[-1], a = "kernel", a.transpose(2, 3, 1, 0)
      elif a.ndim == 2:  # Linear (out, in) -> (in, out)
        path[-1], a = "kernel", a.T
      elif not (len(path) > 1 and path[-2].startswith("neck_")):  # nn.LayerNorm
        path[-1] = "scale"
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(a)
  return {"params": tree}


def check_tree(model, variables, *inputs):
  """Every Flax param is filled, with the right shape, and nothing is left over."""
  want = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))
  want_shapes = jax.tree.map(lambda a: a.shape, want)
  got_shapes = jax.tree.map(lambda a: a.shape, variables)
  assert got_shapes == want_shapes


def torch_encoder(enc, x_nhwc):
  """ImageEncoderViT.forward with ViTDet's get_abs_pos (bicubic) so any grid works."""
  with torch.no_grad():
    x = enc.patch_embed(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2))
    pos = enc.pos_embed
    if pos is not None and pos.shape[1:3] != x.shape[1:3]:
      pos = F.interpolate(pos.permute(0, 3, 1, 2), size=tuple(x.shape[1:3]), mode="bicubic",
                          align_corners=False).permute(0, 2, 3, 1)
    if pos is not None:
      x = x + pos
    blocks = []
    for blk in enc.blocks:
      x = blk(x)
      blocks.append(x.numpy())
    emb = enc.neck(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  return emb, blocks


def torch_image_encoder(cfg):
  return sam_ie.ImageEncoderViT(
      img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
      depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
      out_chans=cfg.out_chans, qkv_bias=cfg.qkv_bias,
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=cfg.use_rel_pos,
      window_size=cfg.window_size, global_attn_indexes=cfg.global_attn_indexes,
      use_abs_pos=cfg.use_abs_pos)


def max_abs(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@functools.lru_cache(maxsize=None)
def _tiny():
  enc = randomize_(torch_image_encoder(TINY), seed=1)
  return enc, to_flax(enc)


@functools.lru_cache(maxsize=None)
def _apply_fn(cfg, dtype=jnp.float32, remat=False):
  model = vit_det.ImageEncoderViT(cfg, dtype=dtype, remat=remat)
  return model, jax.jit(model.apply)


def rand(*shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- config
def test_config_variants_match_build_sam():
  b = vit_det.ImageEncoderConfig.from_name("vit_b")
  assert (b.embed_dim, b.depth, b.num_heads, b.global_attn_indexes) == (768, 12, 12, (2, 5, 8, 11))
  l = vit_det.ImageEncoderConfig.from_name("vit_l")
  assert (l.embed_dim, l.depth, l.num_heads, l.global_attn_indexes) == (1024, 24, 16, (5, 11, 17, 23))
  h = vit_det.ImageEncoderConfig.from_name("vit_h")
  assert (h.embed_dim, h.depth, h.num_heads, h.global_attn_indexes) == (1280, 32, 16, (7, 15, 23, 31))
  for c in (b, l, h):
    assert (c.img_size, c.patch_size, c.window_size, c.out_chans, c.mlp_ratio) == (1024, 16, 14, 256, 4)
    assert c.use_rel_pos and c.use_abs_pos and c.qkv_bias
    assert vit_det.ImageEncoderConfig.from_dict(c.to_dict()) == c
  import json
  assert vit_det.ImageEncoderConfig.from_dict(json.loads(json.dumps(b.to_dict()))) == b
  with pytest.raises(ValueError):
    vit_det.ImageEncoderConfig.from_name("vit_x")
  with pytest.raises(ValueError):
    vit_det.ImageEncoderConfig.from_dict({"bogus": 1})


def test_param_names_shapes_and_axes():
  cfg = vit_det.ImageEncoderConfig.from_name("vit_b")
  model = vit_det.ImageEncoderViT(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  params = nn.unbox(abstract)["params"]
  assert params["patch_embed"]["proj"]["kernel"].shape == (16, 16, 3, 768)
  assert params["pos_embed"].shape == (1, 64, 64, 768)
  assert params["blocks_0"]["attn"]["rel_pos_h"].shape == (27, 64)  # windowed: 2*14-1
  assert params["blocks_2"]["attn"]["rel_pos_w"].shape == (127, 64)  # global: 2*64-1
  assert params["blocks_3"]["attn"]["qkv"]["kernel"].shape == (768, 2304)
  assert params["blocks_11"]["mlp"]["lin2"]["kernel"].shape == (3072, 768)
  assert set(params["neck_1"]) == {"weight", "bias"} and params["neck_2"]["kernel"].shape == (3, 3, 256, 256)
  specs = nn.get_partition_spec(abstract)["params"]
  assert tuple(specs["blocks_0"]["attn"]["qkv"]["kernel"]) == (sharding.EMBED, sharding.HEADS)
  assert tuple(specs["blocks_0"]["attn"]["proj"]["kernel"]) == (sharding.HEADS, sharding.EMBED)
  assert tuple(specs["blocks_0"]["mlp"]["lin1"]["kernel"]) == (sharding.EMBED, sharding.MLP)
  assert tuple(specs["blocks_0"]["mlp"]["lin2"]["kernel"]) == (sharding.MLP, sharding.EMBED)
  assert tuple(specs["blocks_0"]["norm1"]["scale"]) == (sharding.NORM,)
  assert tuple(specs["neck_0"]["kernel"]) == (None, None, sharding.CONV_IN, sharding.CONV_OUT)
  # Every leaf carries axis names (one per dimension).
  boxed = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim for x in boxed)
  # Names follow the torch state dict exactly (via the test's naming rule).
  enc = torch_image_encoder(cfg)
  assert jax.tree.map(np.shape, to_flax(enc)) == jax.tree.map(np.shape, {"params": params})


# ---------------------------------------------------------------- resampling
@pytest.mark.parametrize("src,dst", [((64, 64), (14, 14)), ((64, 64), (28, 28)), ((64, 64), (64, 48)),
                                     ((8, 8), (7, 6)), ((8, 8), (10, 16)), ((5, 9), (3, 2))])
def test_abs_pos_bicubic_matches_torch(src, dst):
  pos = rand(1, *src, 16, seed=3)
  want = F.interpolate(torch.from_numpy(pos).permute(0, 3, 1, 2), size=dst, mode="bicubic",
                       align_corners=False).permute(0, 2, 3, 1).numpy()
  got = vit_det.resize_abs_pos(jnp.asarray(pos), dst)
  assert got.shape == want.shape
  assert max_abs(got, want) <= 1e-5


@pytest.mark.parametrize("q,k,length", [(7, 7, 9), (13, 13, 27), (28, 28, 127), (64, 64, 127),
                                        (3, 3, 11), (4, 6, 5), (6, 3, 11)])
def test_get_rel_pos_matches_torch(q, k, length):
  table = rand(length, 8, seed=4)
  want = sam_ie.get_rel_pos(q, k, torch.from_numpy(table)).numpy()
  got = vit_det.get_rel_pos(q, k, jnp.asarray(table))
  assert got.shape == want.shape
  assert max_abs(got, want) <= 1e-6


@pytest.mark.parametrize("hw", [(7, 6), (5, 11), (8, 8)])
def test_window_partition_matches_torch(hw):
  x = rand(2, *hw, 3, seed=5)
  want, want_pad = sam_ie.window_partition(torch.from_numpy(x), 4)
  got, got_pad = vit_det.window_partition(jnp.asarray(x), 4)
  assert got_pad == want_pad
  np.testing.assert_array_equal(np.asarray(got), want.numpy())
  np.testing.assert_array_equal(np.asarray(vit_det.window_unpartition(got, 4, got_pad, hw)), x)


# ---------------------------------------------------------------- modules
def test_attention_rel_pos_parity():
  # Table sized for 5x5 and applied on a 7x6 grid: both axes interpolate, differently.
  tm = randomize_(sam_ie.Attention(64, num_heads=4, use_rel_pos=True, input_size=(5, 5)), seed=2)
  x = rand(2, 7, 6, 64, seed=6)
  with torch.no_grad():
    want = tm(torch.from_numpy(x)).numpy()
  model = vit_det.Attention(64, 4, use_rel_pos=True, input_size=(5, 5))
  variables = to_flax(tm)
  check_tree(model, variables, x)
  got = jax.jit(model.apply)(variables, x)
  assert max_abs(got, want) <= TOL


@pytest.mark.parametrize("window,hw", [(4, (7, 6)), (4, (5, 11)), (0, (7, 6))])
def test_block_parity(window, hw):
  # Non-square grids with unequal H/W padding catch a port that pads H with W's padding.
  tm = randomize_(sam_ie.Block(64, 4, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                               use_rel_pos=True, window_size=window, input_size=(8, 8)), seed=3)
  x = rand(2, *hw, 64, seed=7)
  with torch.no_grad():
    want = tm(torch.from_numpy(x)).numpy()
  model = vit_det.Block(64, 4, use_rel_pos=True, window_size=window, input_size=(8, 8))
  variables = to_flax(tm)
  check_tree(model, variables, x)
  assert max_abs(jax.jit(model.apply)(variables, x), want) <= TOL


def test_layernorm2d_parity():
  tm = randomize_(TorchLayerNorm2d(32), seed=4)
  x = rand(2, 5, 3, 32, seed=8) * 3 + 1
  with torch.no_grad():
    want = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  params = {"weight": tm.weight.detach().numpy(), "bias": tm.bias.detach().numpy()}
  got = vit_det.LayerNorm2d(32).apply({"params": params}, x)
  assert max_abs(got, want) <= 1e-5


# ---------------------------------------------------------------- whole encoder
@pytest.mark.parametrize("hw", [(128, 128), (112, 96), (160, 128)])
def test_tiny_encoder_parity(hw):
  enc, variables = _tiny()
  x = rand(2, *hw, 3, seed=9)
  want, want_blocks = torch_encoder(enc, x)
  if hw == (TINY.img_size, TINY.img_size):  # the reference is Meta's forward where it applies
    with torch.no_grad():
      meta = enc(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(meta, want)
  model, apply = _apply_fn(TINY)
  check_tree(model, variables, x)
  got, aux = apply(variables, x)
  assert got.shape == (2, hw[0] // 16, hw[1] // 16, TINY.out_chans)
  assert max_abs(got, want) <= TOL
  for i in range(TINY.depth):
    assert aux[f"block_{i}"].shape == (2, hw[0] // 16, hw[1] // 16, TINY.embed_dim)
    assert max_abs(aux[f"block_{i}"], want_blocks[i]) <= TOL
  np.testing.assert_array_equal(aux["tokens"], aux[f"block_{TINY.depth - 1}"])


def test_encoder_without_position_terms():
  # segment_anything's own defaults: no absolute and no relative position terms.
  cfg = dataclasses.replace(TINY, use_abs_pos=False, use_rel_pos=False)
  enc = randomize_(torch_image_encoder(cfg), seed=7)
  x = rand(1, 112, 96, 3, seed=11)
  want, _ = torch_encoder(enc, x)
  variables = to_flax(enc)
  model, apply = _apply_fn(cfg)
  check_tree(model, variables, x)
  assert "pos_embed" not in variables["params"]
  assert max_abs(apply(variables, x)[0], want) <= TOL


def test_other_resolutions_bf16_and_remat():
  # Tiny width, SAM geometry: pos_embed stored at 64x64, window 14, input 224 / 448.
  cfg = vit_det.ImageEncoderConfig(embed_dim=32, depth=2, num_heads=2, out_chans=16,
                                   global_attn_indexes=(1,))
  enc = randomize_(torch_image_encoder(cfg), seed=5)
  variables = to_flax(enc)
  model, apply = _apply_fn(cfg)
  for size in (224, 448):
    x = rand(1, size, size, 3, seed=size)
    got, aux = apply(variables, x)
    assert got.shape == (1, size // 16, size // 16, 16)
    assert aux["tokens"].shape == (1, size // 16, size // 16, 32)
    if size == 224:
      want, _ = torch_encoder(enc, x)
      assert max_abs(got, want) <= TOL
  f32 = got
  _, apply16 = _apply_fn(cfg, jnp.bfloat16)
  got16, aux16 = apply16(variables, x)
  assert got16.dtype == jnp.bfloat16 and aux16["tokens"].dtype == jnp.bfloat16
  assert jax.tree.leaves(variables)[0].dtype == jnp.float32
  assert np.isfinite(np.asarray(got16, np.float32)).all()
  assert max_abs(got16, f32) < 0.25  # LayerNorm2d output is O(1); bf16 has ~3 digits
  # remat changes memory, not values; gradients flow through it.
  x = rand(1, 224, 224, 3, seed=1)
  model_r = vit_det.ImageEncoderViT(cfg, remat=True)
  loss = lambda v: (jnp.sum(model_r.apply(v, x)[0] ** 2), model_r.apply(v, x)[0])
  (_, out_r), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
  np.testing.assert_allclose(out_r, apply(variables, x)[0], atol=1e-6)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["params"]["blocks_0"]["attn"]["rel_pos_h"]).sum()) > 0


# ---------------------------------------------------------------- fused attention
def max_rel(got, want):
  """max |got - want| / max |want|: the error against the reference's own scale."""
  want = np.asarray(want, np.float64)
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


@functools.lru_cache(maxsize=None)
def _loss_grad(model):
  """jit of (output, d/d(variables, x) of a loss that weights every output element differently)."""
  def loss(variables, x):
    y = model.apply(variables, x)
    y = y[0] if isinstance(y, tuple) else y  # the encoder's (embeddings, aux)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size), y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("window,hw", [(4, (8, 8)), (0, (6, 6)), (4, (7, 6)), (0, (7, 5))])
def test_fused_attention_matches_reference_and_torch(window, hw):
  # Windowed and global blocks; (7, 6) pads the windows unequally, (7, 5) is a non-square
  # global grid; tables sized for 8x8 and resampled where the grid differs.
  tm = randomize_(sam_ie.Block(64, 4, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                               use_rel_pos=True, window_size=window, input_size=(8, 8)), seed=8)
  x = rand(2, *hw, 64, seed=12)
  with torch.no_grad():
    want = tm(torch.from_numpy(x)).numpy()
  variables = to_flax(tm)
  ref = vit_det.Block(64, 4, use_rel_pos=True, window_size=window, input_size=(8, 8),
                      attention="reference")
  fused = ref.clone(attention="xla")
  check_tree(fused, variables, x)
  (_, y_ref), g_ref = _loss_grad(ref)(variables, x)
  (_, y_fused), g_fused = _loss_grad(fused)(variables, x)
  assert max_rel(y_fused, y_ref) <= 1e-5
  assert max_rel(y_fused, want) <= 1e-5
  flat_ref = dict(jax.tree_util.tree_flatten_with_path(g_ref)[0])
  flat_fused = dict(jax.tree_util.tree_flatten_with_path(g_fused)[0])
  assert flat_ref.keys() == flat_fused.keys() and len(flat_ref) == 15  # x + every parameter
  errs = {jax.tree_util.keystr(k): max_rel(flat_fused[k], g) for k, g in flat_ref.items()}
  assert max(errs.values()) <= 1e-5, errs
  assert np.abs(g_ref[0]["params"]["attn"]["rel_pos_h"]).max() > 0  # the tables get gradients


def test_fused_attention_without_rel_pos():
  model = vit_det.Attention(64, 4, use_rel_pos=False, attention="xla")
  x = rand(2, 5, 3, 64, seed=13)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  got = jax.jit(model.apply)(variables, x)
  want = jax.jit(model.clone(attention="reference").apply)(variables, x)
  assert max_rel(got, want) <= 1e-5


def test_encoder_fused_attention_matches_torch():
  enc, variables = _tiny()
  x = rand(2, 112, 96, 3, seed=14)
  want, want_blocks = torch_encoder(enc, x)
  got, aux = jax.jit(vit_det.ImageEncoderViT(TINY, attention="xla").apply)(variables, x)
  assert max_rel(got, want) <= 1e-5
  for i in range(TINY.depth):
    assert max_rel(aux[f"block_{i}"], want_blocks[i]) <= 1e-5


def test_attention_choice():
  assert vit_det.default_attention(jnp.float32, 192) == "reference"  # measured faster on CPU
  x = rand(1, 4, 4, 64)
  with pytest.raises(ValueError, match="unknown attention"):
    vit_det.Attention(64, 4, attention="flash").init(jax.random.key(0), x)


def test_remat_policy():
  cfg = vit_det.ImageEncoderConfig(img_size=64, embed_dim=32, depth=2, num_heads=2, window_size=2,
                                   global_attn_indexes=(1,), out_chans=8)
  x = jax.ShapeDtypeStruct((1, 64, 48, 3), jnp.float32)
  plain = vit_det.ImageEncoderViT(cfg)
  variables = jax.eval_shape(plain.init, jax.random.key(0), x)
  grad_of = lambda m: jax.grad(lambda v, x: jnp.sum(m.apply(v, x)[0]))
  jaxpr = lambda m: str(jax.make_jaxpr(grad_of(m))(variables, x))
  assert "remat" not in jaxpr(plain)
  # Each policy reaches jax.checkpoint, on every block (remat_policy alone turns remat on).
  seen = set()
  for policy in vit_det.REMAT_POLICIES:
    found = re.findall(r"policy=(\S+)", jaxpr(vit_det.ImageEncoderViT(cfg, remat_policy=policy)))
    assert len(found) >= cfg.depth and len(set(found)) == 1
    seen.add(found[0])
  assert len(seen) == len(vit_det.REMAT_POLICIES)
  with pytest.raises(ValueError, match="unknown remat policy"):
    jaxpr(vit_det.ImageEncoderViT(cfg, remat_policy="everything"))
  # Values and gradients unchanged (one block, the unit that is rematerialised).
  block = vit_det.Block(32, 2, use_rel_pos=True, window_size=0, input_size=(4, 4))
  xb = rand(1, 4, 3, 32, seed=15)
  vb = jax.jit(block.init)(jax.random.key(0), xb)
  loss = lambda m: lambda v, x: jnp.sum(m.apply(v, x) ** 2)
  grad = lambda m: jax.jit(jax.grad(loss(m), argnums=(0, 1)))(vb, xb)
  want = grad(block)
  got = grad(vit_det.maybe_remat(vit_det.Block, policy="dots_with_no_batch_dims_saveable")(
      32, 2, use_rel_pos=True, window_size=0, input_size=(4, 4)))
  assert max(jax.tree.leaves(jax.tree.map(max_rel, got, want))) <= 1e-5


def test_block_period():
  period = lambda name: vit_det.block_period(vit_det.ImageEncoderConfig.from_name(name))
  assert (period("vit_b"), period("vit_l"), period("vit_h")) == (3, 6, 8)
  assert vit_det.block_period(TINY) == 3  # (window, global, window): no repeat, one group
  assert vit_det.block_period(dataclasses.replace(TINY, depth=4, global_attn_indexes=(1, 3))) == 2


def test_scan_blocks_matches_torch_and_unrolled_gradients():
  # Depth 6 in two groups of (window, window, global), as vit_b's four; remat inside the scan too.
  cfg = dataclasses.replace(TINY, depth=6, global_attn_indexes=(2, 5))
  enc = randomize_(torch_image_encoder(cfg), seed=16)
  variables = to_flax(enc)
  x = rand(2, 112, 96, 3, seed=17)
  want, want_blocks = torch_encoder(enc, x)
  unrolled = vit_det.ImageEncoderViT(cfg)
  scanned = unrolled.clone(scan_blocks=True)
  check_tree(scanned, variables, x)
  got, aux = jax.jit(scanned.apply)(variables, x)
  assert max_abs(got, want) <= TOL
  for i in range(cfg.depth):
    assert max_abs(aux[f"block_{i}"], want_blocks[i]) <= TOL
  _, g_ref = _loss_grad(unrolled)(variables, x)
  flat_ref = dict(jax.tree_util.tree_flatten_with_path(g_ref)[0])
  for model in (scanned, scanned.clone(remat=True)):
    (_, y), g = _loss_grad(model)(variables, x)
    assert max_abs(y, want) <= TOL
    flat = dict(jax.tree_util.tree_flatten_with_path(g)[0])
    assert flat.keys() == flat_ref.keys()
    errs = {jax.tree_util.keystr(k): max_rel(flat[k], v) for k, v in flat_ref.items()}
    assert max(errs.values()) <= 1e-5, errs
  # One group is traced and compiled: one scan, and half the matmuls of the unrolled six blocks.
  jaxpr = lambda m: str(jax.make_jaxpr(m.apply)(variables, x))  # noqa: E731
  assert jaxpr(scanned).count("scan[") == 1 and "scan[" not in jaxpr(unrolled)
  assert jaxpr(scanned).count("dot_general") < 0.6 * jaxpr(unrolled).count("dot_general")
