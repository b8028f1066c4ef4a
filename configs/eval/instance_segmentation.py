"""Box-prompted instance segmentation: COCO mask AP (pycocotools) of the SAM head.

  python -m samclip_jax.evaluate --config=configs/eval/instance_segmentation.py \
      --config.model=DIR --config.data.image_dir=coco/val2017 \
      --config.data.annotations=coco/annotations/instances_val2017.json \
      --config.data.detections=vitdet_b_boxes.json --workdir=OUT
  ...instance_segmentation.py:local   (the embedded sample's COCO export, ground-truth boxes)
  (:local: --config.model defaults to /tmp/samclip_local, the README main job's workdir)
"""
from configs.eval import common


def get_config(arg=None):
  c = common.base("instance_segmentation", arg)
  c.batch_size = 8 if arg != "local" else 4   # 1024-px images per step
  c.data.image_dir = ""
  c.data.annotations = ""       # COCO-format ground truth (instances json)
  # COCO results json with "bbox" (XYWH), "score", "category_id", "image_id" (the paper used
  # ViTDet-B boxes); "" prompts with the ground-truth boxes.
  c.data.detections = ""
  c.data.min_score = 0.0        # detections below this score are dropped
  c.data.max_detections = 100   # per image, best scores first (COCO's maxDets)
  # Mask score: with detections, the detector's score; with ground-truth boxes, SAM's
  # predicted IoU (so AP measures how well SAM ranks its own masks).
  return c
