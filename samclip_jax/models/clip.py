"""OpenCLIP's ViT image tower and text tower (open_clip/transformer.py, model.py) in Flax linen;
the ModifiedResNet image tower (RN50 family) lives in modified_resnet.py.

Parameter names mirror open_clip's state dict (`visual.transformer.resblocks.3.attn.in_proj_weight`
-> `visual/transformer/resblocks_3/attn/in_proj/kernel`), so convert/open_clip.py reads like a
rename. The image tower takes any input size: the position embedding is resampled to the token
grid with the weights of open_clip's `resize_pos_embed` (PyTorch bicubic, antialiased, class
token kept), computed exactly as a separable matrix product.
"""
import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from samclip_jax.interpolate import bicubic_matrix
from samclip_jax.sharding import CONV_IN, EMBED, HEADS, MLP, NONE, NORM, POS, VOCAB, param_with_axes

Dtype = Any
_HIGHEST = jax.lax.Precision.HIGHEST

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407  # The largest id of the OpenAI BPE vocab, hence open_clip's argmax pooling.
MODEL_TYPE = "open_clip"


def normalize_images(images, dtype: Dtype = jnp.float32):
  """uint8 [..., 3] RGB -> (x / 255 - OPENAI_DATASET_MEAN) / OPENAI_DATASET_STD (jit-friendly)."""
  mean = jnp.asarray(OPENAI_DATASET_MEAN, jnp.float32)
  std = jnp.asarray(OPENAI_DATASET_STD, jnp.float32)
  return ((jnp.asarray(images, jnp.float32) / 255.0 - mean) / std).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Configs: the schema of open_clip's model_configs/*.json (the subset this port implements).

@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """open_clip's CLIPVisionCfg: a ViT tower, or a ModifiedResNet when `layers` is a 4-tuple (RN50:
  (3, 4, 6, 3), width 64, no patch_size); defaults are open_clip's."""
  image_size: int | tuple[int, int] = 224
  patch_size: int | None = 16
  width: int = 768
  layers: int | tuple[int, ...] = 12
  head_width: int = 64
  mlp_ratio: float = 4.0
  ls_init_value: float | None = None
  no_ln_pre: bool = False
  pool_type: str = "tok"
  final_ln_after_pool: bool = False
  norm_eps: float = 1e-5

  def __post_init__(self):
    if isinstance(self.image_size, (list, tuple)):
      size = tuple(int(s) for s in self.image_size)
      object.__setattr__(self, "image_size", size[0] if size[0] == size[1] else size)
    if isinstance(self.layers, (list, tuple)):
      object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
      if len(self.layers) != 4:
        raise ValueError(f"a ModifiedResNet tower has 4 stages, got layers={self.layers}")
    elif not self.patch_size:
      raise ValueError("a ViT tower needs a patch_size")
    if self.tower_width % self.head_width:
      raise ValueError(f"vision width {self.tower_width} is not a multiple of head_width {self.head_width}")
    if self.pool_type not in ("tok", "avg"):
      raise ValueError(f"vision pool_type {self.pool_type!r} not supported (expected 'tok' or 'avg')")

  @property
  def is_resnet(self) -> bool:
    return isinstance(self.layers, tuple)

  @property
  def tower_width(self) -> int:
    """Width of the attention layers: the ViT's, or the ResNet's final features (32 x width)."""
    return self.width * 32 if self.is_resnet else self.width

  @property
  def heads(self) -> int:
    return self.tower_width // self.head_width

  @property
  def image_hw(self) -> tuple[int, int]:
    s = self.image_size
    return (s, s) if isinstance(s, int) else tuple(s)

  @property
  def grid_size(self) -> tuple[int, int]:
    """Token grid at image_size: the stored size of the position embedding."""
    h, w = self.image_hw
    return h // self.patch_size, w // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """open_clip's CLIPTextCfg for the built-in TextTransformer; defaults are open_clip's."""
  context_length: int = 77
  vocab_size: int = 49408
  width: int = 512
  heads: int = 8
  layers: int = 12
  mlp_ratio: float = 4.0
  ls_init_value: float | None = None
  no_causal_mask: bool = False
  pool_type: str = "argmax"
  eos_id: int = 2  # open_clip's default; read only by pool_type 'eos'.
  proj_type: str = "linear"
  proj_bias: bool = False
  norm_eps: float = 1e-5

  def __post_init__(self):
    if self.width % self.heads:
      raise ValueError(f"text width {self.width} is not a multiple of heads {self.heads}")
    if self.pool_type not in ("argmax", "eos", "first", "last"):
      raise ValueError(f"text pool_type {self.pool_type!r} not supported")
    if self.proj_type not in ("linear", "none"):
      raise ValueError(f"text proj_type {self.proj_type!r} not supported (expected 'linear' or 'none')")


# Fields of open_clip's configs that only matter for training or for other model families; a
# non-default value of anything else not listed in the dataclasses is refused.
_IGNORED_VISION = {"patch_dropout": 0.0, "output_tokens": None, "pos_embed_type": None}
_IGNORED_TEXT = {"output_tokens": None, "pad_id": None, "tokenizer_mode": None}
_UNSUPPORTED_DEFAULTS = {
  "timm_model_name": None, "attentional_pool": False, "block_type": None, "qk_norm": False,
  "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
  "scale_fc": False, "act_kwargs": None, "hf_model_name": None, "hf_tokenizer_name": None,
  "tokenizer_kwargs": None, "embed_cls": False,
}


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """An OpenCLIP ViT model: open_clip's top-level config (embed_dim, quick_gelu, towers)."""
  embed_dim: int = 512
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  quick_gelu: bool = False
  init_logit_scale: float = math.log(1 / 0.07)

  @classmethod
  def from_name(cls, name: str) -> "ClipConfig":
    """open_clip model name: "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", ... ."""
    base = name[:-len("-quickgelu")] if name.endswith("-quickgelu") else name
    if base not in _OPEN_CLIP_CONFIGS:
      raise ValueError(f"unknown open_clip model {name!r}; known: {', '.join(known_models())} "
                       "(or pass its model config dict to ClipConfig.from_open_clip_config)")
    cfg = json.loads(json.dumps(_OPEN_CLIP_CONFIGS[base]))
    if base != name:
      cfg["quick_gelu"] = True
    return cls.from_open_clip_config(cfg)

  @classmethod
  def from_open_clip_config(cls, cfg: Mapping[str, Any]) -> "ClipConfig":
    """Parses an open_clip model config dict (the JSON schema of open_clip/model_configs)."""
    problems = []
    top = dict(cfg)
    vision, text = dict(top.pop("vision_cfg", {})), dict(top.pop("text_cfg", {}))
    kwargs = {}
    for key in ("embed_dim", "quick_gelu", "init_logit_scale"):
      if key in top:
        kwargs[key] = top.pop(key)
    for key, default in (("custom_text", False), ("init_logit_bias", None), ("multimodal_cfg", None),
                         ("nonscalar_logit_scale", False)):
      value = top.pop(key, default)
      if value != default:
        problems.append(f"{key}={value!r}")
    problems += [f"unknown top-level key {k!r}" for k in top]
    vkw = _tower_kwargs(VisionConfig, vision, _IGNORED_VISION, "vision_cfg", problems)
    if vision.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):
      problems.append(f"vision_cfg.pos_embed_type={vision['pos_embed_type']!r}")
    tkw = _tower_kwargs(TextConfig, text, _IGNORED_TEXT, "text_cfg", problems)
    if problems:
      raise ValueError("open_clip config not supported by this port: " + "; ".join(problems))
    return cls(vision=VisionConfig(**vkw), text=TextConfig(**tkw), **kwargs)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    if isinstance(self.vision.image_size, tuple):
      d["vision"]["image_size"] = list(self.vision.image_size)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ClipConfig":
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown ClipConfig keys: {sorted(unknown)}")
    d["vision"] = VisionConfig(**d.get("vision", {}))
    d["text"] = TextConfig(**d.get("text", {}))
    return cls(**d)


def _tower_kwargs(klass, cfg, ignored, where, problems):
  """open_clip tower dict -> dataclass kwargs; anything this port cannot honour -> problems."""
  fields = {f.name for f in dataclasses.fields(klass)}
  out = {}
  for key, value in cfg.items():
    if key in fields:
      out[key] = value
    elif key == "norm_kwargs":
      extra = set(value or {}) - {"eps"}
      if extra:
        problems.append(f"{where}.norm_kwargs {sorted(extra)}")
      if value and "eps" in value:
        out["norm_eps"] = float(value["eps"])
    elif key in ignored:
      continue
    elif key in _UNSUPPORTED_DEFAULTS:
      if value != _UNSUPPORTED_DEFAULTS[key]:
        problems.append(f"{where}.{key}={value!r}")
    elif key.startswith(("timm_", "hf_", "attn_pooler_")):
      continue  # Settings of towers that the *_name / attentional_pool keys above refuse.
    else:
      problems.append(f"unknown key {where}.{key}")
  return out


# open_clip 3.3's model_configs for the models this project uses ("-quickgelu" names add
# quick_gelu=True). The library never imports open_clip, so the table is bundled here.
_B_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}
_L_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}
_H_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}
_OPEN_CLIP_CONFIGS = {
  "RN50": {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 64, "patch_size": None},
           "text_cfg": _B_TEXT},
  "RN101": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": [3, 4, 23, 3], "width": 64, "patch_size": None},
            "text_cfg": _B_TEXT},
  "ViT-B-32": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
               "text_cfg": _B_TEXT},
  "ViT-B-16": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
               "text_cfg": _B_TEXT},
  "ViT-L-14": {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
               "text_cfg": _L_TEXT},
  "ViT-L-14-336": {"embed_dim": 768,
                   "vision_cfg": {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14},
                   "text_cfg": _L_TEXT},
  "ViT-H-14": {"embed_dim": 1024,
               "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
               "text_cfg": _H_TEXT},
  "ViT-g-14": {"embed_dim": 1024,
               "vision_cfg": {"image_size": 224, "layers": 40, "width": 1408, "head_width": 88,
                              "mlp_ratio": 4.3637, "patch_size": 14},
               "text_cfg": _H_TEXT},
  "ViT-bigG-14": {"embed_dim": 1280,
                  "vision_cfg": {"image_size": 224, "layers": 48, "width": 1664, "head_width": 104,
                                 "mlp_ratio": 4.9231, "patch_size": 14},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20, "layers": 32}},
}
_QUICKGELU_NAMES = ("RN50", "RN101", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-bigG-14")


def known_models() -> list[str]:
  """Model names ClipConfig.from_name accepts."""
  return sorted(list(_OPEN_CLIP_CONFIGS) + [f"{n}-quickgelu" for n in _QUICKGELU_NAMES])


# ---------------------------------------------------------------------------------------------
# Position-embedding resampling with PyTorch's F.interpolate(mode='bicubic') weights.

def resample_pos_embed(pos: jax.Array, old_grid: tuple[int, int], new_grid: tuple[int, int],
                       antialias: bool = True) -> jax.Array:
  """[1 + h*w, D] table (class token first) -> [1 + H*W, D], as open_clip's resize_pos_embed."""
  if tuple(old_grid) == tuple(new_grid):
    return pos
  cls_tok, grid = pos[:1], pos[1:].reshape(*old_grid, pos.shape[-1])
  mh = jnp.asarray(bicubic_matrix(old_grid[0], new_grid[0], antialias), pos.dtype)
  mw = jnp.asarray(bicubic_matrix(old_grid[1], new_grid[1], antialias), pos.dtype)
  grid = jnp.einsum("ia,abd->ibd", mh, grid, precision=_HIGHEST)
  grid = jnp.einsum("jb,ibd->ijd", mw, grid, precision=_HIGHEST)
  return jnp.concatenate([cls_tok, grid.reshape(-1, pos.shape[-1])], axis=0)


# ---------------------------------------------------------------------------------------------
# Modules.

def _dense(features: int, name: str, axes: tuple, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                  kernel_init=param_with_axes(nn.initializers.lecun_normal(), *axes),
                  bias_init=param_with_axes(nn.initializers.zeros_init(), axes[-1]))


def _layer_norm(name: str, eps: float, dtype: Dtype) -> nn.LayerNorm:
  # torch's LayerNorm eps is 1e-5 (flax's default is 1e-6); flax computes statistics in float32.
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name,
                      scale_init=param_with_axes(nn.initializers.ones_init(), NORM),
                      bias_init=param_with_axes(nn.initializers.zeros_init(), NORM))


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def attention_per_head(q, k, v, causal: bool = False):
  """Softmax attention one head at a time (batch kept whole): [B, N, H, d] -> [B, N, H, d].

  On CPU this runs about 2x faster than one einsum over all heads (ViT-L/14, batch 8): the
  [B, N, N] logits of one head stay in cache instead of a [B, H, N, N] tensor going through
  memory three times. The batch axis is untouched, so a batch-sharded input stays sharded.
  """
  n, d = q.shape[1], q.shape[3]
  heads_first = lambda x: x.transpose(2, 0, 1, 3)  # [H, B, N, d]
  mask = jnp.tril(jnp.ones((n, n), bool)) if causal else None

  def one(qkv):
    qh, kh, vh = qkv
    logits = jnp.einsum("bqd,bkd->bqk", qh * d ** -0.5, kh, preferred_element_type=jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(logits, axis=-1).astype(vh.dtype), vh)

  out = jax.lax.map(one, (heads_first(q), heads_first(k), heads_first(v)))
  return out.transpose(1, 2, 0, 3)


class MultiheadAttention(nn.Module):
  """torch nn.MultiheadAttention (fused in_proj, out_proj) for self-attention.

  implementation: "per_head" (attention_per_head), or "xla" / "cudnn" for
  jax.nn.dot_product_attention; None picks per_head on CPU and jax's default elsewhere.
  """
  width: int
  heads: int
  dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x, causal: bool = False):
    b, n, _ = x.shape
    qkv = _dense(3 * self.width, "in_proj", (EMBED, HEADS), self.dtype)(x)
    q, k, v = jnp.split(qkv.reshape(b, n, 3 * self.heads, self.width // self.heads), 3, axis=2)
    impl = self.implementation
    if impl == "per_head" or (impl is None and jax.default_backend() == "cpu"):
      out = attention_per_head(q, k, v, causal)
    else:
      out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
    return _dense(self.width, "out_proj", (HEADS, EMBED), self.dtype)(out.reshape(b, n, self.width))


class Mlp(nn.Module):
  """c_fc -> GELU (exact, or QuickGELU for OpenAI-trained weights) -> c_proj."""
  width: int
  hidden: int
  quick_gelu: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _dense(self.hidden, "c_fc", (EMBED, MLP), self.dtype)(x)
    x = quick_gelu(x) if self.quick_gelu else nn.gelu(x, approximate=False)
    return _dense(self.width, "c_proj", (MLP, EMBED), self.dtype)(x)


class LayerScale(nn.Module):
  """Per-channel residual scale (`ls_1.gamma`) of open_clip's ls_init_value option."""
  init_value: float

  @nn.compact
  def __call__(self, x):
    init = param_with_axes(nn.initializers.constant(self.init_value), EMBED)
    return x * self.param("gamma", init, (x.shape[-1],)).astype(x.dtype)


class ResidualAttentionBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
  width: int
  heads: int
  mlp_ratio: float = 4.0
  quick_gelu: bool = False
  ls_init_value: float | None = None
  norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  attention: str | None = None

  @nn.compact
  def __call__(self, x, causal: bool = False):
    def scale(name, y):  # open_clip's ls_1 / ls_2 (nn.Identity without ls_init_value)
      return y if self.ls_init_value is None else LayerScale(self.ls_init_value, name=name)(y)

    attn = MultiheadAttention(self.width, self.heads, self.dtype, self.attention, name="attn")
    x = x + scale("ls_1", attn(_layer_norm("ln_1", self.norm_eps, self.dtype)(x), causal))
    mlp = Mlp(self.width, int(self.width * self.mlp_ratio), self.quick_gelu, self.dtype, name="mlp")
    return x + scale("ls_2", mlp(_layer_norm("ln_2", self.norm_eps, self.dtype)(x)))


class Transformer(nn.Module):
  """open_clip's Transformer: `resblocks_i`."""
  width: int
  layers: int
  heads: int
  mlp_ratio: float = 4.0
  quick_gelu: bool = False
  ls_init_value: float | None = None
  norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention: str | None = None

  @nn.compact
  def __call__(self, x, causal: bool = False):
    block = nn.remat(ResidualAttentionBlock, static_argnums=(2,)) if self.remat else ResidualAttentionBlock
    for i in range(self.layers):
      x = block(self.width, self.heads, self.mlp_ratio, self.quick_gelu, self.ls_init_value,
                self.norm_eps, self.dtype, self.attention, name=f"resblocks_{i}")(x, causal)
    return x


class VisionTransformer(nn.Module):
  """open_clip's VisionTransformer; returns (pooled [B, D], aux)."""
  config: VisionConfig
  output_dim: int
  quick_gelu: bool = False
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention: str | None = None

  @nn.compact
  def __call__(self, pixels, dense: bool = False):
    """pixels [B, H, W, 3] normalised; aux = {"tokens": [B, h, w, width] patch tokens}."""
    cfg = self.config
    p, width = cfg.patch_size, cfg.width
    scale = width ** -0.5
    x = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                kernel_init=param_with_axes(nn.initializers.lecun_normal(), NONE, NONE, CONV_IN, EMBED),
                name="conv1")(pixels.astype(self.dtype))
    b, h, w, _ = x.shape
    cls_emb = self.param("class_embedding", param_with_axes(nn.initializers.normal(scale), EMBED), (width,))
    pos = self.param("positional_embedding", param_with_axes(nn.initializers.normal(scale), POS, EMBED),
                     (cfg.grid_size[0] * cfg.grid_size[1] + 1, width))
    pos = resample_pos_embed(pos, cfg.grid_size, (h, w))
    cls_tok = jnp.broadcast_to(cls_emb.astype(self.dtype), (b, 1, width))
    x = jnp.concatenate([cls_tok, x.reshape(b, h * w, width)], axis=1) + pos.astype(self.dtype)
    if not cfg.no_ln_pre:
      x = _layer_norm("ln_pre", cfg.norm_eps, self.dtype)(x)
    x = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, self.quick_gelu, cfg.ls_init_value,
                    cfg.norm_eps, self.dtype, self.remat, self.attention, name="transformer")(x)
    ln_post = _layer_norm("ln_post", cfg.norm_eps, self.dtype)
    if not cfg.final_ln_after_pool:
      x = ln_post(x)
    pooled = x[:, 0] if cfg.pool_type == "tok" else x[:, 1:].mean(axis=1)
    if cfg.final_ln_after_pool:
      pooled = ln_post(pooled)
    proj = self.param("proj", param_with_axes(nn.initializers.normal(scale), EMBED, NONE),
                      (width, self.output_dim))
    pooled = pooled @ proj.astype(self.dtype)
    aux = {}
    if dense:  # Patch tokens through the same head as the pooled token (MaskCLIP-style features).
      tokens = x[:, 1:]
      aux["tokens"] = tokens.reshape(b, h, w, width)
      if cfg.final_ln_after_pool:
        tokens = ln_post(tokens)
      aux["patch_embeddings"] = (tokens @ proj.astype(self.dtype)).reshape(b, h, w, self.output_dim)
    return pooled, aux


class CLIP(nn.Module):
  """open_clip.CLIP (ViT or ModifiedResNet image tower): encode_image / encode_text give
  unnormalised embeddings."""
  config: ClipConfig
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention: str | None = None  # MultiheadAttention.implementation
  batch_stats: bool = False  # ModifiedResNet: BatchNorm on the batch's statistics (training)

  def setup(self):
    cfg, t = self.config, self.config.text
    self.visual = image_tower(cfg, self.dtype, self.remat, self.attention, self.batch_stats)
    self.token_embedding = nn.Embed(
        t.vocab_size, t.width, dtype=self.dtype,
        embedding_init=param_with_axes(nn.initializers.normal(0.02), VOCAB, EMBED))
    self.positional_embedding = self.param(
        "positional_embedding", param_with_axes(nn.initializers.normal(0.01), POS, EMBED),
        (t.context_length, t.width))
    self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, cfg.quick_gelu,
                                   t.ls_init_value, t.norm_eps, self.dtype, self.remat, self.attention)
    self.ln_final = _layer_norm("ln_final", t.norm_eps, self.dtype)
    if t.proj_type == "none":
      self.text_projection = None
    elif t.proj_bias:
      self.text_projection = _dense(cfg.embed_dim, "text_projection", (EMBED, NONE), self.dtype)
    else:
      self.text_projection = self.param(
          "text_projection", param_with_axes(nn.initializers.normal(t.width ** -0.5), EMBED, NONE),
          (t.width, cfg.embed_dim))
    self.logit_scale = self.param(
        "logit_scale", param_with_axes(nn.initializers.constant(cfg.init_logit_scale)), ())

  def encode_image(self, pixels, dense: bool = False):
    """[B, H, W, 3] normalised pixels -> [B, D]; with dense=True also aux (patch tokens)."""
    pooled, aux = self.visual(pixels, dense=dense)
    return (pooled, aux) if dense else pooled

  def encode_text(self, ids):
    """[B, L] token ids (L <= context_length) -> [B, D]."""
    t = self.config.text
    n = ids.shape[1]
    x = self.token_embedding(ids) + self.positional_embedding[:n].astype(self.dtype)
    x = self.ln_final(self.transformer(x, not t.no_causal_mask))
    pooled = x[jnp.arange(x.shape[0]), _text_pool_index(ids, t)]
    if self.text_projection is None:
      return pooled
    if isinstance(self.text_projection, nn.Module):
      return self.text_projection(pooled)
    return pooled @ self.text_projection.astype(self.dtype)

  def __call__(self, pixels, ids):
    """(image embeddings, text embeddings, logit_scale); used to initialise every parameter."""
    return self.encode_image(pixels), self.encode_text(ids), self.logit_scale


def image_tower(cfg: ClipConfig, dtype: Dtype = jnp.float32, remat: bool = False,
                attention: str | None = None, batch_stats: bool = False) -> nn.Module:
  """The image tower of `cfg`; its __call__(pixels, dense) gives (pooled embeddings, aux)."""
  from samclip_jax.models.modified_resnet import ModifiedResNet
  if cfg.vision.is_resnet:
    return ModifiedResNet(cfg.vision, cfg.embed_dim, batch_stats, dtype)
  return VisionTransformer(cfg.vision, cfg.embed_dim, cfg.quick_gelu, dtype, remat, attention)


def _text_pool_index(ids, t: TextConfig):
  if t.pool_type == "argmax":
    # open_clip's text.argmax(-1): the FIRST end-of-text id (the largest id of the OpenAI vocab),
    # whether padding is 0 (open_clip) or 49407 (transformers' CLIPTokenizer).
    return jnp.argmax(ids, axis=-1)
  if t.pool_type == "eos":
    return jnp.argmax(ids == t.eos_id, axis=-1)
  if t.pool_type == "first":
    return jnp.zeros(ids.shape[:1], jnp.int32)
  return jnp.full(ids.shape[:1], ids.shape[1] - 1, jnp.int32)


# ---------------------------------------------------------------------------------------------
# Parameters and model directories.

def init_variables(config: ClipConfig, rng=None, dtype: Dtype = jnp.float32):
  """Boxed (logically partitioned) variables of CLIP(config), for sharding specs."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  h, w = config.vision.image_hw
  pixels = jnp.zeros((1, h, w, 3), jnp.float32)
  ids = jnp.zeros((1, config.text.context_length), jnp.int32)
  return CLIP(config, dtype=dtype).init(rng, pixels, ids)


def abstract_params(config: ClipConfig) -> dict:
  """The params tree of CLIP(config) as jax.ShapeDtypeStructs (no memory, no compute)."""
  return nn.unbox(jax.eval_shape(functools.partial(init_variables, config)))["params"]


def load_clip_config(directory: str) -> ClipConfig:
  """The ClipConfig of an OpenCLIP model dir, without reading its parameters."""
  from samclip_jax import checkpoint
  return ClipConfig.from_dict(checkpoint.load_config(directory, expected_type=MODEL_TYPE)["config"])


def load_clip(directory: str, target=None, partial: bool = False) -> tuple[ClipConfig, dict]:
  """Reads a model directory written by convert/open_clip.py -> (ClipConfig, params);
  `target` / `partial` as checkpoint.load_model (e.g. {"visual": ...} restores the image tower)."""
  from samclip_jax import checkpoint  # Orbax is only needed here.
  params, meta = checkpoint.load_model(directory, expected_type=MODEL_TYPE, target=target, partial=partial)
  return ClipConfig.from_dict(meta["config"]), params


def tokenizer_files(directory: str) -> tuple[str, str]:
  """(vocab.json, merges.txt) paths of a model directory."""
  return os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
