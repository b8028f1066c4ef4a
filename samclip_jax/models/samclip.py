"""SAM-CLIP: SAM's ViT-Det backbone shared by SAM's prompt encoder + mask decoder and a CLIP head.

CLIP head (paper section 3): 3 ViT-Det blocks with global attention and relative position
bias, each initialised from the backbone's LAST block, reading the 768-d trunk tokens (not the
256-d neck output: block init from a ViT block implies the trunk width). Then max-pool over
patch tokens, LayerNorm, and an MLP with two hidden layers (GELU) to the teacher's dim.
The per-patch embeddings used for zero-shot segmentation apply the same LayerNorm + MLP to
every token (before pooling), so they live in the pooled embedding's space.
"""
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from samclip_jax import checkpoint
from samclip_jax.models.sam import MaskDecoder, PromptEncoder, SamConfig, present
from samclip_jax.models.vit_det import Block, ImageEncoderConfig, ImageEncoderViT, maybe_remat
from samclip_jax.sharding import EMBED, MLP, NONE, NORM, param_with_axes

Dtype = Any
MODEL_TYPE = "samclip"


@dataclasses.dataclass(frozen=True)
class SamClipConfig:
  """The merged model: a SamConfig plus the CLIP head's sizes."""
  sam: SamConfig = dataclasses.field(default_factory=lambda: SamConfig.from_name("vit_b"))
  head_depth: int = 3                    # transformer blocks in the CLIP head (paper: 3)
  head_mlp_hidden: tuple[int, ...] = ()  # the MLP's hidden widths; () -> two of 2 x embed_dim
  out_dim: int = 768                     # teacher embedding dim (OpenCLIP ViT-L/14: 768)

  def __post_init__(self):
    object.__setattr__(self, "head_mlp_hidden", tuple(int(h) for h in self.head_mlp_hidden))

  @property
  def mlp_hidden(self) -> tuple[int, ...]:
    e = self.sam.image_encoder.embed_dim
    return self.head_mlp_hidden or (2 * e, 2 * e)

  @classmethod
  def from_name(cls, name: str, out_dim: int = 768, **overrides) -> "SamClipConfig":
    """'vit_b' | 'vit_l' | 'vit_h' backbone."""
    return cls(sam=SamConfig.from_name(name), out_dim=out_dim, **overrides)

  def to_dict(self) -> dict:
    return {"model_type": MODEL_TYPE, "sam": self.sam.to_dict(), "head_depth": self.head_depth,
            "head_mlp_hidden": list(self.head_mlp_hidden), "out_dim": self.out_dim}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "SamClipConfig":
    d = {k: v for k, v in d.items() if k != "model_type"}
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown SamClipConfig keys: {sorted(unknown)}")
    sam = d.pop("sam")
    return cls(sam=sam if isinstance(sam, SamConfig) else SamConfig.from_dict(sam), **d)


def tiny_sam_config(image_size: int = 256, embed_dim: int = 64, depth: int = 2, num_heads: int = 2,
                    window_size: int = 4, prompt_embed_dim: int = 32) -> SamConfig:
  """A SAM small enough for CPU tests and the ':local' merge (same structure as vit_b)."""
  enc = ImageEncoderConfig(img_size=image_size, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, window_size=window_size,
                           global_attn_indexes=(depth - 1,), out_chans=prompt_embed_dim)
  return SamConfig(image_encoder=enc, prompt_embed_dim=prompt_embed_dim, image_size=image_size,
                   mask_in_chans=8, decoder_mlp_dim=2 * prompt_embed_dim, decoder_num_heads=2,
                   iou_head_hidden_dim=prompt_embed_dim)


class ProjectionMLP(nn.Module):
  """Dense -> GELU -> ... -> Dense (the CLIP head's projection to the teacher's space)."""
  hidden: tuple[int, ...]
  out_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dims = tuple(self.hidden) + (self.out_dim,)
    for i, d in enumerate(dims):
      last = i == len(dims) - 1
      # Hidden layers read a model-width-like input (EMBED) and write MLP; the last one
      # writes the teacher's embedding (EMBED) so FSDP still splits it.
      axes = (MLP, EMBED) if last else (EMBED, MLP)
      x = nn.Dense(d, dtype=self.dtype, name=f"layers_{i}",
                   kernel_init=param_with_axes(nn.initializers.lecun_normal(), *axes),
                   bias_init=param_with_axes(nn.initializers.zeros_init(), NONE if last else MLP))(x)
      if not last:
        x = nn.gelu(x, approximate=False)
    return x


class ClipHead(nn.Module):
  """Trunk tokens [B,h,w,E] -> (pooled [B,D], per-patch [B,h,w,D]), both float32."""
  config: SamClipConfig
  dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str | None = None  # vit_det.REMAT_POLICIES key
  attention: str | None = None  # vit_det.Attention implementation

  @nn.compact
  def __call__(self, tokens):
    enc = self.config.sam.image_encoder
    block = maybe_remat(Block, self.remat, self.remat_policy)
    x = tokens.astype(self.dtype)
    for i in range(self.config.head_depth):
      # Global attention (window 0) with rel-pos tables sized like the backbone's last block,
      # so its parameters copy over one to one.
      x = block(enc.embed_dim, enc.num_heads, enc.mlp_ratio, enc.qkv_bias, enc.use_rel_pos, 0,
                (enc.grid_size, enc.grid_size), self.dtype, attention=self.attention, name=f"blocks_{i}")(x)
    norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm",
                        scale_init=param_with_axes(nn.initializers.ones_init(), NORM),
                        bias_init=param_with_axes(nn.initializers.zeros_init(), NORM))
    mlp = ProjectionMLP(self.config.mlp_hidden, self.config.out_dim, self.dtype, name="mlp")
    pooled = mlp(norm(jnp.max(x, axis=(1, 2))))  # paper: max-pool, then LN, then MLP
    patch = mlp(norm(x))
    return pooled.astype(jnp.float32), patch.astype(jnp.float32)


class SamClipNet(nn.Module):
  """Shared ViT-Det backbone + SAM head (prompt encoder, mask decoder) + CLIP head."""
  config: SamClipConfig
  dtype: Dtype = jnp.float32  # compute dtype; parameters stay float32
  remat: bool = False
  remat_policy: str | None = None  # vit_det.REMAT_POLICIES key (implies remat)
  attention: str | None = None  # encoder's, CLIP head's and decoder's attention; None: per backend
  scan_blocks: bool = False  # ImageEncoderViT.scan_blocks (the backbone; the head has 3 blocks)

  def setup(self):
    cfg = self.config.sam
    self.image_encoder = ImageEncoderViT(cfg.image_encoder, dtype=self.dtype, remat=self.remat,
                                         remat_policy=self.remat_policy, attention=self.attention,
                                         scan_blocks=self.scan_blocks)
    # The same submodules (names and settings) as models.sam.Sam: SAM params load as they are.
    self.prompt_encoder = PromptEncoder(
        embed_dim=cfg.prompt_embed_dim, image_embedding_size=cfg.image_embedding_size,
        input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=cfg.mask_in_chans,
        dtype=self.dtype)
    self.mask_decoder = MaskDecoder(
        transformer_dim=cfg.prompt_embed_dim, num_multimask_outputs=cfg.num_multimask_outputs,
        iou_head_depth=cfg.iou_head_depth, iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        depth=cfg.decoder_depth, num_heads=cfg.decoder_num_heads, mlp_dim=cfg.decoder_mlp_dim,
        attention_downsample_rate=cfg.attention_downsample_rate, dtype=self.dtype,
        attention=self.attention)
    self.clip_head = ClipHead(self.config, self.dtype, self.remat, self.remat_policy, self.attention)

  def __call__(self, images, point_coords, point_labels, multimask_output: bool = False):
    """One backbone pass feeding both heads (stage 3 at 1024 px; also creates every parameter).

    -> (pooled [B,D], patch [B,h,w,D], masks [B,K,M,4h,4w], iou [B,K,M]).
    """
    embeddings, aux = self.image_encoder(images)
    pooled, patch = self.clip_head(aux["tokens"])
    masks, iou = self.predict_masks(embeddings, point_coords, point_labels, None, multimask_output)
    return pooled, patch, masks, iou

  def encode_image(self, images):
    """Normalised, padded images [B,H,W,3] -> (embeddings [B,H/16,W/16,C], aux with "tokens")."""
    return self.image_encoder(images)

  def clip_features(self, images):
    """Normalised images [B,H,W,3] (any multiple of 16) -> (pooled [B,D], patch [B,h,w,D])."""
    _, aux = self.image_encoder(images)
    return self.clip_head(aux["tokens"])

  def clip_features_from_tokens(self, tokens):
    return self.clip_head(tokens)

  def sam_masks(self, images_or_embeddings, point_coords, point_labels, mask_input=None,
                multimask_output: bool = False):
    """Images [B,S,S,3] or image embeddings [B,h,w,C] + K prompts -> (masks, iou) as Sam."""
    x = images_or_embeddings
    if x.shape[-1] != self.config.sam.prompt_embed_dim:
      x, _ = self.image_encoder(x)
    return self.predict_masks(x, point_coords, point_labels, mask_input, multimask_output)

  def get_dense_pe(self):
    return self.prompt_encoder.get_dense_pe()

  def predict_masks(self, image_embeddings, point_coords, point_labels, mask_input=None,
                    multimask_output: bool = False):
    sparse, dense = self.prompt_encoder(point_coords, point_labels, mask_input)
    return self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense,
                             multimask_output, present(point_labels))


# ----------------------------------------------------------------------------- parameters
def example_inputs(config: SamClipConfig, batch: int = 1, num_prompts: int = 1, num_points: int = 2):
  s = config.sam.image_size
  return (jnp.zeros((batch, s, s, 3), jnp.float32),
          jnp.zeros((batch, num_prompts, num_points, 2), jnp.float32),
          jnp.ones((batch, num_prompts, num_points), jnp.int32))


def init_params(config: SamClipConfig, rng=None):
  """Random parameters of the whole merged model (boxed with logical axis names)."""
  rng = jax.random.key(0) if rng is None else rng
  return SamClipNet(config).init(rng, *example_inputs(config))["params"]


def abstract_params(config: SamClipConfig, boxed: bool = False):
  """ShapeDtypeStruct tree of the parameters; boxed=True keeps the logical axis names."""
  tree = jax.eval_shape(lambda: init_params(config))
  return tree if boxed else nn.unbox(tree)


def init_clip_head(config: SamClipConfig, rng):
  """Fresh CLIP-head parameters (boxed). Param shapes don't depend on the token grid,
  so a 2x2 grid keeps init cheap at any model size."""
  e = config.sam.image_encoder.embed_dim
  return ClipHead(config).init(rng, jnp.zeros((1, 2, 2, e), jnp.float32))["params"]


def samclip_params_from_sam(sam_params, config: SamClipConfig, rng):
  """SAM params -> SamClip params: backbone + SAM head copied, CLIP head blocks = last block.

  Each clip_head/blocks_i is a copy of image_encoder/blocks_{depth-1}; LayerNorm and MLP are
  fresh from `rng`. Works on boxed or plain trees; jit it with out_shardings to build
  straight into a sharded layout.
  """
  sam_params = nn.unbox(sam_params)
  last = sam_params["image_encoder"][f"blocks_{config.sam.image_encoder.depth - 1}"]
  head = dict(nn.unbox(init_clip_head(config, rng)))
  for i in range(config.head_depth):
    head[f"blocks_{i}"] = jax.tree.map(jnp.array, last)  # a copy, not an alias
  return {"image_encoder": sam_params["image_encoder"], "prompt_encoder": sam_params["prompt_encoder"],
          "mask_decoder": sam_params["mask_decoder"], "clip_head": head}


def sam_params_from_samclip(params):
  """The SAM part of SamClip params (a valid `Sam` params tree)."""
  return {k: params[k] for k in ("image_encoder", "prompt_encoder", "mask_decoder")}


# ----------------------------------------------------------------------------- model directories
def save_samclip(directory: str, config: SamClipConfig, params, extra: Mapping[str, Any] | None = None):
  """Writes a merged model directory (model_type "samclip"), atomically."""
  meta = config.to_dict()
  meta.update(extra or {})
  checkpoint.save_model(directory, jax.tree.map(np.asarray, nn.unbox(params)), meta)


def _config_from_meta(meta: Mapping[str, Any]) -> SamClipConfig:
  # config.json also holds run facts (step, stage, teacher paths): keep the model's keys.
  known = {f.name for f in dataclasses.fields(SamClipConfig)} | {"model_type"}
  return SamClipConfig.from_dict({k: v for k, v in meta.items() if k in known})


def load_samclip_config(directory: str) -> SamClipConfig:
  """The SamClipConfig of a merged model dir, without reading its parameters."""
  return _config_from_meta(checkpoint.load_config(directory, expected_type=MODEL_TYPE))


def load_samclip(directory: str, target=None) -> tuple[SamClipConfig, dict]:
  """Reads a model directory written by save_samclip -> (SamClipConfig, params); `target` as
  checkpoint.load_model."""
  params, meta = checkpoint.load_model(directory, expected_type=MODEL_TYPE, target=target)
  return _config_from_meta(meta), params


__all__ = ["SamClipConfig", "SamClipNet", "ClipHead", "tiny_sam_config", "init_params",
           "abstract_params", "samclip_params_from_sam", "sam_params_from_samclip",
           "save_samclip", "load_samclip", "load_samclip_config", "MODEL_TYPE"]
