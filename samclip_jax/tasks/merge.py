"""The merge (SAM-CLIP's three stages): CLIP distilled into SAM's backbone, with rehearsal.

Data flows one way: grain batches (host, per process) -> global sharded arrays -> teachers
(frozen, no gradient) -> student losses -> summed gradients of the trainable params only ->
AdamW with per-group LR multipliers (the loop). One optimizer update per step, as in the
paper: forward/backward on the CLIP batch, then on the SAM batch, gradients summed.
"""
import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from samclip_jax import checkpoint, loop, losses, optim, sharding
from samclip_jax.models import samclip as samclip_lib
from samclip_jax.models.clip import ClipConfig, image_tower, init_variables, load_clip
from samclip_jax.models import sam as sam_lib
from samclip_jax.models.sam import Sam, SamConfig, load_sam
from samclip_jax.models.samclip import SamClipConfig, SamClipNet
from samclip_jax.tasks import common

STAGES = ("distill", "probe", "resolution")
# config.sam_outputs -> the mask decoder's multimask_output: every mask token (single first,
# then the 3 multimask ones), the single one, or the 3 multimask ones.
SAM_OUTPUTS = {"all": None, "single": False, "multimask": True}
MODEL_CONFIG_FILE = "model_config.json"  # WORKDIR/: the model of the run (samclip_jax.api reads it)


def validate_config(config) -> None:
  """Fails fast, before any compilation, on settings that cannot work."""
  loop.validate_common(config)
  common.validate_batches(config)
  if config.stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {config.stage!r}")
  if config.sam_outputs not in SAM_OUTPUTS:
    raise ValueError(f"sam_outputs must be one of {sorted(SAM_OUTPUTS)}, got {config.sam_outputs!r}")
  if not (np.isfinite(config.sam_iou_weight) and config.sam_iou_weight >= 0):
    raise ValueError(f"sam_iou_weight must be finite and >= 0, got {config.sam_iou_weight!r}")
  if config.compute_dtype not in common.DTYPES:
    raise ValueError(f"compute_dtype must be one of {sorted(common.DTYPES)}, got {config.compute_dtype!r}")
  if config.clip_batch_size == 0 and config.sam_batch_size == 0:
    raise ValueError("both clip_batch_size and sam_batch_size are 0: nothing to train on")
  if config.sam_batch_size > 0 and not (np.isfinite(config.lambda_sam) and config.lambda_sam > 0):
    raise ValueError("sam_batch_size > 0 needs a finite lambda_sam > 0 (set sam_batch_size=0 to drop L_SAM)")
  if config.sam_batch_size > 0 and config.masks_per_image < 1:
    raise ValueError(f"masks_per_image must be >= 1, got {config.masks_per_image}")
  if config.sam_image_size <= 0 or config.sam_image_size % 16:
    raise ValueError(f"sam_image_size {config.sam_image_size} is not a positive multiple of 16")
  for r in config.clip_resolutions:
    if int(r) <= 0 or int(r) % 16:
      raise ValueError(f"clip resolution {r} is not a positive multiple of the patch size 16")
  for key in ("sam_checkpoint", "clip_checkpoint", "init_from"):
    path = config[key]
    if path and not os.path.isdir(path):
      raise FileNotFoundError(f"config.{key}={path!r} is not a directory (a converted model dir)")
  if config.data.teacher_embeddings and not os.path.isdir(config.data.teacher_embeddings):
    raise FileNotFoundError(f"config.data.teacher_embeddings={config.data.teacher_embeddings!r} "
                            "is not a directory")
  from samclip_jax.data import world
  for key in ("clip_train", "clip_val", "sam_train", "sam_val"):
    path = config.data[key]
    if world.is_world(path):
      try:
        world.source(path)
      except ValueError as e:
        raise ValueError(f"config.data.{key}: {e}") from None
    elif path and not (os.path.exists(path) or any(ch in path for ch in "*?[")):
      raise FileNotFoundError(f"config.data.{key}={path!r} does not exist")


@dataclasses.dataclass
class MergeTask:
  """Everything static about a merge run: mesh, modules, abstract state, shardings, optimizer."""
  config: Any
  mesh: Any
  rules: tuple
  sam_config: SamConfig
  clip_config: ClipConfig
  model_config: SamClipConfig
  student: SamClipNet
  sam_teacher: Sam | None
  clip_teacher: nn.Module  # clip.image_tower
  tx: Any
  schedule: Any
  state_shardings: Any
  aux_shardings: Any
  sam_target: Any  # a SAM's params as ShapeDtypeStructs with shardings (teacher or student start)
  teacher_targets: Any  # the same for each teacher that runs: {"sam"?, "clip"}
  trainable_paths: list
  frozen_paths: list

  log_keys = ("total_loss", "clip_loss", "sam_loss", "sam_iou")

  @property
  def use_clip(self) -> bool:
    return self.config.clip_batch_size > 0

  @property
  def use_sam(self) -> bool:
    return self.config.sam_batch_size > 0

  @property
  def images_per_step(self) -> int:
    return max(self.config.clip_batch_size, 0) + max(self.config.sam_batch_size, 0)

  @property
  def metric_names(self):
    names = ["total_loss"]
    if self.use_clip:
      names += ["clip_loss"]
    if self.use_sam:
      names += ["sam_loss", "sam_focal", "sam_dice", "sam_iou_mse", "sam_iou"]
    return names

  def describe(self) -> str:
    return (f"merge stage {self.config.stage}: mesh {dict(self.mesh.shape)} on {self.mesh.devices.size} "
            f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es); "
            f"{len(self.trainable_paths)} trainable / {len(self.frozen_paths)} frozen tensors")

  # ---------------------------------------------------------------- state
  def abstract_state(self):
    """ShapeDtypeStructs (with shardings) of the train state: the restore target."""
    params = nn.unbox(samclip_lib.abstract_params(self.model_config, boxed=True))
    return loop.abstract_state(self.tx, self.config.optim.frozen, params, self.state_shardings)

  def make_state(self, student_params) -> loop.TrainState:
    return loop.make_state(self.tx, self.config.optim.frozen, student_params)

  def init_aux(self):
    """Frozen teachers, sharded: converted checkpoints, or random ones from the seed."""
    cfg, keys = self.config, _keys(self.config.seed, self.config.prng_impl)
    out = {}
    if "sam" in self.teacher_targets:
      out["sam"] = self._sam_params(keys["sam"])
    if cfg.clip_checkpoint:  # the image tower only, restored straight into its layout
      _, params = load_clip(cfg.clip_checkpoint, target={"visual": self.teacher_targets["clip"]}, partial=True)
      out["clip"] = params["visual"]
    else:
      out["clip"] = jax.device_put(random_clip_params(self.clip_config, keys["clip"])["visual"],
                                   self.aux_shardings["clip"])
    return out

  def init_state(self, teachers) -> loop.TrainState:
    """A fresh, sharded train state (jit with out_shardings: built in place on the devices)."""
    if self.config.init_from:  # an earlier stage's export
      _, params = samclip_lib.load_samclip(self.config.init_from, target=loop.params_target(self.abstract_state()))
      return jax.jit(self.make_state, out_shardings=self.state_shardings)(params)
    sam_params = self._sam_params_for_student(teachers)
    head_key = _keys(self.config.seed, self.config.prng_impl)["head"]
    build = lambda k, sp: self.make_state(samclip_lib.samclip_params_from_sam(sp, self.model_config, k))
    return jax.jit(build, out_shardings=self.state_shardings)(head_key, sam_params)

  def _sam_params(self, key):
    """SAM's weights in sam_target's layout: the converted checkpoint, else random from `key`
    (the stand-in teacher)."""
    if self.config.sam_checkpoint:
      return load_sam(self.config.sam_checkpoint, target=self.sam_target)[1]
    inputs = samclip_lib.example_inputs(self.model_config)[:3]
    init = lambda k: nn.unbox(Sam(self.sam_config).init(k, *inputs)["params"])
    return jax.jit(init, out_shardings=jax.tree.map(lambda t: t.sharding, self.sam_target))(key)

  def _sam_params_for_student(self, teachers):
    """The SAM weights the student starts from: the teacher's (same converted checkpoint)."""
    if "sam" in teachers:
      return teachers["sam"]
    return self._sam_params(_keys(self.config.seed, self.config.prng_impl)["sam"])

  # ---------------------------------------------------------------- step
  def clip_targets(self, teachers, clip_batch):
    """Teacher embeddings of a CLIP batch: offline ones if the batch has them, else online."""
    if "teacher_embedding" in clip_batch:
      return clip_batch["teacher_embedding"].astype(jnp.float32)
    size = self.config.clip_teacher_image_size or clip_batch["image"].shape[1]
    x = common.normalize_clip(common.resize(clip_batch["image"].astype(jnp.float32), size))
    pooled, _ = self.clip_teacher.apply({"params": teachers["clip"]}, x)
    return jax.lax.stop_gradient(pooled.astype(jnp.float32))

  def sam_targets(self, teachers, images, coords, labels):
    """Frozen SAM teacher's low-res mask logits and IoU predictions (float32) for the prompts.

    Targets are slot-aligned (student output m learns teacher output m for the same prompt),
    so the ambiguity SAM's min-over-3 loss resolves against one ground-truth mask does not
    arise. config.sam_outputs picks the outputs distilled (default "all": the single mask,
    the 3 multimask ones and the IoU head, so predict(multimask_output=True) and the
    automatic mask generator are protected from forgetting too).
    """
    masks, iou = self.sam_teacher.apply({"params": teachers["sam"]}, images, coords, labels,
                                        multimask_output=SAM_OUTPUTS[self.config.sam_outputs])
    return jax.lax.stop_gradient(masks.astype(jnp.float32)), jax.lax.stop_gradient(iou.astype(jnp.float32))

  def student_sam(self, params, images, coords, labels):
    masks, iou = self.student.apply({"params": params}, images, coords, labels,
                                    multimask_output=SAM_OUTPUTS[self.config.sam_outputs],
                                    method=SamClipNet.sam_masks)
    return masks.astype(jnp.float32), iou.astype(jnp.float32)

  def sam_distill(self, masks, iou, target, target_iou, valid):
    """L_SAM (focal + dice on every distilled mask, + sam_iou_weight * IoU-head MSE) and its parts."""
    cfg = self.config
    loss, parts = losses.sam_distill_loss(masks, target, valid[..., None], soft=cfg.sam_soft_targets)
    iou_loss = losses.iou_head_loss(iou, target_iou, valid[..., None])
    return loss + cfg.sam_iou_weight * iou_loss, dict(parts, iou_mse=iou_loss)

  def micro_grads(self, trainable, frozen, teachers, batches):
    """Gradients (trainable tree) and metrics of one (micro-)batch: CLIP fwd/bwd, then SAM's."""
    student, lam = self.student, float(self.config.lambda_sam)
    grads = jax.tree.map(jnp.zeros_like, trainable)
    metrics, total = {}, 0.0
    if "clip" in batches:
      b = batches["clip"]
      target = self.clip_targets(teachers, b)
      images = common.normalize_sam(b["image"])

      def clip_loss(tp):
        params = optim.merge_params(tp, frozen)
        pooled, _ = student.apply({"params": params}, images, method=SamClipNet.clip_features)
        return losses.clip_distill_loss(pooled, target)

      loss, g = jax.value_and_grad(clip_loss)(trainable)
      grads = jax.tree.map(jnp.add, grads, g)
      metrics["clip_loss"] = loss
      total = total + loss
    if "sam" in batches:
      images, coords, labels, valid = common.sam_inputs(self.config, batches["sam"])
      target, target_iou = self.sam_targets(teachers, images, coords, labels)

      def sam_loss(tp):
        masks, iou_pred = self.student_sam(optim.merge_params(tp, frozen), images, coords, labels)
        loss, parts = self.sam_distill(masks, iou_pred, target, target_iou, valid)
        iou = losses.mask_iou(masks, target, valid[..., None])
        return lam * loss, (loss, parts, iou)

      (_, (loss, parts, iou)), g = jax.value_and_grad(sam_loss, has_aux=True)(trainable)
      grads = jax.tree.map(jnp.add, grads, g)
      metrics.update(sam_loss=loss, sam_focal=parts["focal"], sam_dice=parts["dice"],
                     sam_iou_mse=parts["iou_mse"], sam_iou=iou)
      total = total + lam * loss
    metrics["total_loss"] = jnp.asarray(total, jnp.float32)
    return grads, metrics

  def eval_metrics(self, params, teachers, batches):
    """Held-out cosine to the CLIP teacher; mask IoU and loss against the SAM teacher."""
    out = {}
    if "clip" in batches:
      b = batches["clip"]
      target = self.clip_targets(teachers, b)
      pooled, _ = self.student.apply({"params": params}, common.normalize_sam(b["image"]),
                                     method=SamClipNet.clip_features)
      out["clip_cosine"] = jnp.mean(losses.cosine_similarity(pooled, target))
    if "sam" in batches:
      images, coords, labels, valid = common.sam_inputs(self.config, batches["sam"])
      target, target_iou = self.sam_targets(teachers, images, coords, labels)
      masks, iou_pred = self.student_sam(params, images, coords, labels)
      out["sam_iou"] = losses.mask_iou(masks, target, valid[..., None])
      out["sam_loss"] = self.sam_distill(masks, iou_pred, target, target_iou, valid)[0]
    return out

  # ---------------------------------------------------------------- data
  def data_paths(self, workdir) -> dict:
    """Split paths from the config; the embedded sample fills them when none this run reads is set."""
    d = self.config.data
    paths = {k: d[k] for k in ("clip_train", "clip_val", "sam_train", "sam_val")}
    splits = ("train", "val") if self.config.eval_every_steps > 0 else ("train",)
    used = [f"{kind}_{split}" for kind, on in (("clip", self.use_clip), ("sam", self.use_sam)) if on
            for split in splits]
    missing = [k for k in used if not paths[k]]
    if missing and any(paths[k] for k in used):  # own data: the embedded sample is no stand-in
      raise ValueError(f"config.data.{missing[0]} is not set while other data paths are "
                       f"(set {', '.join('config.data.' + k for k in missing)}; the embedded sample "
                       "fills them only when none is set)")
    if missing:
      from samclip_jax.data.sample import ensure_sample
      sample = ensure_sample(d.sample_dir or os.path.join(workdir, "sample"))
      paths = {k: v or sample[k] for k, v in paths.items()}
    return paths

  def make_loaders(self, paths, split="train"):
    """{"clip": loader, "sam": loader} for this process (its shard of the global batch)."""
    from samclip_jax.data import pipeline
    cfg = self.config
    nproc, pidx = jax.process_count(), jax.process_index()
    is_train = split == "train"
    # Eval batches are one micro-batch big: they must fit where a train micro-batch fits.
    div = 1 if is_train else cfg.grad_accum_steps
    out = {}
    common_kw = dict(seed=cfg.seed, shard_index=pidx, shard_count=nproc,
                     num_epochs=None if is_train else 1,
                     worker_count=cfg.data.worker_count if is_train else 0)
    if self.use_clip:
      kw = dict(common_kw)
      if is_train and cfg.data.teacher_embeddings:
        kw["teacher_embeddings"] = cfg.data.teacher_embeddings
      res = tuple(int(r) for r in cfg.clip_resolutions)
      out["clip"] = pipeline.clip_loader(
          paths[f"clip_{split}"], batch_size=cfg.clip_batch_size // div // nproc,
          resolutions=res if is_train else res[:1], shuffle=is_train, **kw)
    if self.use_sam:
      out["sam"] = pipeline.sam_loader(
          paths[f"sam_{split}"], batch_size=cfg.sam_batch_size // div // nproc,
          masks_per_image=cfg.masks_per_image, points_per_prompt=cfg.points_per_prompt,
          shuffle=is_train, image_size=cfg.sam_image_size, **common_kw)
    return out

  def device_batches(self, host):
    return common.device_batches(self, host)

  def fake_batches(self, seed: int = 0, clip_resolution: int | None = None,
                   sam_frame: int | None = None):
    """Random host batches with the pipeline's shapes and dtypes (tests, benchmarks)."""
    cfg, rng = self.config, np.random.default_rng(seed)
    out = {}
    if self.use_clip:
      r = clip_resolution or int(cfg.clip_resolutions[0])
      out["clip"] = {"image": rng.integers(0, 256, (cfg.clip_batch_size, r, r, 3), dtype=np.uint8)}
    if self.use_sam:
      s, b, k, p = sam_frame or cfg.sam_image_size, cfg.sam_batch_size, cfg.masks_per_image, cfg.points_per_prompt
      labels = np.full((b, k, p), sam_lib.ABSENT, np.int32)
      labels[:, :, :2] = (sam_lib.POSITIVE, sam_lib.PAD)
      labels[:, ::2, :2] = (sam_lib.BOX_TOP_LEFT, sam_lib.BOX_BOTTOM_RIGHT)  # every other prompt is a box
      coords = np.sort(rng.uniform(0, s - 1, (b, k, p, 2)).astype(np.float32), axis=2)
      out["sam"] = {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
                    "point_coords": coords, "point_labels": labels,
                    "prompt_valid": np.ones((b, k), bool),
                    "image_size": np.full((b, 2), s, np.int32)}
    return out

  # ---------------------------------------------------------------- run files and export
  def run_facts(self) -> dict:
    """What a merged model dir records beside its SamClipConfig: stage and the teachers
    (clip_checkpoint is where samclip_jax.api finds the CLIP text tower)."""
    path = lambda p: os.path.abspath(p) if p else ""
    return {"stage": self.config.stage, "clip_checkpoint": path(self.config.clip_checkpoint),
            "sam_checkpoint": path(self.config.sam_checkpoint),
            "clip_teacher_config": self.clip_config.to_dict(),
            "inference_resolution": int(self.config.inference_resolution) or None}

  def prepare_workdir(self, workdir: str) -> None:
    """WORKDIR/model_config.json (the model the checkpoints hold, read by samclip_jax.api to
    load an unfinished run) and, for a random CLIP teacher, WORKDIR/text_model/."""
    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    model = json.loads(json.dumps(self.model_config.to_dict()))  # as the file gives it back
    if os.path.isfile(path):  # its checkpoints hold that model: another one cannot resume them
      with open(path) as f:
        before = json.load(f)
      changed = sorted(k for k in model if k in before and before[k] != model[k])
      if changed:
        raise ValueError(f"{workdir} holds a run of another model ({', '.join(changed)} differ from this "
                         "config's); use another --workdir, or the run's own model settings")
    if jax.process_index() == 0:
      meta = dict(model, **self.run_facts())
      with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
      os.replace(path + ".tmp", path)  # atomic: a reader never sees half a file
    if self.config.clip_checkpoint:  # a real teacher is found through clip_checkpoint
      return
    from samclip_jax.api import TEXT_MODEL_DIR
    exists = os.path.isfile(os.path.join(workdir, TEXT_MODEL_DIR, checkpoint.CONFIG_FILE))
    if jax.process_count() > 1:
      # Process 0 decides for all: save_model is collective.
      from jax.experimental import multihost_utils
      exists = bool(multihost_utils.broadcast_one_to_all(np.asarray(exists)))
    if not exists:
      self._export_random_text_model(workdir)

  def export(self, state: loop.TrainState, directory: str):
    """Writes the merged model dir (model_type "samclip") that load_samclip / SamClip read."""
    params = common.export_params(state)
    # save_model is collective: every process calls it, process 0 writes the files.
    samclip_lib.save_samclip(directory, self.model_config, params,
                             dict(self.run_facts(), step=int(state.step)))
    if not self.config.clip_checkpoint:  # a real teacher is found through config.json
      self._export_random_text_model(directory)

  def _export_random_text_model(self, directory: str):
    """DIRECTORY/text_model/: the random CLIP teacher (same seed), with the bundled tokenizer."""
    from samclip_jax.api import TEXT_MODEL_DIR
    from samclip_jax.clip_model import save_clip
    key = _keys(self.config.seed, self.config.prng_impl)["clip"]
    params = random_clip_params(self.clip_config, key)
    save_clip(os.path.join(directory, TEXT_MODEL_DIR), self.clip_config, params,
              name=f"random {self.config.model.clip_variant}", extra={"seed": self.config.seed})


@functools.partial(jax.jit, static_argnums=0)
def random_clip_params(config: ClipConfig, key):
  """A randomly initialised full CLIP (the stand-in teacher with no checkpoint): training uses
  its image tower, the export keeps the whole model as text_model/. Compiled once per config in
  a process (every run of a study or a test suite builds the same one)."""
  return nn.unbox(init_variables(config, key))["params"]


def _keys(seed, impl="threefry2x32"):
  root = jax.random.key(seed, impl=impl)
  return {name: jax.random.fold_in(root, i) for i, name in enumerate(("sam", "clip", "head"))}


def check_teacher_embeddings(config, clip_cfg) -> None:
  """Offline embeddings must come from this run's kind of CLIP teacher, of its width, checked
  before anything runs. A checkpoint's path may differ (extraction and training hosts mount it
  differently); a random teacher's embeddings are a stand-in for plumbing (the extraction draws
  its own random tower)."""
  from samclip_jax.data import teacher_store
  directory = config.data.teacher_embeddings
  m = teacher_store.read_manifest(directory)
  teacher = m.get("teacher", {})
  problems = []
  if m["dim"] != clip_cfg.embed_dim:
    problems.append(f"they are {m['dim']}-dim, this teacher embeds into {clip_cfg.embed_dim}")
  if bool(config.clip_checkpoint) != bool(teacher.get("checkpoint")):
    problems.append(f"their teacher is {teacher.get('checkpoint') or 'a random stand-in'}, this run's "
                    f"{config.clip_checkpoint or 'a random stand-in'}")
  # What the loader checks again, said before anything is written.
  if not m.get("complete"):
    raise ValueError(f"teacher extraction in {directory} is not complete: rerun it to finish")
  missing = sorted(set(int(r) for r in config.clip_resolutions) - set(m["resolutions"]))
  if missing:
    raise ValueError(f"teacher embeddings in {directory} have no views at resolutions {missing} "
                     f"(clip_resolutions); they hold {m['resolutions']}")
  size = teacher.get("teacher_image_size")   # 0: the view's own size, in both configs
  if size is not None and int(size) != int(config.clip_teacher_image_size):
    problems.append(f"their teacher saw the views at {int(size) or 'their own size'}, this run's sees them at "
                    f"{int(config.clip_teacher_image_size) or 'their own size'} (clip_teacher_image_size)")
  if problems:
    raise ValueError(f"teacher embeddings in {directory} were not made by this run's CLIP teacher: "
                     f"{'; '.join(problems)}; extract them with it (samclip_jax.extract, the same teacher settings)")


def create(config, devices=None) -> MergeTask:
  """Builds the static parts of a merge run; no parameter is materialised (eval_shape only)."""
  validate_config(config)
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  rules = sharding.normalize_rules(config.logical_axis_rules)
  for name in ("clip_batch_size", "sam_batch_size"):
    if config[name] > 0:
      sharding.check_batch_divisible(name, config[name], mesh, rules, config.grad_accum_steps)

  dtype = common.DTYPES[config.compute_dtype]
  sam_cfg = common.sam_config_from(config)
  if sam_cfg.image_size != config.sam_image_size:
    raise ValueError(f"sam_image_size={config.sam_image_size} but the SAM model is built for "
                     f"{sam_cfg.image_size} px")
  clip_cfg = common.clip_config_from(config)
  if config.data.teacher_embeddings:
    check_teacher_embeddings(config, clip_cfg)
  model_cfg = SamClipConfig(sam=sam_cfg, head_depth=config.model.head_depth,
                            head_mlp_hidden=tuple(config.model.head_mlp_hidden),
                            out_dim=clip_cfg.embed_dim)
  common.check_init_from(config, model_cfg, samclip_lib.load_samclip_config)
  student = SamClipNet(model_cfg, dtype=dtype, **common.model_options(config))
  # The SAM teacher runs in float32: bf16 rounding flips the sign of logits near 0, i.e. the
  # binarised targets' boundary pixels.
  sam_teacher = Sam(sam_cfg, dtype=jnp.float32) if config.sam_batch_size > 0 else None
  clip_teacher = image_tower(clip_cfg, dtype)

  abstract_student = jax.eval_shape(functools.partial(samclip_lib.init_params, model_cfg),
                                    jax.random.key(0))
  tx, schedule, state_sh, trainable_paths, frozen_paths = loop.state_layout(
      config, abstract_student, mesh, rules)

  target = lambda boxed: sharding.shaped(nn.unbox(boxed), sharding.tree_shardings(boxed, mesh, rules))
  sam_target = target(jax.eval_shape(
      lambda k: Sam(sam_cfg).init(k, *samclip_lib.example_inputs(model_cfg)[:3]), jax.random.key(0))["params"])
  teacher_targets = {"sam": sam_target} if sam_teacher is not None else {}
  teacher_targets["clip"] = target(jax.eval_shape(
      lambda k: clip_teacher.init(k, jnp.zeros((1,) + clip_cfg.vision.image_hw + (3,))), jax.random.key(0))["params"])
  aux_sh = jax.tree.map(lambda t: t.sharding, teacher_targets)

  return MergeTask(config=config, mesh=mesh, rules=rules, sam_config=sam_cfg, clip_config=clip_cfg,
                   model_config=model_cfg, student=student, sam_teacher=sam_teacher,
                   clip_teacher=clip_teacher, tx=tx, schedule=schedule, state_shardings=state_sh,
                   aux_shardings=aux_sh, sam_target=sam_target, teacher_targets=teacher_targets,
                   trainable_paths=trainable_paths, frozen_paths=frozen_paths)
