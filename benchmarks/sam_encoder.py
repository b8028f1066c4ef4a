"""Times the jitted Flax SAM image encoder against segment_anything's PyTorch one, same weights.

  python benchmarks/sam_encoder.py [--model vit_b] [--size 1024] [--batch 1] [--runs 3]

Prints the median wall time of each (after warm-up) and the ratio JAX / PyTorch, plus the
load average, since the CPU machines here are shared.
"""
import argparse
import functools
import os
import statistics
import sys
import time

import numpy as np


def _median_time(fn, runs):
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def torch_encoder(cfg):
  """segment_anything's ImageEncoderViT built as build_sam.py does, random weights."""
  import torch
  from segment_anything.modeling import image_encoder as sam_ie
  torch.manual_seed(0)
  enc = sam_ie.ImageEncoderViT(
      img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
      depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
      out_chans=cfg.out_chans, qkv_bias=cfg.qkv_bias,
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=cfg.use_rel_pos,
      window_size=cfg.window_size, global_attn_indexes=cfg.global_attn_indexes)
  with torch.no_grad():  # torch initialises rel-pos and pos_embed to zeros
    for name, p in enc.named_parameters():
      if "rel_pos" in name or "pos_embed" in name:
        p.normal_(0.0, 0.25)
  return enc.eval()


def torch_to_flax(module):
  """State dict -> Flax params by the project's naming rule (Linear/Conv transposed)."""
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
      if a.ndim == 4:
        path[-1], a = "kernel", a.transpose(2, 3, 1, 0)
      elif a.ndim == 2:
        path[-1], a = "kernel", a.T
      elif not path[-2].startswith("neck_"):
        path[-1] = "scale"
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.ascontiguousarray(a)
  return {"params": tree}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
  parser.add_argument("--size", type=int, default=1024)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--skip_torch", action="store_true")
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import torch

  from samclip_jax.models import vit_det

  cfg = vit_det.ImageEncoderConfig.from_name(args.model)
  enc = torch_encoder(cfg)
  variables = jax.device_put(torch_to_flax(enc))
  model = vit_det.ImageEncoderViT(cfg, dtype=jnp.dtype(args.dtype))
  # Only the embeddings leave the jit, so XLA drops the unused intermediates.
  apply = jax.jit(lambda v, x: model.apply(v, x)[0])
  x = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3), np.float32)
  xj = jax.device_put(x)

  print(f"SAM image encoder {args.model}, {args.batch}x{args.size}x{args.size}, {args.dtype}; "
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cpus), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  t0 = time.perf_counter()
  compiled = apply.lower(variables, xj).compile()
  print(f"jax compile: {time.perf_counter() - t0:.1f} s")
  run_jax = lambda: compiled(variables, xj).block_until_ready()
  run_jax()  # warm-up
  jax_s, jax_all = _median_time(run_jax, args.runs)
  print(f"jax   median {jax_s:.2f} s  (runs {', '.join(f'{t:.2f}' for t in jax_all)})")
  mem = compiled.memory_analysis()
  if mem is not None:
    print(f"jax   temp memory {mem.temp_size_in_bytes / 2**30:.2f} GiB")
  if args.skip_torch:
    return
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    run_torch = lambda: enc(xt)
    run_torch()  # warm-up
    torch_s, torch_all = _median_time(run_torch, args.runs)
    print(f"torch median {torch_s:.2f} s  (runs {', '.join(f'{t:.2f}' for t in torch_all)})")
    if args.dtype == "float32" and args.size == cfg.img_size:
      err = np.abs(np.asarray(compiled(variables, xj)) - enc(xt).permute(0, 2, 3, 1).numpy()).max()
      print(f"max-abs difference of embeddings: {err:.2e}")
  print(f"ratio jax/torch: {jax_s / torch_s:.2f}")
  print(f"load average (1, 5, 15 min): {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
  sys.exit(main())
