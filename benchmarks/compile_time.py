"""Compile time of the ViT-Det encoder's forward + backward, blocks unrolled vs `scan_blocks`.

  python benchmarks/compile_time.py [--models vit_b,vit_l,vit_h] [--size 256] [--remat]

For each SAM size (real widths and depths; a small image, so compiling dominates), jits the
gradient of a scalar of the embeddings w.r.t. the parameters, then prints the seconds spent
lowering and compiling each way, the ratio scan / unrolled, one step's run time each way, and
the largest difference between the two paths' gradients (they compute the same function).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from samclip_jax.models.vit_det import ImageEncoderConfig, ImageEncoderViT, block_period  # noqa: E402


def grad_fn(cfg, scan: bool, remat: bool):
  model = ImageEncoderViT(cfg, remat=remat, scan_blocks=scan)
  loss = lambda p, x: jnp.mean(jnp.square(model.apply({"params": p}, x)[0]))  # noqa: E731
  return jax.jit(jax.grad(loss))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="vit_b,vit_l,vit_h")
  ap.add_argument("--size", type=int, default=256, help="image side (a multiple of 16)")
  ap.add_argument("--remat", action="store_true", help="rematerialise each block")
  a = ap.parse_args()
  print(f"{jax.devices()[0].device_kind}, image {a.size} px, batch 1, float32, remat={a.remat}; "
        f"load average {os.getloadavg()[0]:.1f}")
  for name in a.models.split(","):
    cfg = ImageEncoderConfig.from_name(name, img_size=a.size)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, a.size, a.size, 3)), jnp.float32)
    params = jax.jit(ImageEncoderViT(cfg).init)(jax.random.PRNGKey(0), x)["params"]
    row, grads = {}, {}
    for scan in (False, True):
      f = grad_fn(cfg, scan, a.remat)
      t0 = time.perf_counter()
      compiled = f.lower(params, x).compile()
      t1 = time.perf_counter()
      grads[scan] = jax.block_until_ready(compiled(params, x))
      t2 = time.perf_counter()
      grads[scan] = jax.block_until_ready(compiled(params, x))
      row[scan] = (t1 - t0, time.perf_counter() - t2)
    diff = max(float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(v)) + 1e-30))
               for u, v in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False])))
    print(f"{name}: depth {cfg.depth}, scanned in groups of {block_period(cfg)}; compile unrolled "
          f"{row[False][0]:.1f} s, scan {row[True][0]:.1f} s (ratio {row[True][0] / row[False][0]:.2f}); "
          f"step {row[False][1]:.2f} s vs {row[True][1]:.2f} s; max relative gradient difference {diff:.1e}",
          flush=True)


if __name__ == "__main__":
  main()
