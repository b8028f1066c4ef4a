"""Zero-shot semantic segmentation: mIoU (mmseg's rule) of CLIP head alone or CLIP+SAM.

  python -m samclip_jax.evaluate --config=configs/eval/semantic_segmentation.py \
      --config.model=DIR --config.data.image_dir=VOC/JPEGImages --config.data.label_dir=VOC/Seg \
      --config.data.classes_file=voc_classes.txt --workdir=OUT
  ...semantic_segmentation.py:local    (embedded sample: background + 5 shapes)
  (:local: --config.model defaults to /tmp/samclip_local, the README main job's workdir)
"""
from configs.eval import common


def get_config(arg=None):
  c = common.base("semantic_segmentation", arg)
  c.mode = "clip"               # "clip" (CLIP head at 448, 28x28 patches) | "clip+sam" (1024)
  c.templates = "imagenet80"
  c.resolution = 448            # clip mode input side
  c.threshold = 0.5             # clip+sam: probability above which cells give point prompts
  c.points_per_class = 3        # clip+sam: points per class prompt (paper: 1-3)
  c.prompt_grid = 32            # clip+sam: CLIP logit grid of the mask prompt (paper: 32x32)
  c.batch_size = 16 if arg != "local" else 8
  c.data.image_dir = ""
  c.data.label_dir = ""         # label maps <image stem>.png, value = class index, 255 = ignore
  c.data.class_names = ()       # class index -> name (or classes_file, one name a line)
  c.data.classes_file = ""
  c.data.ignore_index = 255
  return c
