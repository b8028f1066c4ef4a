"""The merge study (paper's figure 1 and ablations) on the embedded world, in miniature.

  python -m samclip_jax.study --config=configs/study.py:local --workdir=DIR
  python -m samclip_jax.study --config=configs/study.py:tiny --workdir=DIR   # tests: random teachers

Every variant runs through the real entry points (configs/merge.py stages, the loop, export)
and is measured by samclip_jax.world_eval on held-out world scenes.
"""
import ml_collections

VARIANTS = ("sam_teacher", "clip_teacher", "head_probe", "no_rehearsal", "samclip", "weight_average")

# Design choices of the distillation (issue 8), each the samclip recipe with stages 2 and 3
# changed by these merge-config overrides; variant "samclip_NAME".
ABLATIONS = {
    # sigmoid of the SAM teacher's logits as targets, not binarised masks (the default, as the paper)
    "soft_targets": {"sam_soft_targets": True},
    # AdamW decays the backbone and SAM head toward 0 too (the default decays the new CLIP head only)
    "decay_all": {"optim.no_decay": [".*pos_embed", ".*rel_pos_.*"]},
}


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
  c.ablations = ()  # extra samclip recipes, names of ABLATIONS: --config.ablations='("soft_targets",)'
  c.wise_alpha = 0.5  # weight_average: alpha * no_rehearsal + (1 - alpha) * SAM (backbone + SAM head)
  c.eval_scenes = 48 if arg == "local" else 4  # held-out world scenes per measurement
  c.semseg_scenes = 24 if arg == "local" else 2
  c.scene_side = 128 if arg == "local" else 64
  c.lock()
  return c
