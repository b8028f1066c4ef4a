"""OpenCLIP's ModifiedResNet image tower (open_clip/modified_resnet.py: RN50, RN101, RN50x4, ...) in Flax.

A ResNet with a 3-conv stem, anti-aliased strided blocks (an average pool before the stride
instead of a strided convolution) and a QKV attention pool in place of the global average
pool. Parameter names mirror open_clip's state dict (`visual.layer2.0.downsample.1.running_mean`
-> `visual/layer2_0/downsample_1/running_mean`).

BatchNorm keeps its running statistics as ordinary parameters (`running_mean`,
`running_var`), so a CLIP model stays one params tree everywhere (Orbax, converters, sharding).
`batch_stats=True` normalises with the statistics of the batch instead, as torch's training
mode does. They are the global batch's: under jit with a batch-sharded input XLA reduces
across devices, so they do not depend on the device count. Nothing is updated in place: after
training, `precise_bn` sets the running statistics to the population statistics of a few
training batches (pycls's "precise BN"), which needs no moving average in the train state.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from samclip_jax.models.clip import resample_pos_embed  # clip imports this module lazily
from samclip_jax.sharding import CONV_IN, EMBED, HEADS, NONE, NORM, POS, param_with_axes

Dtype = Any
BN_EPS = 1e-5  # torch BatchNorm2d
EXPANSION = 4  # Bottleneck output channels / planes


class BatchNorm(nn.Module):
  """torch BatchNorm2d over the last axis of NHWC: running statistics, or the batch's own."""
  batch_stats: bool = False
  dtype: Dtype = jnp.float32
  zero_scale: bool = False  # open_clip starts each block's last BatchNorm at 0 (identity blocks)

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale_init = nn.initializers.zeros_init() if self.zero_scale else nn.initializers.ones_init()
    scale = self.param("scale", param_with_axes(scale_init, NORM), (c,))
    bias = self.param("bias", param_with_axes(nn.initializers.zeros_init(), NORM), (c,))
    mean = self.param("running_mean", param_with_axes(nn.initializers.zeros_init(), NORM), (c,))
    var = self.param("running_var", param_with_axes(nn.initializers.ones_init(), NORM), (c,))
    xf = x.astype(jnp.float32)
    if self.batch_stats:  # torch's training mode: biased batch variance
      mean = jnp.mean(xf, axis=(0, 1, 2))
      var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
      self.sow("batch_stats", "mean", mean)  # read by precise_bn (with mutable=["batch_stats"])
      self.sow("batch_stats", "var", var)
    y = (xf - mean) * jax.lax.rsqrt(var + BN_EPS) * scale + bias
    return y.astype(self.dtype)


def _conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, dtype=dtype, name=name,
                 kernel_init=param_with_axes(nn.initializers.kaiming_normal(), NONE, NONE, CONV_IN, EMBED))


def _avg_pool(x, size: int):
  return nn.avg_pool(x, (size, size), (size, size), padding="VALID") if size > 1 else x


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> (avg pool) -> 1x1 (x4 channels), each with BatchNorm; ReLU after the sum."""
  planes: int
  stride: int = 1
  batch_stats: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    bn = lambda name, zero=False: BatchNorm(self.batch_stats, self.dtype, zero, name=name)
    out = nn.relu(bn("bn1")(_conv(self.planes, 1, "conv1", self.dtype)(x)))
    out = nn.relu(bn("bn2")(_conv(self.planes, 3, "conv2", self.dtype)(out)))
    out = bn("bn3", True)(_conv(self.planes * EXPANSION, 1, "conv3", self.dtype)(_avg_pool(out, self.stride)))
    identity = x
    if self.stride > 1 or x.shape[-1] != self.planes * EXPANSION:
      identity = _conv(self.planes * EXPANSION, 1, "downsample_0", self.dtype)(_avg_pool(x, self.stride))
      identity = bn("downsample_1")(identity)
    return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
  """The mean token attends over [mean, positions] (F.multi_head_attention_forward); c_proj."""
  grid: tuple[int, int]  # feature grid at the config's image size (stored position table)
  heads: int
  output_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, dense: bool = False):
    """x [B, h, w, C] -> (pooled [B, output_dim], per-position embeddings [B, h, w, out] or None)."""
    b, h, w, c = x.shape
    pos = self.param("positional_embedding", param_with_axes(nn.initializers.normal(c ** -0.5), POS, EMBED),
                     (self.grid[0] * self.grid[1] + 1, c))
    tokens = x.reshape(b, h * w, c)
    tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
    tokens = tokens + resample_pos_embed(pos, self.grid, (h, w)).astype(self.dtype)
    dense_layer = lambda name, features, axes: nn.Dense(
        features, dtype=self.dtype, name=name,
        kernel_init=param_with_axes(nn.initializers.normal(c ** -0.5), *axes),
        bias_init=param_with_axes(nn.initializers.zeros_init(), axes[-1]))
    q_proj, k_proj, v_proj = (dense_layer(n, c, (EMBED, HEADS)) for n in ("q_proj", "k_proj", "v_proj"))
    c_proj = dense_layer("c_proj", self.output_dim, (HEADS, EMBED))
    d = c // self.heads
    q = q_proj(tokens[:, :1]).reshape(b, 1, self.heads, d) * d ** -0.5  # only the mean token's output is kept
    k = k_proj(tokens).reshape(b, -1, self.heads, d)
    v = v_proj(tokens).reshape(b, -1, self.heads, d)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
    pooled = c_proj(out.reshape(b, c))
    # MaskCLIP's dense features for a ResNet: each position's value through the output projection.
    per_position = c_proj(v[:, 1:].reshape(b, h, w, c)) if dense else None
    return pooled, per_position


class ModifiedResNet(nn.Module):
  """open_clip's ModifiedResNet; returns (pooled [B, D], aux) as the ViT tower does."""
  config: Any  # clip.VisionConfig with layers = (n1, n2, n3, n4)
  output_dim: int
  batch_stats: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels, dense: bool = False):
    """pixels [B, H, W, 3] normalised; aux = {"tokens": final feature map, "patch_embeddings"}."""
    cfg, width = self.config, self.config.width
    bn = lambda name: BatchNorm(self.batch_stats, self.dtype, name=name)
    x = pixels.astype(self.dtype)
    x = nn.relu(bn("bn1")(_conv(width // 2, 3, "conv1", self.dtype, stride=2)(x)))
    x = nn.relu(bn("bn2")(_conv(width // 2, 3, "conv2", self.dtype)(x)))
    x = nn.relu(bn("bn3")(_conv(width, 3, "conv3", self.dtype)(x)))
    x = _avg_pool(x, 2)
    for i, blocks in enumerate(cfg.layers):
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = Bottleneck(width * 2 ** i, stride, self.batch_stats, self.dtype, name=f"layer{i + 1}_{j}")(x)
    h, w = cfg.image_hw
    pooled, per_position = AttentionPool2d((h // 32, w // 32), cfg.heads, self.output_dim, self.dtype,
                                           name="attnpool")(x, dense)
    aux = {"tokens": x, "patch_embeddings": per_position} if dense else {}
    return pooled, aux


def precise_bn(params: dict, batch_stats_fn, batches) -> dict:
  """`params` with every BatchNorm's running statistics set to those of `batches` together.

  batch_stats_fn(params, batch) -> the "batch_stats" collection a batch_stats=True apply with
  mutable=["batch_stats"] collects ({.../bn: {"mean": (m,), "var": (v,)}}). Per channel, over
  equal-sized batches: mean = E[m_b], var = E[v_b + m_b^2] - mean^2 (the population's).
  """
  from flax import traverse_util
  sums, n = {}, 0
  for batch in batches:
    flat = traverse_util.flatten_dict(jax.device_get(batch_stats_fn(params, batch)))
    for path, (value,) in flat.items():
      value = np.asarray(value, np.float64)
      if path[-1] == "var":
        value = value + np.square(np.asarray(flat[path[:-1] + ("mean",)][0], np.float64))
      sums[path] = sums.get(path, 0.0) + value
    n += 1
  if not n:
    raise ValueError("precise_bn needs at least one batch")
  out = traverse_util.flatten_dict(jax.device_get(params))
  for path, total in sums.items():
    if path[-1] == "mean":
      mean = total / n
      var = sums[path[:-1] + ("var",)] / n - np.square(mean)
      dtype = out[path[:-1] + ("running_mean",)].dtype
      out[path[:-1] + ("running_mean",)] = mean.astype(dtype)
      out[path[:-1] + ("running_var",)] = np.maximum(var, 0.0).astype(dtype)
  return traverse_util.unflatten_dict(out)
