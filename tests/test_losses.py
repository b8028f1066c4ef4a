"""Distillation losses against hand computations."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samclip_jax import losses


def test_clip_loss_hand_values():
  s = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
  t = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
  # cos: 1, 1/sqrt(2), -1 -> 1 - cos: 0, 1 - 0.7071, 2
  want = (0.0 + (1 - 1 / math.sqrt(2)) + 2.0) / 3
  np.testing.assert_allclose(losses.clip_distill_loss(s, t), want, rtol=1e-6)
  # Scale invariance of the student.
  np.testing.assert_allclose(losses.clip_distill_loss(5.0 * s, t), want, rtol=1e-6)
  # Valid mask drops the third row.
  valid = jnp.array([True, True, False])
  np.testing.assert_allclose(losses.clip_distill_loss(s, t, valid), (1 - 1 / math.sqrt(2)) / 2,
                             rtol=1e-6)


def test_clip_loss_gradient_finite_at_zero():
  g = jax.grad(lambda s: losses.clip_distill_loss(s, jnp.ones((1, 4))))(jnp.zeros((1, 4)))
  assert np.all(np.isfinite(g))


def _focal_hand(x, y, alpha=0.25, gamma=2.0):
  p = 1 / (1 + math.exp(-x))
  pt = p if y == 1 else 1 - p
  at = alpha if y == 1 else 1 - alpha
  return -at * (1 - pt) ** gamma * math.log(pt)


def _dice_hand(xs, ys):
  ps = [1 / (1 + math.exp(-x)) for x in xs]
  inter = sum(p * y for p, y in zip(ps, ys))
  return 1 - (2 * inter + 1) / (sum(ps) + sum(ys) + 1)


def test_sam_loss_hand_values():
  # One 2x2 student mask; teacher logits binarised at 0 -> targets [[1, 0], [0, 1]].
  student = np.array([[2.0, -1.0], [0.5, -3.0]])
  teacher = np.array([[4.0, -2.0], [-0.1, 0.3]])
  ys = [1, 0, 0, 1]
  xs = student.reshape(-1).tolist()
  focal = sum(_focal_hand(x, y) for x, y in zip(xs, ys)) / 4
  dice = _dice_hand(xs, ys)
  loss, parts = losses.sam_distill_loss(jnp.asarray(student)[None], jnp.asarray(teacher)[None])
  np.testing.assert_allclose(parts["focal"], focal, rtol=1e-5)
  np.testing.assert_allclose(parts["dice"], dice, rtol=1e-5)
  np.testing.assert_allclose(loss, 20 * focal + dice, rtol=1e-5)


def test_soft_targets_and_iou_head_loss_hand_values():
  """Soft targets are sigmoid(teacher logits); the IoU head's MSE averages over valid prompts' outputs."""
  student = np.array([[2.0, -1.0], [0.5, -3.0]])
  teacher = np.array([[4.0, -2.0], [-0.1, 0.3]])
  xs, ys = student.reshape(-1).tolist(), (1 / (1 + np.exp(-teacher.reshape(-1)))).tolist()

  def focal_soft(x, y, alpha=0.25, gamma=2.0):  # sigmoid focal loss with a soft label y
    p = 1 / (1 + math.exp(-x))
    ce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
    pt = p * y + (1 - p) * (1 - y)
    return (alpha * y + (1 - alpha) * (1 - y)) * (1 - pt) ** gamma * ce

  focal = sum(focal_soft(x, y) for x, y in zip(xs, ys)) / 4
  loss, parts = losses.sam_distill_loss(jnp.asarray(student)[None], jnp.asarray(teacher)[None], soft=True)
  np.testing.assert_allclose(parts["focal"], focal, rtol=1e-5)
  np.testing.assert_allclose(loss, 20 * focal + _dice_hand(xs, ys), rtol=1e-5)
  # 2 prompts x 4 outputs (single + 3 multimask); the second prompt is padding.
  s_iou = np.array([[0.9, 0.5, 0.2, 0.1], [5.0, 5.0, 5.0, 5.0]], np.float32)
  t_iou = np.array([[0.8, 0.7, 0.2, 0.4], [0.0, 0.0, 0.0, 0.0]], np.float32)
  valid = np.array([[True], [False]])
  want = np.mean((s_iou[0] - t_iou[0]) ** 2)
  np.testing.assert_allclose(losses.iou_head_loss(jnp.asarray(s_iou), jnp.asarray(t_iou), jnp.asarray(valid)),
                             want, rtol=1e-6)


def test_sam_loss_averages_only_valid_prompts():
  rng = np.random.default_rng(0)
  student = rng.normal(size=(2, 3, 1, 4, 4)).astype(np.float32)
  teacher = rng.normal(size=(2, 3, 1, 4, 4)).astype(np.float32)
  valid = np.array([[True, False, True], [False, False, True]])
  loss, _ = losses.sam_distill_loss(student, teacher, valid[..., None])
  per = [float(losses.sam_distill_loss(student[b, k], teacher[b, k])[0])
         for b in range(2) for k in range(3) if valid[b, k]]
  np.testing.assert_allclose(loss, np.mean(per), rtol=1e-5)
  # Garbage (even NaN) in invalid prompts must not leak into the loss.
  student_nan = student.copy()
  student_nan[0, 1] = np.nan
  loss_nan, _ = losses.sam_distill_loss(student_nan, teacher, valid[..., None])
  np.testing.assert_allclose(loss_nan, loss, rtol=1e-6)
  # All invalid: zero, not NaN.
  zero, _ = losses.sam_distill_loss(student, teacher, np.zeros((2, 3, 1), bool))
  assert float(zero) == 0.0


def test_sam_loss_is_minimised_by_confident_teacher_agreement():
  teacher = jnp.array([[[3.0, -3.0], [-3.0, 3.0]]])
  agree, _ = losses.sam_distill_loss(10 * teacher, teacher)
  disagree, _ = losses.sam_distill_loss(-10 * teacher, teacher)
  assert float(agree) < 0.01 < 1.0 < float(disagree)


def test_mask_iou():
  s = jnp.array([[[1.0, 1.0], [-1.0, -1.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
  t = jnp.array([[[1.0, -1.0], [-1.0, -1.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
  # First: 1 / 2; second: both empty -> 1.
  np.testing.assert_allclose(losses.mask_iou(s, t), 0.75)
  np.testing.assert_allclose(losses.mask_iou(s, t, jnp.array([True, False])), 0.5)


@pytest.mark.parametrize("lam", [0.0, 10.0])
def test_total_loss(lam):
  assert float(losses.total_loss(jnp.float32(0.5), jnp.float32(0.2), lam)) == pytest.approx(
      0.5 + lam * 0.2)
