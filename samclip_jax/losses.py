"""Distillation losses of SAM-CLIP: cosine to the CLIP teacher, focal + dice to the SAM teacher."""
import jax
import jax.numpy as jnp
import optax

# SAM's focal:dice weighting (segment_anything paper, section 3 / appendix A).
FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
# SAM's mask threshold on logits (Sam.mask_threshold = 0.0).
MASK_THRESHOLD = 0.0


def _masked_mean(x, valid):
  """Mean of x over entries where valid; 0 when nothing is valid (no NaN from 0/0)."""
  if valid is None:
    return jnp.mean(x)
  valid = jnp.broadcast_to(valid, x.shape)
  # where, not multiply: garbage (NaN) in padded prompts must not leak into the mean.
  total = jnp.sum(jnp.where(valid, x, 0.0))
  return total / jnp.maximum(jnp.sum(valid.astype(x.dtype)), 1.0)


def cosine_similarity(a, b, eps=1e-8):
  """Cosine similarity along the last axis, computed in float32."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  dot = jnp.sum(a * b, axis=-1)
  # eps inside the sqrt keeps the gradient finite at a zero vector.
  na = jnp.sqrt(jnp.sum(a * a, axis=-1) + eps)
  nb = jnp.sqrt(jnp.sum(b * b, axis=-1) + eps)
  return dot / (na * nb)


def clip_distill_loss(student, teacher, valid=None):
  """L_CLIP = mean over images of 1 - cos(student [B,D], teacher [B,D])."""
  return _masked_mean(1.0 - cosine_similarity(student, teacher), valid)


def mask_targets(teacher_logits):
  """Binary targets from teacher mask logits (SAM's threshold: logit > 0)."""
  return (teacher_logits.astype(jnp.float32) > MASK_THRESHOLD).astype(jnp.float32)


def focal_loss_per_mask(logits, targets):
  """Sigmoid focal loss (alpha 0.25, gamma 2) averaged over the last two (pixel) axes."""
  fl = optax.sigmoid_focal_loss(logits.astype(jnp.float32), targets,
                                alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA)
  return jnp.mean(fl, axis=(-2, -1))


def dice_loss_per_mask(logits, targets, smooth=1.0):
  """1 - soft Dice over the last two (pixel) axes, with SAM/DETR's +1 smoothing."""
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  inter = jnp.sum(p * targets, axis=(-2, -1))
  denom = jnp.sum(p, axis=(-2, -1)) + jnp.sum(targets, axis=(-2, -1))
  return 1.0 - (2.0 * inter + smooth) / (denom + smooth)


def sam_distill_loss(student_logits, teacher_logits, valid=None, soft: bool = False):
  """L_SAM = 20 * focal + 1 * dice per mask, averaged over valid prompts.

  student_logits, teacher_logits: [..., H, W] mask logits (e.g. [B, K, M, 4h, 4w]).
  valid: bool broadcastable to the leading axes (e.g. prompt_valid [B, K, 1]).
  soft: targets sigmoid(teacher logits) instead of the binarised masks (logit > 0).
  Returns (loss, parts) with parts = {"focal", "dice"} (each averaged the same way).
  """
  t = teacher_logits.astype(jnp.float32)
  targets = jax.lax.stop_gradient(jax.nn.sigmoid(t) if soft else mask_targets(t))
  focal = focal_loss_per_mask(student_logits, targets)
  dice = dice_loss_per_mask(student_logits, targets)
  per_mask = FOCAL_WEIGHT * focal + DICE_WEIGHT * dice
  return _masked_mean(per_mask, valid), {"focal": _masked_mean(focal, valid),
                                         "dice": _masked_mean(dice, valid)}


def mask_iou(student_logits, teacher_logits, valid=None):
  """Mean IoU of the binarised student and teacher masks over valid prompts."""
  s = student_logits > MASK_THRESHOLD
  t = teacher_logits > MASK_THRESHOLD
  inter = jnp.sum(s & t, axis=(-2, -1)).astype(jnp.float32)
  union = jnp.sum(s | t, axis=(-2, -1)).astype(jnp.float32)
  # Two empty masks agree perfectly.
  iou = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)
  return _masked_mean(iou, valid)


def iou_head_loss(student_iou, teacher_iou, valid=None):
  """MSE between the student's and the teacher's IoU predictions [..., M] (protects the
  predicted IoU that multimask selection and the automatic mask generator rely on)."""
  err = (student_iou.astype(jnp.float32) - jax.lax.stop_gradient(teacher_iou.astype(jnp.float32))) ** 2
  return _masked_mean(err, valid)


def total_loss(l_clip, l_sam, lambda_sam):
  """L = L_CLIP + lambda * L_SAM (the paper uses lambda = 10)."""
  return l_clip + lambda_sam * l_sam
