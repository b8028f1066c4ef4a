"""Training: the task named by config.task, run by the one loop (samclip_jax/loop.py).

Tasks (samclip_jax/tasks/): "merge" (SAM-CLIP's stages, configs/merge.py), "sam_pretrain" and
"clip_pretrain" (the small teachers of the embedded world, configs/teachers.py).
"""
import importlib

import jax

from samclip_jax import loop, sharding

TASKS = {"merge": "samclip_jax.tasks.merge", "sam_pretrain": "samclip_jax.tasks.sam_pretrain",
         "clip_pretrain": "samclip_jax.tasks.clip_pretrain"}


def create_task(config, devices=None):
  """The task object of a config (validated, nothing materialised yet)."""
  name = config.get("task", "merge")
  if name not in TASKS:
    raise ValueError(f"config.task must be one of {sorted(TASKS)}, got {name!r}")
  return importlib.import_module(TASKS[name]).create(config, devices)


def train_and_evaluate(config, workdir: str, *, stop_at_step: int | None = None,
                       devices=None) -> dict:
  """Runs (or resumes) the training described by `config` in `workdir`; returns final metrics.

  stop_at_step: leave the loop after that step (after checkpointing it), as a preemption
  would; rerunning resumes. devices: the devices the mesh spans (default: all of them).
  """
  sharding.initialize_from_config(config)
  config = loop.resume_config(config, workdir, say=print if jax.process_index() == 0 else lambda _: None)
  return loop.run(create_task(config, devices), workdir, stop_at_step=stop_at_step)
