"""Meta's SAM checkpoint (sam_vit_{b,l,h}_*.pth or .safetensors) -> samclip_jax model directory.

  python -m convert.sam --checkpoint sam_vit_b_01ec64.pth --output ckpt/sam_vit_b [--model vit_b] [--overwrite]

The variant is read from the checkpoint's shapes (embed dim and depth) unless --model is
given. Every tensor must map onto a parameter of the Flax model and every parameter must be
filled; all problems are reported in one error and nothing is written. --output must be new or
empty, or, with --overwrite, a model directory an earlier conversion wrote (replaced atomically).
"""
import argparse
import os
import re
import sys
import time

from convert.common import (CheckpointError, apply_table, check_output, conv, conv_transpose, exit_status, identity, linear,
                            load_state_dict, summary)

VARIANTS = ("vit_b", "vit_l", "vit_h")


_ENC = r"image_encoder\."
_PE = r"prompt_encoder\."
_DEC = r"mask_decoder\."
_TWL = r"mask_decoder\.transformer\.layers\.(\d+)\."  # TwoWayAttentionBlock i
_ATTN = r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
_PROJ = r"(q_proj|k_proj|v_proj|out_proj)"

# (PyTorch name, Flax path, transform): read top to bottom like segment_anything/modeling.
RULES = [
    # image_encoder.py: ImageEncoderViT
    (_ENC + r"pos_embed", r"image_encoder/pos_embed", identity),
    (_ENC + r"patch_embed\.proj\.weight", r"image_encoder/patch_embed/proj/kernel", conv),
    (_ENC + r"patch_embed\.proj\.bias", r"image_encoder/patch_embed/proj/bias", identity),
    (_ENC + r"blocks\.(\d+)\.(norm[12])\.weight", r"image_encoder/blocks_\1/\2/scale", identity),
    (_ENC + r"blocks\.(\d+)\.(norm[12])\.bias", r"image_encoder/blocks_\1/\2/bias", identity),
    (_ENC + r"blocks\.(\d+)\.attn\.(rel_pos_[hw])", r"image_encoder/blocks_\1/attn/\2", identity),
    (_ENC + r"blocks\.(\d+)\.attn\.(qkv|proj)\.weight", r"image_encoder/blocks_\1/attn/\2/kernel", linear),
    (_ENC + r"blocks\.(\d+)\.attn\.(qkv|proj)\.bias", r"image_encoder/blocks_\1/attn/\2/bias", identity),
    (_ENC + r"blocks\.(\d+)\.mlp\.(lin[12])\.weight", r"image_encoder/blocks_\1/mlp/\2/kernel", linear),
    (_ENC + r"blocks\.(\d+)\.mlp\.(lin[12])\.bias", r"image_encoder/blocks_\1/mlp/\2/bias", identity),
    (_ENC + r"neck\.([02])\.weight", r"image_encoder/neck_\1/kernel", conv),  # convs, no bias
    (_ENC + r"neck\.([13])\.(weight|bias)", r"image_encoder/neck_\1/\2", identity),  # LayerNorm2d
    # prompt_encoder.py: PromptEncoder
    (_PE + r"pe_layer\.positional_encoding_gaussian_matrix",
     r"prompt_encoder/pe_layer/positional_encoding_gaussian_matrix", identity),
    (_PE + r"point_embeddings\.(\d)\.weight", r"prompt_encoder/point_embeddings_\1/embedding", identity),
    (_PE + r"(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder/\1/embedding", identity),
    (_PE + r"mask_downscaling\.([036])\.weight", r"prompt_encoder/mask_downscaling_\1/kernel", conv),
    (_PE + r"mask_downscaling\.([036])\.bias", r"prompt_encoder/mask_downscaling_\1/bias", identity),
    (_PE + r"mask_downscaling\.([14])\.(weight|bias)", r"prompt_encoder/mask_downscaling_\1/\2", identity),
    # transformer.py: TwoWayTransformer
    (_TWL + _ATTN + r"\." + _PROJ + r"\.weight",
     r"mask_decoder/transformer/layers_\1/\2/\3/kernel", linear),
    (_TWL + _ATTN + r"\." + _PROJ + r"\.bias",
     r"mask_decoder/transformer/layers_\1/\2/\3/bias", identity),
    (_TWL + r"mlp\.(lin[12])\.weight", r"mask_decoder/transformer/layers_\1/mlp/\2/kernel", linear),
    (_TWL + r"mlp\.(lin[12])\.bias", r"mask_decoder/transformer/layers_\1/mlp/\2/bias", identity),
    (_TWL + r"(norm[1-4])\.weight", r"mask_decoder/transformer/layers_\1/\2/scale", identity),
    (_TWL + r"(norm[1-4])\.bias", r"mask_decoder/transformer/layers_\1/\2/bias", identity),
    (_DEC + r"transformer\.final_attn_token_to_image\." + _PROJ + r"\.weight",
     r"mask_decoder/transformer/final_attn_token_to_image/\1/kernel", linear),
    (_DEC + r"transformer\.final_attn_token_to_image\." + _PROJ + r"\.bias",
     r"mask_decoder/transformer/final_attn_token_to_image/\1/bias", identity),
    (_DEC + r"transformer\.norm_final_attn\.weight", r"mask_decoder/transformer/norm_final_attn/scale", identity),
    (_DEC + r"transformer\.norm_final_attn\.bias", r"mask_decoder/transformer/norm_final_attn/bias", identity),
    # mask_decoder.py: MaskDecoder
    (_DEC + r"(iou_token|mask_tokens)\.weight", r"mask_decoder/\1/embedding", identity),
    (_DEC + r"output_upscaling\.([03])\.weight", r"mask_decoder/output_upscaling_\1/kernel", conv_transpose),
    (_DEC + r"output_upscaling\.([03])\.bias", r"mask_decoder/output_upscaling_\1/bias", identity),
    (_DEC + r"output_upscaling\.1\.(weight|bias)", r"mask_decoder/output_upscaling_1/\1", identity),  # LayerNorm2d
    (_DEC + r"output_hypernetworks_mlps\.(\d+)\.layers\.(\d+)\.weight",
     r"mask_decoder/output_hypernetworks_mlps_\1/layers_\2/kernel", linear),
    (_DEC + r"output_hypernetworks_mlps\.(\d+)\.layers\.(\d+)\.bias",
     r"mask_decoder/output_hypernetworks_mlps_\1/layers_\2/bias", identity),
    (_DEC + r"iou_prediction_head\.layers\.(\d+)\.weight", r"mask_decoder/iou_prediction_head/layers_\1/kernel",
     linear),
    (_DEC + r"iou_prediction_head\.layers\.(\d+)\.bias", r"mask_decoder/iou_prediction_head/layers_\1/bias", identity),
]

# Constants of Sam.preprocess (non-persistent buffers; some exports still carry them).
IGNORE = (r"pixel_mean", r"pixel_std")


def infer_variant(state) -> tuple[str | None, str]:
  """-> (variant or None, description of what the shapes say)."""
  from samclip_jax.models.vit_det import ImageEncoderConfig
  w = state.get("image_encoder.patch_embed.proj.weight")
  if w is None or w.ndim != 4:
    return None, "no image_encoder.patch_embed.proj.weight: not a SAM checkpoint"
  blocks = [int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))]
  dim, depth = int(w.shape[0]), (max(blocks) + 1 if blocks else 0)
  for name in VARIANTS:
    c = ImageEncoderConfig.from_name(name)
    if (c.embed_dim, c.depth) == (dim, depth):
      return name, f"embed dim {dim}, depth {depth}"
  return None, f"embed dim {dim}, depth {depth} match no released SAM (vit_b 768/12, vit_l 1024/24, vit_h 1280/32)"


def convert_sam(checkpoint: str, output: str, model: str | None = None, config=None, verbose: bool = True,
                overwrite: bool = False):
  """Converts a SAM checkpoint into a model directory; returns (SamConfig, params).

  `model` names the variant (inferred from the shapes when None); `config`, a SamConfig,
  overrides both (non-standard sizes, as tiny test models). `overwrite` lets a previous
  model directory at `output` be replaced.
  """
  from samclip_jax import checkpoint as ckpt
  from samclip_jax.models.sam import SamConfig, abstract_params
  log = print if verbose else (lambda *a, **k: None)
  t0 = time.time()
  if model is not None and model not in VARIANTS:
    raise CheckpointError(f"unknown model {model!r}; expected one of {', '.join(VARIANTS)}")
  check_output(output, checkpoint, overwrite)
  log(f"reading {checkpoint}")
  state = load_state_dict(checkpoint)
  log(f"  {len(state)} tensors")
  inferred, why = infer_variant(state)
  notes = []
  if config is not None:
    variant = "custom"
  elif model is not None:
    variant = model
    if inferred != model:
      notes.append(f"--model {model} but the checkpoint's shapes say {inferred or 'something else'} ({why})")
    config = SamConfig.from_name(model)
  elif inferred is not None:
    variant = inferred
    log(f"  variant {variant} (inferred: {why})")
    config = SamConfig.from_name(variant)
  else:
    raise CheckpointError(f"{checkpoint}: cannot infer the SAM variant ({why}); pass --model")
  skeleton = abstract_params(config)
  try:
    params = apply_table(state, RULES, skeleton, ignore=IGNORE, source=checkpoint)
  except CheckpointError as e:
    raise CheckpointError("\n".join(notes + [str(e)])) from None
  if notes:  # shapes fit yet the variant does not (should not happen): refuse anyway
    raise CheckpointError("\n".join(notes))
  log(f"  mapped {len(state)} tensors onto {variant} ({summary(params)})")
  log(f"writing {output}")
  ckpt.save_model(output, params, config.to_dict())
  log(f"converted SAM {variant}: {summary(params)} -> {os.path.abspath(output)} ({time.time() - t0:.1f} s)")
  return config, params


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m convert.sam", description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="sam_vit_*.pth (weights_only) or .safetensors")
  parser.add_argument("--output", required=True, help="model directory to write: new or empty")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace --output if it is a model directory of ours (nothing else is ever replaced)")
  parser.add_argument("--model", choices=VARIANTS, default=None, help="variant; inferred from shapes if omitted")
  args = parser.parse_args(argv)
  return exit_status(convert_sam, args.checkpoint, args.output, args.model, overwrite=args.overwrite)


if __name__ == "__main__":
  sys.exit(main())
