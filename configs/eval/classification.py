"""Zero-shot classification: class names x prompt templates, top-1 / top-5 accuracy.

  python -m samclip_jax.evaluate --config=configs/eval/classification.py \
      --config.model=DIR --config.data.image_dir=imagenet/val --workdir=OUT
  ...classification.py:local   (the embedded sample's CLIP val images, 5 shape classes)
  (:local: --config.model defaults to /tmp/samclip_local, the README main job's workdir)
"""
from configs.eval import common


def get_config(arg=None):
  c = common.base("classification", arg)
  c.templates = "imagenet80"   # samclip_jax.templates set name (OpenAI's 80 prompts)
  c.resolution = 336           # samclip input side (paper: ImageNet at 336); teachers use their own
  # Either an image folder with one sub-folder per class (names from the folders, "_" -> " "),
  # or image_dir + labels_file: JSON list of {"file_name", "label" (index into class_names)}.
  c.data.image_dir = ""
  c.data.labels_file = ""
  c.data.class_names = ()      # overrides the folder names; needed with labels_file
  return c
