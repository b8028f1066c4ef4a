"""samclip_jax model directory (a merged SAM-CLIP export or a converted SAM) -> PyTorch, and ONNX.

  python -m convert.to_torch --model DIR --output OUT [--onnx [--return-single-mask]] [--overwrite]

OUT/sam.pth           state dict of segment_anything's Sam (strict, loads with weights_only=True)
OUT/sam_config.json   its constructor kwargs: convert.torch_models.build_sam(path) rebuilds it
merged models only:
OUT/clip_head.safetensors, OUT/clip_head_config.json: the CLIP head (convert.torch_models.build_clip_head)
with --onnx (TorchScript exporter, as segment_anything's scripts/export_onnx_model.py):
OUT/image_encoder.onnx  normalised padded image [B,3,S,S] -> image_embeddings [B,C,h,w] (h = S / patch)
                        (+ clip_embedding [B,D], clip_patch_embeddings [B,h,w,D] for a merged model)
OUT/decoder.onnx        segment_anything's SamOnnxModel (prompts + image_embeddings -> masks), its crop
                        kept dynamic (torch_models.SamOnnxDecoder; upstream bakes in one aspect ratio)

The names come from convert/sam.py's table read backwards (convert.common.invert_rules); the
CLIP head's blocks reuse that table's image-encoder block rules. The text tower of a merged
model is the frozen CLIP teacher's and is not written: use the open_clip checkpoint it came from.
OUT is written beside itself and swapped into place; nothing is written when anything fails.
"""
import argparse
import json
import os
import shutil
import sys
import time
import warnings

from convert import sam as sam_table
from convert.common import CheckpointError, check_output_place, exit_status, identity, invert_rules, linear, summary, unapply_table
from convert.torch_models import CLIP_HEAD_CONFIG, CLIP_HEAD_WEIGHTS, SAM_CONFIG, SAM_WEIGHTS
from samclip_jax import cli

IMAGE_ENCODER_ONNX, DECODER_ONNX = "image_encoder.onnx", "decoder.onnx"
# Everything this converter writes: the only entries --overwrite may replace.
OUTPUT_FILES = (SAM_WEIGHTS, SAM_CONFIG, CLIP_HEAD_WEIGHTS, CLIP_HEAD_CONFIG,
                *(f + ext for f in (IMAGE_ENCODER_ONNX, DECODER_ONNX) for ext in ("", ".data")))
OPSET = 17  # segment_anything's export script default

_BLOCK = r"image_encoder\.blocks\."
# CLIP head (models/samclip.py ClipHead; torch_models.ClipHead): ViT-Det blocks named as the
# image encoder's, then its own LayerNorm and projection MLP.
CLIP_HEAD_RULES = [(p[len("image_encoder\\."):], t[len("image_encoder/"):], f)
                   for p, t, f in sam_table.RULES if p.startswith(_BLOCK)] + [
    (r"norm\.weight", r"norm/scale", identity),
    (r"norm\.bias", r"norm/bias", identity),
    (r"mlp\.layers\.(\d+)\.weight", r"mlp/layers_\1/kernel", linear),
    (r"mlp\.layers\.(\d+)\.bias", r"mlp/layers_\1/bias", identity),
]


def sam_torch_config(config) -> dict:
  """SamConfig -> segment_anything constructor kwargs (the JSON of sam_config.json)."""
  enc = config.image_encoder
  grid = config.image_size // enc.patch_size
  return {
      "image_encoder": {
          "img_size": enc.img_size, "patch_size": enc.patch_size, "in_chans": enc.in_chans,
          "embed_dim": enc.embed_dim, "depth": enc.depth, "num_heads": enc.num_heads, "mlp_ratio": enc.mlp_ratio,
          "out_chans": enc.out_chans, "qkv_bias": enc.qkv_bias, "use_abs_pos": enc.use_abs_pos,
          "use_rel_pos": enc.use_rel_pos, "window_size": enc.window_size,
          "global_attn_indexes": list(enc.global_attn_indexes)},
      "prompt_encoder": {
          "embed_dim": config.prompt_embed_dim, "image_embedding_size": [grid, grid],
          "input_image_size": [config.image_size, config.image_size], "mask_in_chans": config.mask_in_chans},
      "mask_decoder": {
          "transformer_dim": config.prompt_embed_dim, "num_multimask_outputs": config.num_multimask_outputs,
          "iou_head_depth": config.iou_head_depth, "iou_head_hidden_dim": config.iou_head_hidden_dim,
          "transformer": {"depth": config.decoder_depth, "embedding_dim": config.prompt_embed_dim,
                          "num_heads": config.decoder_num_heads, "mlp_dim": config.decoder_mlp_dim,
                          "attention_downsample_rate": config.attention_downsample_rate}},
  }


def clip_head_torch_config(config) -> dict:
  """SamClipConfig -> torch_models.ClipHead kwargs (the JSON of clip_head_config.json)."""
  enc = config.sam.image_encoder
  return {"embed_dim": enc.embed_dim, "num_heads": enc.num_heads, "mlp_ratio": enc.mlp_ratio,
          "qkv_bias": enc.qkv_bias, "use_rel_pos": enc.use_rel_pos, "input_size": [enc.grid_size, enc.grid_size],
          "depth": config.head_depth, "mlp_hidden": list(config.mlp_hidden), "out_dim": config.out_dim}


def check_output(output: str, model: str, overwrite: bool) -> None:
  """Refuses, before anything is read, an --output that is not new, empty, or (--overwrite) an earlier export."""
  check_output_place(output, model)
  out = os.path.realpath(output)
  if not os.path.lexists(out):
    return
  if not os.path.isdir(out):
    raise CheckpointError(f"--output {output} exists and is not a directory; refusing to replace it")
  entries = sorted(os.listdir(out))
  foreign = [e for e in entries if e not in OUTPUT_FILES]
  if foreign:  # refused whatever the flags: no hint at --overwrite, which would not help
    raise CheckpointError(f"--output {output} holds files convert.to_torch did not write ({', '.join(foreign[:10])}); "
                          f"refusing to replace it: choose a new or empty directory")
  if entries and not overwrite:
    raise CheckpointError(f"--output {output} holds an earlier export; pass --overwrite to replace it")


def read_model(directory: str):
  """-> (SamConfig, SamClipConfig or None, SAM params, CLIP-head params or None)."""
  from samclip_jax import checkpoint
  from samclip_jax.models import samclip
  from samclip_jax.models.sam import SamConfig
  if not checkpoint.is_model_dir(directory):
    hint = " (a training workdir? give its export/)" if os.path.isdir(os.path.join(directory, "export")) else ""
    raise CheckpointError(f"{directory} is not a samclip_jax model directory (config.json with a model_type, "
                          f"and params/){hint}")
  kind = checkpoint.load_config(directory).get("model_type")
  if kind not in ("sam", samclip.MODEL_TYPE):
    raise CheckpointError(f"{directory} holds a {kind!r} model; convert.to_torch writes 'sam' and "
                          f"{samclip.MODEL_TYPE!r} (merged) models")
  params, meta = checkpoint.load_model(directory)
  if kind == "sam":
    return SamConfig.from_dict(meta), None, params, None
  config = samclip.load_samclip_config(directory)
  return config.sam, config, samclip.sam_params_from_samclip(params), params["clip_head"]


def _torch_module(module, arrays: dict, source: str):
  """`module` holding `arrays` (a strict load), or a CheckpointError saying why they do not fit it exactly."""
  import torch
  try:
    # assign: a module built on the meta device takes the tensors as they are (no copy, no memory).
    module.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True, assign=True)
  except RuntimeError as e:
    raise CheckpointError(f"{source}: {e}") from None
  return module


def _onnx_export(module, args, path: str, **kwargs) -> None:
  """torch.onnx.export with the TorchScript exporter into `path`; weights over protobuf's 2 GB go
  beside it in one PATH.data file (that exporter writes one file per tensor)."""
  import torch
  scratch = path + ".parts"
  os.makedirs(scratch)
  part = os.path.join(scratch, os.path.basename(path))
  with warnings.catch_warnings():  # tracing warnings about shapes read as Python ints, as Meta's script
    warnings.simplefilter("ignore")
    torch.onnx.export(module, args, part, dynamo=False, export_params=True, opset_version=OPSET,
                      do_constant_folding=True, **kwargs)
  if os.listdir(scratch) == [os.path.basename(path)]:
    os.rename(part, path)
  else:
    import onnx
    onnx.save_model(onnx.load(part), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data", size_threshold=0)
  shutil.rmtree(scratch)


def export_onnx(sam, clip_head, directory: str, return_single_mask: bool = False) -> None:
  """image_encoder.onnx (backbone + neck [+ CLIP head]) and decoder.onnx (SamOnnxModel) into `directory`."""
  import torch
  from convert.torch_models import image_encoder_with_head, onnx_decoder
  s = sam.image_encoder.img_size
  outputs = ["image_embeddings"] + (["clip_embedding", "clip_patch_embeddings"] if clip_head is not None else [])
  _onnx_export(image_encoder_with_head(sam, clip_head), (torch.zeros(1, 3, s, s),),
               os.path.join(directory, IMAGE_ENCODER_ONNX), input_names=["image"], output_names=outputs,
               dynamic_axes={name: {0: "batch"} for name in ["image"] + outputs})
  # As segment_anything's scripts/export_onnx_model.py: any number of points, one mask input.
  h, w = sam.prompt_encoder.image_embedding_size
  dummy = {"image_embeddings": torch.randn(1, sam.prompt_encoder.embed_dim, h, w),
           "point_coords": torch.randint(0, s, (1, 5, 2)).float(),
           "point_labels": torch.randint(0, 4, (1, 5)).float(),
           "mask_input": torch.randn(1, 1, 4 * h, 4 * w),
           "has_mask_input": torch.tensor([1.0]),
           "orig_im_size": torch.tensor([1500.0, 2250.0])}
  _onnx_export(onnx_decoder(sam, return_single_mask), tuple(dummy.values()),
               os.path.join(directory, DECODER_ONNX), input_names=list(dummy),
               output_names=["masks", "iou_predictions", "low_res_masks"],
               dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}})


def to_torch(model: str, output: str, onnx: bool = False, overwrite: bool = False, return_single_mask: bool = False,
             verbose: bool = True) -> list[str]:
  """Writes the PyTorch (and with `onnx`, ONNX) form of a model directory to `output`; -> the files written."""
  import torch
  from safetensors.torch import save_file
  from samclip_jax import checkpoint
  from convert.torch_models import build_clip_head, build_sam
  log = print if verbose else (lambda *a, **k: None)
  t0 = time.time()
  check_output(output, model, overwrite)
  log(f"reading {model}")
  sam_config, samclip_config, sam_params, head_params = read_model(model)
  files = {SAM_CONFIG: sam_torch_config(sam_config)}
  state = unapply_table(sam_params, invert_rules(sam_table.RULES), source=model)
  # Built on the meta device: no random initialisation; the strict load puts the weights in.
  sam = _torch_module(build_sam(files[SAM_CONFIG], "meta"), state, f"{model} as segment_anything's Sam")
  head = None
  if head_params is not None:
    files[CLIP_HEAD_CONFIG] = clip_head_torch_config(samclip_config)
    head = _torch_module(build_clip_head(files[CLIP_HEAD_CONFIG], "meta"),
                         unapply_table(head_params, invert_rules(CLIP_HEAD_RULES), source=f"{model} (clip_head)"),
                         f"{model} (clip_head)")
  log(f"  SAM {summary(sam_params)}" + (f", CLIP head {summary(head_params)}" if head is not None else ""))
  out = os.path.realpath(output)
  tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-save")
  shutil.rmtree(tmp, ignore_errors=True)  # left by a run that was killed
  os.makedirs(tmp)
  try:
    for name, config in files.items():
      with open(os.path.join(tmp, name), "w") as f:
        json.dump(config, f, indent=2)
    torch.save(sam.state_dict(), os.path.join(tmp, SAM_WEIGHTS))
    if head is not None:
      with cli.atomic_write(os.path.join(tmp, CLIP_HEAD_WEIGHTS)) as path:  # safetensors writes 0600
        save_file(head.state_dict(), path)
    if onnx:
      t1 = time.time()
      export_onnx(sam, head, tmp, return_single_mask)
      log(f"  ONNX export {time.time() - t1:.1f} s")
    written = sorted(os.listdir(tmp))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    checkpoint.swap_in(tmp, out)  # save_model's swap: the previous export goes only once this one is in place
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  log(f"wrote {', '.join(written)} -> {out} ({time.time() - t0:.1f} s)")
  return written


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m convert.to_torch", description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="model directory: a merged export or a converted SAM")
  parser.add_argument("--output", required=True, help="directory to write: new or empty")
  parser.add_argument("--overwrite", action="store_true", help="replace --output if it holds an earlier export only")
  parser.add_argument("--onnx", action="store_true", help="also write image_encoder.onnx and decoder.onnx")
  parser.add_argument("--return-single-mask", action="store_true",
                      help="decoder.onnx returns the best mask only (as segment_anything's export script)")
  args = parser.parse_args(argv)
  return exit_status(to_torch, args.model, args.output, args.onnx, args.overwrite, args.return_single_mask)


if __name__ == "__main__":
  sys.exit(main())
