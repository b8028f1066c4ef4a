"""Merging CLIP into SAM: train state, sharded jitted step, and the loop (checkpoint, metrics, resume).

Data flows one way: grain batches (host, per process) -> global sharded arrays -> teachers
(frozen, no gradient) -> student losses -> summed gradients of the trainable params only ->
AdamW with per-group LR multipliers -> new state. One optimizer update per step, as in the
paper: forward/backward on the CLIP batch, then on the SAM batch, gradients summed
(optionally over micro-batches with lax.scan for batches larger than memory).
"""
import dataclasses
import functools
import inspect
import json
import os
import time
from typing import Any

import flax
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from samclip_jax import checkpoint, losses, optim, sharding
from samclip_jax.models import samclip as samclip_lib
from samclip_jax.models.clip import (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, ClipConfig, TextConfig,
                                     VisionConfig, VisionTransformer, init_variables, load_clip)
from samclip_jax.models.sam import PIXEL_MEAN, PIXEL_STD, Sam, SamConfig, load_sam
from samclip_jax.models.samclip import SamClipConfig, SamClipNet

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NAN_POLICIES = ("stop", "skip")
MODEL_CONFIG_FILE = "model_config.json"  # WORKDIR/: the model of the run (samclip_jax.api reads it)


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 scalar: optimizer updates done
  params: Any           # trainable parameters (float32 master weights)
  frozen: Any           # frozen parameters: no gradient, no optimizer state
  opt_state: Any        # optimizer state of `params` only
  nonfinite: jax.Array  # int32 scalar: steps whose update was skipped (non-finite loss/grad)


# ----------------------------------------------------------------------------- config checks
def validate_config(config) -> None:
  """Fails fast, before any compilation, on settings that cannot work."""
  if config.total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {config.total_steps}")
  if config.nan_policy not in NAN_POLICIES:
    raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {config.nan_policy!r}")
  if config.compute_dtype not in _DTYPES:
    raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)}, got {config.compute_dtype!r}")
  if config.grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {config.grad_accum_steps}")
  if config.clip_batch_size <= 0 and config.sam_batch_size <= 0:
    raise ValueError("both clip_batch_size and sam_batch_size are 0: nothing to train on")
  if config.sam_batch_size > 0 and config.lambda_sam <= 0:
    raise ValueError("sam_batch_size > 0 but lambda_sam <= 0: set sam_batch_size=0 to drop L_SAM")
  if config.sam_image_size % 16:
    raise ValueError(f"sam_image_size {config.sam_image_size} is not a multiple of 16")
  for r in config.clip_resolutions:
    if int(r) % 16:
      raise ValueError(f"clip resolution {r} is not a multiple of the patch size 16")
  for key in ("sam_checkpoint", "clip_checkpoint", "init_from"):
    path = config[key]
    if path and not os.path.isdir(path):
      raise FileNotFoundError(f"config.{key}={path!r} is not a directory (a converted model dir)")
  if config.data.teacher_embeddings and not os.path.isdir(config.data.teacher_embeddings):
    raise FileNotFoundError(f"config.data.teacher_embeddings={config.data.teacher_embeddings!r} "
                            "is not a directory")
  for key in ("clip_train", "clip_val", "sam_train", "sam_val"):
    path = config.data[key]
    if path and not (os.path.exists(path) or any(ch in path for ch in "*?[")):
      raise FileNotFoundError(f"config.data.{key}={path!r} does not exist")


# ----------------------------------------------------------------------------- models
def sam_config_from(config) -> SamConfig:
  """The SAM (teacher and student backbone) config: checkpoint's, or the random variant's."""
  if config.sam_checkpoint:
    return SamConfig.from_dict(checkpoint.load_config(config.sam_checkpoint))
  m = config.model
  if m.sam_variant == "tiny":
    return samclip_lib.tiny_sam_config(config.sam_image_size, m.tiny_embed_dim, m.tiny_depth,
                                       m.tiny_num_heads, m.tiny_window_size, m.tiny_prompt_embed_dim)
  return SamConfig.from_name(m.sam_variant)


def clip_config_from(config) -> ClipConfig:
  """The CLIP teacher config: checkpoint's, or the random variant's."""
  if config.clip_checkpoint:
    return ClipConfig.from_dict(checkpoint.load_config(config.clip_checkpoint)["config"])
  m = config.model
  if m.clip_variant == "tiny":
    vision = VisionConfig(image_size=config.clip_teacher_image_size or 224, patch_size=m.tiny_clip_patch,
                          width=m.tiny_clip_width, layers=m.tiny_clip_layers, head_width=32)
    # Text tower as small as the image tower: export/text_model/ gives the API its text encoder.
    text = TextConfig(width=m.tiny_clip_width, heads=max(1, m.tiny_clip_width // 32), layers=m.tiny_clip_layers)
    return ClipConfig(embed_dim=m.tiny_clip_embed_dim, vision=vision, text=text)
  return ClipConfig.from_name(m.clip_variant)


def _resize(images, size):
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


def normalize_clip(images):
  """uint8 [B,R,R,3] -> OpenAI-CLIP-normalised float32."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.array(OPENAI_DATASET_MEAN)) / jnp.array(OPENAI_DATASET_STD)


@dataclasses.dataclass
class Experiment:
  """Everything static about a run: mesh, modules, abstract state, shardings, optimizer."""
  config: Any
  mesh: Any
  rules: tuple
  sam_config: SamConfig
  clip_config: ClipConfig
  model_config: SamClipConfig
  student: SamClipNet
  sam_teacher: Sam | None
  clip_teacher: VisionTransformer
  tx: Any
  schedule: Any
  state_shardings: Any
  teacher_shardings: Any
  abstract_teachers: Any
  trainable_paths: list
  frozen_paths: list

  @property
  def use_clip(self) -> bool:
    return self.config.clip_batch_size > 0

  @property
  def use_sam(self) -> bool:
    return self.config.sam_batch_size > 0

  @property
  def batch_sharding(self):
    return sharding.batch_sharding(self.mesh, self.rules)

  def make_state(self, student_params) -> TrainState:
    """Step-0 train state from full student params: split by optim.frozen, optimizer init."""
    trainable, frozen = optim.split_params(student_params, list(self.config.optim.frozen), check=False)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen,
                      opt_state=self.tx.init(trainable), nonfinite=jnp.zeros((), jnp.int32))

  def abstract_state(self):
    """ShapeDtypeStructs (with shardings) of the train state: the restore target."""
    shapes = jax.eval_shape(lambda: self.make_state(
        nn.unbox(samclip_lib.init_params(self.model_config, jax.random.key(0)))))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)


def create_experiment(config, devices=None) -> Experiment:
  """Builds the static parts of a run; no parameter is materialised (eval_shape only)."""
  validate_config(config)
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  rules = sharding.normalize_rules(config.logical_axis_rules)
  accum = config.grad_accum_steps
  if config.clip_batch_size > 0:
    sharding.check_batch_divisible("clip_batch_size", config.clip_batch_size, mesh, rules, accum)
  if config.sam_batch_size > 0:
    sharding.check_batch_divisible("sam_batch_size", config.sam_batch_size, mesh, rules, accum)

  dtype = _DTYPES[config.compute_dtype]
  sam_cfg = sam_config_from(config)
  if sam_cfg.image_size != config.sam_image_size:
    raise ValueError(f"sam_image_size={config.sam_image_size} but the SAM model is built for "
                     f"{sam_cfg.image_size} px")
  clip_cfg = clip_config_from(config)
  model_cfg = SamClipConfig(sam=sam_cfg, head_depth=config.model.head_depth,
                            head_mlp_hidden=tuple(config.model.head_mlp_hidden),
                            out_dim=clip_cfg.embed_dim)
  if config.init_from:
    init_cfg = samclip_lib.load_samclip_config(config.init_from)
    if init_cfg != model_cfg:
      raise ValueError(f"init_from={config.init_from} holds a model of config {init_cfg}, "
                       f"but this run builds {model_cfg}")
  student = SamClipNet(model_cfg, dtype=dtype, remat=config.remat)
  sam_teacher = Sam(sam_cfg, dtype=dtype) if config.sam_batch_size > 0 else None
  clip_teacher = VisionTransformer(clip_cfg.vision, clip_cfg.embed_dim, clip_cfg.quick_gelu, dtype)

  # Abstract (boxed) params -> logical specs -> shardings; split by the frozen regexes.
  abstract_student = jax.eval_shape(functools.partial(samclip_lib.init_params, model_cfg),
                                    jax.random.key(0))
  student_shardings = sharding.tree_shardings(abstract_student, mesh, rules)
  shapes = nn.unbox(abstract_student)
  all_paths = list(optim.flat_paths(shapes))
  frozen_patterns = list(config.optim.frozen)
  abstract_trainable, abstract_frozen = optim.split_params(shapes, frozen_patterns)
  trainable_sh, frozen_sh = optim.split_params(student_shardings, frozen_patterns, check=False)
  if not jax.tree.leaves(abstract_trainable):
    raise ValueError(f"optim.frozen {frozen_patterns} freezes every parameter")
  tx, schedule = optim.build_optimizer(config, abstract_trainable, all_paths)
  abstract_opt = jax.eval_shape(tx.init, abstract_trainable)
  repl = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, trainable_sh,
                                 transform_non_params=lambda _: repl)
  state_shardings = TrainState(step=repl, params=trainable_sh, frozen=frozen_sh,
                               opt_state=opt_sh, nonfinite=repl)

  abstract_teachers, teacher_boxed = {}, {}
  if sam_teacher is not None:
    teacher_boxed["sam"] = jax.eval_shape(
        lambda k: Sam(sam_cfg).init(k, *samclip_lib.example_inputs(model_cfg)[:3]), jax.random.key(0))["params"]
  teacher_boxed["clip"] = jax.eval_shape(
      lambda k: clip_teacher.init(k, jnp.zeros((1,) + clip_cfg.vision.image_hw + (3,))), jax.random.key(0))["params"]
  teacher_shardings = {k: sharding.tree_shardings(v, mesh, rules) for k, v in teacher_boxed.items()}
  abstract_teachers = {k: nn.unbox(v) for k, v in teacher_boxed.items()}

  return Experiment(config=config, mesh=mesh, rules=rules, sam_config=sam_cfg, clip_config=clip_cfg,
                    model_config=model_cfg, student=student, sam_teacher=sam_teacher,
                    clip_teacher=clip_teacher, tx=tx, schedule=schedule,
                    state_shardings=state_shardings, teacher_shardings=teacher_shardings,
                    abstract_teachers=abstract_teachers,
                    trainable_paths=list(optim.flat_paths(abstract_trainable)),
                    frozen_paths=list(optim.flat_paths(abstract_frozen)))


# ----------------------------------------------------------------------------- init
def _keys(seed, impl="threefry2x32"):
  root = jax.random.key(seed, impl=impl)
  return {name: jax.random.fold_in(root, i) for i, name in enumerate(("sam", "clip", "head"))}


def init_teachers(exp: Experiment):
  """Frozen teachers, sharded: converted checkpoints, or random ones from the seed."""
  cfg, keys = exp.config, _keys(exp.config.seed, exp.config.prng_impl)
  out = {}
  if "sam" in exp.teacher_shardings:
    if cfg.sam_checkpoint:
      _, params = load_sam(cfg.sam_checkpoint)
      out["sam"] = jax.device_put(nn.unbox(params), exp.teacher_shardings["sam"])
    else:
      out["sam"] = _random_sam_params(exp, keys["sam"], exp.teacher_shardings["sam"])
  if cfg.clip_checkpoint:
    _, params = load_clip(cfg.clip_checkpoint)
    out["clip"] = jax.device_put(nn.unbox(params["visual"]), exp.teacher_shardings["clip"])
  else:
    visual = lambda k: _random_clip_params(exp, k)["visual"]
    out["clip"] = jax.jit(visual, out_shardings=exp.teacher_shardings["clip"])(keys["clip"])
  return out


def _random_clip_params(exp: Experiment, key):
  """A randomly initialised full CLIP (image + text towers; the stand-in teacher with no
  checkpoint): training uses its image tower, the export keeps the whole model as text_model/."""
  return nn.unbox(init_variables(exp.clip_config, key))["params"]


def _sam_params_for_student(exp: Experiment, teachers):
  """The SAM weights the student starts from: the teacher's (same converted checkpoint)."""
  if "sam" in teachers:
    return teachers["sam"]
  if exp.config.sam_checkpoint:
    _, params = load_sam(exp.config.sam_checkpoint)
    return nn.unbox(params)
  return _random_sam_params(exp, _keys(exp.config.seed, exp.config.prng_impl)["sam"])


def _random_sam_params(exp: Experiment, key, shardings=None):
  """A randomly initialised SAM (the stand-in teacher when no checkpoint is given)."""
  inputs = samclip_lib.example_inputs(exp.model_config)[:3]
  init = lambda k: nn.unbox(Sam(exp.sam_config).init(k, *inputs)["params"])
  return jax.jit(init, out_shardings=shardings)(key)


def init_state(exp: Experiment, teachers) -> TrainState:
  """A fresh, sharded train state (jit with out_shardings: built in place on the devices)."""
  if exp.config.init_from:  # an earlier stage's export
    _, params = samclip_lib.load_samclip(exp.config.init_from)
    return jax.jit(exp.make_state, out_shardings=exp.state_shardings)(nn.unbox(params))
  sam_params = _sam_params_for_student(exp, teachers)
  head_key = _keys(exp.config.seed, exp.config.prng_impl)["head"]
  build = lambda k, sp: exp.make_state(samclip_lib.samclip_params_from_sam(sp, exp.model_config, k))
  return jax.jit(build, out_shardings=exp.state_shardings)(head_key, sam_params)


# ----------------------------------------------------------------------------- step
def _tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _metric_names(exp: Experiment):
  names = []
  if exp.use_clip:
    names += ["clip_loss"]
  if exp.use_sam:
    names += ["sam_loss", "sam_focal", "sam_dice", "sam_iou"]
  return names


def clip_targets(exp: Experiment, teachers, clip_batch):
  """Teacher embeddings of a CLIP batch: offline ones if the batch has them, else online."""
  if "teacher_embedding" in clip_batch:
    return clip_batch["teacher_embedding"].astype(jnp.float32)
  size = exp.config.clip_teacher_image_size or clip_batch["image"].shape[1]
  x = normalize_clip(_resize(clip_batch["image"].astype(jnp.float32), size))
  pooled, _ = exp.clip_teacher.apply({"params": teachers["clip"]}, x)
  return jax.lax.stop_gradient(pooled.astype(jnp.float32))


def sam_inputs(exp: Experiment, sam_batch):
  """SAM batch (pipeline frame) -> (normalised images, coords, labels, valid) at sam_image_size."""
  images = sam_batch["image"]
  coords = sam_batch["point_coords"].astype(jnp.float32)
  content = sam_batch.get("image_size")
  s0, s = images.shape[1], exp.config.sam_image_size
  if s0 != s:
    # Pipeline frame (1024) -> the model's side: resize on device, rescale the prompts.
    scale = s / s0
    images = _resize(images.astype(jnp.float32), s)
    coords = coords * scale
    if content is not None:
      content = jnp.ceil(content.astype(jnp.float32) * scale).astype(jnp.int32)
  return normalize_sam(images, content), coords, sam_batch["point_labels"], sam_batch["prompt_valid"]


def sam_targets(exp: Experiment, teachers, images, coords, labels):
  """Frozen SAM teacher's low-res mask logits for the same images and prompts.

  Multimask choice: with a teacher, targets are slot-aligned (student slot m learns teacher
  slot m for the same prompt), so the ambiguity SAM's min-over-3 loss resolves against a
  single ground-truth mask does not arise. By default (sam_multimask=False) both use the
  single-mask output, SAM's answer for multi-point and box prompts; sam_multimask=True
  distils the three multimask slots instead (all of them, averaged).
  """
  masks, _ = exp.sam_teacher.apply({"params": teachers["sam"]}, images, coords, labels,
                                   multimask_output=exp.config.sam_multimask)
  return jax.lax.stop_gradient(masks.astype(jnp.float32))


def _micro_grads(exp: Experiment, trainable, frozen, teachers, batches):
  """Gradients (trainable tree) and metrics of one (micro-)batch: CLIP fwd/bwd, then SAM's."""
  student, lam = exp.student, float(exp.config.lambda_sam)
  grads = jax.tree.map(jnp.zeros_like, trainable)
  metrics = {}
  if "clip" in batches:
    b = batches["clip"]
    target = clip_targets(exp, teachers, b)
    images = normalize_sam(b["image"])

    def clip_loss(tp):
      params = optim.merge_params(tp, frozen)
      pooled, _ = student.apply({"params": params}, images, method=SamClipNet.clip_features)
      return losses.clip_distill_loss(pooled, target)

    loss, g = jax.value_and_grad(clip_loss)(trainable)
    grads = _tree_add(grads, g)
    metrics["clip_loss"] = loss
  if "sam" in batches:
    images, coords, labels, valid = sam_inputs(exp, batches["sam"])
    target = sam_targets(exp, teachers, images, coords, labels)

    def sam_loss(tp):
      params = optim.merge_params(tp, frozen)
      masks, _ = student.apply({"params": params}, images, coords, labels,
                               multimask_output=exp.config.sam_multimask, method=SamClipNet.sam_masks)
      masks = masks.astype(jnp.float32)
      loss, parts = losses.sam_distill_loss(masks, target, valid[..., None])
      iou = losses.mask_iou(masks, target, valid[..., None])
      return lam * loss, (loss, parts, iou)

    (_, (loss, parts, iou)), g = jax.value_and_grad(sam_loss, has_aux=True)(trainable)
    grads = _tree_add(grads, g)
    metrics.update(sam_loss=loss, sam_focal=parts["focal"], sam_dice=parts["dice"], sam_iou=iou)
  return grads, metrics


def _split_micro(exp: Experiment, batches, n):
  """[n*b, ...] -> [n, b, ...] keeping the batch axis sharded (each device keeps its rows)."""
  spec = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec(
      None, sharding.batch_axes(exp.rules)))

  def split(x):
    b = x.shape[0] // n
    # Row r goes to micro-batch r % n: a local reshape of each device's contiguous rows.
    y = jnp.swapaxes(x.reshape((b, n) + x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(y, spec)

  return jax.tree.map(split, batches)


def make_train_step(exp: Experiment):
  """jit(step)(state, teachers, batches) -> (state, metrics); state donated."""
  cfg = exp.config
  n_micro = int(cfg.grad_accum_steps)
  lam = float(cfg.lambda_sam)
  names = _metric_names(exp)

  def step_fn(state: TrainState, teachers, batches):
    if n_micro == 1:
      grads, metrics = _micro_grads(exp, state.params, state.frozen, teachers, batches)
    else:
      def body(carry, mb):
        g, m = _micro_grads(exp, state.params, state.frozen, teachers, mb)
        return _tree_add(carry, (g, m)), None

      zero = (jax.tree.map(jnp.zeros_like, state.params),
              {k: jnp.zeros((), jnp.float32) for k in names})
      (grads, metrics), _ = jax.lax.scan(body, zero, _split_micro(exp, batches, n_micro))
      grads = jax.tree.map(lambda g: g / n_micro, grads)
      metrics = {k: v / n_micro for k, v in metrics.items()}
    total = metrics.get("clip_loss", 0.0) + lam * metrics.get("sam_loss", 0.0)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    updates, opt_state = exp.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite step changes nothing but the counters (policy "skip" goes on, "stop" raises
    # on the host with the step number; either way the state stays clean).
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state),
                              nonfinite=state.nonfinite + (~finite).astype(jnp.int32))
    metrics = dict(metrics, total_loss=total, grad_norm=grad_norm, finite=finite,
                   learning_rate=exp.schedule(state.step), nonfinite_steps=new_state.nonfinite)
    return new_state, metrics

  repl = sharding.replicated(exp.mesh)
  return jax.jit(step_fn, in_shardings=(exp.state_shardings, exp.teacher_shardings, exp.batch_sharding),
                 out_shardings=(exp.state_shardings, repl), donate_argnums=(0,))


def make_eval_step(exp: Experiment):
  """jit(eval)(state, teachers, batches) -> {"clip_cosine", "sam_iou", "sam_loss"} means."""

  def eval_fn(state: TrainState, teachers, batches):
    params = optim.merge_params(state.params, state.frozen)
    out = {}
    if "clip" in batches:
      b = batches["clip"]
      target = clip_targets(exp, teachers, b)
      pooled, _ = exp.student.apply({"params": params}, normalize_sam(b["image"]),
                                    method=SamClipNet.clip_features)
      out["clip_cosine"] = jnp.mean(losses.cosine_similarity(pooled, target))
    if "sam" in batches:
      images, coords, labels, valid = sam_inputs(exp, batches["sam"])
      target = sam_targets(exp, teachers, images, coords, labels)
      masks, _ = exp.student.apply({"params": params}, images, coords, labels,
                                   multimask_output=exp.config.sam_multimask, method=SamClipNet.sam_masks)
      out["sam_iou"] = losses.mask_iou(masks, target, valid[..., None])
      out["sam_loss"] = losses.sam_distill_loss(masks, target, valid[..., None])[0]
    return out

  return jax.jit(eval_fn, in_shardings=(exp.state_shardings, exp.teacher_shardings, exp.batch_sharding),
                 out_shardings=sharding.replicated(exp.mesh))


# ----------------------------------------------------------------------------- data
def data_paths(config, workdir) -> dict:
  """Split paths from the config, the embedded sample filling the empty ones."""
  d = config.data
  paths = {k: d[k] for k in ("clip_train", "clip_val", "sam_train", "sam_val")}
  if not all(paths.values()):
    from samclip_jax.data.sample import ensure_sample
    sample = ensure_sample(d.sample_dir or os.path.join(workdir, "sample"))
    paths = {k: v or sample[k] for k, v in paths.items()}
  return paths


def make_loaders(exp: Experiment, paths, *, split="train"):
  """{"clip": loader, "sam": loader} for this process (its shard of the global batch)."""
  from samclip_jax.data import pipeline
  cfg = exp.config
  nproc, pidx = jax.process_count(), jax.process_index()
  is_train = split == "train"
  # Eval batches are one micro-batch big: they must fit where a train micro-batch fits.
  div = 1 if is_train else cfg.grad_accum_steps
  out = {}
  common = dict(seed=cfg.seed, shard_index=pidx, shard_count=nproc,
                num_epochs=None if is_train else 1, worker_count=cfg.data.worker_count if is_train else 0)
  if exp.use_clip:
    kw = dict(common)
    if is_train and cfg.data.teacher_embeddings:
      kw["teacher_embeddings"] = cfg.data.teacher_embeddings
    res = tuple(int(r) for r in cfg.clip_resolutions)
    out["clip"] = pipeline.clip_loader(
        paths[f"clip_{split}"], batch_size=cfg.clip_batch_size // div // nproc,
        resolutions=res if is_train else res[:1], shuffle=is_train, **kw)
  if exp.use_sam:
    kw = dict(common)
    # The pipeline renders SAM images at 1024; where it can render at sam_image_size, ask it
    # (saves host work), else sam_inputs resizes on device.
    if "image_size" in inspect.signature(pipeline.sam_loader).parameters:
      kw["image_size"] = cfg.sam_image_size
    out["sam"] = pipeline.sam_loader(
        paths[f"sam_{split}"], batch_size=cfg.sam_batch_size // div // nproc,
        masks_per_image=cfg.masks_per_image, points_per_prompt=cfg.points_per_prompt,
        shuffle=is_train, **kw)
  return out


def fake_batches(exp: Experiment, seed: int = 0, clip_resolution: int | None = None,
                 sam_frame: int | None = None):
  """Random host batches with the pipeline's shapes and dtypes (tests, benchmarks)."""
  cfg, rng = exp.config, np.random.default_rng(seed)
  out = {}
  if exp.use_clip:
    r = clip_resolution or int(cfg.clip_resolutions[0])
    out["clip"] = {"image": rng.integers(0, 256, (cfg.clip_batch_size, r, r, 3), dtype=np.uint8)}
  if exp.use_sam:
    s, b, k, p = sam_frame or cfg.sam_image_size, cfg.sam_batch_size, cfg.masks_per_image, cfg.points_per_prompt
    labels = np.full((b, k, p), -1, np.int32)
    labels[:, :, 0] = 1
    labels[:, ::2, :2] = (2, 3)  # every other prompt is a box
    coords = np.sort(rng.uniform(0, s - 1, (b, k, p, 2)).astype(np.float32), axis=2)
    out["sam"] = {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
                  "point_coords": coords, "point_labels": labels,
                  "prompt_valid": np.ones((b, k), bool),
                  "image_size": np.full((b, 2), s, np.int32)}
  return out


class _Snapshot:
  """An iterator state captured now, saved later (async checkpoints must not see later batches)."""

  def __init__(self, iterator):
    self._state = iterator.get_state()

  def get_state(self):
    return self._state


def device_batches(exp: Experiment, host_batches):
  """Host batches (this process's rows) -> global arrays sharded over the batch axes."""
  return sharding.put_batch({k: {n: v for n, v in b.items() if n != "index"}
                             for k, b in host_batches.items()}, exp.mesh, exp.rules)


# ----------------------------------------------------------------------------- loop helpers
class MetricWriter:
  """Console lines + TensorBoard event files (tensorboardX) in WORKDIR/tensorboard; process 0."""

  def __init__(self, workdir):
    self.enabled = jax.process_index() == 0
    self.writer = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

  def scalars(self, step, values, prefix):
    if not self.writer:
      return
    for k, v in values.items():
      self.writer.add_scalar(f"{prefix}/{k}", float(v), step)
    self.writer.flush()

  def print(self, msg):
    if self.enabled:
      print(msg, flush=True)
      logging.info(msg)

  def close(self):
    if self.writer:
      self.writer.close()


def check_finite(metrics_host, step, policy):
  """Raises (policy "stop") with the step number when a step's loss/grad was not finite."""
  if bool(metrics_host["finite"]):
    return False
  detail = ", ".join(f"{k}={float(v):.4g}" for k, v in metrics_host.items()
                     if k in ("clip_loss", "sam_loss", "total_loss", "grad_norm"))
  if policy == "stop":
    raise FloatingPointError(f"non-finite loss or gradient at step {step} ({detail}); the update "
                             "was not applied. Set nan_policy='skip' to skip such steps.")
  logging.warning("non-finite loss or gradient at step %d (%s): update skipped", step, detail)
  return True


def _fmt_eta(seconds):
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h:d}:{m:02d}:{s:02d}"


def checkpoint_manager(workdir, config):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.max_checkpoints_to_keep, create=True,
      enable_async_checkpointing=config.async_checkpointing, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def _save(mngr, step, state, iterators, force=False):
  args = {"state": ocp.args.StandardSave(state)}
  for name, it in iterators.items():
    args[f"{name}_iter"] = grain.checkpoint.CheckpointSave(_Snapshot(it))
  return mngr.save(step, args=ocp.args.Composite(**args), force=force)


def _restore(mngr, step, exp, iterators):
  args = {"state": ocp.args.StandardRestore(exp.abstract_state())}
  for name, it in iterators.items():
    args[f"{name}_iter"] = grain.checkpoint.CheckpointRestore(it)
  restored = mngr.restore(step, args=ocp.args.Composite(**args))
  return restored["state"]


def evaluate(exp, eval_step, state, teachers, paths):
  """Means over config.eval_batches held-out batches of each set (fixed order, first resolution)."""
  loaders = make_loaders(exp, paths, split="val")
  its = {k: iter(v) for k, v in loaders.items()}
  sums, n = {}, 0
  for _ in range(exp.config.eval_batches):
    host = {}
    for k, it in its.items():
      try:
        host[k] = next(it)
      except StopIteration:
        pass
    if not host:
      break
    out = jax.device_get(eval_step(state, teachers, device_batches(exp, host)))
    for k, v in out.items():
      sums.setdefault(k, []).append(float(v))
    n += 1
  return {k: float(np.mean(v)) for k, v in sums.items()}


def _evaluate_and_log(exp, eval_step, state, teachers, paths, writer, step):
  ev = evaluate(exp, eval_step, state, teachers, paths)
  writer.print(f"step {step} eval " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()))
  writer.scalars(step, ev, "eval")
  return ev


def _window_means(host_metrics):
  """A logging window's metrics: losses averaged, counters and LR at the window's end."""
  last = host_metrics[-1]
  mean = {k: float(np.mean([m[k] for m in host_metrics])) for k in last
          if k not in ("finite", "learning_rate", "nonfinite_steps")}
  mean["learning_rate"] = float(last["learning_rate"])
  mean["nonfinite_steps"] = int(last["nonfinite_steps"])
  return mean


def export_model(exp: Experiment, state: TrainState, directory: str):
  """Writes the merged model dir (model_type "samclip") that load_samclip / SamClip read."""
  params = optim.merge_params(state.params, state.frozen)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
  # save_model is collective: every process calls it, process 0 writes the files.
  samclip_lib.save_samclip(directory, exp.model_config, params,
                           dict(_run_facts(exp), step=int(state.step)))
  if not exp.config.clip_checkpoint:  # a real teacher is found through config.json's clip_checkpoint
    _export_random_text_model(exp, directory)


def _export_random_text_model(exp: Experiment, directory: str):
  """DIRECTORY/text_model/: the random CLIP teacher (same seed, so the image tower trained
  against), with the bundled tokenizer, where samclip_jax.api looks for the text encoder."""
  from samclip_jax.api import TEXT_MODEL_DIR
  from samclip_jax.clip_model import save_clip
  key = _keys(exp.config.seed, exp.config.prng_impl)["clip"]
  params = jax.jit(functools.partial(_random_clip_params, exp))(key)
  save_clip(os.path.join(directory, TEXT_MODEL_DIR), exp.clip_config, params,
            name=f"random {exp.config.model.clip_variant}", extra={"seed": exp.config.seed})


def _run_facts(exp: Experiment) -> dict:
  """What a merged model dir records beside its SamClipConfig: stage and the teachers
  (clip_checkpoint is where samclip_jax.api finds the CLIP text tower)."""
  path = lambda p: os.path.abspath(p) if p else ""
  return {"stage": exp.config.stage, "clip_checkpoint": path(exp.config.clip_checkpoint),
          "sam_checkpoint": path(exp.config.sam_checkpoint),
          "clip_teacher_config": exp.clip_config.to_dict()}


def write_model_config(exp: Experiment, workdir: str) -> None:
  """WORKDIR/model_config.json: the model a workdir's checkpoints hold (read by samclip_jax.api
  to load a run that has not exported yet)."""
  if jax.process_index() != 0:
    return
  meta = dict(exp.model_config.to_dict(), **_run_facts(exp))
  path = os.path.join(workdir, MODEL_CONFIG_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)  # atomic: a reader never sees half a file


def write_text_model(exp: Experiment, workdir: str) -> None:
  """WORKDIR/text_model/ for a random CLIP teacher, once, so SamClip.from_checkpoint(WORKDIR) works pre-export."""
  from samclip_jax.api import TEXT_MODEL_DIR
  if exp.config.clip_checkpoint:  # a real teacher is found through model_config.json's clip_checkpoint
    return
  exists = os.path.isfile(os.path.join(workdir, TEXT_MODEL_DIR, checkpoint.CONFIG_FILE))
  if jax.process_count() > 1:
    # Process 0 decides for all: save_model is collective, and a process that looked after
    # process 0 had written the directory would otherwise skip it and hang the others.
    from jax.experimental import multihost_utils
    exists = bool(multihost_utils.broadcast_one_to_all(np.asarray(exists)))
  if not exists:
    _export_random_text_model(exp, workdir)


# ----------------------------------------------------------------------------- loop
def train_and_evaluate(config, workdir: str, *, stop_at_step: int | None = None,
                       devices=None) -> dict:
  """Runs (or resumes) the merge described by `config` in `workdir`; returns final metrics.

  stop_at_step: leave the loop after that step (after checkpointing it), as a preemption
  would; rerunning resumes. The schedule still spans config.total_steps.
  devices: the devices the mesh spans (default: all of them).
  """
  validate_config(config)
  sharding.maybe_initialize_distributed(config.distributed)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  exp = create_experiment(config, devices)
  write_model_config(exp, workdir)
  write_text_model(exp, workdir)
  writer = MetricWriter(workdir)
  writer.print(f"mesh {dict(exp.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
               f"device(s), {jax.process_count()} process(es); stage {config.stage}; "
               f"{len(exp.trainable_paths)} trainable / {len(exp.frozen_paths)} frozen tensors")
  paths = data_paths(config, workdir)
  loaders = make_loaders(exp, paths)
  iterators = {k: iter(v) for k, v in loaders.items()}
  mngr = checkpoint_manager(workdir, config)
  teachers = init_teachers(exp)

  latest = mngr.latest_step()
  if latest is not None:
    state = _restore(mngr, latest, exp, iterators)
    writer.print(f"resumed from step {latest} ({os.path.join(workdir, 'checkpoints', str(latest))})")
  else:
    state = init_state(exp, teachers)
  step = int(jax.device_get(state.step))

  train_step = make_train_step(exp)
  eval_step = make_eval_step(exp)  # traced and compiled on first use only
  total = int(config.total_steps)
  last = min(total, stop_at_step) if stop_at_step is not None else total
  images_per_step = max(config.clip_batch_size, 0) + max(config.sam_batch_size, 0)
  window, window_start, prev = [], time.time(), None
  rates, seen_shapes, final, history = [], set(), {}, []
  try:
    if step == 0 and config.eval_every_steps > 0:  # baseline before any update
      _evaluate_and_log(exp, eval_step, state, teachers, paths, writer, step)
    while step < last:
      host = {k: next(it) for k, it in iterators.items()}
      shape_key = tuple((k, v["image"].shape[1]) for k, v in host.items())
      if shape_key not in seen_shapes:
        seen_shapes.add(shape_key)
        writer.print(f"step {step}: compiling the train step for image sizes {dict(shape_key)}")
      state, metrics = train_step(state, teachers, device_batches(exp, host))
      step += 1
      # Check the previous step while this one runs (no pipeline stall).
      if prev is not None:
        check_finite(jax.device_get(prev[1]), prev[0], config.nan_policy)
      prev = (step, metrics)
      window.append(metrics)

      if step % config.log_every_steps == 0 or step == last:
        host_metrics = jax.device_get(window)
        check_finite(host_metrics[-1], step, config.nan_policy)
        prev = None
        rate = len(window) / max(time.time() - window_start, 1e-9)  # steps/s
        if step > len(window):  # the first window includes compilation
          rates.append(rate)
        mean = _window_means(host_metrics)
        mean["images_per_sec"] = rate * images_per_step
        eta = (total - step) / (np.mean(rates[-5:]) if rates else rate)
        parts = [f"{k}={mean[k]:.4f}" for k in ("total_loss", "clip_loss", "sam_loss", "sam_iou") if k in mean]
        writer.print(f"step {step}/{total} " + " ".join(parts) +
                     f" lr={mean['learning_rate']:.3g} {mean['images_per_sec']:.1f} img/s"
                     f" skipped={mean['nonfinite_steps']} eta {_fmt_eta(eta)}")
        writer.scalars(step, mean, "train")
        history.append(dict(mean, step=step))
        final.update({f"train/{k}": v for k, v in mean.items()})
        window, window_start = [], time.time()

      if step % config.checkpoint_every_steps == 0 or step == last:
        _save(mngr, step, state, iterators, force=True)

      if config.eval_every_steps > 0 and (step % config.eval_every_steps == 0 or step == total):
        ev = _evaluate_and_log(exp, eval_step, state, teachers, paths, writer, step)
        final.update({f"eval/{k}": v for k, v in ev.items()})
        window_start = time.time()  # keep eval time out of images/s
    if prev is not None:
      check_finite(jax.device_get(prev[1]), prev[0], config.nan_policy)
    mngr.wait_until_finished()
    if step >= total and config.export:
      export_model(exp, state, os.path.join(workdir, "export"))
      writer.print(f"exported the merged model to {os.path.join(workdir, 'export')}")
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  final.update(step=step, state=state, history=history)
  return final
