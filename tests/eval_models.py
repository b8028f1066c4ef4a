"""Tiny random-weight model directories for the evaluation / API / CLI tests (CPU-fast)."""
import fcntl
import os
import shutil

import jax
import numpy as np

from samclip_jax import checkpoint
from samclip_jax import tokenizer as tok
from samclip_jax.models import clip as clip_lib
from samclip_jax.models import samclip as samclip_lib
from samclip_jax.models.sam import abstract_params as sam_abstract_params

EMBED_DIM = 32

TINY_CLIP = {"embed_dim": EMBED_DIM,
             "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def random_params(abstract, seed: int):
  """Numpy random weights for an abstract param tree (shapes only: tracing, no compiling,
  which on a busy 2-core machine costs tens of seconds per model). Kernels unit-variance
  per fan-in, norm scales ~1, everything else small."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    shape = tuple(leaf.shape)
    if len(shape) >= 2:
      return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
    if name in ("scale", "weight") and len(shape) == 1:
      return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


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
  params = random_params(clip_lib.abstract_params(config), seed)
  params["logit_scale"] = np.asarray(np.log(1 / 0.07), np.float32)
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
  params = random_params(samclip_lib.abstract_params(config), seed)
  samclip_lib.save_samclip(directory, config, params)
  if clip_dir is not None:
    shutil.copytree(clip_dir, os.path.join(directory, "text_model"))
  return directory


def make_sam_dir(directory: str, seed: int = 3, image_size: int = 128) -> str:
  """A SAM model directory (model_type "sam"), random tiny weights."""
  config = tiny_samclip_config(image_size).sam
  params = random_params(sam_abstract_params(config), seed)
  checkpoint.save_model(directory, params, config.to_dict())
  return directory


def ensure_models(base) -> dict:
  """Builds (once per test process, under `base`) the tiny clip / samclip / sam directories."""
  base = os.path.join(str(base), "eval_models")
  paths = {k: os.path.join(base, k) for k in ("clip", "samclip", "samclip_no_text", "sam")}
  if not os.path.isfile(os.path.join(paths["sam"], checkpoint.CONFIG_FILE)):
    make_clip_dir(paths["clip"])
    make_samclip_dir(paths["samclip"], paths["clip"])
    make_samclip_dir(paths["samclip_no_text"])
    make_sam_dir(paths["sam"])
  return paths


def ensure_sample(base) -> dict:
  """The embedded sample (read-only for the tests), built once per test run: xdist workers
  share it under their common base directory, the first builds it while the other waits.
  (`base`: tmp_path_factory.getbasetemp(); each build costs about 8 CPU-s.)"""
  from samclip_jax.data.sample import ensure_sample as build
  root = os.path.dirname(str(base)) if os.environ.get("PYTEST_XDIST_WORKER") else str(base)
  with open(os.path.join(root, "sample.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    return build(os.path.join(root, "sample"))
