"""Input-pipeline throughput per host vs what a train step consumes.

  python benchmarks/data_pipeline.py [--step-seconds S | --step-json FILE] [--workers 0,2]

Measures images/s of the CLIP loader (random-resized crop at 224/448, flip) and of the SAM
loader (decode, resize to 1024, pad, K=32 prompts) on the embedded sample, with each
worker count. The paper's step takes 2048 CLIP + 32 SAM images; a step of S seconds
needs 2048/S CLIP + 32/S SAM images/s. The verdict is for one host feeding one
accelerator that runs the whole step in S seconds; a host driving n accelerators (each
with its own full step) needs n times the rate.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from samclip_jax.data import pipeline, sample  # noqa: E402

PAPER_CLIP_BATCH, PAPER_SAM_BATCH = 2048, 32


def _rate(loader, batch_size, warmup, batches):
  """(images/s wall clock, images per CPU-second of this process)."""
  it = iter(loader)
  for _ in range(warmup):
    next(it)
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  n = batch_size * batches
  return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def _step_seconds(args):
  if args.step_json:
    with open(args.step_json) as f:
      data = json.load(f)
    for key in ("step_seconds", "seconds_per_step", "step_time_s", "step_time"):
      if key in data:
        return float(data[key]), f"{args.step_json}:{key}"
    raise SystemExit(f"{args.step_json} has none of step_seconds / seconds_per_step / step_time_s")
  return args.step_seconds, "--step-seconds"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--step-seconds", type=float, default=1.0,
                 help="train step time (2048 CLIP + 32 SAM images) on one accelerator")
  p.add_argument("--step-json", help="JSON written by the train benchmark (step_seconds key)")
  p.add_argument("--workers", default="0,2")
  p.add_argument("--clip-batch", type=int, default=32)
  p.add_argument("--sam-batch", type=int, default=4)
  p.add_argument("--batches", type=int, default=6)
  p.add_argument("--sample-dir", default=os.path.join(tempfile.gettempdir(), "samclip_sample"))
  p.add_argument("--json-out", help="also write the figures here")
  args = p.parse_args()
  flags.FLAGS.mark_as_parsed()
  paths = sample.ensure_sample(args.sample_dir)
  step_s, step_src = _step_seconds(args)
  cores = os.cpu_count()
  print(f"host: {cores} CPU cores; step time {step_s:.3f}s ({step_src})")
  results = {"cpu_count": cores, "step_seconds": step_s, "clip": {}, "sam": {}}
  for w in [int(x) for x in args.workers.split(",")]:
    warm = 2 if w else 1
    clip = pipeline.clip_loader(paths["clip_train"], batch_size=args.clip_batch, seed=0,
                                worker_count=w)
    results["clip"][w], clip_cpu = _rate(clip, args.clip_batch, warm, args.batches)
    sam = pipeline.sam_loader(paths["sam_train"], batch_size=args.sam_batch, masks_per_image=32,
                              points_per_prompt=3, seed=0, worker_count=w)
    results["sam"][w], sam_cpu = _rate(sam, args.sam_batch, warm, args.batches)
    print(f"workers={w}: CLIP {results['clip'][w]:8.1f} images/s (224/448 views)   "
          f"SAM {results['sam'][w]:6.1f} images/s (1024 + 32 prompts)")
    if w == 0:  # in-process work only: per busy core, whatever else loads the machine
      results["clip_per_core"], results["sam_per_core"] = clip_cpu, sam_cpu
      print(f"           per busy core (CPU time): CLIP {clip_cpu:.1f} images/s, SAM {sam_cpu:.1f} images/s")
  best = min(results["clip"], key=lambda w: PAPER_CLIP_BATCH / results["clip"][w]
             + PAPER_SAM_BATCH / results["sam"][w])
  clip_rate, sam_rate = results["clip"][best], results["sam"][best]
  host_seconds = PAPER_CLIP_BATCH / clip_rate + PAPER_SAM_BATCH / sam_rate
  need_clip, need_sam = PAPER_CLIP_BATCH / step_s, PAPER_SAM_BATCH / step_s
  print(f"one accelerator consumes {need_clip:.0f} CLIP + {need_sam:.1f} SAM images/s "
        f"({PAPER_CLIP_BATCH} + {PAPER_SAM_BATCH} per {step_s:.3f}s step)")
  print(f"this host (workers={best}) prepares one step's images in {host_seconds:.2f}s "
        f"({PAPER_CLIP_BATCH / clip_rate:.2f}s CLIP + {PAPER_SAM_BATCH / sam_rate:.2f}s SAM)")
  ratio = host_seconds / step_s
  if "clip_per_core" in results:  # robust to other load on the machine
    core_seconds = PAPER_CLIP_BATCH / results["clip_per_core"] + PAPER_SAM_BATCH / results["sam_per_core"]
    cores_needed = core_seconds / step_s
  else:
    cores_needed = ratio * cores
  verdict = "WOULD be the bottleneck" if ratio > 1 else "would keep up"
  print(f"pipeline/step time ratio {ratio:.2f}: the input pipeline {verdict} on this host; "
        f"about {cores_needed:.0f} busy cores of this speed per accelerator keep it fed "
        f"(worker processes scale about linearly)")
  results.update(best_workers=best, host_seconds_per_step=host_seconds, ratio=ratio,
                 cores_per_accelerator=cores_needed)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
