"""SamClip user API on tiny random models: loading (model dirs, training workdirs), zero-shot
classification, semantic segmentation (CLIP head, CLIP+SAM), the SAM head."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eval_models
from samclip_jax import api
from samclip_jax.clip_model import ClipModel
from samclip_jax.models import samclip as samclip_lib

NAMES = ["background", "circle", "rectangle", "triangle", "ellipse", "star"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  return eval_models.ensure_models(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def model(paths):
  return api.SamClip.from_checkpoint(paths["samclip"])


def _image(h=150, w=210, seed=0):
  rng = np.random.default_rng(seed)
  img = np.zeros((h, w, 3), np.uint8) + np.array([60, 120, 60], np.uint8)
  img[20:90, 30:120] = [220, 40, 40]
  return np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)


def _clip_features(model, x):
  """SamClipNet.clip_features (jitted: eager apply compiles op by op)."""
  fn = jax.jit(lambda p, x: samclip_lib.SamClipNet(model.config).apply(
      {"params": p}, x, method=samclip_lib.SamClipNet.clip_features))
  return fn(model.params, x)


def _reference_logits(model, image_uint8_batch, names, templates="photo"):
  """Independent path: SamClipNet.clip_features on SAM-normalised pixels vs ClipModel text."""
  x = (image_uint8_batch.astype(np.float32) - np.array(api.PIXEL_MEAN, np.float32)) / np.array(api.PIXEL_STD, np.float32)
  pooled, patch = _clip_features(model, x)
  text = model.text_model.encode_text([f"a photo of a {n}." for n in names], normalize=True)
  scale = float(np.exp(model.text_model.params["logit_scale"]))
  pooled = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
  patch = patch / np.linalg.norm(patch, axis=-1, keepdims=True)
  return scale * np.asarray(pooled) @ np.asarray(text).T, scale * np.einsum("bhwd,cd->bchw", patch, text)


def test_classify_matches_reference(model):
  img = _image()
  out = model.classify(img, NAMES, templates="photo", resolution=64)
  assert [n for n, _ in out] != [] and sorted(n for n, _ in out) == sorted(NAMES)
  probs = np.array([p for _, p in out])
  assert np.all(np.diff(probs) <= 0) and probs.sum() == pytest.approx(1.0, abs=1e-5)
  logits, _ = _reference_logits(model, api.resize_center_crop(img, 64)[None], NAMES)
  ref = np.asarray(jax.nn.softmax(logits[0]))
  got = dict(out)
  np.testing.assert_allclose([got[n] for n in NAMES], ref, atol=1e-5)


def test_segment_semantic_clip(model):
  img = _image()
  labels = model.segment_semantic(img, NAMES, mode="clip", templates="photo", resolution=64)
  assert labels.shape == img.shape[:2] and labels.dtype == np.int32
  assert labels.min() >= 0 and labels.max() < len(NAMES)
  _, patch_logits = _reference_logits(model, api.resize_square(img, 64)[None], NAMES)
  # Host bilinear upsampling = jax.image.resize's (half-pixel centres) when upsampling.
  up = jax.image.resize(jnp.asarray(patch_logits[0]), (len(NAMES),) + img.shape[:2], "bilinear")
  agree = (np.argmax(np.asarray(up), axis=0) == labels).mean()
  assert agree > 0.999


def test_resize_helpers_match_references():
  from samclip_jax.predictor import postprocess_masks
  rng = np.random.default_rng(0)
  low = rng.normal(size=(3, 32, 32)).astype(np.float32)
  for input_size, orig in [((128, 96), (150, 113)), ((80, 128), (60, 96))]:
    ref = np.asarray(postprocess_masks(jnp.asarray(low), 128, input_size, orig))
    np.testing.assert_allclose(api.upscale_low_res(low, 128, input_size, orig), ref, atol=1e-5)
  x = rng.normal(size=(2, 7, 9)).astype(np.float32)
  ref = jax.image.resize(jnp.asarray(x), (2, 30, 41), "bilinear")
  np.testing.assert_allclose(api.resize_bilinear(x, (30, 41)), np.asarray(ref), atol=1e-5)


def _clip_only_labels(model, img, names):
  """CLIP-head labels at the SAM input size, upscaled as SAM masks are (the fallback)."""
  size = model.config.sam.image_size
  x, input_size = api.sam_input(img, size)
  _, patch = _clip_features(model, x)
  patch = patch / np.linalg.norm(patch, axis=-1, keepdims=True)
  logits = np.einsum("hwd,cd->chw", np.asarray(patch[0]), np.asarray(model.text_classifier(names, "photo")))
  return api.upscale_low_res(logits, size, input_size, img.shape[:2]).argmax(axis=0)


def test_segment_clip_sam_composition(model, monkeypatch):
  img = _image()
  labels, details = model.segment_clip_sam(img, NAMES, templates="photo", threshold=0.0)
  assert labels.shape == img.shape[:2] and details["prompted"].all()
  pts, lab = details["points"], details["point_labels"]
  assert pts.shape == (len(NAMES), 3, 2) and (lab == 1).all()
  _, (nh, nw) = api.sam_input(img, model.config.sam.image_size)
  assert (pts[..., 0] < nw).all() and (pts[..., 1] < nh).all()   # prompts sit on the image, not the padding
  # Same seed, same prompts and labels; through the public entry point too.
  np.testing.assert_array_equal(model.segment_semantic(img, NAMES, mode="clip+sam", templates="photo",
                                                       threshold=0.0), labels)
  # Nothing above threshold: no class is prompted and every pixel takes the CLIP label.
  labels_none, d = model.segment_clip_sam(img, NAMES, templates="photo", threshold=1.0)
  assert not d["prompted"].any() and d["covered_fraction"] == 0.0
  np.testing.assert_array_equal(labels_none, _clip_only_labels(model, img, NAMES))

  # The composition rule with a stub SAM head: the largest positive logit wins per pixel.
  mh, mw = model.config.sam.mask_input_size
  def stub(values):
    def decode(params, emb, coords, labels, mask_input):
      assert coords.shape[:2] == (1, len(NAMES)) and mask_input.shape == (1, len(NAMES), mh, mw, 1)
      return jnp.broadcast_to(jnp.asarray(values, jnp.float32)[None, :, None, None, None], (1, len(NAMES), 1, mh, mw))
    return decode
  monkeypatch.setattr(model, "_decode", stub([-5, -5, 3, 5, -5, -5]))
  lab, d = model.segment_clip_sam(img, NAMES, templates="photo", threshold=0.0)
  assert (lab == 3).all() and d["covered_fraction"] == 1.0
  monkeypatch.setattr(model, "_decode", stub([-5] * len(NAMES)))   # nobody covers: CLIP fallback
  lab, _ = model.segment_clip_sam(img, NAMES, templates="photo", threshold=0.0)
  np.testing.assert_array_equal(lab, _clip_only_labels(model, img, NAMES))


def test_predictor_and_mask_generator(model):
  img = _image()
  p = model.predictor()
  p.set_image(img)
  masks, iou, low = p.predict(point_coords=np.array([[60.0, 50.0]]), point_labels=np.array([1]))
  assert masks.shape == (3,) + img.shape[:2] and iou.shape == (3,)
  records = model.mask_generator(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0).generate(img)
  assert records and set(records[0]) >= {"segmentation", "area", "bbox", "predicted_iou", "point_coords",
                                         "stability_score", "crop_box"}
  named = model.label_masks(img, [r["segmentation"] for r in records[:3]], NAMES, "photo")
  assert len(named) == min(3, len(records)) and all(n in NAMES and 0 < q <= 1 for n, q in named)


def test_mask_generator_defaults_suit_the_model(model):
  """A small model's generator takes predict --everything's defaults (a point every 8 px of its
  input, filters 0.8 / 0.8), not SAM's for 1024 px (32x32, 0.88 / 0.95: with them a 128-px
  model found under half the world's shapes); arguments still override them."""
  size = model.config.sam.image_size
  g = model.mask_generator()
  assert len(g.point_grids[0]) == (size // 8) ** 2 and (g.pred_iou_thresh, g.stability_score_thresh) == (0.8, 0.8)
  g = model.mask_generator(points_per_side=4, stability_score_thresh=0.5)
  assert len(g.point_grids[0]) == 16 and (g.pred_iou_thresh, g.stability_score_thresh) == (0.8, 0.5)
  g = model.mask_generator(point_grids=[np.array([[0.5, 0.5]])])
  assert len(g.point_grids[0]) == 1


def test_loading_errors(paths, tmp_path):
  with pytest.raises(api.CheckpointNotFound, match="not found"):
    api.SamClip.from_checkpoint(str(tmp_path / "nope"))
  with pytest.raises(api.CheckpointNotFound, match="neither a model directory"):
    api.SamClip.from_checkpoint(str(tmp_path))
  with pytest.raises(ValueError, match="'open_clip' model"):
    api.SamClip.from_checkpoint(paths["clip"])
  from samclip_jax.predictor import SamPredictor   # a model's config.json given for its directory
  with pytest.raises(NotADirectoryError, match="config.json is a file; give the model directory that holds it"):
    SamPredictor.from_checkpoint(os.path.join(paths["sam"], "config.json"))
  bare = api.SamClip.from_checkpoint(paths["samclip_no_text"])
  with pytest.raises(ValueError, match="no CLIP text encoder"):
    bare.classify(_image(), ["a", "b"])
  withtext = api.SamClip.from_checkpoint(paths["samclip_no_text"], text_model=paths["clip"])
  assert isinstance(withtext.text_model, ClipModel)
  wrong = samclip_lib.SamClipConfig(sam=withtext.config.sam, head_depth=1, head_mlp_hidden=(64, 64), out_dim=48)
  with pytest.raises(ValueError, match="embeds into 32 dims"):
    api.SamClip(wrong, withtext.params, withtext.text_model)


def test_text_model_named_in_config(paths, tmp_path):
  """train.py's export records the teacher as config.json "clip_checkpoint"."""
  d = tmp_path / "export"
  config, params = samclip_lib.load_samclip(paths["samclip_no_text"])
  samclip_lib.save_samclip(str(d), config, params, {"clip_checkpoint": paths["clip"], "step": 1})
  assert api.SamClip.from_checkpoint(str(d)).text_model is not None
  # A teacher that is gone (a copied export): the image side works; text calls say what to pass.
  samclip_lib.save_samclip(str(d), config, params, {"clip_checkpoint": str(tmp_path / "gone")})
  moved = api.SamClip.from_checkpoint(str(d))
  predictor = moved.predictor()
  predictor.set_image(_image())
  masks, _, _ = predictor.predict(box=np.array([10, 20, 90, 100]), multimask_output=False)
  assert masks.shape == (1, 150, 210)
  with pytest.raises(api.CheckpointNotFound, match=r"clip_checkpoint names .*gone.*--text-model DIR"):
    moved.classify(_image(), ["a", "b"])


def test_shipped_teacher_named_from_another_checkout(paths, tmp_path):
  """An export made in another checkout names the shipped CLIP there: this installation's
  copy of it serves instead."""
  from dataclasses import replace
  from configs.common import shipped_teacher
  from samclip_jax.models.clip import load_clip_config
  clip_dim = load_clip_config(shipped_teacher("clip")).embed_dim
  config, params = samclip_lib.load_samclip(paths["samclip_no_text"])
  config = replace(config, out_dim=clip_dim)
  params = eval_models.random_params(samclip_lib.abstract_params(config), 0)
  elsewhere = "/home/someone/old_checkout/samclip_jax/assets/teachers/clip"
  samclip_lib.save_samclip(str(tmp_path / "export"), config, params, {"clip_checkpoint": elsewhere})
  model = api.SamClip.from_checkpoint(str(tmp_path / "export"))
  assert model.text_model.config.embed_dim == clip_dim
  assert [n for n, _ in model.classify(_image(), ["star", "circle"])] in (["star", "circle"], ["circle", "star"])


def test_training_workdir(paths, tmp_path):
  """Latest Orbax step of a train.py workdir (state.params + state.frozen), or its export."""
  import optax
  import orbax.checkpoint as ocp
  from samclip_jax.loop import TrainState
  config, params = samclip_lib.load_samclip(paths["samclip"])
  params = jax.tree.map(lambda x: np.asarray(x) + 1.0, params)          # differs from the export
  trainable = {"clip_head": params["clip_head"]}
  frozen = {k: v for k, v in params.items() if k != "clip_head"}
  state = TrainState(step=jnp.array(7, jnp.int32), params=trainable, frozen=frozen,
                     opt_state=optax.adamw(1e-3).init(trainable), nonfinite=jnp.array(0, jnp.int32))
  work = tmp_path / "work"
  mngr = ocp.CheckpointManager(str(work / "checkpoints"), options=ocp.CheckpointManagerOptions(create=True))
  mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
  mngr.wait_until_finished()
  mngr.close()
  with pytest.raises(api.CheckpointNotFound, match="model_config.json"):
    api.SamClip.from_checkpoint(str(work))
  with open(work / "model_config.json", "w") as f:
    json.dump(config.to_dict(), f)
  m = api.SamClip.from_checkpoint(str(work), text_model=paths["clip"])
  assert m.config == config
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), m.params, params)
  # An export newer than the last checkpoint wins; an older one only lends its config + teacher.
  _, export_params = samclip_lib.load_samclip(paths["samclip"])
  samclip_lib.save_samclip(str(work / "export"), config, export_params,
                           {"step": 9, "clip_checkpoint": paths["clip"]})
  assert api.resolve_checkpoint(str(work))["model_dir"] == str(work / "export")
  samclip_lib.save_samclip(str(work / "export"), config, export_params,
                           {"step": 3, "clip_checkpoint": paths["clip"]})
  where = api.resolve_checkpoint(str(work))
  assert where["model_dir"] is None and where["workdir_step"] == 7
  m = api.SamClip.from_checkpoint(str(work))
  assert m.text_model is not None
  np.testing.assert_array_equal(np.asarray(m.params["clip_head"]["norm"]["scale"]),
                                params["clip_head"]["norm"]["scale"])


def test_non_finite_prompts_refused(model):
  p = model.predictor()
  p.set_image(_image())
  with pytest.raises(ValueError, match="point_coords holds non-finite"):
    p.predict(point_coords=np.array([[np.nan, 5.0]]), point_labels=np.array([1]))
  with pytest.raises(ValueError, match="box holds non-finite"):
    p.predict(box=np.array([0.0, 0.0, np.inf, 10.0]))
  with pytest.raises(ValueError, match="boxes holds non-finite"):
    p.predict_batch(boxes=np.array([[0.0, 0.0, 5.0, 5.0], [0.0, -np.inf, 5.0, 5.0]]))


def test_class_names_refused(model):
  img = _image()
  with pytest.raises(ValueError, match="got the string 'cat'"):
    model.classify(img, "cat", templates="photo", resolution=64)
  with pytest.raises(ValueError, match="got the string 'cat'"):
    model.segment_semantic(img, "cat", templates="photo", resolution=64)
  # The tokenizer lowercases: "Cat" is "cat" again, and would halve its probability.
  with pytest.raises(ValueError, match="repeat: 'cat' and 'Cat'"):
    model.classify(img, ["cat", "dog", "Cat"], templates="photo", resolution=64)
  with pytest.raises(ValueError, match="repeat"):
    model.text_model.zero_shot_classifier(["dog", "dog"], "photo")


def test_mask_crop_keeps_the_mask_alone_centred_on_a_square():
  img = _image()
  mask = np.zeros(img.shape[:2], bool)
  mask[20:50, 30:100] = True          # a 30 x 70 box ...
  mask[20:30, 30:40] = False          # ... with a notch
  crop = api.mask_crop(img, mask)
  assert crop.shape == (70, 70, 3) and crop.dtype == np.uint8
  fill = np.asarray(api.MEAN_PIXEL, np.uint8)
  assert (crop[:20] == fill).all() and (crop[50:] == fill).all()   # (70 - 30) // 2 rows above and below
  np.testing.assert_array_equal(crop[20:50][mask[20:50, 30:100]], img[20:50, 30:100][mask[20:50, 30:100]])
  assert (crop[20:30, 0:10] == fill).all()


def test_label_masks_crop_ignores_the_scene_around_the_mask(model):
  """A mask's name by crop depends on its own pixels only; by dense logits the scene weighs in."""
  img = _image()
  mask = np.zeros(img.shape[:2], bool)
  mask[40:90, 50:120] = True
  other = img.copy()
  other[~mask] = 255 - other[~mask]
  for mode in api.LABEL_MODES:
    a = model.label_masks(img, [mask], NAMES, "photo", mode=mode)[0]
    b = model.label_masks(other, [mask], NAMES, "photo", mode=mode)[0]
    if mode == "crop":
      assert a[0] == b[0] and a[1] == pytest.approx(b[1], abs=1e-6)
    else:
      assert abs(a[1] - b[1]) > 1e-4 or a[0] != b[0]
  with pytest.raises(ValueError, match="mode must be one of"):
    model.label_masks(img, [mask], NAMES, "photo", mode="pooled")


def test_label_masks_wrong_shape(model):
  img = _image()
  with pytest.raises(ValueError, match=r"mask 1 has shape \(10, 10\).*150x210"):
    model.label_masks(img, [np.ones(img.shape[:2], bool), np.ones((10, 10), bool)], NAMES, "photo")
  # One HxW mask, not in a list: said so (it read as "mask 0 has shape (210,)").
  with pytest.raises(ValueError, match="masks is one 150x210 array: give a list of masks"):
    model.label_masks(img, np.ones(img.shape[:2], bool), NAMES, "photo")


def test_clip_sam_and_text_arguments(model):
  """Names as any iterable, as segment_semantic's "clip" mode takes them; out-of-range counts and
  thresholds are refused by name (a negative count failed inside numpy, a bad NMS threshold
  silently kept one mask or all)."""
  img = _image()
  a = model.segment_semantic(img, (n for n in NAMES), mode="clip+sam", templates="photo")
  np.testing.assert_array_equal(a, model.segment_semantic(img, list(NAMES), mode="clip+sam", templates="photo"))
  with pytest.raises(ValueError, match="resolution is for mode='clip'"):
    model.segment_semantic(img, NAMES, mode="clip+sam", templates="photo", resolution=64)
  for kwargs, message in (({"points_per_class": -1}, "points_per_class must be an integer >= 0"),
                          ({"threshold": 1.5}, "threshold must be in \\[0, 1\\]")):
    with pytest.raises(ValueError, match=message):
      model.segment_clip_sam(img, NAMES, "photo", **kwargs)
  for bad in (-1.0, 1.5):
    with pytest.raises(ValueError, match="nms_thresh must be in \\[0, 1\\]"):
      model.segment_text(img, NAMES[0], nms_thresh=bad, templates="photo")


def test_raw_images_in_everywhere(model):
  """ClipModel takes raw images as SamClip does; the pixel-level calls are named as such."""
  from samclip_jax.templates import get_templates
  clip, img = model.text_model, _image()
  classifier = clip.zero_shot_classifier(NAMES, "photo")          # a template set name, as SamClip takes
  np.testing.assert_allclose(classifier, clip.zero_shot_classifier(NAMES, get_templates("photo")), atol=1e-6)
  _, probs = clip.classify_pixels(clip.preprocess(img), classifier)
  got = clip.classify(img, NAMES, "photo")
  assert [n for n, _ in got] == [NAMES[i] for i in np.argsort(-np.asarray(probs[0]), kind="stable")]
  np.testing.assert_allclose([p for _, p in got], np.sort(np.asarray(probs[0]))[::-1], atol=1e-6)
  np.testing.assert_allclose(clip.encode_image([img, img[:100]]),
                             clip.encode_pixels(clip.preprocess([img, img[:100]])), atol=1e-6)
  emb = model.encode_image([img, img[:, :120]], resolution=64)
  assert emb.shape == (2, model.config.out_dim)
  np.testing.assert_allclose(emb[1], model.encode_pixels(api.resize_center_crop(img[:, :120], 64)[None])[0],
                             atol=1e-6)


def test_inputs_that_gave_silent_wrong_answers(model):
  """Each of these once returned a plausible answer to the wrong question; now each is read
  right or refused by name."""
  from PIL import Image
  clip, img = model.text_model, _image()
  grey = img[..., 0]
  # A float or 16-bit PIL image is scaled from its range (not clipped to black / white).
  want = clip.preprocess(Image.fromarray(grey))
  np.testing.assert_allclose(clip.preprocess(Image.fromarray(grey.astype(np.float32) / 255, "F")), want, atol=1e-5)
  np.testing.assert_allclose(clip.preprocess(Image.fromarray(grey.astype(np.uint16) * 257)), want, atol=1e-5)
  # A palette PIL image gives the predictor the same masks as its RGB conversion.
  pal = Image.fromarray(img).convert("P")
  p = model.predictor()
  p.set_image(pal)
  a = p.predict(box=np.array([30, 20, 120, 90]))[1]
  p.set_image(np.asarray(pal.convert("RGB")))
  np.testing.assert_allclose(a, p.predict(box=np.array([30, 20, 120, 90]))[1], rtol=1e-6)
  # One image per classify; a string is not a list of texts; templates name where the class goes.
  for classify in (clip.classify, lambda i, n, t: model.classify(i, n, t, resolution=64)):
    with pytest.raises(ValueError, match="classify takes one image"):
      classify([img, img], NAMES, "photo")
    with pytest.raises(ValueError, match="classify takes one image"):
      classify(np.stack([img, img]), NAMES, "photo")
    for bad in (["a photo"], ["a {} and a {}"], ["a {name}"]):
      with pytest.raises(ValueError, match="must hold '{}' once"):
        classify(img, NAMES, bad)
  with pytest.raises(ValueError, match="got the string 'red'"):
    clip.encode_text("red")
  long = "very " * 100
  with pytest.raises(ValueError, match="same prompt after truncation"):
    clip.classify(img, [long + "red", long + "blue"], "photo")
  # A generator of names is read once and still names the answer.
  assert sorted(n for n, _ in model.classify(img, (n for n in NAMES), "photo", resolution=64)) == sorted(NAMES)
  # An empty point list is no prompt; an empty or non-binary mask has nothing to name.
  with pytest.raises(ValueError, match="at least one prompt"):
    p.predict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0))
  with pytest.raises(ValueError, match="empty prompt batch"):
    p.predict_batch(boxes=np.zeros((0, 4)))
  with pytest.raises(ValueError, match="mask 0 is empty"):
    model.label_masks(img, [np.zeros(img.shape[:2], bool)], NAMES, "photo")
  with pytest.raises(ValueError, match="mask 0 is not binary"):
    model.label_masks(img, [-np.ones(img.shape[:2])], NAMES, "photo")
  # Arrays go through the same checks in ClipModel as in SamClip.
  with pytest.raises(ValueError, match="expected an HxWx3 image"):
    clip.preprocess(np.zeros((img.shape[0], img.shape[1], 2), np.uint8))
  np.testing.assert_allclose(clip.preprocess(grey[..., None]), want, atol=1e-6)


def test_long_thin_images(model):
  """A strip whose short side would round to 0 pixels at SAM's input size still works."""
  strip = np.full((2, 900, 3), 200, np.uint8)
  p = model.predictor()
  p.set_image(strip)
  masks, _, _ = p.predict(box=np.array([0, 0, 100, 1]))
  assert masks.shape[1:] == strip.shape[:2]
  assert model.segment_semantic(strip, NAMES, mode="clip+sam", templates="photo").shape == strip.shape[:2]
