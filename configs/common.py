"""The fields every training task shares (loop, devices, optimizer): configs start from these."""
import importlib.util
import os

import ml_collections

TEACHERS_DIR = ("assets", "teachers")  # inside the samclip_jax package


def shipped_teacher(name: str) -> str:
  """Path of a teacher shipped in the package ("sam" or "clip"), found without importing it."""
  package = importlib.util.find_spec("samclip_jax").submodule_search_locations[0]
  return os.path.join(package, *TEACHERS_DIR, name)


def loop_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the loop, device and optimizer fields with their defaults to `c`."""
  c.seed = 0  # parameter init and the data order; all randomness
  #             is a function of (seed, step): no other randomness exists on device
  # PRNG for parameter init: threefry gives the same values whatever the mesh; "unsafe_rbg"
  # compiles ~3x faster (CPU runs) but its values may depend on the sharding.
  c.prng_impl = "threefry2x32"

  # ---- loop
  c.total_steps = 1000  # optimizer updates
  c.log_every_steps = 50  # console + TensorBoard scalars every this many steps
  c.eval_every_steps = 500  # held-out validation (the task's metrics), and at the last step; 0: none
  c.eval_batches = 8  # validation batches per evaluation (each of clip and sam)
  c.checkpoint_every_steps = 1000  # Orbax checkpoint (state + both data iterators)
  c.max_checkpoints_to_keep = 3  # older checkpoints are deleted
  c.async_checkpointing = True  # write checkpoints in the background (atomic either way)
  c.export = True  # write the task's model dir to workdir/export at the end
  c.nan_policy = "stop"  # non-finite loss/grad: "stop" raises with the step; "skip" drops the update

  # ---- devices
  # Mesh axis sizes; -1 fills the devices left. Same config on 1 CPU, 8 fake CPUs, a GPU or
  # a TPU slice: ("data", "fsdp", "model"). Pure data parallelism by default (ViT-B + head:
  # ~1.8 GB of fp32 params + Adam); {"data": 1, "fsdp": -1} shards them FSDP-style.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
  # Logical axis name -> mesh axes; earlier rules win, later ones for the same name are
  # fallbacks when that mesh axis is taken by another dim, has size 1, or does not divide
  # the dim (sharding.logical_to_mesh_spec).
  c.logical_axis_rules = [
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "model"),
      ("heads", "model"),
      ("conv_out", "fsdp"),
      ("conv_in", "fsdp"),
      ("vocab", "model"),
      ("mlp", "fsdp"),
      ("heads", "fsdp"),
      ("norm", None),
      ("pos", None),
  ]
  distributed_fields(c)
  c.compute_dtype = "float32"  # activations / matmuls; parameters and optimizer stay float32
  c.remat = False  # rematerialise each transformer block in the backward pass (less memory)
  # What a rematerialised ViT-Det block keeps (vit_det.REMAT_POLICIES: "nothing_saveable",
  # "dots_saveable", ...); None: jax's default. A policy turns remat on by itself.
  c.remat_policy = None
  # ViT-Det attention kernel: "reference" (logits + rel-pos bias), "xla" / "cudnn" (rel-pos
  # folded into q/k channels, jax.nn.dot_product_attention); None: per backend (vit_det.py).
  c.attention = None
  # Run the ViT-Det blocks as one jax.lax.scan over their repeating group (window x k, global):
  # one group compiled instead of every block (compile time at depth 24-32); same parameters.
  c.scan_blocks = False

  c.grad_accum_steps = 1  # micro-batches per step (lax.scan); batches must divide by it
  c.learning_rate = 1e-3  # peak LR
  c.warmup_steps = 100  # linear warmup, then cosine to end_lr_factor
  c.grad_clip_norm = 1.0  # global-norm clipping of the summed gradient (<= 0 disables)
  c.optim = ml_collections.ConfigDict()
  # (regex over "/"-joined param paths, LR multiplier); first match wins, unmatched -> 1.0.
  c.optim.groups = []
  c.optim.frozen = []  # regexes of params with no gradient and no optimizer state
  c.optim.no_decay = [".*pos_embed", ".*rel_pos_.*"]  # besides biases/norms (1-D), no decay here
  c.optim.weight_decay = 0.1  # AdamW decoupled weight decay (paper silent)
  c.optim.b1 = 0.9  # Adam first-moment decay
  c.optim.b2 = 0.95  # Adam second-moment decay (0.95: steadier with large batches)
  c.optim.eps = 1e-8  # Adam epsilon
  c.optim.end_lr_factor = 0.0  # cosine ends at learning_rate * this

  return c


def distributed_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the multi-process launch fields (read by sharding.initialize_from_config) to `c`:
  training, extraction and evaluation join a job alike."""
  c.distributed = "auto"  # jax.distributed.initialize(): "auto" (when env says multi-process) | "always" | "never"
  # Explicit launch without a cluster manager (every process runs the same command but its
  # process_id); empty/0/-1 leave them to the TPU VM / SLURM / Open MPI auto-detection.
  c.coordinator_address = ""  # HOST:PORT of process 0 (it serves the coordinator there)
  c.num_processes = 0  # processes in the job
  c.process_id = -1  # this process: 0 .. num_processes-1
  c.distributed_timeout_s = 300  # give up when not all processes have joined after this long
  c.heartbeat_timeout_s = 100  # a process silent this long is declared gone and the job stops
  return c
