"""Pretraining a small SAM from scratch on ground-truth masks, with SAM's own objective.

Per prompt: focal + dice (20:1) of the mask logits against the ground-truth mask (at the
low-res logits grid), and MSE of the IoU head against the true IoU of each predicted mask.
A single positive point is ambiguous: the loss takes the best of the 3 multimask outputs
(SAM's min-over-outputs); any other prompt (box, several points) trains the single output.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from samclip_jax import checkpoint, loop, losses
from samclip_jax.models import sam as sam_lib
from samclip_jax.models.sam import Sam, SamConfig
from samclip_jax.tasks import common

IOU_LOSS_WEIGHT = 1.0  # SAM: the IoU head's MSE is added with weight 1


def is_single_point(labels):
  """[..., P] prompt labels -> [...] True where the prompt is one positive point (ambiguous)."""
  return (jnp.sum(labels >= 0, axis=-1) == 1) & (labels[..., 0] == sam_lib.POSITIVE)


def mask_ious(logits, gt):
  """IoU of binarised logits [..., h, w] with bool ground truth [..., h, w] (1 for two empties)."""
  pred = logits > losses.MASK_THRESHOLD
  inter = jnp.sum(pred & gt, axis=(-2, -1)).astype(jnp.float32)
  union = jnp.sum(pred | gt, axis=(-2, -1)).astype(jnp.float32)
  return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)


def sam_loss(masks, iou_pred, gt, labels, valid):
  """SAM's objective. masks [B,K,4,h,w] (single output first, then 3 multimask), iou_pred
  [B,K,4], gt bool [B,K,h,w], labels [B,K,P], valid [B,K] -> (loss, metrics)."""
  target = gt[:, :, None].astype(jnp.float32)
  focal = losses.focal_loss_per_mask(masks, target)                 # [B,K,4]
  dice = losses.dice_loss_per_mask(masks, target)
  per_output = losses.FOCAL_WEIGHT * focal + losses.DICE_WEIGHT * dice
  ambiguous = is_single_point(labels)                                # [B,K]
  best_multi = 1 + jnp.argmin(per_output[..., 1:], axis=-1)
  chosen = jnp.where(ambiguous, best_multi, 0)                       # [B,K]
  pick = lambda x: jnp.take_along_axis(x, chosen[..., None], axis=-1)[..., 0]
  true_iou = jax.lax.stop_gradient(mask_ious(masks, gt[:, :, None]))
  iou_mse = (pick(iou_pred.astype(jnp.float32)) - pick(true_iou)) ** 2
  mean = lambda x: losses._masked_mean(x, valid)
  loss = mean(pick(per_output)) + IOU_LOSS_WEIGHT * mean(iou_mse)
  return loss, {"focal": mean(pick(focal)), "dice": mean(pick(dice)), "iou_mse": mean(iou_mse),
                "mask_iou": mean(pick(true_iou))}


def prompt_kind_mious(masks, gt, labels, valid):
  """Held-out quality: box-prompted mIoU (single output) and single-point mIoU (best of 3)."""
  ious = mask_ious(masks, gt[:, :, None])                            # [B,K,4]
  is_box = labels[..., 0] == sam_lib.BOX_TOP_LEFT
  single = is_single_point(labels)
  best3 = jnp.max(ious[..., 1:], axis=-1)
  mean = lambda x, sel: jnp.sum(jnp.where(sel & valid, x, 0.0)) / jnp.maximum(jnp.sum(sel & valid), 1)
  return {"box_miou": mean(ious[..., 0], is_box), "point_miou": mean(best3, single),
          "box_count": jnp.sum(is_box & valid).astype(jnp.float32),
          "point_count": jnp.sum(single & valid).astype(jnp.float32)}


@dataclasses.dataclass
class SamPretrainTask:
  config: Any
  mesh: Any
  rules: tuple
  sam_config: SamConfig
  model: Sam
  tx: Any
  schedule: Any
  state_shardings: Any
  trainable_paths: list
  frozen_paths: list
  started_from: str = ""  # the init_from model's provenance (common.started_from)
  aux_shardings = {}
  log_keys = ("total_loss", "focal", "dice", "iou_mse", "mask_iou")
  metric_names = ("total_loss", "focal", "dice", "iou_mse", "mask_iou")

  @property
  def images_per_step(self):
    return self.config.sam_batch_size

  @property
  def gt_size(self):
    return self.sam_config.mask_input_size[0]

  def describe(self):
    enc = self.sam_config.image_encoder
    return (f"SAM pretraining: {self.sam_config.image_size} px, encoder dim {enc.embed_dim} depth "
            f"{enc.depth} patch {enc.patch_size}; mesh {dict(self.mesh.shape)} on {self.mesh.devices.size} "
            f"{jax.devices()[0].platform} device(s)")

  def abstract_state(self):
    params = nn.unbox(sam_lib.abstract_params(self.sam_config))
    return loop.abstract_state(self.tx, self.config.optim.frozen, params, self.state_shardings)

  def init_aux(self):
    return {}

  def init_state(self, aux):
    del aux
    make = lambda params: loop.make_state(self.tx, self.config.optim.frozen, params)
    if self.config.init_from:  # an exported SAM of this size: its weights, a fresh optimizer
      _, params = sam_lib.load_sam(self.config.init_from, target=loop.params_target(self.abstract_state()))
      return jax.jit(make, out_shardings=self.state_shardings)(params)
    key = jax.random.key(self.config.seed, impl=self.config.prng_impl)
    init = lambda k: make(nn.unbox(Sam(self.sam_config).init(k, *sam_lib.example_inputs(self.sam_config))["params"]))
    return jax.jit(init, out_shardings=self.state_shardings)(key)

  def _forward(self, params, batch):
    images, coords, labels, valid = common.sam_inputs(self.config, batch)
    masks, iou_pred = self.model.apply({"params": params}, images, coords, labels, multimask_output=None)
    return masks.astype(jnp.float32), iou_pred, labels, valid

  def micro_grads(self, trainable, frozen, aux, batches):
    del aux
    from samclip_jax import optim

    def loss_fn(tp):
      masks, iou_pred, labels, valid = self._forward(optim.merge_params(tp, frozen), batches["sam"])
      return sam_loss(masks, iou_pred, batches["sam"]["gt_masks"], labels, valid)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    return grads, dict(metrics, total_loss=loss)

  def eval_metrics(self, params, aux, batches):
    del aux
    masks, iou_pred, labels, valid = self._forward(params, batches["sam"])
    gt = batches["sam"]["gt_masks"]
    loss, metrics = sam_loss(masks, iou_pred, gt, labels, valid)
    return dict(prompt_kind_mious(masks, gt, labels, valid), loss=loss, iou_mse=metrics["iou_mse"])

  def data_paths(self, workdir):
    del workdir
    return {"sam_train": self.config.data.sam_train, "sam_val": self.config.data.sam_val}

  def make_loaders(self, paths, split="train"):
    from samclip_jax.data import pipeline
    cfg, nproc = self.config, jax.process_count()
    is_train = split == "train"
    return {"sam": pipeline.sam_loader(
        paths[f"sam_{split}"], batch_size=cfg.sam_batch_size // nproc,
        masks_per_image=cfg.masks_per_image, points_per_prompt=cfg.points_per_prompt,
        seed=cfg.seed if is_train else cfg.seed + 1, shard_index=jax.process_index(), shard_count=nproc,
        num_epochs=None if is_train else 1, worker_count=cfg.data.worker_count if is_train else 0,
        shuffle=is_train, image_size=cfg.sam_image_size, gt_mask_size=self.gt_size)}

  def device_batches(self, host):
    return common.device_batches(self, host)

  def prepare_workdir(self, workdir):
    del workdir

  def export(self, state, directory):
    """A SAM model directory (the converter's format: load_sam, SamPredictor, merge configs read it)."""
    params = common.export_params(state)
    meta = dict(self.sam_config.to_dict(),
                source=common.pretraining_source(self, self.config.data.sam_train, int(state.step)))
    checkpoint.save_model(directory, params, meta)


def sam_config(config) -> SamConfig:
  """The pretrained SAM's size, from config.model (a tiny_sam_config with a patch size)."""
  from samclip_jax.models.samclip import tiny_sam_config
  m = config.model
  cfg = tiny_sam_config(config.sam_image_size, m.embed_dim, m.depth, m.num_heads, m.window_size,
                        m.prompt_embed_dim)
  enc = dataclasses.replace(cfg.image_encoder, patch_size=m.patch_size,
                            global_attn_indexes=tuple(m.global_attn_indexes))
  return dataclasses.replace(cfg, image_encoder=enc, decoder_num_heads=m.decoder_num_heads,
                             decoder_mlp_dim=m.decoder_mlp_dim)


def create(config, devices=None) -> SamPretrainTask:
  loop.validate_common(config)
  common.validate_batches(config, ("sam_batch_size",))
  if config.sam_batch_size < 1 or config.masks_per_image < 1:
    raise ValueError("sam_batch_size and masks_per_image must be >= 1")
  mesh, rules = common.pretraining_mesh(config, devices, "sam_batch_size", ("sam_train", "sam_val"))
  cfg = sam_config(config)
  common.check_init_from(config, cfg, sam_lib.load_sam_config)
  boxed = jax.eval_shape(lambda k: Sam(cfg).init(k, *sam_lib.example_inputs(cfg))["params"], jax.random.key(0))
  tx, schedule, state_sh, trainable, frozen = loop.state_layout(config, boxed, mesh, rules)
  return SamPretrainTask(config=config, mesh=mesh, rules=rules, sam_config=cfg,
                         model=Sam(cfg, dtype=common.DTYPES[config.compute_dtype], **common.model_options(config)), tx=tx,
                         schedule=schedule, state_shardings=state_sh, trainable_paths=trainable,
                         frozen_paths=frozen, started_from=common.started_from(config))
