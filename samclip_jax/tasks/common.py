"""What every task shares: model configs from a run config, image normalisation, resizing."""
import jax
import jax.numpy as jnp

from samclip_jax.models import samclip as samclip_lib
from samclip_jax.models.clip import (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, ClipConfig, TextConfig, VisionConfig,
                                     load_clip_config)
from samclip_jax.models.sam import PIXEL_MEAN, PIXEL_STD, SamConfig, load_sam_config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def sam_config_from(config) -> SamConfig:
  """The SAM config: the checkpoint's, or the variant named by config.model."""
  if config.sam_checkpoint:
    return load_sam_config(config.sam_checkpoint)
  m = config.model
  if m.sam_variant == "tiny":
    return samclip_lib.tiny_sam_config(config.sam_image_size, m.tiny_embed_dim, m.tiny_depth,
                                       m.tiny_num_heads, m.tiny_window_size, m.tiny_prompt_embed_dim)
  return SamConfig.from_name(m.sam_variant)


def check_init_from(config, built, read_config) -> None:
  """Refuses, before anything runs, an init_from model dir holding another model than this run builds."""
  if config.get("init_from"):
    stored = read_config(config.init_from)
    if stored != built:
      from samclip_jax import cli
      differ = cli.differences(stored.to_dict(), built.to_dict())
      raise ValueError(f"init_from={config.init_from} holds a model of another config than this run "
                       f"builds ({type(built).__name__} fields {', '.join(differ)} differ); use an export "
                       "of this model's size")


def started_from(config) -> str:
  """Provenance of an init_from model ('' without one), read when the run is built: the
  export still says it if that directory has gone by the end of the run."""
  if not config.get("init_from"):
    return ""
  from samclip_jax import checkpoint
  source = checkpoint.load_config(config.init_from).get("source")
  return f", starting from a model {source}" if source else f", starting from {config.init_from}"


def pretraining_source(task, data: str, steps: int) -> str:
  """An export's provenance line: data, seed, steps, and the model it started from (init_from)."""
  return f"pretrained on the embedded world ({data}), seed {task.config.seed}, {steps} steps{task.started_from}"


def clip_config_from(config) -> ClipConfig:
  """The CLIP config: the checkpoint's, or the variant named by config.model."""
  if config.clip_checkpoint:
    return load_clip_config(config.clip_checkpoint)
  m = config.model
  if m.clip_variant == "tiny":
    vision = VisionConfig(image_size=config.clip_teacher_image_size or 224, patch_size=m.tiny_clip_patch,
                          width=m.tiny_clip_width, layers=m.tiny_clip_layers, head_width=32)
    # Text tower as small as the image tower: export/text_model/ gives the API its text encoder.
    text = TextConfig(width=m.tiny_clip_width, heads=max(1, m.tiny_clip_width // 32), layers=m.tiny_clip_layers)
    return ClipConfig(embed_dim=m.tiny_clip_embed_dim, vision=vision, text=text)
  return ClipConfig.from_name(m.clip_variant)


def resize(images, size):
  """[B,H,W,C] float -> [B,size,size,C], antialiased bilinear (no-op when already that size)."""
  if images.shape[1] == size and images.shape[2] == size:
    return images
  return jax.image.resize(images, images.shape[:1] + (size, size) + images.shape[3:], "linear",
                          antialias=True)


def normalize_sam(images, content_hw=None):
  """uint8 [B,S,S,3] -> SAM-normalised float32, the padding region set to 0 as SAM pads."""
  x = (images.astype(jnp.float32) - jnp.array(PIXEL_MEAN)) / jnp.array(PIXEL_STD)
  if content_hw is not None:
    s = x.shape[1]
    rows = jnp.arange(s)[None, :, None] < content_hw[:, 0, None, None]
    cols = jnp.arange(x.shape[2])[None, None, :] < content_hw[:, 1, None, None]
    x = jnp.where((rows & cols)[..., None], x, 0.0)
  return x


def model_options(config) -> dict:
  """The ViT-Det backbone's memory and kernel choices from the run config (loop_fields)."""
  return {"remat": bool(config.remat), "remat_policy": config.get("remat_policy"),
          "attention": config.get("attention"), "scan_blocks": bool(config.get("scan_blocks", False))}


def normalize_clip(images):
  """uint8 [B,R,R,3] -> OpenAI-CLIP-normalised float32."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.array(OPENAI_DATASET_MEAN)) / jnp.array(OPENAI_DATASET_STD)


def sam_inputs(config, sam_batch):
  """SAM batch (pipeline frame) -> (normalised images, coords, labels, valid) at sam_image_size."""
  images = sam_batch["image"]
  coords = sam_batch["point_coords"].astype(jnp.float32)
  content = sam_batch.get("image_size")
  s0, s = images.shape[1], config.sam_image_size
  if s0 != s:
    # Pipeline frame (1024) -> the model's side: resize on device, rescale the prompts.
    scale = s / s0
    images = resize(images.astype(jnp.float32), s)
    coords = coords * scale
    if content is not None:
      content = jnp.ceil(content.astype(jnp.float32) * scale).astype(jnp.int32)
  return normalize_sam(images, content), coords, sam_batch["point_labels"], sam_batch["prompt_valid"]


def validate_batches(config, names=("clip_batch_size", "sam_batch_size")) -> None:
  """Batch sizes are >= 0 (0 disables that set); a negative one is a typo, not 'off'."""
  for name in names:
    if name in config and int(config[name]) < 0:
      raise ValueError(f"{name} must be >= 0 (0 disables it), got {config[name]}")


def export_params(state):
  """A train state's full params (trainable + frozen), gathered on every process for a save."""
  from samclip_jax import optim
  params = optim.merge_params(state.params, state.frozen)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
  return params


def device_batches(task, host_batches):
  """Host batches (this process's rows) -> global arrays sharded over the task's batch axes."""
  from samclip_jax import sharding
  return sharding.put_batch({k: {n: v for n, v in b.items() if n != "index"}
                             for k, b in host_batches.items()}, task.mesh, task.rules)


def pretraining_mesh(config, devices, batch_name: str, data_keys):
  """(mesh, rules) of a pretraining task, after checking its data paths and global batch."""
  from samclip_jax import sharding
  from samclip_jax.data import world
  for key in data_keys:
    if not config.data[key]:
      raise ValueError(f"config.data.{key} is empty (a world spec 'world:train:N' or a split manifest)")
    if world.is_world(config.data[key]):
      try:
        world.source(config.data[key])
      except ValueError as e:
        raise ValueError(f"config.data.{key}: {e}") from None
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  rules = sharding.normalize_rules(config.logical_axis_rules)
  sharding.check_batch_divisible(batch_name, config[batch_name], mesh, rules, config.grad_accum_steps)
  return mesh, rules
