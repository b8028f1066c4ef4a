"""Zero-shot image-text retrieval: Recall@1/5/10 in both directions.

  python -m samclip_jax.evaluate --config=configs/eval/retrieval.py --config.model=DIR \
      --config.data.image_dir=flickr30k/images --config.data.captions_file=test.json --workdir=OUT
  ...retrieval.py:local   (the embedded sample's CLIP val images and their captions)
  (:local: --config.model defaults to /tmp/samclip_local, the README main job's workdir)
"""
from configs.eval import common


def get_config(arg=None):
  c = common.base("retrieval", arg)
  c.resolution = 336           # samclip input side; teachers use their own
  c.data.image_dir = ""
  # JSON list of {"file_name", "caption": str} or {"file_name", "captions": [str, ...]}.
  c.data.captions_file = ""
  return c
