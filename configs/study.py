"""The merge study (paper's figure 1 and ablations) on the embedded world, in miniature.

  python -m samclip_jax.study --config=configs/study.py:local --workdir=DIR
  python -m samclip_jax.study --config=configs/study.py:tiny --workdir=DIR   # tests: random teachers

Every variant runs through the real entry points (configs/merge.py stages, the loop, export)
and is measured by samclip_jax.world_eval on held-out world scenes.
"""
import ml_collections

VARIANTS = ("sam_teacher", "clip_teacher", "head_probe", "no_rehearsal", "samclip", "weight_average")


def get_config(arg: str = "local") -> ml_collections.ConfigDict:
  if arg not in ("local", "tiny"):
    raise ValueError(f"configs/study.py takes 'local' or 'tiny', got {arg!r}")
  c = ml_collections.ConfigDict()
  c.merge = arg  # configs/merge.py variant every stage derives from
  c.variants = VARIANTS  # which to run (and report), in order (tuples: overridable on the command line)
  c.probe_steps = 150 if arg == "local" else 4  # stage 1 (CLIP head only)
  c.distill_steps = 150 if arg == "local" else 4  # stage 2 (and no_rehearsal's CLIP-only distillation)
  c.resolution_steps = 40 if arg == "local" else 2  # stage 3
  c.lambda_sweep = ()  # extra stage-2 runs at these lambdas (10 is samclip): --config.lambda_sweep='(1.0,100.0)'
  c.wise_alpha = 0.5  # weight_average: alpha * no_rehearsal + (1 - alpha) * SAM (backbone + SAM head)
  c.eval_scenes = 48 if arg == "local" else 4  # held-out world scenes per measurement
  c.semseg_scenes = 24 if arg == "local" else 2
  c.scene_side = 128 if arg == "local" else 64
  c.lock()
  return c
