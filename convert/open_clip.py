"""Converts an OpenCLIP checkpoint (ViT or ModifiedResNet image tower) to a samclip_jax model directory.

  python -m convert.open_clip --model ViT-L-14 --checkpoint open_clip_pytorch_model.bin --output DIR [--overwrite]

--checkpoint: an open_clip state dict (.bin / .pt / .pth via torch.load(weights_only=True), or
.safetensors), optionally wrapped in {"state_dict": ...} and with "module." prefixes.
--model: an open_clip model name (ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336, ViT-H-14, their
-quickgelu variants, ...; other names are looked up in the installed open_clip's model_configs)
or the path of an open_clip model config .json.

DIR receives params/ (Orbax), config.json ({"model_type": "open_clip", "open_clip_model": name,
"config": ClipConfig.to_dict(), "tokenizer": {...}}) and the tokenizer files vocab.json +
merges.txt. The tokenizer comes from --vocab/--merges (transformers' CLIP vocab.json and
merges.txt) when given; otherwise from the OpenAI BPE table samclip_jax bundles
(samclip_jax/assets/bpe_simple_vocab_16e6.txt.gz, open_clip's, turned into vocab.json +
merges.txt with no network), which is the tokenizer every OpenAI-BPE OpenCLIP model uses.

Every tensor of the checkpoint must map to a parameter and every parameter must be filled; all
problems are reported together, the exit status is non-zero and DIR is not created. DIR must be
new or empty, or, with --overwrite, a model directory an earlier conversion wrote (replaced
atomically; nothing samclip_jax did not write is ever deleted).
"""
import argparse
import importlib.util
import json
import os
import sys
import time
from typing import Mapping

import numpy as np

from convert import common
from convert.common import CheckpointError, conv, exit_status, identity, linear

# Buffers and bookkeeping entries that are not parameters: ignored on purpose.
IGNORED = (
  r"attn_mask",                                   # causal mask buffer (old checkpoints)
  r"visual\..*num_batches_tracked",               # BatchNorm's step counter (ModifiedResNet)
  r"(visual\.)?transformer\.resblocks\.\d+\.attn_mask",
  r"input_resolution|context_length|vocab_size",  # integers in OpenAI-format state dicts
)


def _scalar(x):
  """logit_scale: () in open_clip, (1,) with nonscalar_logit_scale."""
  return x.reshape(()) if x.size == 1 else x


def _block_rules(torch_prefix: str, flax_prefix: str) -> list[common.Rule]:
  """ResidualAttentionBlock: nn.MultiheadAttention (fused in_proj), ln_1/2, mlp c_fc/c_proj."""
  t = torch_prefix.replace(".", r"\.") + r"transformer\.resblocks\.(\d+)\."
  f = flax_prefix + r"transformer/resblocks_\1/"
  return [
    (t + r"attn\.in_proj_weight", f + "attn/in_proj/kernel", linear),
    (t + r"attn\.in_proj_bias", f + "attn/in_proj/bias", identity),
    (t + r"attn\.out_proj\.weight", f + "attn/out_proj/kernel", linear),
    (t + r"attn\.out_proj\.bias", f + "attn/out_proj/bias", identity),
    (t + r"(ln_[12])\.weight", f + r"\2/scale", identity),
    (t + r"(ln_[12])\.bias", f + r"\2/bias", identity),
    (t + r"mlp\.(c_fc|c_proj)\.weight", f + r"mlp/\2/kernel", linear),
    (t + r"mlp\.(c_fc|c_proj)\.bias", f + r"mlp/\2/bias", identity),
    (t + r"(ls_[12])\.gamma", f + r"\2/gamma", identity),
  ]


def _batch_norm_rules(t: str, f: str, groups: int) -> list[common.Rule]:
  """BatchNorm2d `t` (a regex with `groups` groups) -> BatchNorm `f`: affine and running
  statistics (all parameters here)."""
  return [(t + r"\.weight", f + "/scale", identity), (t + r"\.bias", f + "/bias", identity),
          (t + r"\.running_(mean|var)", f + rf"/running_\{groups + 1}", identity)]


# ModifiedResNet (open_clip/modified_resnet.py): stem, layerN.M bottlenecks, attention pool.
_RN_BLOCK = r"visual\.(layer\d)\.(\d+)\."
RESNET_RULES: list[common.Rule] = [
  (r"visual\.(conv[123])\.weight", r"visual/\1/kernel", conv),
  *_batch_norm_rules(r"visual\.(bn[123])", r"visual/\1", 1),
  (_RN_BLOCK + r"(conv[123])\.weight", r"visual/\1_\2/\3/kernel", conv),
  *_batch_norm_rules(_RN_BLOCK + r"(bn[123])", r"visual/\1_\2/\3", 3),
  (_RN_BLOCK + r"downsample\.0\.weight", r"visual/\1_\2/downsample_0/kernel", conv),
  *_batch_norm_rules(_RN_BLOCK + r"downsample\.1", r"visual/\1_\2/downsample_1", 2),
  (r"visual\.attnpool\.positional_embedding", "visual/attnpool/positional_embedding", identity),
  (r"visual\.attnpool\.([qkvc]_proj)\.weight", r"visual/attnpool/\1/kernel", linear),
  (r"visual\.attnpool\.([qkvc]_proj)\.bias", r"visual/attnpool/\1/bias", identity),
]

# open_clip name -> Flax path, transform. Read top to bottom; the first full match wins.
RULES: list[common.Rule] = [
  *RESNET_RULES,
  # Image tower (open_clip/transformer.py VisionTransformer).
  (r"visual\.conv1\.weight", "visual/conv1/kernel", conv),
  (r"visual\.class_embedding", "visual/class_embedding", identity),
  (r"visual\.positional_embedding", "visual/positional_embedding", identity),
  (r"visual\.(ln_pre|ln_post)\.weight", r"visual/\1/scale", identity),
  (r"visual\.(ln_pre|ln_post)\.bias", r"visual/\1/bias", identity),
  (r"visual\.proj", "visual/proj", identity),
  *_block_rules("visual.", "visual/"),
  # Text tower, stored flat on open_clip.CLIP.
  (r"token_embedding\.weight", "token_embedding/embedding", identity),
  (r"positional_embedding", "positional_embedding", identity),
  *_block_rules("", ""),
  (r"ln_final\.weight", "ln_final/scale", identity),
  (r"ln_final\.bias", "ln_final/bias", identity),
  (r"text_projection", "text_projection", identity),                 # nn.Parameter (width, D)
  (r"text_projection\.weight", "text_projection/kernel", linear),    # nn.Linear (proj_bias)
  (r"text_projection\.bias", "text_projection/bias", identity),
  (r"logit_scale", "logit_scale", _scalar),
]


def resolve_config(model) -> tuple[str, "ClipConfig"]:
  """--model (name, open_clip config .json path, open_clip config dict or ClipConfig) -> (name, config)."""
  from samclip_jax.models.clip import ClipConfig
  if isinstance(model, ClipConfig):
    return "custom", model
  if isinstance(model, Mapping):
    return str(model.get("name", "custom")), ClipConfig.from_open_clip_config(
        {k: v for k, v in model.items() if k != "name"})
  if str(model).endswith(".json") and os.path.isfile(model):
    with open(model) as f:
      cfg = json.load(f)
    return os.path.splitext(os.path.basename(model))[0], ClipConfig.from_open_clip_config(cfg)
  try:
    return model, ClipConfig.from_name(model)
  except ValueError as bundled_error:
    cfg = _installed_open_clip_config(model)
    if cfg is None:
      raise bundled_error
    return model, ClipConfig.from_open_clip_config(cfg)


def _open_clip_dir() -> str | None:
  """Directory of the installed open_clip package, found without importing it (no torch)."""
  spec = importlib.util.find_spec("open_clip")
  return os.path.dirname(spec.origin) if spec and spec.origin else None


def _installed_open_clip_config(name: str) -> dict | None:
  root = _open_clip_dir()
  path = os.path.join(root, "model_configs", f"{name}.json") if root else None
  if not path or not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def default_bpe_path() -> str:
  """The OpenAI BPE table samclip_jax bundles (open_clip's bpe_simple_vocab_16e6.txt.gz)."""
  from samclip_jax.tokenizer import BUNDLED_BPE
  return BUNDLED_BPE


def convert_state_dict(state: Mapping[str, np.ndarray], config, source: str = "checkpoint") -> dict:
  """open_clip state dict -> params of CLIP(config); raises CheckpointError listing every problem."""
  from samclip_jax.models.clip import abstract_params
  return common.apply_table(state, RULES, abstract_params(config), ignore=IGNORED, source=source)


def convert_open_clip(model, checkpoint: str, output: str, vocab: str | None = None,
                      merges: str | None = None, log=print, overwrite: bool = False) -> dict:
  """Converts `checkpoint` for open_clip `model` into the model directory `output`; returns params.

  `overwrite` lets a previous model directory at `output` be replaced."""
  from samclip_jax.clip_model import save_clip
  if (vocab is None) != (merges is None):
    raise CheckpointError("--vocab and --merges go together")
  for path in (vocab, merges):
    if path is not None and not os.path.isfile(path):
      raise CheckpointError(f"tokenizer file not found: {path}")
  name, config = resolve_config(model)
  common.check_output(output, checkpoint, overwrite)
  t0 = time.time()
  log(f"[open_clip] reading {checkpoint}")
  state = common.load_state_dict(checkpoint)
  log(f"[open_clip] mapping {len(state)} tensors onto {name} "
      f"(vision {config.vision.width}x{config.vision.layers}, text {config.text.width}x{config.text.layers})")
  params = convert_state_dict(state, config, source=f"{checkpoint} (as open_clip {name})")
  log(f"[open_clip] writing {output}")
  save_clip(output, config, params, name, vocab, merges,
            extra={"source_checkpoint": os.path.basename(checkpoint)})
  log(f"[open_clip] converted {name}: {common.summary(params)} in {time.time() - t0:.1f}s -> {output}")
  return params


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m convert.open_clip", description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="open_clip model name or model config .json")
  parser.add_argument("--checkpoint", required=True, help=".bin/.pt/.pth/.safetensors state dict")
  parser.add_argument("--output", required=True, help="model directory to write: new or empty")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace --output if it is a model directory of ours (nothing else is ever replaced)")
  parser.add_argument("--vocab", help="CLIP vocab.json (default: from the bundled OpenAI BPE)")
  parser.add_argument("--merges", help="CLIP merges.txt (with --vocab)")
  args = parser.parse_args(argv)
  return exit_status(convert_open_clip, args.model, args.checkpoint, args.output, args.vocab, args.merges,
                     log=lambda m: print(m, file=sys.stderr, flush=True), overwrite=args.overwrite)


if __name__ == "__main__":
  sys.exit(main())
