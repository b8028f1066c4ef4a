"""Fields shared by every evaluation config (python -m samclip_jax.evaluate --config=...)."""
import ml_collections

from configs import common as train_common

# The README's main job writes here (python -m samclip_jax.main --config=configs/merge.py:local
# --workdir=/tmp/samclip_local): the model ":local" evaluates unless --config.model is given.
LOCAL_MODEL = "/tmp/samclip_local"


def base(task: str, arg: str | None) -> ml_collections.ConfigDict:
  """The task's common fields; arg "local": the embedded sample and the main job's model."""
  arg = (arg or "").strip()
  if arg not in ("", "local"):
    raise ValueError(f"unknown config arg {arg!r}; use '' or 'local'")
  c = ml_collections.ConfigDict()
  c.task = task
  # A model directory or a training workdir. Its config.json model_type picks the model:
  # "samclip" (merged), "open_clip" (CLIP teacher: classification / retrieval), "sam"
  # (SAM teacher: instance segmentation).
  c.model = LOCAL_MODEL if arg == "local" else ""
  c.text_model = ""       # open_clip dir for a samclip model lacking its text tower ("" = its own)
  c.batch_size = 32       # global images per step; rounded up to a multiple of the devices
  c.max_images = 0        # evaluate N images spread evenly over the set (every class of a folder; 0 = all)
  c.num_workers = 4       # host threads decoding and resizing images
  c.data = ml_collections.ConfigDict()
  # The embedded sample (samclip_jax.data.sample), built on first use; a relative path is
  # taken inside the workdir. When set, it fills the dataset paths of the task.
  c.data.sample_dir = "sample" if arg == "local" else ""
  # Several processes (as training: --config.coordinator_address/num_processes/process_id):
  # each loads its rows of every global batch; process 0 writes the outputs.
  train_common.distributed_fields(c)
  if arg == "local":
    c.batch_size = 8
  return c
