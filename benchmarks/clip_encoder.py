"""Times the jitted Flax OpenCLIP image tower against open_clip's PyTorch one, same weights, same CPU.

  python benchmarks/clip_encoder.py [--model ViT-L-14] [--size 224] [--batch 8] [--runs 3]

Warm-up (and compile) first, then runs alternate PyTorch / JAX so that load from other users of a
shared machine hits both alike. Prints each median, the ratio JAX / PyTorch (< 1: JAX faster),
the max-abs difference of the embeddings, and the load average.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def _timed_cpu(fn):
  """(wall seconds, CPU seconds of this process): the latter shrugs off other users' load."""
  t0, c0 = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="ViT-L-14")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import open_clip
  import torch
  from open_clip.model import _build_vision_tower

  from convert import common
  from convert.open_clip import RULES
  from samclip_jax.models import clip

  config = clip.ClipConfig.from_name(args.model)
  torch.manual_seed(0)
  oc_cfg = open_clip.get_model_config(args.model)
  tower = _build_vision_tower(oc_cfg["embed_dim"], oc_cfg["vision_cfg"], oc_cfg.get("quick_gelu", False)).eval()
  if args.size != config.vision.image_hw[0]:
    raise SystemExit(f"--size {args.size}: this script times the model at its native size "
                     f"{config.vision.image_hw[0]}")
  state = {f"visual.{k}": v.numpy() for k, v in tower.state_dict().items()}
  skeleton = {"visual": clip.abstract_params(config)["visual"]}
  params = jax.device_put(common.apply_table(state, RULES, skeleton)["visual"])
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  module = clip.VisionTransformer(config.vision, config.embed_dim, config.quick_gelu, dtype=dtype)
  encode = jax.jit(lambda p, x: module.apply({"params": p}, x)[0])

  x = np.random.RandomState(0).randn(args.batch, args.size, args.size, 3).astype(np.float32)
  x_torch = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  x_jax = jax.device_put(x)
  run_jax = lambda: encode(params, x_jax).block_until_ready()
  torch_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32

  def run_torch():
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch_dtype, enabled=args.dtype == "bfloat16"):
      return tower(x_torch)

  print(f"{args.model} image tower, batch {args.batch} at {args.size}px, {args.dtype}; "
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cpus), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)", flush=True)
  compile_s, _ = _timed(lambda: encode.lower(params, x_jax).compile())
  warm_torch, ref = _timed(run_torch)
  warm_jax, out = _timed(run_jax)
  print(f"warm-up: torch {warm_torch:.2f}s, jax {warm_jax:.2f}s (compile {compile_s:.1f}s); "
        f"max |jax - torch| = {np.abs(np.asarray(out, np.float32) - ref.float().numpy()).max():.2e}", flush=True)
  t_torch, t_jax = [], []
  for i in range(args.runs):
    t_torch.append(_timed_cpu(run_torch))
    t_jax.append(_timed_cpu(run_jax))
    print(f"run {i}: torch {t_torch[-1][0]:.3f}s (cpu {t_torch[-1][1]:.2f}s)  "
          f"jax {t_jax[-1][0]:.3f}s (cpu {t_jax[-1][1]:.2f}s)", flush=True)
  mt, mj = (statistics.median(w for w, _ in t) for t in (t_torch, t_jax))
  ct, cj = (statistics.median(c for _, c in t) for t in (t_torch, t_jax))
  print(f"median wall: torch {mt:.3f}s ({args.batch / mt:.2f} img/s), jax {mj:.3f}s ({args.batch / mj:.2f} img/s)")
  print(f"median CPU time: torch {ct:.2f}s, jax {cj:.2f}s")
  print(f"ratio jax / torch = {mj / mt:.3f} wall, {cj / ct:.3f} CPU time   "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus)")


if __name__ == "__main__":
  main()
