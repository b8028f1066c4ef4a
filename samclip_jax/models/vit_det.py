"""SAM's ViT-Det image encoder (segment_anything/modeling/image_encoder.py) in Flax linen.

Parameter names mirror the PyTorch module (`blocks_3/attn/qkv/kernel`, `neck_1/weight`) so
the converter's table reads like a rename. Any input size that is a multiple of the patch
size works: the absolute position embedding is resampled bicubically to the token grid (as
detectron2's ViTDet `get_abs_pos`) and relative-position tables linearly (as SAM's
`get_rel_pos`), both with PyTorch's exact `F.interpolate` weights.
"""
import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from samclip_jax.interpolate import bicubic_matrix, linear_matrix
from samclip_jax.sharding import (CONV_IN, CONV_OUT, EMBED, HEADS, MLP, NONE, NORM, POS,
                                  param_with_axes)

Dtype = Any
_HIGHEST = jax.lax.Precision.HIGHEST

# Size variants exactly as segment_anything/build_sam.py builds them.
_VARIANTS = {
  "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
  "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
  "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


@dataclasses.dataclass(frozen=True)
class ImageEncoderConfig:
  """Hyper-parameters of ImageEncoderViT; defaults are SAM ViT-B."""
  img_size: int = 1024
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  out_chans: int = 256
  window_size: int = 14
  global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
  use_rel_pos: bool = True
  use_abs_pos: bool = True
  qkv_bias: bool = True

  def __post_init__(self):
    # JSON round trips give lists; keep the dataclass hashable.
    object.__setattr__(self, "global_attn_indexes",
                       tuple(int(i) for i in self.global_attn_indexes))
    if self.img_size % self.patch_size:
      raise ValueError(
          f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

  @classmethod
  def from_name(cls, name: str, **overrides) -> "ImageEncoderConfig":
    """The SAM size variant "vit_b", "vit_l" or "vit_h", as Meta's build_sam.py builds it."""
    if name not in _VARIANTS:
      raise ValueError(f"unknown SAM encoder {name!r}; expected one of {sorted(_VARIANTS)}")
    return cls(**{**_VARIANTS[name], **overrides})

  @property
  def grid_size(self) -> int:
    """Token grid side at img_size (the stored size of pos_embed)."""
    return self.img_size // self.patch_size

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["global_attn_indexes"] = list(self.global_attn_indexes)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ImageEncoderConfig":
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown ImageEncoderConfig keys: {sorted(unknown)}")
    return cls(**d)


# ---------------------------------------------------------------- resampling (PyTorch exact)
def resize_abs_pos(pos_embed: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """Bicubic resample of a [1, gh, gw, C] position table to [1, h, w, C] (ViTDet get_abs_pos)."""
  gh, gw = pos_embed.shape[1:3]
  h, w = hw
  if (gh, gw) == (h, w):
    return pos_embed
  mh = jnp.asarray(bicubic_matrix(gh, h), pos_embed.dtype)
  mw = jnp.asarray(bicubic_matrix(gw, w), pos_embed.dtype)
  pos = jnp.einsum("yi,bijc->byjc", mh, pos_embed, precision=_HIGHEST)
  return jnp.einsum("xj,byjc->byxc", mw, pos, precision=_HIGHEST)


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
  """Relative-position embeddings [q_size, k_size, C] from a table [L, C] (SAM get_rel_pos)."""
  max_rel_dist = int(2 * max(q_size, k_size) - 1)
  if rel_pos.shape[0] != max_rel_dist:
    m = jnp.asarray(linear_matrix(rel_pos.shape[0], max_rel_dist), rel_pos.dtype)
    rel_pos = jnp.dot(m, rel_pos, precision=_HIGHEST)
  # Static indices: shorter side's coordinates are scaled when q and k sizes differ.
  q_coords = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
  k_coords = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
  rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
  return rel_pos[rel.astype(np.int64)]


# ---------------------------------------------------------------- windows
def window_partition(x: jax.Array, window_size: int) -> tuple[jax.Array, tuple[int, int]]:
  """[B, H, W, C] -> ([B * nW, ws, ws, C], (Hp, Wp)), zero padding bottom/right."""
  b, h, w, c = x.shape
  pad_h = (window_size - h % window_size) % window_size
  pad_w = (window_size - w % window_size) % window_size
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  hp, wp = h + pad_h, w + pad_w
  x = x.reshape(b, hp // window_size, window_size, wp // window_size, window_size, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
  return x, (hp, wp)


def window_unpartition(windows: jax.Array, window_size: int, pad_hw: tuple[int, int],
                       hw: tuple[int, int]) -> jax.Array:
  """Inverse of window_partition: [B * nW, ws, ws, C] -> [B, H, W, C], padding dropped."""
  hp, wp = pad_hw
  h, w = hw
  b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
  x = windows.reshape(b, hp // window_size, wp // window_size, window_size, window_size, -1)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
  return x[:, :h, :w, :]


# ---------------------------------------------------------------- modules
_dense_init = nn.initializers.lecun_normal()
_zeros = nn.initializers.zeros
_ones = nn.initializers.ones


def dense(features, axes, dtype, name=None, use_bias=True):
  """nn.Dense whose kernel and bias carry logical axis names."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                  kernel_init=param_with_axes(_dense_init, *axes),
                  bias_init=param_with_axes(_zeros, axes[-1]))


def _layer_norm(dtype, name):
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name,
                      scale_init=param_with_axes(_ones, NORM),
                      bias_init=param_with_axes(_zeros, NORM))


class PatchEmbed(nn.Module):
  """Non-overlapping patch projection: [B, H, W, 3] -> [B, H/p, W/p, D]."""
  patch_size: int = 16
  embed_dim: int = 768
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    return nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                   kernel_init=param_with_axes(_dense_init, NONE, NONE, CONV_IN, CONV_OUT),
                   bias_init=param_with_axes(_zeros, CONV_OUT), name="proj")(x)


# ---------------------------------------------------------------- attention
def attend_reference(q, k, v, rel=None):
  """SAM's attention as written: [B, h, w, heads, d] -> [B, h*w, heads, d].

  The decomposed relative-position terms are added to the materialised [B, heads, N, N] logits.
  """
  b, h, w, heads, d = q.shape
  n = h * w
  scaled = q * jnp.asarray(d ** -0.5, q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", scaled.reshape(b, n, heads, d), k.reshape(b, n, heads, d))
  if rel is not None:
    rh, rw = rel
    rel_h = jnp.einsum("byxhc,ykc->bhyxk", q, rh)  # the bias uses the unscaled q, as in SAM
    rel_w = jnp.einsum("byxhc,xkc->bhyxk", q, rw)
    logits = logits.reshape(b, heads, h, w, h, w)
    logits = logits + rel_h[..., :, None] + rel_w[..., None, :]
    logits = logits.reshape(b, heads, n, n)
  # Softmax with the normalisation applied after the value product: one pass fewer over
  # the [heads, N, N] map, which XLA:CPU fuses with both matmuls.
  logits = logits.astype(jnp.float32)
  probs = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  denom = probs.sum(-1)
  out = jnp.einsum("bhqk,bkhd->bhqd", probs.astype(v.dtype), v.reshape(b, n, heads, d))
  out = out / denom[..., None].astype(v.dtype)
  return out.transpose(0, 2, 1, 3)


def rel_pos_channels(q, k, rh, rw):
  """SAM's logit with its relative positions folded into channels: q', k' [B, h, w, heads, d+h+w].

  q' = [q / sqrt(d), q.Rh[y, :], q.Rw[x, :]] and k' = [k, onehot(y_k), onehot(x_k)], so
  q'.k' = q.k / sqrt(d) + q.Rh[y_q, y_k] + q.Rw[x_q, x_k] exactly: SAM's biased logit, which any
  attention kernel then computes with scale 1 and no [N, N] bias tensor.
  """
  b, h, w, heads, d = q.shape
  rel_h = jnp.einsum("byxhc,ykc->byxhk", q, rh)
  rel_w = jnp.einsum("byxhc,xkc->byxhk", q, rw)
  q2 = jnp.concatenate([q * jnp.asarray(d ** -0.5, q.dtype), rel_h, rel_w], axis=-1)
  onehot_h = jnp.broadcast_to(jnp.eye(h, dtype=k.dtype)[:, None, None, :], (b, h, w, heads, h))
  onehot_w = jnp.broadcast_to(jnp.eye(w, dtype=k.dtype)[None, :, None, :], (b, h, w, heads, w))
  return q2, jnp.concatenate([k, onehot_h, onehot_w], axis=-1)


def attend_fused(q, k, v, rel=None, implementation: str = "xla"):
  """jax.nn.dot_product_attention on rel_pos_channels: [B, h, w, heads, d] -> [B, h*w, heads, d].

  jax.nn.dot_product_attention wants one head width for q, k and v: v is zero-padded to the
  width of q' (itself padded to a multiple of 8, as cuDNN requires) and the output sliced back.
  """
  b, h, w, heads, d = q.shape
  scale = d ** -0.5
  if rel is not None:
    q, k = rel_pos_channels(q, k, *rel)
    scale = 1.0  # q' carries the scale (and the rel-pos terms must not get it)
  width = -(-q.shape[-1] // 8) * 8
  pad = lambda t: jnp.pad(t.reshape(b, h * w, heads, -1),
                          ((0, 0), (0, 0), (0, 0), (0, width - t.shape[-1])))
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), scale=scale,
                                     implementation=implementation)
  return out[..., :d]


ATTENTION = {
  "reference": attend_reference,
  "xla": functools.partial(attend_fused, implementation="xla"),
  "cudnn": functools.partial(attend_fused, implementation="cudnn"),
}


def default_attention(dtype: Dtype, width: int) -> str:
  """ATTENTION key for the running backend; width = q' head width (d + h + w with rel-pos).

  CPU: "reference", measured faster there: a ViT-B block at 1024 px, forward + backward, batch 1,
  float32 on 2 busy cores took 7.5 s (global) / 3.1 s (windowed) as written against 16.2 s /
  3.4 s through "xla" (q'/k'/padded v three times as wide at the 64x64 grid). NVIDIA GPU:
  cuDNN's fused kernel where it applies (16-bit inputs, width <= 256 on Hopper, <= 128 before),
  else XLA. TPU and others: XLA (a Pallas TPU flash kernel is not wired
  in: nothing here could test it, and the 196-token windows are no multiple of its blocks).
  """
  device = jax.devices()[0]
  if device.platform == "cpu":
    return "reference"
  if "nvidia" in device.device_kind.lower() and jnp.dtype(dtype).itemsize == 2:
    hopper = float(getattr(device, "compute_capability", "0")) >= 9.0
    if -(-width // 8) * 8 <= (256 if hopper else 128):
      return "cudnn"
  return "xla"


class Attention(nn.Module):
  """Multi-head attention over a [B, H, W, C] grid with decomposed relative position bias.

  attention: an ATTENTION key ("reference": SAM's explicit logits + bias; "xla" / "cudnn":
  jax.nn.dot_product_attention with the bias folded into channels); None: default_attention.
  """
  dim: int
  num_heads: int = 8
  qkv_bias: bool = True
  use_rel_pos: bool = False
  input_size: tuple[int, int] | None = None  # sizes the rel-pos tables; runtime H, W may differ
  dtype: Dtype = jnp.float32
  attention: str | None = None

  @nn.compact
  def __call__(self, x):
    b, h, w, _ = x.shape
    heads = self.num_heads
    head_dim = self.dim // heads
    qkv = dense(3 * self.dim, (EMBED, HEADS), self.dtype, "qkv", self.qkv_bias)(x)
    # Torch layout of the fused output: (3, heads, head_dim).
    qkv = qkv.reshape(b, h, w, 3, heads, head_dim)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    rel = None
    if self.use_rel_pos:
      if self.input_size is None:
        raise ValueError("Attention with use_rel_pos needs input_size")
      rel_pos_h = self.param("rel_pos_h", param_with_axes(_zeros, POS, NONE),
                             (2 * self.input_size[0] - 1, head_dim))
      rel_pos_w = self.param("rel_pos_w", param_with_axes(_zeros, POS, NONE),
                             (2 * self.input_size[1] - 1, head_dim))
      rel = (get_rel_pos(h, h, rel_pos_h).astype(self.dtype),
             get_rel_pos(w, w, rel_pos_w).astype(self.dtype))
    impl = self.attention or default_attention(self.dtype, head_dim + (h + w if rel else 0))
    if impl not in ATTENTION:
      raise ValueError(f"unknown attention {impl!r}; expected one of {sorted(ATTENTION)}")
    out = ATTENTION[impl](q, k, v, rel).reshape(b, h, w, self.dim)
    return dense(self.dim, (HEADS, EMBED), self.dtype, "proj")(out)


class MLPBlock(nn.Module):
  """lin1 -> act -> lin2 (segment_anything's common.MLPBlock; exact GELU by default)."""
  embedding_dim: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  act: Callable = functools.partial(nn.gelu, approximate=False)

  @nn.compact
  def __call__(self, x):
    x = self.act(dense(self.mlp_dim, (EMBED, MLP), self.dtype, "lin1")(x))
    return dense(self.embedding_dim, (MLP, EMBED), self.dtype, "lin2")(x)


class Block(nn.Module):
  """Pre-norm transformer block; window attention when window_size > 0, else global."""
  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  use_rel_pos: bool = False
  window_size: int = 0
  input_size: tuple[int, int] | None = None  # token grid the global rel-pos tables are sized for
  dtype: Dtype = jnp.float32
  attention: str | None = None  # Attention.attention

  @nn.compact
  def __call__(self, x):
    shortcut = x
    x = _layer_norm(self.dtype, "norm1")(x)
    ws = self.window_size
    if ws > 0:
      hw = x.shape[1:3]
      x, pad_hw = window_partition(x, ws)
    x = Attention(self.dim, self.num_heads, self.qkv_bias, self.use_rel_pos,
                  self.input_size if ws == 0 else (ws, ws), self.dtype, self.attention,
                  name="attn")(x)
    if ws > 0:
      x = window_unpartition(x, ws, pad_hw, hw)
    x = shortcut + x
    y = _layer_norm(self.dtype, "norm2")(x)
    return x + MLPBlock(self.dim, int(self.dim * self.mlp_ratio), self.dtype, name="mlp")(y)


# What a rematerialised block keeps from its forward pass (the rest is recomputed).
REMAT_POLICIES = {
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,  # only the block input
  "dots_saveable": jax.checkpoint_policies.dots_saveable,  # every matmul output, attention's too
  # Weight matmuls only: keeps qkv / proj / MLP outputs, recomputes the [N, N] attention maps.
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def maybe_remat(module: type[nn.Module], remat: bool = False, policy: str | None = None):
  """module, or nn.remat(module) when remat or a REMAT_POLICIES policy is asked for."""
  if policy is not None and policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {policy!r}; expected one of {sorted(REMAT_POLICIES)}")
  if not (remat or policy):
    return module
  return nn.remat(module, policy=REMAT_POLICIES.get(policy))


def block_period(config: ImageEncoderConfig) -> int:
  """Smallest p dividing depth with block i global iff block i mod p is (vit_b: 3, vit_h: 8)."""
  glob = set(config.global_attn_indexes)
  for p in range(1, config.depth + 1):
    if config.depth % p == 0 and all((i in glob) == (i % p in glob) for i in range(config.depth)):
      return p
  return config.depth


def scanned_blocks(make: Callable, params: Mapping, x, config: ImageEncoderConfig) -> list:
  """The blocks blocks_0..blocks_{D-1} as a jax.lax.scan over groups of block_period(config).

  make(i) builds block i (unbound); params holds each block's parameters under blocks_i. The
  groups' parameters are stacked inside the computation (a copy; gradients flow back through
  it), so XLA compiles one group instead of D blocks. -> every block's output, in order.
  """
  depth, period = config.depth, block_period(config)
  groups = depth // period

  def group(x, group_params):
    ys = []
    for j in range(period):
      x = make(j, parent=None).apply({"params": group_params[j]}, x)
      ys.append(x)
    return x, jnp.stack(ys)

  stacked = [jax.tree.map(lambda *a: jnp.stack(a), *[params[f"blocks_{g * period + j}"] for g in range(groups)])
             for j in range(period)]
  _, ys = jax.lax.scan(group, x, stacked)                                     # [G, period, ...]
  return [ys[i // period, i % period] for i in range(depth)]


class LayerNorm2d(nn.Module):
  """Channel LayerNorm of NHWC maps (eps 1e-6); params keep torch's names weight/bias."""
  num_channels: int
  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", param_with_axes(_ones, NORM), (self.num_channels,))
    bias = self.param("bias", param_with_axes(_zeros, NORM), (self.num_channels,))
    x32 = x.astype(jnp.float32)
    u = x32.mean(-1, keepdims=True)
    s = jnp.square(x32 - u).mean(-1, keepdims=True)
    y = (x32 - u) * jax.lax.rsqrt(s + self.eps)
    return (weight * y + bias).astype(self.dtype)


class ImageEncoderViT(nn.Module):
  """SAM image encoder: x [B, H, W, 3] -> (embeddings [B, H/p, W/p, out_chans], aux)."""
  config: ImageEncoderConfig
  dtype: Dtype = jnp.float32  # compute dtype; params stay float32
  remat: bool = False  # rematerialise each block in the backward pass (jax's default policy)
  remat_policy: str | None = None  # REMAT_POLICIES key for those blocks; implies remat
  attention: str | None = None  # Attention.attention
  # Run the blocks as one jax.lax.scan over their repeating group (compile time at depth 24-32);
  # the parameters keep their per-block layout (blocks_i), so checkpoints are unchanged.
  scan_blocks: bool = False

  @nn.compact
  def __call__(self, x):
    c = self.config
    if x.shape[1] % c.patch_size or x.shape[2] % c.patch_size or x.shape[3] != c.in_chans:
      raise ValueError(f"input {x.shape} is not [B, H, W, {c.in_chans}] with H, W multiples "
                       f"of patch_size {c.patch_size}")
    x = PatchEmbed(c.patch_size, c.embed_dim, self.dtype, name="patch_embed")(x.astype(self.dtype))
    if c.use_abs_pos:
      g = c.grid_size
      pos_embed = self.param("pos_embed", param_with_axes(_zeros, NONE, POS, NONE, EMBED),
                             (1, g, g, c.embed_dim))
      x = x + resize_abs_pos(pos_embed, x.shape[1:3]).astype(self.dtype)
    block = maybe_remat(Block, self.remat, self.remat_policy)
    make = lambda i, **kw: block(c.embed_dim, c.num_heads, c.mlp_ratio, c.qkv_bias, c.use_rel_pos,  # noqa: E731
                                 0 if i in c.global_attn_indexes else c.window_size,
                                 (c.grid_size, c.grid_size), self.dtype, self.attention, **kw)
    if self.scan_blocks and not self.is_initializing():
      outs = scanned_blocks(make, self.variables["params"], x, c)
    else:
      outs = []
      for i in range(c.depth):
        x = make(i, name=f"blocks_{i}")(x)
        outs.append(x)
    aux = {f"block_{i}": y for i, y in enumerate(outs)}
    aux["tokens"] = outs[-1]
    x = outs[-1]
    conv_axes = (NONE, NONE, CONV_IN, CONV_OUT)
    x = nn.Conv(c.out_chans, (1, 1), use_bias=False, dtype=self.dtype, name="neck_0",
                kernel_init=param_with_axes(_dense_init, *conv_axes))(x)
    x = LayerNorm2d(c.out_chans, dtype=self.dtype, name="neck_1")(x)
    x = nn.Conv(c.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                name="neck_2", kernel_init=param_with_axes(_dense_init, *conv_axes))(x)
    x = LayerNorm2d(c.out_chans, dtype=self.dtype, name="neck_3")(x)
    return x, aux
