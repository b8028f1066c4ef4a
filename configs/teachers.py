"""Pretraining the project's small real teachers on the embedded world (samclip_jax/data/world.py).

  python -m samclip_jax.main --config=configs/teachers.py:sam  --workdir=DIR   # SAM's objective
  python -m samclip_jax.main --config=configs/teachers.py:clip --workdir=DIR   # contrastive CLIP

`arg`: "sam" or "clip", optionally with ",tiny" (a few steps of a smaller model: tests).
DIR/export is a model directory like a converted checkpoint's (SAM: load_sam / SamPredictor;
CLIP: load_clip / ClipModel); the shipped ones (samclip_jax/assets/teachers/) were made by
exactly these commands (README: "The embedded world's teachers").
"""
import ml_collections

from configs import common

TEACHERS = ("sam", "clip")


def _sam(c):
  c.task = "sam_pretrain"
  c.total_steps = 1000
  c.learning_rate = 1e-3
  c.warmup_steps = 100
  c.sam_batch_size = 16  # world scenes per step
  c.masks_per_image = 8  # prompts (with their ground-truth masks) per scene
  c.points_per_prompt = 3  # a box uses two slots; point prompts have 1-3 points
  c.sam_image_size = 128  # SAM input side
  c.model = ml_collections.ConfigDict()
  c.model.patch_size = 8  # 16x16 image embedding at 128 px; 64x64 low-res mask logits
  c.model.embed_dim = 96
  c.model.depth = 4
  c.model.num_heads = 3
  c.model.window_size = 8
  c.model.global_attn_indexes = (1, 3)
  c.model.prompt_embed_dim = 64  # neck, prompt encoder and mask decoder width
  c.model.decoder_num_heads = 4
  c.model.decoder_mlp_dim = 256
  c.data.sam_train = "world:train:1000000"  # drawn on the fly: world:SPLIT:N[:MIN_SIDE[:MAX_SIDE]]
  c.data.sam_val = "world:val:256"


def _clip(c):
  c.task = "clip_pretrain"
  c.total_steps = 1500
  c.learning_rate = 1.5e-3
  c.warmup_steps = 100
  c.clip_batch_size = 32  # contrastive batch (its other captions are the negatives)
  c.clip_image_size = 96
  c.zero_shot_templates = "imagenet80"  # held-out top-1 prompts (samclip_jax/templates.py)
  # Training captions: a weighted draw of (canonical, largest with colour, largest, all shapes)
  # (colour-free ones most: colour alone is a shortcut), wrapped in a random one of these
  # templates ("" keeps "a photo of a ..."): zero-shot prompts are then familiar sentences.
  c.caption_weights = (0.15, 0.15, 0.35, 0.35)
  c.caption_templates = "imagenet80"
  # Per image, this many copies of its caption with one shape name swapped join the
  # image->text softmax (NegCLIP): colour alone can no longer solve the batch.
  c.hard_negatives = 0
  c.zero_unused_tokens = True  # export: zero token rows the world never uses (a small file)
  c.model = ml_collections.ConfigDict()
  c.model.resnet_layers = ()  # () = ViT; 4 block counts = open_clip's ModifiedResNet (',resnet')
  # ResNet init: each block's last BatchNorm scale at 1, not open_clip's 0 (README: the shape probe)
  c.model.open_residuals = False
  c.model.mean_pool_init = False  # ResNet init: the attention pool starts as a mean (query weights 0)
  c.precise_bn_batches = 32  # ResNet: training batches whose statistics become BatchNorm's
  c.model.patch_size = 8  # 12x12 tokens: shapes span several patches (16 px patches saw only colours)
  c.model.width = 128
  c.model.layers = 4
  c.model.head_width = 32
  c.model.embed_dim = 128
  c.model.text_width = 64
  c.model.text_layers = 3
  c.model.context_length = 32  # captions are short; open_clip's 77 also works
  c.data.clip_train = "world:train:1000000:96"
  c.data.clip_val = "world:val:512:96"


def _tiny(c):
  c.total_steps = 30
  c.log_every_steps = 10
  c.eval_every_steps = 30
  c.checkpoint_every_steps = 15
  c.eval_batches = 2
  c.warmup_steps = 5
  if c.task == "sam_pretrain":
    c.sam_image_size = 64
    c.sam_batch_size = 8
    c.masks_per_image = 4
    c.model.embed_dim = 32
    c.model.depth = 2
    c.model.num_heads = 1
    c.model.global_attn_indexes = (1,)
    c.model.prompt_embed_dim = 32
    c.model.decoder_num_heads = 2
    c.model.decoder_mlp_dim = 64
    c.data.sam_train = "world:train:100000:64"
    c.data.sam_val = "world:val:16:64"
  else:
    c.clip_batch_size = 16
    c.clip_image_size = 64
    c.precise_bn_batches = 2
    c.model.width = 8 if c.model.resnet_layers else 32
    c.model.layers = 1
    c.model.embed_dim = 32
    c.model.text_width = 32
    c.model.text_layers = 1
    c.data.clip_train = "world:train:100000:64"
    c.data.clip_val = "world:val:32:64"


def _resnet(c):
  """CLIP with open_clip's ModifiedResNet image tower: convolutions at full resolution learn the
  world's shapes where patchifying towers (ViT, ConvNeXt) stay at chance (README)."""
  if c.task != "clip_pretrain":
    raise ValueError("',resnet' applies to the CLIP teacher only")
  c.model.resnet_layers = (1, 1, 1, 1)
  c.model.width = 16  # stem 8 channels; 512-wide final features; attention pool of 16 heads
  c.optim.frozen = [".*running_(mean|var)"]  # set by precise BN at export, never trained


def get_config(arg: str = "sam") -> ml_collections.ConfigDict:
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  teachers = [p for p in parts if p in TEACHERS]
  unknown = set(parts) - set(TEACHERS) - {"tiny", "resnet"}
  if unknown or len(teachers) != 1:
    raise ValueError(f"configs/teachers.py takes one of {TEACHERS} (and optionally ',tiny', "
                     f"',resnet' for CLIP), got {arg!r}")
  c = ml_collections.ConfigDict()
  common.loop_fields(c)
  c.log_every_steps = 50
  c.eval_every_steps = 250
  c.eval_batches = 4
  c.checkpoint_every_steps = 250
  c.prng_impl = "unsafe_rbg"  # CPU: init compiles faster
  # A model dir of this teacher and size (e.g. an earlier run's export) to start from instead of
  # random weights; optimizer and schedule start fresh (a run whose checkpoints cannot resume).
  c.init_from = ""
  c.data = ml_collections.ConfigDict()
  c.data.worker_count = 1  # one process draws the world while the step runs; raise on big hosts
  (_sam if teachers[0] == "sam" else _clip)(c)
  if "resnet" in parts:
    _resnet(c)
  if "tiny" in parts:
    _tiny(c)
  c.lock()
  return c
