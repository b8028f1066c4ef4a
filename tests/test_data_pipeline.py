"""grain pipelines: batch shapes, prompts inside masks, box jitter, sharding, exact resume."""
import numpy as np
import orbax.checkpoint as ocp
import pytest

from samclip_jax.data import pipeline, prompts, records, sample, transforms

SMALL = dict(num_clip_train=20, num_clip_val=4, num_sam_train=12, num_sam_val=4)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  return sample.ensure_sample(str(tmp_path_factory.mktemp("p") / "sample"), **SMALL)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_clip_batches(paths):
  loader = pipeline.clip_loader(paths["clip_train"], batch_size=4, seed=7)
  batches = _take(iter(loader), 8)
  sizes = set()
  for b in batches:
    assert set(b) == {"image"}
    assert b["image"].dtype == np.uint8 and b["image"].shape[0] == 4
    r = b["image"].shape[1]
    assert b["image"].shape == (4, r, r, 3) and r in (224, 448)
    sizes.add(r)
  assert sizes == {224, 448}
  _assert_same(batches, _take(iter(pipeline.clip_loader(paths["clip_train"], batch_size=4, seed=7)), 8))
  other = next(iter(pipeline.clip_loader(paths["clip_train"], batch_size=4, seed=8)))
  assert not np.array_equal(other["image"], batches[0]["image"])


def test_clip_view_matches_record(paths):
  # One resolution, no shuffle: the batch is the rendered crop of the record at "index".
  loader = pipeline.clip_loader(paths["clip_val"], batch_size=2, seed=1, resolutions=(224,),
                                shuffle=False, num_epochs=1, return_index=True)
  recs = records.read_all(paths["clip_val"])
  b = next(iter(loader))
  np.testing.assert_array_equal(b["index"], [0, 1])
  img = transforms.decode_image(recs[0]["image"])
  # Record 0 draws from Philox(seed + 0), as grain's IndexSampler hands it out.
  rng = np.random.Generator(np.random.Philox(key=1))
  box, flip = transforms.sample_view(rng, *img.shape[:2])
  np.testing.assert_array_equal(b["image"][0],
                                transforms.render_view_encoded(recs[0]["image"], box, flip, 224))
  x0, y0, cw, ch = box
  assert 0.4 * img.size / 3 * 0.9 <= cw * ch <= img.shape[0] * img.shape[1]
  # Without a reduced-scale decode the view is the plain crop + resize of the decoded image.
  if min(cw, ch) < 2 * 224:
    np.testing.assert_array_equal(b["image"][0], transforms.render_view(img, box, flip, 224))


def test_sam_batches(paths):
  K, P = 6, 4
  loader = pipeline.sam_loader(paths["sam_train"], batch_size=3, masks_per_image=K,
                               points_per_prompt=P, seed=0, return_index=True)
  recs = records.read_all(paths["sam_train"])
  for b in _take(iter(loader), 4):
    assert b["image"].shape == (3, 1024, 1024, 3) and b["image"].dtype == np.uint8
    assert b["point_coords"].shape == (3, K, P, 2) and b["point_coords"].dtype == np.float32
    assert b["point_labels"].shape == (3, K, P) and b["point_labels"].dtype == np.int32
    assert b["prompt_valid"].shape == (3, K) and b["prompt_valid"].dtype == bool
    for i, idx in enumerate(b["index"]):
      rec = recs[idx]
      nh, nw = b["image_size"][i]
      assert max(nh, nw) == 1024
      assert (b["image"][i, nh:] == 0).all() and (b["image"][i, :, nw:] == 0).all()
      assert b["prompt_valid"][i].sum() == min(K, len(rec["masks"]))
      lab = b["point_labels"][i][~b["prompt_valid"][i]]
      assert (lab == -1).all()


def test_sam_batches_at_smaller_image_size(paths):
  # CPU configs render SAM inputs at 256: the whole frame (pixels, prompts, masks) is 256.
  K, P, S = 6, 3, 256
  loader = pipeline.sam_loader(paths["sam_train"], batch_size=3, masks_per_image=K, points_per_prompt=P,
                               seed=0, return_index=True, image_size=S, box_prob=0.5)
  recs = records.read_all(paths["sam_train"])
  n_points = n_boxes = 0
  for b in _take(iter(loader), 3):
    assert b["image"].shape == (3, S, S, 3) and b["image"].dtype == np.uint8
    assert b["point_coords"].shape == (3, K, P, 2) and b["point_labels"].shape == (3, K, P)
    for i, idx in enumerate(b["index"]):
      rec = recs[idx]
      nh, nw = b["image_size"][i]
      assert (nh, nw) == transforms.preprocess_shape(rec["height"], rec["width"], S)
      assert (b["image"][i, nh:] == 0).all() and (b["image"][i, :, nw:] == 0).all()
      assert b["image"][i, :nh, :nw].any()
      masks = [prompts.full_resized_mask(records.decode_mask(m), nh, nw) for m in rec["masks"]]
      for k in np.nonzero(b["prompt_valid"][i])[0]:
        xy, lab = b["point_coords"][i, k], b["point_labels"][i, k]
        used = xy[lab >= 0]
        assert (used >= 0).all() and (used[:, 0] <= nw - 1).all() and (used[:, 1] <= nh - 1).all()
        if lab[0] == 1:  # every positive point lies in one mask (the one it was drawn from)
          pos = xy[lab == 1].astype(int)
          assert any(m[pos[:, 1], pos[:, 0]].all() for m in masks)
          n_points += 1
        else:  # the (jittered) box overlaps some mask at this scale
          x0, y0, x1, y1 = np.concatenate([xy[0], xy[1]]).astype(int)
          assert lab[0] == 2 and lab[1] == 3 and x0 <= x1 and y0 <= y1
          assert any(m[y0:y1 + 1, x0:x1 + 1].any() for m in masks)
          n_boxes += 1
  assert n_points > 0 and n_boxes > 0


def test_prompts_inside_masks_and_box_jitter(paths):
  recs = records.read_all(paths["sam_train"])
  rng = np.random.default_rng(0)
  box_err, n_points, n_neg = [], 0, 0
  for rec in recs:
    h, w = rec["height"], rec["width"]
    nh, nw = transforms.preprocess_shape(h, w, 1024)
    full = [prompts.full_resized_mask(records.decode_mask(m), nh, nw) for m in rec["masks"]]
    for _ in range(4):
      coords, labels, valid, idx = prompts.sample_prompts(rng, rec["masks"], (h, w), (nh, nw), 8, 3)
      assert valid.sum() == min(8, len(rec["masks"]))
      assert len(set(idx[valid].tolist())) == valid.sum()  # distinct masks
      for k in np.nonzero(valid)[0]:
        m = full[idx[k]]
        lab = labels[k]
        assert lab[0] in (1, 2)
        if lab[0] == 1:
          xy = coords[k][lab == 1].astype(int)
          assert m[xy[:, 1], xy[:, 0]].all()
          n_points += len(xy)
          for x, y in coords[k][lab == 0].astype(int):
            assert not m[y, x] and 0 <= x < nw and 0 <= y < nh
            n_neg += 1
        else:
          assert list(lab) == [2, 3, -2]  # the third slot is absent (no token)
          ys, xs = np.nonzero(m)
          tight = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)
          box = np.concatenate([coords[k][0], coords[k][1]])
          side = np.array([xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] * 2, np.float32)
          err = box - tight
          clipped = (box == 0) | (box[[0, 1, 0, 1]] == [nw - 1, nh - 1, nw - 1, nh - 1])
          assert (np.abs(err) <= np.minimum(20, 6 * 0.1 * side) + 1e-3).all()
          assert box[0] <= box[2] and box[1] <= box[3]
          box_err.extend((err / side)[~clipped & (side * 0.1 < 20)].tolist())
  assert n_points > 20 and n_neg > 0
  # Jitter is noise of std 10% of the side: check the spread, loosely.
  assert len(box_err) > 20 and 0.05 < np.std(box_err) < 0.15


def test_sharding_partitions_data(paths):
  n = SMALL["num_clip_train"]
  seen = []
  for shard in range(2):
    loader = pipeline.clip_loader(paths["clip_train"], batch_size=1, seed=3, resolutions=(224,),
                                  shard_index=shard, shard_count=2, num_epochs=1,
                                  return_index=True)
    seen.append(sorted(int(b["index"][0]) for b in loader))
  assert len(seen[0]) == len(seen[1]) == n // 2
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(n))


def test_global_batches_do_not_depend_on_process_or_worker_count(paths):
  # Global batch n (its records, pixels and CLIP resolution) is a function of (seed, n): two
  # processes (one with grain workers, one without) assemble the single-process batches, and
  # the resolutions follow clip_resolution(seed, n) on every process alike.
  n, res = 6, (224, 448)

  def take(shard_index, shard_count, worker_count):
    loader = pipeline.clip_loader(paths["clip_train"], batch_size=4 // shard_count, seed=5,
                                  resolutions=res, shard_index=shard_index, shard_count=shard_count,
                                  worker_count=worker_count, return_index=True)
    return _take(iter(loader), n)

  one, halves = take(0, 1, 0), [take(0, 2, 0), take(1, 2, 2)]
  schedule = [pipeline.clip_resolution(5, i, res) for i in range(n)]
  assert set(schedule) == set(res)
  for batches in [one] + halves:
    assert [b["image"].shape[1] for b in batches] == schedule
  for i in range(n):
    for k in ("index", "image"):
      np.testing.assert_array_equal(np.concatenate([h[i][k] for h in halves]), one[i][k])


def test_epochs_and_repeat(paths):
  one = [int(i) for b in pipeline.clip_loader(paths["clip_val"], batch_size=1, seed=0,
                                               num_epochs=1, return_index=True) for i in b["index"]]
  assert sorted(one) == list(range(SMALL["num_clip_val"]))
  it = iter(pipeline.clip_loader(paths["clip_val"], batch_size=3, seed=0, resolutions=(224,)))
  assert len(_take(it, 5)) == 5  # num_epochs=None repeats forever


def test_state_roundtrip(paths):
  loader = pipeline.sam_loader(paths["sam_train"], batch_size=2, masks_per_image=4,
                               points_per_prompt=3, seed=5)
  it = iter(loader)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = iter(loader)
  fresh.set_state(state)
  _assert_same(_take(fresh, 3), expected)


def test_orbax_composite_roundtrip(paths, tmp_path):
  def make():
    return pipeline.clip_loader(paths["clip_train"], batch_size=3, seed=11)
  it = iter(make())
  _take(it, 2)
  state = {"step": np.array(2, np.int32), "w": np.arange(4.0)}
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mgr:
    mgr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        data=pipeline.save_args(it)))
    mgr.wait_until_finished()
  expected = _take(it, 4)
  fresh = iter(make())
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mgr:
    out = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), data=pipeline.restore_args(fresh)))
  np.testing.assert_array_equal(out["state"]["w"], state["w"])
  _assert_same(_take(fresh, 4), expected)


def test_multiprocess_workers_and_resume(paths):
  loader = pipeline.clip_loader(paths["clip_train"], batch_size=2, seed=2, worker_count=2)
  it = iter(loader)
  first = _take(it, 3)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = iter(loader)
  fresh.set_state(state)
  _assert_same(_take(fresh, 3), expected)
  assert all(b["image"].shape[0] == 2 for b in first)


def test_reduced_scale_jpeg_decode_is_close_to_full_decode():
  import io
  from PIL import Image
  scene = np.asarray(Image.fromarray(sample.draw_scene(0, 1)["image"]).resize((1600, 1200)))
  buf = io.BytesIO()
  Image.fromarray(scene).save(buf, format="JPEG", quality=95)
  box = (100, 50, 1200, 1000)
  fast = transforms.render_view_encoded(buf.getvalue(), box, True, 224)
  full = transforms.render_view(transforms.decode_image(buf.getvalue()), box, True, 224)
  assert fast.shape == full.shape == (224, 224, 3)
  assert np.abs(fast.astype(int) - full.astype(int)).mean() < 4


def test_sam_large_jpeg_reduced_decode(tmp_path):
  import io
  from PIL import Image
  h, w = 1500, 2250
  scene = np.asarray(Image.fromarray(sample.draw_scene(0, 2)["image"]).resize((w, h)))
  buf = io.BytesIO()
  Image.fromarray(scene).save(buf, format="JPEG", quality=95)
  mask = np.zeros((h, w), bool)
  mask[400:900, 1000:1700] = True
  rec = {"key": "big", "image": buf.getvalue(), "height": h, "width": w,
         "masks": records.encode_masks(mask[None])}
  path = str(tmp_path / "big.array_record")
  records.write_shard(path, [records.encode(rec)])
  loader = pipeline.sam_loader(path, batch_size=1, masks_per_image=2, points_per_prompt=3,
                               seed=0, box_prob=0.0)
  b = next(iter(loader))
  nh, nw = transforms.preprocess_shape(h, w, 1024)
  assert b["image_size"][0].tolist() == [nh, nw] == [683, 1024]
  full, _ = transforms.resize_longest_pad(transforms.decode_image(buf.getvalue()), 1024)
  assert np.abs(b["image"][0].astype(int) - full.astype(int)).mean() < 3
  m = prompts.full_resized_mask(mask, nh, nw)
  lab, xy = b["point_labels"][0, 0], b["point_coords"][0, 0].astype(int)
  assert b["prompt_valid"][0].tolist() == [True, False]
  assert m[xy[lab == 1, 1], xy[lab == 1, 0]].all()


def test_tfds_array_record_data_source(paths, tmp_path):
  """A TFDS dataset in the array_record file format feeds the loader (no TensorFlow)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  recs = records.read_all(paths["clip_val"])

  class SampleClip(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes
          "caption": tfds.features.Text(), "height": np.int32, "width": np.int32}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, r in enumerate(recs):
        yield i, {k: r[k] for k in ("image", "caption", "height", "width")}

  SampleClip(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  source = tfds.data_source("sample_clip", split="train", data_dir=str(tmp_path))
  loader = pipeline.clip_loader(source, batch_size=2, seed=0, resolutions=(224,), num_epochs=1,
                                return_index=True)
  batches = list(loader)
  assert len(batches) == len(recs) // 2
  assert all(b["image"].shape == (2, 224, 224, 3) for b in batches)
