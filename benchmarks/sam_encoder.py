"""Times the jitted Flax SAM image encoder against segment_anything's PyTorch one, same weights.

  python benchmarks/sam_encoder.py [--model vit_b] [--size 1024] [--batch 1] [--runs 3]

Runs are interleaved after a warm-up; prints the median wall time and process CPU time of
each, the ratios JAX / PyTorch, and the load average (the CPU machines here are shared, and
under load the CPU-time ratio is the steadier figure).
"""
import argparse
import functools
import os
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # convert/ beside samclip_jax/


def _cpu_seconds():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _timed(fn):
  """(wall s, process cpu s, result) of one call; cpu time is steadier under others' load."""
  t0, c0 = time.perf_counter(), _cpu_seconds()
  out = fn()
  return time.perf_counter() - t0, _cpu_seconds() - c0, out


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


def torch_to_flax(enc, cfg):
  """The encoder's weights through convert/sam.py's table, as users convert them."""
  import flax.linen as nn
  import jax
  from convert.common import apply_table
  from convert.sam import RULES
  from samclip_jax.models import vit_det
  state = {f"image_encoder.{k}": v.detach().cpu().numpy() for k, v in enc.state_dict().items()}
  skeleton = jax.eval_shape(vit_det.ImageEncoderViT(cfg).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, cfg.img_size, cfg.img_size, 3), np.float32))
  skeleton = {"image_encoder": nn.unbox(skeleton)["params"]}
  return {"params": apply_table(state, RULES, skeleton)["image_encoder"]}


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
  variables = jax.device_put(torch_to_flax(enc, cfg))
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
  mem = compiled.memory_analysis()
  if mem is not None:
    print(f"jax temp memory: {mem.temp_size_in_bytes / 2**30:.2f} GiB")
  runners = {"jax": lambda: compiled(variables, xj).block_until_ready()}
  if not args.skip_torch:
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    runners["torch"] = lambda: enc(xt)
  timings = {name: ([], []) for name in runners}
  outputs = {}
  with torch.no_grad():
    for name, fn in runners.items():  # warm-up
      fn()
    for _ in range(args.runs):  # interleaved, so both see the same machine load
      for name, fn in runners.items():
        wall, cpu, outputs[name] = _timed(fn)
        timings[name][0].append(wall)
        timings[name][1].append(cpu)
    if not args.skip_torch and args.dtype == "float32" and args.size == cfg.img_size:
      err = np.abs(np.asarray(outputs["jax"]) - outputs["torch"].permute(0, 2, 3, 1).numpy()).max()
      print(f"max-abs difference of embeddings: {err:.2e}")
  med = {}
  for name, (walls, cpus) in timings.items():
    med[name] = (statistics.median(walls), statistics.median(cpus))
    print(f"{name:5s} median wall {med[name][0]:.2f} s, cpu {med[name][1]:.2f} s  "
          f"(walls {', '.join(f'{t:.2f}' for t in walls)})")
  if "torch" in med:
    print(f"ratio jax/torch: wall {med['jax'][0] / med['torch'][0]:.2f}, "
          f"cpu time {med['jax'][1] / med['torch'][1]:.2f}")
  print(f"load average (1, 5, 15 min): {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
  sys.exit(main())
