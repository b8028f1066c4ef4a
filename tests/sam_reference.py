"""PyTorch SAM references for the parity tests: segment_anything models with random weights."""
import functools

import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from samclip_jax.models.sam import SamConfig
from samclip_jax.models.vit_det import ImageEncoderConfig

# A SAM small enough for milliseconds on CPU; every code path of the full model still runs
# (windowed + global blocks, window padding, multi-head decoder, mask downscaling).
TINY = SamConfig(
    image_encoder=ImageEncoderConfig(img_size=256, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                                     window_size=3, global_attn_indexes=(1,), out_chans=32),
    prompt_embed_dim=32, image_size=256, mask_in_chans=8, decoder_depth=2, decoder_mlp_dim=64,
    decoder_num_heads=2, iou_head_hidden_dim=32)


def build_torch_sam(config: SamConfig, seed: int = 0) -> Sam:
  """segment_anything's Sam as build_sam.py assembles it, with every tensor randomised."""
  enc = config.image_encoder
  torch.manual_seed(seed)
  grid = config.image_size // enc.patch_size
  sam = Sam(
      image_encoder=ImageEncoderViT(
          img_size=enc.img_size, patch_size=enc.patch_size, in_chans=3, embed_dim=enc.embed_dim, depth=enc.depth,
          num_heads=enc.num_heads, mlp_ratio=enc.mlp_ratio, out_chans=enc.out_chans, qkv_bias=enc.qkv_bias,
          norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), use_abs_pos=enc.use_abs_pos,
          use_rel_pos=enc.use_rel_pos, window_size=enc.window_size,
          global_attn_indexes=tuple(enc.global_attn_indexes)),
      prompt_encoder=PromptEncoder(
          embed_dim=config.prompt_embed_dim, image_embedding_size=(grid, grid),
          input_image_size=(config.image_size, config.image_size), mask_in_chans=config.mask_in_chans),
      mask_decoder=MaskDecoder(
          num_multimask_outputs=config.num_multimask_outputs,
          transformer=TwoWayTransformer(depth=config.decoder_depth, embedding_dim=config.prompt_embed_dim,
                                        mlp_dim=config.decoder_mlp_dim, num_heads=config.decoder_num_heads,
                                        attention_downsample_rate=config.attention_downsample_rate),
          transformer_dim=config.prompt_embed_dim, iou_head_depth=config.iou_head_depth,
          iou_head_hidden_dim=config.iou_head_hidden_dim),
  )
  randomize_(sam, seed)
  return sam.eval()


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Overwrites every state-dict tensor (torch leaves biases, rel-pos, pos_embed at 0, norms at 1)."""
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, t in module.state_dict().items():
      if not t.is_floating_point():
        continue
      noise = torch.randn(t.shape, generator=gen)
      if "rel_pos" in name or "pos_embed" in name:
        t.copy_(0.25 * noise)
      elif "positional_encoding_gaussian_matrix" in name:
        t.copy_(noise)
      elif t.ndim == 1 and name.endswith("weight"):  # LayerNorm / LayerNorm2d scales
        t.copy_(1.0 + 0.1 * noise)
      elif t.ndim == 1:  # biases, LayerNorm shifts
        t.copy_(0.1 * noise)
      elif any(k in name for k in ("point_embeddings", "not_a_point_embed", "no_mask_embed", "iou_token",
                                   "mask_tokens")):
        t.copy_(noise)
      else:  # Linear / Conv / ConvTranspose weights: unit-variance activations
        t.copy_(noise / np.sqrt(np.prod(t.shape[1:])))
  return module


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
  """A smooth-ish uint8 RGB image (gradients + noise), so resizing is not trivial."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([255 * xx / max(w - 1, 1), 255 * yy / max(h - 1, 1), 128 + 60 * np.sin(xx / 17.0 + yy / 23.0)], -1)
  return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
