"""Which image towers learn the world's shapes from pixels, and how fast (supervised probe).

  python benchmarks/shape_probe.py --tower resnet --side 48 --max_shapes 1 --steps 600

Trains one tower from scratch to name the largest shape (5 classes, cross-entropy on a
normalised embedding, AdamW, batch 64, random flips) on `--train` scenes drawn once into
memory, and prints held-out top-1 every 100 steps next to the class prior. Towers: the
project's OpenCLIP ViT (`vit`) and ModifiedResNet (`resnet`, batch statistics), a ConvNeXt in
timm's layout (`convnext`) and a plain 8-conv CNN with GroupNorm (`cnn`). The README's
"Why the ViT CLIP teacher does not learn shapes" quotes its output.
"""
import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from samclip_jax.data import sample
from samclip_jax.models import clip
from samclip_jax.tasks import clip_pretrain, common


class Cnn(nn.Module):
  """Pairs of 3x3 conv + GroupNorm + ReLU at full resolution, then max pools."""

  @nn.compact
  def __call__(self, x):
    for c in (32, 64, 128, 128):
      for _ in range(2):
        x = nn.relu(nn.GroupNorm(8)(nn.Conv(c, (3, 3))(x)))
      x = nn.max_pool(x, (2, 2), (2, 2))
    return jnp.concatenate([x.mean((1, 2)), x.max((1, 2))], -1)


class ConvNext(nn.Module):
  """timm's ConvNeXt layout (4x4 patchify stem, 7x7 depthwise blocks, LayerNorm), dims 32..256."""

  @nn.compact
  def __call__(self, x):
    dims, depths = (32, 64, 128, 256), (2, 2, 4, 2)
    x = nn.LayerNorm(1e-6)(nn.Conv(dims[0], (4, 4), (4, 4), padding="VALID")(x))
    for i, (d, n) in enumerate(zip(dims, depths)):
      if i:
        x = nn.Conv(d, (2, 2), (2, 2), padding="VALID")(nn.LayerNorm(1e-6)(x))
      for _ in range(n):
        y = nn.Conv(d, (7, 7), feature_group_count=d)(x)
        y = nn.Dense(d)(nn.gelu(nn.Dense(4 * d)(nn.LayerNorm(1e-6)(y)), approximate=False))
        x = x + self.param(f"gamma_{i}_{_}", nn.initializers.constant(1e-6), (d,)) * y
    return nn.LayerNorm(1e-6)(x.mean((1, 2)))


class Probe(nn.Module):
  tower: nn.Module
  meanmax: bool = False  # ResNet: mean+max of its final feature map instead of its attention pool

  @nn.compact
  def __call__(self, pixels):
    if self.meanmax:
      x = self.tower(pixels, dense=True)[1]["tokens"]
      e = jnp.concatenate([x.mean((1, 2)), x.max((1, 2))], -1)
    else:
      e = self.tower(pixels)
      e = e[0] if isinstance(e, tuple) else e
    e = nn.Dense(128, use_bias=False)(e)
    return 10 * (e / jnp.linalg.norm(e, axis=-1, keepdims=True)) @ self.param("head", nn.initializers.zeros, (128, 5))


def make_tower(name: str, side: int, width: int) -> nn.Module:
  if name == "cnn":
    return Cnn()
  if name == "convnext":
    return ConvNext()
  if name == "vit":
    return clip.VisionTransformer(clip.VisionConfig(image_size=side, patch_size=4, width=128, layers=4,
                                                    head_width=32), 128)
  if name == "resnet":
    from samclip_jax.models.modified_resnet import ModifiedResNet
    return ModifiedResNet(clip.VisionConfig(image_size=side, patch_size=None, width=width, layers=(1, 1, 1, 1),
                                            head_width=32), 128, batch_stats=True)
  raise ValueError(f"unknown tower {name!r}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tower", default="resnet", choices=("cnn", "convnext", "vit", "resnet"))
  ap.add_argument("--side", type=int, default=64)
  ap.add_argument("--max_shapes", type=int, default=1, help="1: one large shape; 6: the world's scenes")
  ap.add_argument("--train", type=int, default=8000)
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--lr", type=float, default=2e-3)
  ap.add_argument("--width", type=int, default=16, help="resnet: stem width (final features 32x)")
  ap.add_argument("--open_residuals", action="store_true",
                  help="resnet: blocks' last BatchNorm scale starts at 1 (configs/teachers.py model.open_residuals)")
  ap.add_argument("--mean_pool_init", action="store_true",
                  help="resnet: the attention pool's query projection starts at 0 (model.mean_pool_init)")
  ap.add_argument("--meanmax", action="store_true",
                  help="resnet: pool the final feature map by mean+max, not the attention pool (diagnosis)")
  a = ap.parse_args()
  sizes = (0.2, 0.4) if a.max_shapes == 1 else (0.07, 0.28)
  scenes = [sample.draw_scene(7, i, a.side, a.side, a.max_shapes, sizes) for i in range(a.train + 512)]
  x = np.stack([s["image"] for s in scenes])
  y = np.array([sample.label(s) for s in scenes])
  xt, yt, xv, yv = x[:a.train], np.maximum(y[:a.train], 0), x[a.train:], y[a.train:]
  prior = np.bincount(yv[yv >= 0], minlength=5).max() / (yv >= 0).sum()
  model = Probe(make_tower(a.tower, a.side, a.width), a.meanmax)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((2, a.side, a.side, 3)))["params"])
  params = {"params": clip_pretrain.resnet_init(params, a.open_residuals, a.mean_pool_init)}
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, a.lr, 50, a.steps), b2=0.95, weight_decay=0.05)
  opt = tx.init(params)
  logits = lambda p, images: model.apply(p, common.normalize_clip(images))

  @jax.jit
  def step(p, o, images, labels):
    loss, g = jax.value_and_grad(
        lambda p: optax.softmax_cross_entropy_with_integer_labels(logits(p, images), labels).mean())(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  predict = jax.jit(lambda p, images: logits(p, images).argmax(-1))
  rng, t0 = np.random.default_rng(0), time.time()
  extras = "".join(f", {k}" for k in ("open_residuals", "mean_pool_init", "meanmax") if getattr(a, k))
  print(f"{a.tower}{f' width {a.width}{extras}' if a.tower == 'resnet' else ''}: {a.side} px, max {a.max_shapes} shapes, {a.train} scenes; class prior {prior:.3f}")
  for s in range(a.steps):
    i = rng.integers(0, a.train, 64)
    flip = rng.integers(2, size=64).astype(bool)[:, None, None, None]
    params, opt, loss = step(params, opt, np.where(flip, xt[i][:, :, ::-1], xt[i]), yt[i])
    if (s + 1) % 100 == 0:
      pred = np.concatenate([np.asarray(predict(params, xv[j:j + 128])) for j in range(0, len(xv), 128)])
      top1 = (pred == yv)[yv >= 0].mean()
      print(f"step {s + 1} loss {float(loss):.3f} held-out top-1 {top1:.3f} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
