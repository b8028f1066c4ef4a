"""Merging CLIP into SAM (SAM-CLIP, arXiv 2310.15308): the paper's recipe as configs.

  python -m samclip_jax.main --config=configs/merge.py --workdir=DIR          # stage 2
  python -m samclip_jax.main --config=configs/merge.py:probe --workdir=DIR    # stage 1
  python -m samclip_jax.main --config=configs/merge.py:resolution --workdir=DIR  # stage 3
  python -m samclip_jax.main --config=configs/merge.py:local --workdir=DIR    # CPU, minutes

`arg` is a comma-separated list: one stage ("" / "distill" = stage 2, "probe" = stage 1,
"resolution" = stage 3) and optionally "local" (the shipped world teachers, the embedded
sample, one CPU) or "tiny" (tiny random teachers: tests, CI smoke runs). Stages chain through `init_from`:
stage 2 starts from stage 1's export, stage 3 from stage 2's. Steps are derived from the
paper's epochs over Merged-41M where it says so.
"""
import ml_collections

from configs import common

# Paper: D_CLIP has 40.6M images; D_SAM is 5.7% of SA-1B (~11M images x ~100 masks).
CLIP_IMAGES = 40_600_000
PAPER_CLIP_BATCH = 2048

STAGES = ("distill", "probe", "resolution")


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "merge"  # the training task (samclip_jax/train.py TASKS)
  c.stage = "distill"  # which stage this is ("probe" | "distill" | "resolution"); informative
  common.loop_fields(c)
  c.total_steps = 16 * CLIP_IMAGES // PAPER_CLIP_BATCH  # optimizer updates (stage 2: 16 epochs)
  c.eval_every_steps = 5000  # validation (cosine to CLIP teacher, mask IoU to SAM teacher), and
  #                            at the last step; 0 disables validation
  c.learning_rate = 4e-5  # peak LR (stage 2: 4e-5)
  c.warmup_steps = 2000  # linear warmup (paper silent; our choice), then cosine to end_lr_factor
  c.optim.groups = [("clip_head/.*", 1.0), ("image_encoder/.*|mask_decoder/.*", 0.1)]
  c.optim.frozen = ["prompt_encoder/.*"]  # no gradient, no optimizer state
  # AdamW's decay pulls weights toward 0, not toward SAM: only the new CLIP head decays.
  c.optim.no_decay = [".*pos_embed", ".*rel_pos_.*", "image_encoder/.*", "mask_decoder/.*"]
  c.lambda_sam = 10.0  # L = L_CLIP + lambda_sam * L_SAM (paper: 10)
  c.compute_dtype = "bfloat16"  # activations / matmuls; parameters and optimizer stay float32

  # ---- batches (global, over all processes)
  c.clip_batch_size = PAPER_CLIP_BATCH  # CLIP-set images per step (L_CLIP); 0 disables
  c.sam_batch_size = 32  # SA-1B images per step (L_SAM); 0 disables
  c.masks_per_image = 32  # prompts sampled per SAM image
  c.points_per_prompt = 3  # points per prompt slot (a box uses two of them)
  c.clip_resolutions = (224, 448)  # student's CLIP-batch resolutions, one per batch
  c.clip_teacher_image_size = 224  # teacher sees the view resized to this (0: same as student)
  c.sam_image_size = 1024  # SAM input side (student and teacher); pipeline frame is rescaled
  c.inference_resolution = 0  # CLIP-head input size the exported model's API uses; 0: the paper's (336/448)
  c.sam_outputs = "all"  # distilled mask outputs: "all" (single + 3 multimask), "single", "multimask"
  c.sam_iou_weight = 1.0  # weight of the IoU-head MSE to the teacher's IoU predictions in L_SAM
  c.sam_soft_targets = False  # targets: binarised teacher masks (False, as the paper) or sigmoid(logits)

  # ---- loss and optimizer
  c.lambda_sam = 10.0  # L = L_CLIP + lambda_sam * L_SAM (paper: 10)
  # ---- models
  c.sam_checkpoint = ""  # converted SAM dir (convert/sam.py): teacher + student init; "" = random (model.sam_variant)
  c.clip_checkpoint = ""  # converted OpenCLIP dir (convert/open_clip.py); "" = random (model.clip_variant)
  c.init_from = ""  # a samclip model dir (earlier stage's export) to start the student from
  c.model = ml_collections.ConfigDict()
  c.model.head_depth = 3  # CLIP-head blocks, each initialised from the backbone's last block
  c.model.head_mlp_hidden = ()  # hidden widths of the head MLP; () = two of 2 x embed_dim
  # Random teachers when no checkpoint is given (tests, ':local'): SAM encoder and CLIP sizes.
  c.model.sam_variant = "vit_b"  # random SAM of this size; "tiny" = the CPU-sized one below
  c.model.tiny_embed_dim = 64  # tiny SAM encoder width
  c.model.tiny_depth = 2  # tiny SAM encoder blocks (the last one global, as in vit_b)
  c.model.tiny_num_heads = 2  # tiny SAM encoder heads
  c.model.tiny_window_size = 4  # tiny SAM window attention size (tokens)
  c.model.tiny_prompt_embed_dim = 32  # tiny SAM neck / prompt / mask-decoder width
  c.model.clip_variant = "ViT-L-14"  # random CLIP of this open_clip name; "tiny" = below
  c.model.tiny_clip_width = 64  # tiny CLIP image tower width
  c.model.tiny_clip_layers = 2  # tiny CLIP image tower blocks
  c.model.tiny_clip_patch = 32  # tiny CLIP patch size
  c.model.tiny_clip_embed_dim = 64  # tiny CLIP embedding dim (= the student's out_dim)

  # ---- data
  c.data = ml_collections.ConfigDict()
  c.data.sample_dir = ""  # embedded sample location when the split paths below are empty; "" = WORKDIR/sample
  c.data.clip_train = ""  # split manifest / ArrayRecord glob of D_CLIP train ("" = embedded sample)
  c.data.clip_val = ""  # held-out CLIP images (validation: cosine to the teacher)
  c.data.sam_train = ""  # D_SAM train (images + masks to sample prompts from)
  c.data.sam_val = ""  # held-out SAM images (validation: mask IoU to the teacher)
  c.data.teacher_embeddings = ""  # offline teacher embeddings (samclip_jax.extract) for clip_train
  c.data.worker_count = 8  # grain worker processes per loader and process (0 = in-process)
  return c


def _apply_stage(c, stage):
  c.stage = stage
  if stage == "probe":  # stage 1: CLIP head only, CLIP data only, AdamW 8e-4, 20 epochs
    c.total_steps = 20 * CLIP_IMAGES // PAPER_CLIP_BATCH
    c.learning_rate = 8e-4
    c.sam_batch_size = 0
    c.lambda_sam = 0.0
    c.optim.groups = [("clip_head/.*", 1.0)]
    c.optim.frozen = ["image_encoder/.*", "prompt_encoder/.*", "mask_decoder/.*"]
  elif stage == "resolution":  # stage 3: CLIP head only at 224/448/1024, 3 epochs, as stage 1
    c.total_steps = 3 * CLIP_IMAGES // PAPER_CLIP_BATCH
    c.learning_rate = 8e-4
    c.sam_batch_size = 0
    c.lambda_sam = 0.0
    c.clip_resolutions = (224, 448, 1024)
    c.optim.groups = [("clip_head/.*", 1.0)]
    c.optim.frozen = ["image_encoder/.*", "prompt_encoder/.*", "mask_decoder/.*"]
  elif stage != "distill":
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


def _apply_local(c):
  """The shipped world teachers, the embedded sample, one CPU device: the whole merge in minutes."""
  c.sam_checkpoint = common.shipped_teacher("sam")  # pretrained on the world (configs/teachers.py)
  c.clip_checkpoint = common.shipped_teacher("clip")
  c.total_steps = 140
  c.log_every_steps = 35
  c.eval_every_steps = 70
  c.eval_batches = 2
  c.checkpoint_every_steps = 70
  c.compute_dtype = "float32"  # CPUs have no fast bf16
  c.prng_impl = "unsafe_rbg"  # init compiles ~3x faster on CPU
  c.data.worker_count = 0  # two cores: decoding in-process is cheaper than worker processes
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
  c.clip_batch_size = 16
  c.masks_per_image = 4
  # The world's teachers work at 128 px (SAM: patch 8, a 16x16 embedding); stage 3 adds 256.
  c.clip_resolutions = (128, 256) if c.stage == "resolution" else (128,)
  c.clip_teacher_image_size = 96  # the world CLIP's native size (configs/teachers.py)
  c.sam_image_size = 128
  c.inference_resolution = 128
  # The CLIP head starts from scratch and has 140-150 steps: 2e-3 (1e-3 before) raised the
  # local main job's held-out colour top-1 from 0.45 to 0.56 at the same box mIoU (README).
  c.learning_rate = 2e-3
  c.warmup_steps = 20
  if c.stage == "distill":
    c.sam_batch_size = 4
    # The main job's head starts from scratch beside a moving backbone: a long warmup keeps its
    # first, random gradients from wrecking the backbone's colours (README: 20 steps gave colour
    # top-1 0.28 with the 6500-step SAM, 100 gave 0.50).
    c.warmup_steps = 100
  c.model.sam_variant = "tiny"
  c.model.clip_variant = "tiny"


def _apply_tiny(c):
  """Random teachers smaller still (64 px, 2 blocks of width 32): tests and CI smoke runs."""
  c.sam_checkpoint = c.clip_checkpoint = ""
  c.inference_resolution = 64
  c.total_steps = 8
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.eval_batches = 1
  c.checkpoint_every_steps = 4
  c.clip_batch_size = 8
  c.sam_batch_size = 2 if c.stage == "distill" else 0
  c.masks_per_image = 2
  c.clip_resolutions = (64,)
  c.clip_teacher_image_size = 64
  c.sam_image_size = 64
  c.learning_rate = 2e-3
  c.warmup_steps = 1
  c.model.tiny_embed_dim = 32
  c.model.tiny_window_size = 2
  c.model.tiny_prompt_embed_dim = 16
  c.model.tiny_clip_width = 32
  c.model.tiny_clip_layers = 1
  c.model.tiny_clip_embed_dim = 16


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  unknown = set(parts) - set(STAGES) - {"local", "tiny"}
  if unknown:
    raise ValueError(f"unknown config arg(s) {sorted(unknown)}; use a stage {STAGES} and/or "
                     "'local' (or 'tiny': local, smaller still, for tests)")
  stages = [p for p in parts if p in STAGES]
  if len(stages) > 1:
    raise ValueError(f"pick one stage, got {stages}")
  c = _base()
  _apply_stage(c, stages[0] if stages else "distill")
  if "local" in parts or "tiny" in parts:
    _apply_local(c)
  if "tiny" in parts:
    _apply_tiny(c)
  c.lock()  # unknown keys (typos in --config.x=...) fail loudly
  return c
