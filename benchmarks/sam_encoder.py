"""Times the jitted Flax SAM image encoder against segment_anything's PyTorch one, same weights.

  python benchmarks/sam_encoder.py [--model vit_b] [--size 1024] [--batch 1] [--runs 3]
      [--attention reference,xla] [--backward] [--skip_torch]

--attention times each named vit_det.ATTENTION path (default: the backend's choice) in the
same interleaved runs; --backward times forward + backward (gradient of a scalar of the
embeddings w.r.t. the parameters and the image) instead of the forward pass, JAX only.

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
  parser.add_argument("--attention", default="default",
                      help="comma-separated vit_det.ATTENTION keys, or 'default' (the backend's)")
  parser.add_argument("--backward", action="store_true", help="time forward + backward (JAX only)")
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import torch

  from samclip_jax.models import vit_det

  cfg = vit_det.ImageEncoderConfig.from_name(args.model)
  enc = torch_encoder(cfg)
  variables = jax.device_put(torch_to_flax(enc, cfg))
  x = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3), np.float32)
  xj = jax.device_put(x)
  attentions = [None if a == "default" else a for a in args.attention.split(",")]
  for a in attentions:
    if a is not None and a not in vit_det.ATTENTION:
      raise SystemExit(f"--attention {a!r}: expected 'default' or one of "
                       f"{sorted(vit_det.ATTENTION)}")
  if args.backward:
    args.skip_torch = True

  def program(attention):
    """Jitted embeddings (or their gradients) with that attention path."""
    model = vit_det.ImageEncoderViT(cfg, dtype=jnp.dtype(args.dtype), attention=attention)
    # Only the embeddings leave the jit, so XLA drops the unused intermediates.
    forward = lambda v, x: model.apply(v, x)[0]
    if args.backward:
      loss = lambda v, x: jnp.mean(jnp.square(forward(v, x).astype(jnp.float32)))
      return jax.jit(jax.grad(loss, argnums=(0, 1)))
    return jax.jit(forward)

  dev = jax.devices()[0]
  print(f"SAM image encoder {args.model}, {args.batch}x{args.size}x{args.size}, {args.dtype}, "
        f"{'forward + backward' if args.backward else 'forward'}; jax {jax.__version__} on "
        f"{dev.platform} ({dev.device_kind}; {os.cpu_count()} cpus), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  runners = {}
  for attention in attentions:
    name = f"jax[{attention or 'default'}]"
    t0 = time.perf_counter()
    try:  # a kernel that does not apply here (cuDNN on CPU, a head width it lacks) skips its path
      compiled = program(attention).lower(variables, xj).compile()
    except Exception as e:  # noqa: BLE001
      print(f"{name} skipped: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
      continue
    print(f"{name} compile: {time.perf_counter() - t0:.1f} s", flush=True)
    mem = compiled.memory_analysis()
    if mem is not None:
      print(f"{name} temp memory: {mem.temp_size_in_bytes / 2**30:.2f} GiB")
    runners[name] = functools.partial(lambda c: jax.block_until_ready(c(variables, xj)), compiled)
  if not runners:
    raise SystemExit("no attention path compiled")
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
      for name in runners.keys() - {"torch"}:
        err = np.abs(np.asarray(outputs[name]) - outputs["torch"].permute(0, 2, 3, 1).numpy()).max()
        print(f"{name} max-abs difference of embeddings from torch: {err:.2e}")
  jax_names = [n for n in runners if n != "torch"]
  if not args.backward and len(jax_names) > 1:  # the paths compute one function
    first = np.asarray(outputs[jax_names[0]], np.float32)
    for name in jax_names[1:]:
      err = np.abs(np.asarray(outputs[name], np.float32) - first).max()
      print(f"max-abs difference {name} vs {jax_names[0]}: {err:.2e}")
  med = {}
  for name, (walls, cpus) in timings.items():
    med[name] = (statistics.median(walls), statistics.median(cpus))
    print(f"{name:14s} median wall {med[name][0]:.3f} s, cpu {med[name][1]:.2f} s  "
          f"({args.batch / med[name][0]:.2f} img/s; walls {', '.join(f'{t:.3f}' for t in walls)})")
  for name in jax_names:
    if "torch" in med:
      print(f"ratio {name}/torch: wall {med[name][0] / med['torch'][0]:.2f}, "
            f"cpu time {med[name][1] / med['torch'][1]:.2f}")
    if name != jax_names[0]:
      print(f"ratio {name}/{jax_names[0]}: wall {med[name][0] / med[jax_names[0]][0]:.2f}")
  print(f"load average (1, 5, 15 min): {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
  sys.exit(main())
