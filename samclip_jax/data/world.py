"""The embedded world as an endless, deterministic data source for pretraining and studies.

Scene i of split s is drawn on demand from (seed, s, i) by sample.draw_scene: nothing is
stored, every split is disjoint from the others, and any process draws the same scene for
the same index. Records are dicts (as TFDS sources give) with everything both loaders read
(records.py keys): the image as a uint8 array (nothing to encode or decode), a caption and the
largest shape's label (CLIP), the instance masks (RLE) and classes (SAM).
"""
import grain

from samclip_jax.data import records, sample

SPLITS = {"train": 1, "val": 2, "test": 3}
MIN_SIDE = 64   # smaller scenes often hold no shape at all (at 8-16 px none does)


class WorldSource(grain.sources.RandomAccessDataSource):
  """`num_records` scenes of a split, drawn at sides in [min_side, max_side]."""

  def __init__(self, split: str, num_records: int, seed: int = 0, min_side: int = 128,
               max_side: int = 128):
    if split not in SPLITS:
      raise ValueError(f"world split must be one of {sorted(SPLITS)}, got {split!r}")
    if num_records <= 0 or not MIN_SIDE <= min_side <= max_side:
      raise ValueError(f"bad world source: num_records={num_records}, sides {min_side}..{max_side} (the "
                       f"number must be positive, sides at least {MIN_SIDE} and min <= max)")
    self.split, self.num_records, self.seed = split, int(num_records), int(seed)
    self.min_side, self.max_side = int(min_side), int(max_side)

  def __len__(self):
    return self.num_records

  def scene(self, index: int) -> dict:
    """The scene behind record `index` (image, masks, classes, colours, semantic)."""
    if not 0 <= index < self.num_records:
      raise IndexError(index)
    return sample.draw_scene(self.seed * 4 + SPLITS[self.split], int(index), self.min_side, self.max_side)

  def __getitem__(self, index):
    scene = self.scene(int(index))
    h, w = scene["image"].shape[:2]
    return {"key": f"world_{self.split}_{int(index):07d}", "image": scene["image"],
            "height": h, "width": w, "caption": sample.caption(scene), "label": sample.label(scene),
            "captions": sample.caption_variants(scene),
            "masks": records.encode_masks(scene["masks"]), "classes": list(scene["classes"])}

  def __repr__(self):  # grain checks it on restore: no paths, so a moved workdir resumes
    return (f"WorldSource(split={self.split!r}, num_records={self.num_records}, seed={self.seed}, "
            f"sides={self.min_side}..{self.max_side})")


def source(spec: str, default_seed: int = 0):
  """'world:SPLIT:N[:MIN_SIDE[:MAX_SIDE]]' -> WorldSource; configs name world splits this way."""
  parts = spec.split(":")
  if parts[0] != "world" or len(parts) < 3:
    raise ValueError(f"not a world spec {spec!r}; expected 'world:SPLIT:N[:MIN_SIDE[:MAX_SIDE]]'")
  if len(parts) > 5 or not all(p.isdigit() for p in parts[2:]):
    raise ValueError(f"bad world spec {spec!r}: expected 'world:SPLIT:N[:MIN_SIDE[:MAX_SIDE]]' with "
                     "whole numbers N and sides")
  sides = [int(p) for p in parts[3:5]]
  lo = sides[0] if sides else 128
  hi = sides[1] if len(sides) > 1 else lo
  try:
    return WorldSource(parts[1], int(parts[2]), default_seed, lo, hi)
  except ValueError as e:
    raise ValueError(f"world spec {spec!r}: {e}") from None


def is_world(spec) -> bool:
  return isinstance(spec, str) and spec.startswith("world:")
