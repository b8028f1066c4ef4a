"""Tiny random-weight model directories for the evaluation / API / CLI tests (CPU-fast)."""
import os
import shutil

import flax.linen as nn
import jax

from samclip_jax import checkpoint
from samclip_jax import tokenizer as tok
from samclip_jax.models import clip as clip_lib
from samclip_jax.models import samclip as samclip_lib
from samclip_jax.models.sam import Sam, example_inputs

EMBED_DIM = 32

TINY_CLIP = {"embed_dim": EMBED_DIM,
             "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def tokenizer_files(directory: str) -> tuple[str, str]:
  """vocab.json + merges.txt from open_clip's bundled BPE (written once per directory)."""
  from convert.open_clip import default_bpe_path
  vocab, merges = os.path.join(directory, tok.VOCAB_FILE), os.path.join(directory, tok.MERGES_FILE)
  if not os.path.isfile(merges):
    os.makedirs(directory, exist_ok=True)
    tok.write_vocab_files(tok.vocab_from_bpe(default_bpe_path()), vocab, merges)
  return vocab, merges


def make_clip_dir(directory: str, seed: int = 1) -> str:
  """An open_clip model directory (model_type "open_clip") holding a random tiny CLIP."""
  config = clip_lib.ClipConfig.from_open_clip_config(TINY_CLIP)
  params = nn.unbox(clip_lib.init_variables(config, jax.random.key(seed))["params"])
  vocab, merges = tokenizer_files(os.path.join(os.path.dirname(os.path.abspath(directory)), "bpe"))
  meta = {"model_type": clip_lib.MODEL_TYPE, "open_clip_model": "tiny-test", "config": config.to_dict(),
          "tokenizer": {"vocab": tok.VOCAB_FILE, "merges": tok.MERGES_FILE, "context_length": 77,
                        "source": "open_clip bpe_simple_vocab_16e6.txt.gz"}}
  checkpoint.save_model(directory, params, meta, extra_files={tok.VOCAB_FILE: vocab, tok.MERGES_FILE: merges})
  return directory


def tiny_samclip_config(image_size: int = 128) -> samclip_lib.SamClipConfig:
  sam = samclip_lib.tiny_sam_config(image_size=image_size, embed_dim=64, depth=2, num_heads=2,
                                    window_size=4, prompt_embed_dim=32)
  return samclip_lib.SamClipConfig(sam=sam, head_depth=1, head_mlp_hidden=(64, 64), out_dim=EMBED_DIM)


def make_samclip_dir(directory: str, clip_dir: str | None = None, seed: int = 2, image_size: int = 128) -> str:
  """A merged model directory (model_type "samclip"), random; clip_dir copied as text_model/."""
  config = tiny_samclip_config(image_size)
  params = samclip_lib.init_params(config, jax.random.key(seed))
  samclip_lib.save_samclip(directory, config, params)
  if clip_dir is not None:
    shutil.copytree(clip_dir, os.path.join(directory, "text_model"))
  return directory


def make_sam_dir(directory: str, seed: int = 3, image_size: int = 128) -> str:
  """A SAM model directory (model_type "sam"), random tiny weights."""
  config = tiny_samclip_config(image_size).sam
  params = nn.unbox(Sam(config).init(jax.random.key(seed), *example_inputs(config))["params"])
  checkpoint.save_model(directory, params, config.to_dict())
  return directory
