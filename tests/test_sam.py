"""Parity of samclip_jax.models.sam with segment_anything (prompt encoder, two-way transformer, mask decoder)."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.common import apply_table
from convert.sam import IGNORE, RULES
from samclip_jax.models import sam as S
from sam_reference import TINY, build_torch_sam, state_dict_numpy

TOL = 1e-4
MH, MW = TINY.mask_input_size
EH, EW = TINY.image_embedding_size
C = TINY.prompt_embed_dim


@pytest.fixture(scope="module")
def ref():
  tsam = build_torch_sam(TINY, seed=1)
  params = apply_table(state_dict_numpy(tsam), RULES, S.abstract_params(TINY), ignore=IGNORE)
  return tsam, params


def _prompt_encoder():
  return S.PromptEncoder(C, TINY.image_embedding_size, (TINY.image_size, TINY.image_size), TINY.mask_in_chans)


def _decoder():
  return S.MaskDecoder(C, TINY.num_multimask_outputs, TINY.iou_head_depth, TINY.iou_head_hidden_dim,
                       TINY.decoder_depth, TINY.decoder_num_heads, TINY.decoder_mlp_dim,
                       TINY.attention_downsample_rate)


def _t(x):
  return torch.from_numpy(np.asarray(x, np.float32))


def _nchw(x):
  return x.detach().numpy().transpose(0, 2, 3, 1)


def _maxabs(a, b):
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


# ---------------------------------------------------------------- prompt encoder
@pytest.mark.parametrize("kind", ["points", "box", "points+box", "mask"])
def test_prompt_encoder_parity(ref, kind):
  tsam, params = ref
  rng = np.random.default_rng(0)
  b, n = 3, 4
  pts = rng.uniform(0, TINY.image_size, (b, n, 2)).astype(np.float32)
  lbl = rng.integers(0, 2, (b, n)).astype(np.int32)
  box = np.sort(rng.uniform(0, TINY.image_size, (b, 2, 2)), axis=1).reshape(b, 4).astype(np.float32)
  mask = rng.normal(0, 3, (b, 1, MH, MW)).astype(np.float32)
  t_points = (_t(pts), torch.from_numpy(lbl)) if "points" in kind else None
  t_box = _t(box) if "box" in kind else None
  t_mask = _t(mask) if kind == "mask" else None
  if kind == "mask":
    t_points = (_t(pts), torch.from_numpy(lbl))
  with torch.no_grad():
    t_sparse, t_dense = tsam.prompt_encoder(points=t_points, boxes=t_box, masks=t_mask)
    t_pe = tsam.prompt_encoder.get_dense_pe()

  coords, labels = S.build_sparse_prompt(pts if t_points else None, lbl if t_points else None,
                                         box if t_box is not None else None)
  masks = mask[:, 0, :, :, None] if kind == "mask" else None
  sparse, dense = _prompt_encoder().apply({"params": params["prompt_encoder"]}, coords, labels, masks)
  pe = _prompt_encoder().apply({"params": params["prompt_encoder"]}, method=S.PromptEncoder.get_dense_pe)
  assert sparse.shape == tuple(t_sparse.shape)
  assert _maxabs(sparse, t_sparse.numpy()) <= TOL
  assert dense.shape == (b, EH, EW, C)
  assert _maxabs(dense, _nchw(t_dense)) <= TOL
  assert _maxabs(pe, _nchw(t_pe)[0]) <= TOL


def test_build_sparse_prompt_order():
  pts, lbl = np.array([[[1.0, 2.0], [3.0, 4.0]]]), np.array([[1, 0]])
  c, l = S.build_sparse_prompt(pts, lbl)
  np.testing.assert_array_equal(l, [[1, 0, -1]])
  np.testing.assert_array_equal(c, [[[1, 2], [3, 4], [0, 0]]])
  c, l = S.build_sparse_prompt(pts, lbl, np.array([[5.0, 6.0, 7.0, 8.0]]))
  np.testing.assert_array_equal(l, [[1, 0, 2, 3]])
  np.testing.assert_array_equal(c, [[[1, 2], [3, 4], [5, 6], [7, 8]]])
  c, l = S.build_sparse_prompt(box=np.array([5.0, 6.0, 7.0, 8.0]))
  np.testing.assert_array_equal(l, [2, 3])
  assert isinstance(c, np.ndarray)
  c, l = jax.jit(S.build_sparse_prompt)(jnp.asarray(pts), jnp.asarray(lbl))  # traceable
  np.testing.assert_array_equal(l, [[1, 0, -1]])
  with pytest.raises(ValueError, match="point_labels"):
    S.build_sparse_prompt(pts)


def test_padding_points_do_not_matter(ref):
  """A -1 label zeroes the coordinate's encoding: pads may sit anywhere."""
  _, params = ref
  enc = _prompt_encoder()
  labels = np.array([[1, -1, -1]])
  a, _ = enc.apply({"params": params["prompt_encoder"]}, np.array([[[10.0, 20.0], [0, 0], [0, 0]]]), labels)
  b, _ = enc.apply({"params": params["prompt_encoder"]}, np.array([[[10.0, 20.0], [99, 5], [7, 250]]]), labels)
  np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- transformer / decoder
def test_two_way_transformer_parity(ref):
  tsam, params = ref
  rng = np.random.default_rng(1)
  img = rng.normal(size=(2, EH, EW, C)).astype(np.float32)
  pe = rng.normal(size=(2, EH, EW, C)).astype(np.float32)
  tokens = rng.normal(size=(2, 7, C)).astype(np.float32)
  with torch.no_grad():
    tq, tk = tsam.mask_decoder.transformer(_t(img).permute(0, 3, 1, 2), _t(pe).permute(0, 3, 1, 2), _t(tokens))
  tr = S.TwoWayTransformer(TINY.decoder_depth, C, TINY.decoder_num_heads, TINY.decoder_mlp_dim)
  q, k = jax.jit(tr.apply)({"params": params["mask_decoder"]["transformer"]}, img, pe, tokens)
  assert _maxabs(q, tq.numpy()) <= TOL
  assert _maxabs(k, tk.numpy()) <= TOL


@pytest.mark.parametrize("multimask", [True, False])
def test_mask_decoder_parity_batched(ref, multimask):
  """B images x K prompts in one call == torch's decoder run per image with K prompts."""
  tsam, params = ref
  rng = np.random.default_rng(2)
  b, k, n = 2, 3, 5
  emb = rng.normal(size=(b, EH, EW, C)).astype(np.float32)
  sparse = rng.normal(size=(b, k, n, C)).astype(np.float32)
  dense = rng.normal(size=(b, k, EH, EW, C)).astype(np.float32)
  pe = _prompt_encoder().apply({"params": params["prompt_encoder"]}, method=S.PromptEncoder.get_dense_pe)
  decode = jax.jit(lambda p, *a: _decoder().apply(p, *a, multimask))
  masks, iou = decode({"params": params["mask_decoder"]}, emb, pe, sparse, dense)
  m = 3 if multimask else 1
  assert masks.shape == (b, k, m, 4 * EH, 4 * EW) and iou.shape == (b, k, m)
  with torch.no_grad():
    t_pe = tsam.prompt_encoder.get_dense_pe()
    for i in range(b):
      tm, ti = tsam.mask_decoder(_t(emb[i:i + 1]).permute(0, 3, 1, 2), t_pe, _t(sparse[i]),
                                 _t(dense[i]).permute(0, 3, 1, 2), multimask)
      assert _maxabs(masks[i], tm.numpy()) <= TOL
      assert _maxabs(iou[i], ti.numpy()) <= TOL


def test_sam_whole_model_parity(ref):
  """Sam.__call__ (encoder + prompts + decoder) against torch's modules on one padded input."""
  tsam, params = ref
  rng = np.random.default_rng(3)
  x = rng.normal(size=(1, TINY.image_size, TINY.image_size, 3)).astype(np.float32)
  pts = rng.uniform(0, TINY.image_size, (2, 1, 2)).astype(np.float32)
  lbl = np.array([[1], [0]], np.int32)
  coords, labels = S.build_sparse_prompt(pts, lbl)
  masks, iou = jax.jit(S.Sam(TINY).apply)({"params": params}, x, coords[None], labels[None])
  with torch.no_grad():
    feats = tsam.image_encoder(_t(x).permute(0, 3, 1, 2))
    sp, de = tsam.prompt_encoder(points=(_t(pts), torch.from_numpy(lbl)), boxes=None, masks=None)
    tm, ti = tsam.mask_decoder(feats, tsam.prompt_encoder.get_dense_pe(), sp, de, True)
  assert _maxabs(masks[0], tm.numpy()) <= TOL
  assert _maxabs(iou[0], ti.numpy()) <= TOL


def test_bfloat16_compute_keeps_float32_params(ref):
  _, params = ref
  model = S.Sam(TINY, dtype=jnp.bfloat16)
  inputs = S.example_inputs(TINY, batch=1, num_prompts=2)
  boxed = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
  assert {x.dtype for x in jax.tree.leaves(nn.unbox(boxed))} == {jnp.dtype(jnp.float32)}
  x = np.random.default_rng(4).normal(size=inputs[0].shape).astype(np.float32)
  coords = np.full(inputs[1].shape, 100.0, np.float32)
  m16, _ = jax.jit(model.apply)({"params": params}, x, coords, inputs[2], inputs[3])
  m32, _ = jax.jit(S.Sam(TINY).apply)({"params": params}, x, coords, inputs[2], inputs[3])
  assert m16.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(m16, np.float32)).all()
  scale = float(np.abs(np.asarray(m32)).max())
  assert _maxabs(m16, m32) <= 0.1 * scale


def test_preprocess_matches_torch(ref):
  tsam, _ = ref
  rng = np.random.default_rng(6)
  img = rng.integers(0, 256, (2, TINY.image_size, TINY.image_size, 3)).astype(np.uint8)
  valid = np.array([[200, 256], [256, 100]])
  for i, (h, w) in enumerate(valid):
    img[i, h:], img[i, :, w:] = 0, 0  # a data-pipeline batch: resized, zero padded as uint8
  got = np.asarray(S.preprocess(img, valid))
  for i, (h, w) in enumerate(valid):
    want = tsam.preprocess(torch.from_numpy(img[i, :h, :w]).permute(2, 0, 1).float()).permute(1, 2, 0).numpy()
    assert _maxabs(got[i], want) <= 1e-6


# ---------------------------------------------------------------- config / params
def test_params_carry_logical_axes():
  boxed = jax.eval_shape(S.Sam(TINY).init, jax.random.key(0), *S.example_inputs(TINY))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for x in leaves:
    assert len(x.names) == x.value.ndim
  specs = nn.get_partition_spec(boxed)
  dec = specs["mask_decoder"]["transformer"]["layers_0"]["mlp"]["lin1"]["kernel"]
  assert tuple(dec) == ("embed", "mlp")


@pytest.mark.parametrize("name,dim,depth", [("vit_b", 768, 12), ("vit_l", 1024, 24), ("vit_h", 1280, 32)])
def test_config_from_name_and_json_round_trip(name, dim, depth):
  cfg = S.SamConfig.from_name(name)
  assert (cfg.image_encoder.embed_dim, cfg.image_encoder.depth) == (dim, depth)
  assert (cfg.prompt_embed_dim, cfg.image_size, cfg.image_embedding_size, cfg.mask_input_size) == \
      (256, 1024, (64, 64), (256, 256))
  d = json.loads(json.dumps(cfg.to_dict()))
  assert d["model_type"] == "sam"
  assert S.SamConfig.from_dict(d) == cfg
  assert S.SamConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY


def test_config_rejects_inconsistent_sizes():
  with pytest.raises(ValueError, match="out_chans"):
    S.SamConfig(prompt_embed_dim=128)
  with pytest.raises(ValueError, match="image_size"):
    S.SamConfig(image_size=512)


# ---------------------------------------------------------------- fixed-shape prompts with absent slots
def _torch_prompt(coords, labels):
  """One fixed-shape slot -> the variable-length prompt segment_anything takes (points, box)."""
  keep = labels != S.ABSENT
  c, l = coords[keep], labels[keep]
  is_box = l >= S.BOX_TOP_LEFT
  points = l >= S.NEGATIVE
  pts = (_t(c[points & ~is_box][None]), torch.from_numpy(l[points & ~is_box][None].astype(np.int64)))
  box = _t(c[is_box].reshape(1, 4)) if is_box.any() else None
  return (pts if (points & ~is_box).any() else None), box


@pytest.mark.parametrize("attention", ["reference", "xla"])
def test_absent_slots_compute_what_sam_computes_per_prompt(ref, attention):
  """K prompts of different lengths in one [K, P] batch (ABSENT filling each slot) give what
  segment_anything gives on each prompt alone; without the mask they would not. Both the
  explicit attention and the fused jax.nn.dot_product_attention (key mask) path."""
  tsam, params = ref
  rng = np.random.default_rng(5)
  A, PAD = S.ABSENT, S.PAD
  labels = np.array([[2, 3, A, A], [1, PAD, A, A], [1, 0, PAD, A], [1, A, PAD, A], [1, 1, 0, PAD]], np.int32)
  coords = np.sort(rng.uniform(0, TINY.image_size, (len(labels), 4, 2)).astype(np.float32), axis=1)
  emb = rng.normal(size=(1, EH, EW, C)).astype(np.float32)
  model = S.Sam(TINY, attention=attention)
  run = jax.jit(lambda l: model.apply({"params": params}, emb, coords[None], l[None], None, True,
                                      method=S.Sam.predict_masks))
  masks, iou = run(labels)
  unmasked, _ = run(np.where(labels == A, PAD, labels))  # absent slots as extra pad tokens
  t_pe = tsam.prompt_encoder.get_dense_pe()
  for k in range(len(labels)):
    points, box = _torch_prompt(coords[k], labels[k])
    with torch.no_grad():
      sp, de = tsam.prompt_encoder(points=points, boxes=box, masks=None)
      tm, ti = tsam.mask_decoder(_t(emb).permute(0, 3, 1, 2), t_pe, sp, de, True)
    scale = float(np.abs(tm.numpy()).max())
    assert _maxabs(masks[0, k], tm.numpy()[0]) <= 1e-5 * scale, k
    assert _maxabs(iou[0, k], ti.numpy()[0]) <= 1e-5 * max(1.0, float(np.abs(ti.numpy()).max())), k
    if (labels[k] == A).any():
      assert _maxabs(unmasked[0, k], tm.numpy()[0]) > 1e-3 * scale, k


def test_sampled_prompts_hold_sams_own_sequences():
  """Every sampled slot, absent slots dropped, is the sequence build_sparse_prompt gives SAM."""
  from samclip_jax.data import prompts, records
  rng = np.random.default_rng(0)
  masks = np.zeros((3, 64, 64), bool)
  masks[0, 5:30, 5:40] = masks[1, 40:60, 10:20] = masks[2, 20:50, 30:60] = True
  rles = records.encode_masks(masks)
  seen = set()
  for _ in range(40):
    coords, labels, valid, _ = prompts.sample_prompts(rng, rles, (64, 64), (64, 64), 3, 4)
    for c, l in zip(coords[valid], labels[valid]):
      kept = l[l != S.ABSENT]
      is_box = kept[0] == S.BOX_TOP_LEFT
      pts = None if is_box else kept[kept >= S.NEGATIVE]
      _, want = S.build_sparse_prompt(None if is_box else c[:len(pts)], pts,
                                      c[:2].reshape(4) if is_box else None)
      np.testing.assert_array_equal(kept, want)
      seen.add(len(kept))
  assert seen >= {2, 3, 4}  # boxes, one and more points


def test_fused_decoder_attention_gradients_match_the_reference(ref):
  """Training through the fused two-way transformer (absent slots masked) gives the explicit
  path's gradients, for every decoder parameter and the image embedding."""
  _, params = ref
  rng = np.random.default_rng(6)
  A = S.ABSENT
  labels = np.array([[[2, 3, A], [1, 0, S.PAD]]], np.int32)
  coords = rng.uniform(0, TINY.image_size, (1, 2, 3, 2)).astype(np.float32)
  emb = jnp.asarray(rng.normal(size=(1, EH, EW, C)).astype(np.float32))

  def grads(attention):
    model = S.Sam(TINY, attention=attention)
    def loss(p, e):
      masks, iou = model.apply({"params": p}, e, coords, labels, None, True, method=S.Sam.predict_masks)
      return jnp.sum(jnp.tanh(masks) * jnp.cos(masks)) + jnp.sum(iou ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, emb)

  (p_ref, e_ref), (p_xla, e_xla) = grads("reference"), grads("xla")
  rel = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(a)).max(), 1e-12))
  assert rel(e_ref, e_xla) <= 1e-5
  flat_ref = jax.tree_util.tree_leaves_with_path(p_ref["mask_decoder"])
  flat_xla = jax.tree.leaves(p_xla["mask_decoder"])
  assert len(flat_ref) == len(flat_xla) > 20
  scale = max(float(np.abs(np.asarray(a)).max()) for _, a in flat_ref)
  for (path, a), b in zip(flat_ref, flat_xla):
    name = jax.tree_util.keystr(path)
    if name.endswith("['k_proj']['bias']"):
      # A key bias shifts each query's logits by a constant: its gradient is 0, both paths
      # give rounding noise only.
      assert max(np.abs(np.asarray(a)).max(), np.abs(np.asarray(b)).max()) <= 1e-5 * scale, name
    else:
      assert rel(a, b) <= 1e-5, name
