"""Train-step benchmark: time per step, images/s, FLOPs (XLA cost analysis), MFU, and the
projected accelerator-hours of the paper's full recipe from the measured FLOPs per image.

  python benchmarks/train_step.py --model=tiny                      # CPU, seconds
  python benchmarks/train_step.py --model=vit_b --clip_batch=256 --sam_batch=8 --remat
  python benchmarks/train_step.py --model=vit_b --project_only      # FLOPs + projection, no run

FLOPs come from XLA's cost analysis of the lowered step (matmuls/convs dominate; elementwise
ops are counted too, so it slightly over-counts "model FLOPs"). MFU = FLOPs / time / peak,
with peak dense bf16 (or fp32 on CPU: not reported) from the table below.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import merge  # noqa: E402
from samclip_jax import loop, sharding  # noqa: E402
from samclip_jax.tasks import merge as merge_task  # noqa: E402

# Dense peak FLOP/s per chip (bf16 tensor cores / MXU), vendor figures.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12,
}
# The paper's recipe (PAPER.md): Merged-41M; stage 2 steps: 2048 CLIP + 32 SAM images x 32 masks.
CLIP_IMAGES = 40_600_000
RECIPE = {"stage1_epochs": 20, "stage2_epochs": 16, "stage3_epochs": 3, "clip_batch": 2048,
          "sam_batch": 32, "masks": 32}


def peak_flops(device) -> float | None:
  kind = device.device_kind
  for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return flops
  return None


def make_config(args, stage="distill", clip_batch=None, sam_batch=None, clip_res=None, masks=None):
  c = merge.get_config(("local," if args.model == "tiny" else "") + stage)
  if args.model == "vit_b":
    c.model.sam_variant, c.model.clip_variant = "vit_b", "ViT-L-14"
    c.sam_image_size, c.clip_teacher_image_size = 1024, 224
  c.clip_batch_size = args.clip_batch if clip_batch is None else clip_batch
  c.sam_batch_size = (args.sam_batch if stage == "distill" else 0) if sam_batch is None else sam_batch
  c.masks_per_image = masks or args.masks_per_image
  c.clip_resolutions = (clip_res or args.clip_res,)
  c.compute_dtype = args.dtype
  c.remat = args.remat
  c.scan_blocks = args.scan_blocks
  c.mesh.data, c.mesh.fsdp = -1, 1
  if args.fsdp:
    c.mesh.data, c.mesh.fsdp = 1, -1
  return c


def abstract_inputs(exp, clip_res, offline_teacher):
  """ShapeDtypeStructs (with shardings) of (state, teachers, batches): lowering needs no memory."""
  state = exp.abstract_state()
  teachers = exp.teacher_targets
  host = exp.fake_batches(0, clip_resolution=clip_res)
  if offline_teacher and "clip" in host:
    host["clip"]["teacher_embedding"] = np.zeros((exp.config.clip_batch_size, exp.clip_config.embed_dim),
                                                 np.float32)
  bs = sharding.batch_sharding(exp.mesh, exp.rules)
  batches = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=bs), host)
  return state, teachers, batches


def step_flops(args, stage, clip_batch, sam_batch, clip_res, masks=None):
  """FLOPs of one train step of that shape, from the lowered HLO (no compile, no run)."""
  exp = merge_task.create(make_config(args, stage, clip_batch, sam_batch, clip_res, masks))
  lowered = loop.make_train_step(exp).lower(*abstract_inputs(exp, clip_res, args.offline_teacher))
  return float(lowered.cost_analysis()["flops"])


def per_image_flops(args):
  """FLOPs per CLIP image (by stage and resolution) and per SAM image (the recipe's 32 prompts)."""
  dp = jax.device_count()
  out = {}
  for res in (224, 448, 1024):
    out[("distill", res)] = step_flops(args, "distill", dp, 0, res) / dp
    out[("probe", res)] = step_flops(args, "probe", dp, 0, res) / dp
  out["sam"] = step_flops(args, "distill", 0, dp, args.clip_res, RECIPE["masks"]) / dp
  return out


def project(flops, mfu):
  """Accelerator-hours of the paper's three stages on each chip of PEAK_FLOPS at `mfu`."""
  clip_2 = (flops[("distill", 224)] + flops[("distill", 448)]) / 2  # uniform 224/448 batches
  probe_1 = (flops[("probe", 224)] + flops[("probe", 448)]) / 2
  probe_3 = (flops[("probe", 224)] + flops[("probe", 448)] + flops[("probe", 1024)]) / 3
  steps_2 = RECIPE["stage2_epochs"] * CLIP_IMAGES / RECIPE["clip_batch"]
  sam_image = flops["sam"]
  stages = {
      "stage1 (probe, 20 ep)": RECIPE["stage1_epochs"] * CLIP_IMAGES * probe_1,
      "stage2 (distill, 16 ep)": steps_2 * (RECIPE["clip_batch"] * clip_2 + RECIPE["sam_batch"] * sam_image),
      "stage3 (resolution, 3 ep)": RECIPE["stage3_epochs"] * CLIP_IMAGES * probe_3,
  }
  total = sum(stages.values())
  lines = [f"  {k}: {v:.3e} FLOPs" for k, v in stages.items()]
  lines.append(f"  total: {total:.3e} FLOPs")
  for chip in ("H100", "A100", "TPU v4", "TPU v5e", "TPU v5p"):
    hours = total / (PEAK_FLOPS[chip] * mfu) / 3600
    lines.append(f"  {chip:8s} at {mfu:.0%} MFU: {hours:,.0f} chip-hours"
                 f" ({hours / 32:,.0f} h on 32 chips, the paper's 4x8 A100 count)")
  return "\n".join(lines)


def run_timing(args):
  exp = merge_task.create(make_config(args))
  teachers = exp.init_aux()
  state = exp.init_state(teachers)
  step = loop.make_train_step(exp)
  host = exp.fake_batches(0)
  if args.offline_teacher and "clip" in host:
    host["clip"]["teacher_embedding"] = np.random.default_rng(0).normal(
        size=(args.clip_batch, exp.clip_config.embed_dim)).astype(np.float32)
  batches = exp.device_batches(host)
  t0 = time.perf_counter()
  compiled = step.lower(state, teachers, batches).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost["flops"])
  mem = compiled.memory_analysis()
  times = []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, teachers, batches)
    jax.block_until_ready(metrics)
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  dt = statistics.median(times)
  images = args.clip_batch + args.sam_batch
  dev = jax.devices()[0]
  print(f"device: {jax.device_count()} x {dev.device_kind} ({dev.platform}); model {args.model}; "
        f"dtype {args.dtype}; remat {args.remat}; mesh {dict(exp.mesh.shape)}")
  print(f"batch: {args.clip_batch} CLIP @ {args.clip_res} px + {args.sam_batch} SAM @ "
        f"{exp.config.sam_image_size} px x {args.masks_per_image} masks; teacher "
        f"{'offline' if args.offline_teacher else 'online'}")
  print(f"compile: {compile_s:.1f} s")
  print(f"step: {dt * 1e3:.1f} ms (median of {len(times)}; min {min(times) * 1e3:.1f}); "
        f"{images / dt:.1f} images/s; loss {float(metrics['total_loss']):.4f}")
  print(f"FLOPs/step (XLA cost analysis): {flops:.3e}; achieved {flops / dt / 1e12:.3f} TFLOP/s"
        f" per {jax.device_count()} device(s)")
  peak = peak_flops(dev)
  if peak and dev.platform != "cpu":
    print(f"MFU: {flops / dt / (peak * jax.device_count()):.1%} (peak {peak / 1e12:.0f} TFLOP/s/chip)")
  else:
    print("MFU: n/a (no peak figure for this device)")
  if mem is not None:
    print(f"memory per device: arguments {mem.argument_size_in_bytes / 2**20:.1f} MiB, "
          f"temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB, outputs {mem.output_size_in_bytes / 2**20:.1f} MiB "
          f"(aliased {mem.alias_size_in_bytes / 2**20:.1f} MiB)")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=("tiny", "vit_b"), default="tiny",
                 help="tiny: the ':local' CPU model (SAM 256 px); vit_b: SAM ViT-B 1024 + ViT-L/14 teacher")
  p.add_argument("--clip_batch", type=int, default=8)
  p.add_argument("--sam_batch", type=int, default=2)
  p.add_argument("--masks_per_image", type=int, default=4)
  p.add_argument("--clip_res", type=int, default=224)
  p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 elsewhere")
  p.add_argument("--remat", action="store_true")
  p.add_argument("--scan_blocks", action="store_true", help="the backbone's blocks as one lax.scan (compile time)")
  p.add_argument("--fsdp", action="store_true", help="shard params FSDP over all devices")
  p.add_argument("--offline_teacher", action="store_true", help="teacher embeddings come with the batch")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for the projection")
  p.add_argument("--project_only", action="store_true", help="FLOPs + projection only (no run)")
  p.add_argument("--no_project", action="store_true")
  args = p.parse_args()
  if args.dtype is None:
    args.dtype = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
  if not args.project_only:
    run_timing(args)
  if not args.no_project:
    t0 = time.perf_counter()
    flops = per_image_flops(args)
    print(f"FLOPs per image ({args.model}, fwd+bwd incl. {'no' if args.offline_teacher else 'online'} "
          f"teacher forward; {time.perf_counter() - t0:.0f} s to lower):")
    for res in (224, 448, 1024):
      print(f"  CLIP {res:4d} px: distill {flops[('distill', res)]:.3e}, head-only {flops[('probe', res)]:.3e}")
    print(f"  SAM 1 image x {RECIPE['masks']} masks: {flops['sam']:.3e}")
    print(f"Projected cost of the paper's recipe (41M images; stage 2 = {RECIPE['clip_batch']} CLIP + "
          f"{RECIPE['sam_batch']} SAM x {RECIPE['masks']} masks per step):")
    print(project(flops, args.mfu))


if __name__ == "__main__":
  main()
