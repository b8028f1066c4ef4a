"""Overlay pictures: colours that mean what the legend says."""
import numpy as np

from samclip_jax import visualize


def test_colour_names_are_drawn_in_their_colour():
  """A class named after a colour is drawn and listed in that colour (a legend once called a
  green swatch "purple"); other names keep the palette's distinct colours."""
  names = ["cat", "Red", "purple ", "dog", "green star"]
  colours = visualize.class_colours(names)
  assert colours[1] == (255, 0, 0) and colours[2] == (128, 0, 128)
  palette = visualize.palette(len(names))
  assert [colours[i] for i in (0, 3, 4)] == [palette[i] for i in (0, 3, 4)]

  image = np.full((40, 60, 3), 255, np.uint8)
  labels = np.zeros((40, 60), np.uint8)
  labels[10:30, 10:30] = 1
  pic = np.asarray(visualize.overlay_semantic(image, labels, ["background", "blue"], alpha=0.5, skip=(0,)))
  assert tuple(pic[20, 20]) == (127, 127, 255)     # white half-blended with blue
  assert tuple(pic[5, 5]) == (255, 255, 255)       # background skipped
  panel = pic[:, 60:]                              # the legend: one swatch, blue
  assert (np.all(panel == (0, 0, 255), axis=-1)).sum() > 20
  masks = [labels == 1, labels == 0]
  pic = np.asarray(visualize.overlay_masks(image, masks, names=["red", "cat"], alpha=0.5))
  assert tuple(pic[20, 20]) == (255, 127, 127)
  cat = visualize.palette(2)[1]                    # the second name's palette colour
  assert tuple(pic[35, 50]) == tuple(np.uint8((255 + np.array(cat, np.float32)) / 2))
