"""The PyTorch side of convert.to_torch: segment_anything's Sam from sam_config.json, and the CLIP head.

    from convert.torch_models import load
    sam, clip_head = load("out")     # clip_head is None for a SAM-only export
    tokens = ...                     # [B, h, w, E] trunk tokens (see SamClipImageEncoder)
    pooled, patch = clip_head(tokens)

torch and segment_anything are imported on first use, as in convert/common.py: importing this
module needs neither.
"""
import contextlib
import functools
import json
import os
import types

from convert.torchvision_nms import ensure_nms

SAM_WEIGHTS, SAM_CONFIG = "sam.pth", "sam_config.json"
CLIP_HEAD_WEIGHTS, CLIP_HEAD_CONFIG = "clip_head.safetensors", "clip_head_config.json"


def _read(config) -> dict:
  """A dict as it is, or the JSON file it names."""
  if isinstance(config, (str, os.PathLike)):
    with open(config) as f:
      return json.load(f)
  return dict(config)


def build_sam(config, device=None):
  """segment_anything's Sam from sam_config.json (a path or its dict), as build_sam.py assembles it.

  `device="meta"` builds it without memory (to check a state dict with load_state_dict(assign=True)).
  """
  import torch
  ensure_nms()
  from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
  c = _read(config)
  enc, pe, dec = dict(c["image_encoder"]), dict(c["prompt_encoder"]), dict(c["mask_decoder"])
  enc["global_attn_indexes"] = tuple(enc["global_attn_indexes"])
  pe["image_embedding_size"], pe["input_image_size"] = tuple(pe["image_embedding_size"]), tuple(pe["input_image_size"])
  with torch.device(device) if device else contextlib.nullcontext():
    sam = Sam(
        # The norm layer is a class, not JSON: build_sam.py's LayerNorm with eps 1e-6.
        image_encoder=ImageEncoderViT(**enc, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)),
        prompt_encoder=PromptEncoder(**pe),
        mask_decoder=MaskDecoder(**{k: v for k, v in dec.items() if k != "transformer"},
                                 transformer=TwoWayTransformer(**dec["transformer"])))
  return sam.eval()


def build_clip_head(config, device=None):
  """The merged model's CLIP head (a torch nn.Module) from clip_head_config.json (a path or its dict)."""
  import torch
  with torch.device(device) if device else contextlib.nullcontext():
    return _classes().ClipHead(**_read(config)).eval()


def image_encoder_with_head(sam, clip_head=None):
  """Normalised, padded image [B, 3, S, S] -> (SAM embedding [B, C, h, w], pooled [B, D], patch [B, h, w, D]),
  h = S / patch size; the SAM embedding alone without a head."""
  return _classes().SamClipImageEncoder(sam.image_encoder, clip_head).eval()


def onnx_decoder(sam, return_single_mask: bool = False):
  """segment_anything's SamOnnxModel, its crop traced for any image size (see SamOnnxDecoder)."""
  return _classes().SamOnnxDecoder(sam, return_single_mask=return_single_mask).eval()


def load(directory: str):
  """(Sam, ClipHead or None) of a convert.to_torch output, weights loaded strictly (weights_only)."""
  import torch
  from safetensors.torch import load_file
  sam = build_sam(os.path.join(directory, SAM_CONFIG))
  sam.load_state_dict(torch.load(os.path.join(directory, SAM_WEIGHTS), map_location="cpu", weights_only=True))
  head = None
  if os.path.isfile(os.path.join(directory, CLIP_HEAD_CONFIG)):
    head = build_clip_head(os.path.join(directory, CLIP_HEAD_CONFIG))
    head.load_state_dict(load_file(os.path.join(directory, CLIP_HEAD_WEIGHTS)))
  return sam, head


@functools.cache
def _classes():
  """The torch modules, defined on first use (so that this module imports without torch)."""
  import torch
  ensure_nms()
  from segment_anything.modeling.image_encoder import Block
  from segment_anything.utils.onnx import SamOnnxModel
  from torch import nn
  from torch.nn import functional as F

  class ProjectionMLP(nn.Module):
    """Linear -> GELU -> ... -> Linear (samclip_jax.models.samclip.ProjectionMLP)."""

    def __init__(self, dims):
      super().__init__()
      self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
      for i, layer in enumerate(self.layers):
        x = layer(x) if i == len(self.layers) - 1 else nn.functional.gelu(layer(x))  # exact GELU
      return x

  class ClipHead(nn.Module):
    """Trunk tokens [B, h, w, E] -> (pooled [B, D], per-patch [B, h, w, D]) (samclip_jax.models.samclip.ClipHead).

    segment_anything's global-attention Blocks, max-pool over the patches, LayerNorm, MLP; the
    per-patch embeddings apply the same LayerNorm + MLP to every token.
    """

    def __init__(self, embed_dim, num_heads, mlp_ratio, qkv_bias, use_rel_pos, input_size, depth,
                 mlp_hidden, out_dim):
      super().__init__()
      self.blocks = nn.ModuleList(
          Block(embed_dim, num_heads, mlp_ratio, qkv_bias, functools.partial(nn.LayerNorm, eps=1e-6),
                use_rel_pos=use_rel_pos, window_size=0, input_size=tuple(input_size))
          for _ in range(depth))
      self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
      self.mlp = ProjectionMLP([embed_dim, *mlp_hidden, out_dim])

    def forward(self, tokens):
      x = tokens
      for block in self.blocks:
        x = block(x)
      return self.mlp(self.norm(x.amax(dim=(1, 2)))), self.mlp(self.norm(x))

  class SamClipImageEncoder(nn.Module):
    """One backbone pass for both heads: image -> (SAM embedding, pooled, patch); SAM only without a head."""

    def __init__(self, image_encoder, clip_head=None):
      super().__init__()
      self.image_encoder, self.clip_head = image_encoder, clip_head

    def forward(self, image):
      enc = self.image_encoder
      # ImageEncoderViT.forward up to the neck: the CLIP head reads the trunk tokens.
      x = enc.patch_embed(image)
      if enc.pos_embed is not None:
        x = x + enc.pos_embed
      for block in enc.blocks:
        x = block(x)
      embedding = enc.neck(x.permute(0, 3, 1, 2))
      if self.clip_head is None:
        return embedding
      return (embedding, *self.clip_head(x))

  class SamOnnxDecoder(SamOnnxModel):
    """SamOnnxModel whose crop of the padding follows orig_im_size in the exported graph.

    SamOnnxModel crops with masks[..., :int(h), :int(w)]: the TorchScript tracer records those
    bounds as constants, so its ONNX decoder keeps the example input's aspect ratio for every
    image (segment-anything issue #56). Gathering index ranges keeps them in the graph.
    """

    def mask_postprocessing(self, masks, orig_im_size):
      masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
      h, w = self.resize_longest_image_size(orig_im_size, self.img_size)
      masks = masks.index_select(2, torch.arange(h)).index_select(3, torch.arange(w))
      orig_im_size = orig_im_size.to(torch.int64)
      return F.interpolate(masks, size=(orig_im_size[0], orig_im_size[1]), mode="bilinear", align_corners=False)

  return types.SimpleNamespace(ClipHead=ClipHead, ProjectionMLP=ProjectionMLP, SamClipImageEncoder=SamClipImageEncoder,
                               SamOnnxDecoder=SamOnnxDecoder)
