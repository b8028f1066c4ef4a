"""Offline CLIP-teacher embeddings over D_CLIP (samclip_jax.extract).

  python -m samclip_jax.extract --config=configs/extract.py --workdir=DIR \
      --config.data=/data/clip/train.json --config.clip_checkpoint=/ckpt/openclip_vitl14
  python -m samclip_jax.extract --config=configs/extract.py:local --workdir=DIR  # CPU, seconds

Training replays the stored views: configs/merge.py's data.teacher_embeddings=<output_dir>.
"""
import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = ""  # CLIP split (manifest .json / ArrayRecord glob); "" = the embedded sample's clip_train
  c.sample_dir = ""  # embedded sample location when data is ""; "" = WORKDIR/sample
  c.output_dir = ""  # "" = WORKDIR/teacher_embeddings
  c.clip_checkpoint = ""  # converted OpenCLIP dir (convert/open_clip.py); "" = random teacher below
  c.model = ml_collections.ConfigDict()
  c.model.clip_variant = "ViT-L-14"  # random teacher of this open_clip name; "tiny" = below
  c.model.tiny_clip_width = 64
  c.model.tiny_clip_layers = 2
  c.model.tiny_clip_patch = 32
  c.model.tiny_clip_embed_dim = 64
  c.seed = 0  # views of record k are drawn from rng(seed, k, view); random-teacher init
  c.views_per_image = 2  # stored views per image; view v is rendered at resolutions[v % len]
  c.resolutions = (224, 448)  # must cover the training config's clip_resolutions
  c.teacher_image_size = 224  # teacher input side (views resized on device); 0 = view's own size
  c.batch_size = 256  # views per forward pass, over all local devices (fixed shape: padded)
  c.shard_size = 10_000  # records per output shard: the unit of resumption
  c.embedding_dtype = "float16"  # "float16" | "bfloat16"
  c.compute_dtype = "bfloat16"  # teacher activations ("float32" on CPU)
  c.num_threads = 16  # image decode / render threads (PIL releases the GIL)
  c.prefetch_batches = 4  # decoded batches kept ahead of the device
  # Several processes (as training: --config.coordinator_address/num_processes/process_id):
  # shard i is extracted by process i % process_count.
  common.distributed_fields(c)
  if arg == "local":
    c.model.clip_variant = "tiny"
    c.views_per_image = 2
    c.batch_size = 16
    c.shard_size = 64
    c.compute_dtype = "float32"
    c.num_threads = 2
  elif arg:
    raise ValueError(f"unknown config arg {arg!r}; use '' or 'local'")
  return c
