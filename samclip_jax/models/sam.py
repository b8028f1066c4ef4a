"""SAM's prompt encoder, two-way transformer and mask decoder, and the whole Sam model.

A port of segment_anything's prompt_encoder.py, transformer.py, mask_decoder.py and sam.py
(NHWC). Parameter names mirror the PyTorch state dict so convert/sam.py's table stays
readable: `mask_decoder.output_upscaling.0.weight` -> `mask_decoder/output_upscaling_0/kernel`.

Prompts are fixed-shape: a sparse prompt is a sequence of points with labels
  -2 absent, -1 padding / not a point, 0 negative, 1 positive, 2 box top-left, 3 box bottom-right,
in the frame of the padded model input (1024 px for the released models). An absent slot is
no token at all (masked out of the two-way transformer's attention): fixed-shape batches of
prompts of different lengths then compute exactly what SAM computes on each prompt. `build_sparse_prompt`
turns (points, labels, box) into the sequence PyTorch's PromptEncoder builds, which gives
identical embeddings.
"""
import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from samclip_jax import checkpoint
from samclip_jax.models.vit_det import ATTENTION, ImageEncoderConfig, ImageEncoderViT, LayerNorm2d, MLPBlock, dense
from samclip_jax.sharding import CONV_IN, CONV_OUT, EMBED, HEADS, MLP, NONE, NORM, param_with_axes

Dtype = Any

# config.json keys that describe a model directory rather than the model.
METADATA_KEYS = ("model_type", "source")

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
MASK_THRESHOLD = 0.0

# Labels of the fixed-shape sparse prompt (ABSENT: a slot with no token, see the docstring).
ABSENT, PAD, NEGATIVE, POSITIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = -2, -1, 0, 1, 2, 3

_gelu = functools.partial(nn.gelu, approximate=False)  # torch.nn.GELU is the erf form


@dataclasses.dataclass(frozen=True)
class SamConfig:
  """Image encoder + prompt encoder + mask decoder sizes (defaults: segment_anything's)."""
  image_encoder: ImageEncoderConfig = dataclasses.field(default_factory=lambda: ImageEncoderConfig.from_name("vit_b"))
  prompt_embed_dim: int = 256
  image_size: int = 1024
  mask_in_chans: int = 16
  decoder_depth: int = 2
  decoder_mlp_dim: int = 2048
  decoder_num_heads: int = 8
  attention_downsample_rate: int = 2
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256

  def __post_init__(self):
    enc = self.image_encoder
    if enc.img_size != self.image_size:
      raise ValueError(f"image_size {self.image_size} != image_encoder.img_size {enc.img_size}")
    if enc.out_chans != self.prompt_embed_dim:
      raise ValueError(f"image_encoder.out_chans {enc.out_chans} != prompt_embed_dim {self.prompt_embed_dim}")

  @property
  def image_embedding_size(self) -> tuple[int, int]:
    n = self.image_size // self.image_encoder.patch_size
    return (n, n)

  @property
  def mask_input_size(self) -> tuple[int, int]:
    h, w = self.image_embedding_size
    return (4 * h, 4 * w)

  @classmethod
  def from_name(cls, name: str) -> "SamConfig":
    """'vit_b' | 'vit_l' | 'vit_h' (the released SAM models)."""
    return cls(image_encoder=ImageEncoderConfig.from_name(name))

  def to_dict(self) -> dict:
    """JSON-ready, with the "model_type" key model directories need."""
    d = dataclasses.asdict(self)
    d["image_encoder"] = self.image_encoder.to_dict()
    d["model_type"] = "sam"
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "SamConfig":
    d = {k: v for k, v in d.items() if k not in METADATA_KEYS}
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown SamConfig keys: {sorted(unknown)}")
    enc = d.pop("image_encoder")
    if not isinstance(enc, ImageEncoderConfig):
      enc = ImageEncoderConfig.from_dict(enc)
    return cls(image_encoder=enc, **d)


# ----------------------------------------------------------------------------- layers


def _conv(features, kernel, dtype):
  return nn.Conv(features, (kernel, kernel), strides=(kernel, kernel), padding="VALID", dtype=dtype,
                 kernel_init=param_with_axes(nn.initializers.lecun_normal(), NONE, NONE, CONV_IN, CONV_OUT),
                 bias_init=param_with_axes(nn.initializers.zeros_init(), CONV_OUT))


def _conv_transpose(features, dtype, name):
  # transpose_kernel=True is PyTorch's ConvTranspose2d (the gradient of a conv): kernel
  # (kh, kw, out, in) = torch weight (in, out, kh, kw).transpose(2, 3, 1, 0), no flip needed.
  return nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding="VALID", transpose_kernel=True,
                          dtype=dtype, name=name,
                          kernel_init=param_with_axes(nn.initializers.lecun_normal(), NONE, NONE, CONV_OUT, CONV_IN),
                          bias_init=param_with_axes(nn.initializers.zeros_init(), CONV_OUT))


def _layer_norm(dtype, name=None):
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, name=name,  # torch.nn.LayerNorm default eps
                      scale_init=param_with_axes(nn.initializers.ones_init(), NORM),
                      bias_init=param_with_axes(nn.initializers.zeros_init(), NORM))


class Embedding(nn.Module):
  """A learned table (torch nn.Embedding read whole through `.weight`)."""
  num_embeddings: int
  features: int

  @nn.compact
  def __call__(self):
    return self.param("embedding", param_with_axes(nn.initializers.normal(1.0), NONE, EMBED),
                      (self.num_embeddings, self.features))


class MLPHead(nn.Module):
  """Dense layers with ReLU between them (segment_anything mask_decoder.MLP)."""
  hidden_dim: int
  output_dim: int
  num_layers: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = dense(self.output_dim if last else self.hidden_dim, (EMBED, NONE if last else MLP), self.dtype,
                 name=f"layers_{i}")(x)
      if not last:
        x = nn.relu(x)
    return x


# ----------------------------------------------------------------------------- prompt encoder


class PositionEmbeddingRandom(nn.Module):
  """Fourier features of [0, 1]^2 coordinates with a fixed random Gaussian matrix."""
  num_pos_feats: int

  def setup(self):
    # A buffer in PyTorch; a parameter here (frozen with the prompt encoder).
    self.positional_encoding_gaussian_matrix = self.param(
        "positional_encoding_gaussian_matrix", param_with_axes(nn.initializers.normal(1.0), NONE, NONE),
        (2, self.num_pos_feats))

  def _pe_encoding(self, coords):
    """coords [..., 2] in [0, 1] -> [..., 2 * num_pos_feats] (float32: sin of large arguments)."""
    g = self.positional_encoding_gaussian_matrix.astype(jnp.float32)
    coords = 2 * coords.astype(jnp.float32) - 1
    # Two multiply-adds, not a matmul: float32 whatever the default matmul precision (a bf16
    # pass would blur 2*pi*x*g at SAM's high frequencies).
    coords = coords[..., 0:1] * g[0] + coords[..., 1:2] * g[1]
    coords = 2 * np.pi * coords
    return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

  def __call__(self, size: tuple[int, int]):
    """Dense encoding of an (h, w) grid of cell centres -> [h, w, C]."""
    h, w = size
    y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    grid = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
    return self._pe_encoding(grid)

  def forward_with_coords(self, coords, image_size: tuple[int, int]):
    """coords [..., 2] as (x, y) pixels of an (H, W) image -> [..., C]."""
    scale = jnp.array([image_size[1], image_size[0]], jnp.float32)
    return self._pe_encoding(coords.astype(jnp.float32) / scale)


class PromptEncoder(nn.Module):
  """Embeds sparse (points/box corners) and dense (low-res mask) prompts."""
  embed_dim: int
  image_embedding_size: tuple[int, int]
  input_image_size: tuple[int, int]
  mask_in_chans: int
  dtype: Dtype = jnp.float32

  def setup(self):
    self.pe_layer = PositionEmbeddingRandom(self.embed_dim // 2)
    # Labels 0, 1 (neg/pos point), 2, 3 (box corners).
    self.point_embeddings = [Embedding(1, self.embed_dim) for _ in range(4)]
    self.not_a_point_embed = Embedding(1, self.embed_dim)
    c = self.mask_in_chans
    # Indices as in the torch nn.Sequential (activations hold no parameters).
    self.mask_downscaling = [
        _conv(c // 4, 2, self.dtype), LayerNorm2d(c // 4, dtype=self.dtype), _gelu,
        _conv(c, 2, self.dtype), LayerNorm2d(c, dtype=self.dtype), _gelu,
        _conv(self.embed_dim, 1, self.dtype),
    ]
    self.no_mask_embed = Embedding(1, self.embed_dim)

  def get_dense_pe(self):
    """Positional encoding of the image-embedding grid, [h, w, C]."""
    return self.pe_layer(self.image_embedding_size).astype(self.dtype)

  def embed_points(self, coords, labels):
    """coords [..., N, 2] (x, y input pixels), labels [..., N] in {-1..3} -> [..., N, C]."""
    pe = self.pe_layer.forward_with_coords(coords + 0.5, self.input_image_size)  # pixel centres
    labels = labels.astype(jnp.int32)
    pe = jnp.where((labels <= PAD)[..., None], 0.0, pe)
    table = jnp.concatenate([self.not_a_point_embed()] + [e() for e in self.point_embeddings], axis=0)
    # An absent slot embeds as padding; the decoder's attention never reads it.
    return (pe + jnp.take(table.astype(jnp.float32), jnp.maximum(labels, PAD) + 1, axis=0)).astype(self.dtype)

  def embed_masks(self, masks):
    """masks [..., 4h, 4w, 1] (logits) -> [..., h, w, C]."""
    lead = masks.shape[:-3]
    x = masks.reshape((-1,) + masks.shape[-3:]).astype(self.dtype)
    for layer in self.mask_downscaling:
      x = layer(x)
    return x.reshape(lead + x.shape[1:])

  def __call__(self, coords, labels, masks=None):
    """-> (sparse [..., N, C], dense [..., h, w, C]); no mask -> the learned no_mask_embed."""
    sparse = self.embed_points(coords, labels)
    if self.is_initializing():  # create the parameters of both dense paths whichever is used
      self.no_mask_embed()
      self.embed_masks(jnp.zeros((1,) + tuple(self.mask_input_size) + (1,), self.dtype))
    if masks is not None:
      dense = self.embed_masks(masks)
    else:
      h, w = self.image_embedding_size
      dense = jnp.broadcast_to(self.no_mask_embed().astype(self.dtype).reshape(1, 1, -1),
                               labels.shape[:-1] + (h, w, self.embed_dim))
    return sparse, dense

  @property
  def mask_input_size(self) -> tuple[int, int]:
    return (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])


def present(labels):
  """Which prompt slots are tokens (labels [..., N] -> bool [..., N]): all but ABSENT ones."""
  return jnp.asarray(labels) != ABSENT


def build_sparse_prompt(point_coords=None, point_labels=None, box=None):
  """(points [..., P, 2], labels [..., P], box [..., 4] XYXY) -> (coords [..., N, 2], labels [..., N]).

  The sequence PyTorch's PromptEncoder embeds: the points, then one padding point when
  there is no box, else the two box corners (labels 2, 3). Coordinates stay in the model
  input frame. numpy in -> numpy out (the predictor builds prompts on the host).
  """
  xp = np if all(a is None or isinstance(a, (np.ndarray, list, tuple, float, int))
                 for a in (point_coords, point_labels, box)) else jnp
  if point_coords is None and box is None:
    raise ValueError("a sparse prompt needs points or a box")
  coords, labels = [], []
  if point_coords is not None:
    if point_labels is None:
      raise ValueError("point_labels must be given with point_coords")
    coords.append(xp.asarray(point_coords, xp.float32))
    labels.append(xp.asarray(point_labels, xp.int32))
    lead = coords[0].shape[:-2]
  if box is None:
    coords.append(xp.zeros(lead + (1, 2), xp.float32))
    labels.append(xp.full(lead + (1,), PAD, xp.int32))
  else:
    box = xp.asarray(box, xp.float32)
    lead = box.shape[:-1]
    coords.append(box.reshape(lead + (2, 2)))
    labels.append(xp.broadcast_to(xp.asarray([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], xp.int32), lead + (2,)))
  return xp.concatenate(coords, axis=-2), xp.concatenate(labels, axis=-1)


# ----------------------------------------------------------------------------- two-way transformer


def decoder_attention(attention: str | None) -> str:
  """The two-way transformer's implementation: `attention` if given (the model-wide choice:
  "reference", "xla" or "cudnn"), else "reference" on CPU (plain einsums) and XLA's fused
  jax.nn.dot_product_attention elsewhere."""
  impl = attention or ("reference" if jax.devices()[0].platform == "cpu" else "xla")
  if impl not in ATTENTION:  # the encoder's choices, so one setting names both
    raise ValueError(f"unknown attention {impl!r}; expected one of {sorted(ATTENTION)}")
  return impl


class Attention(nn.Module):
  """Multi-head attention whose projections shrink the width by `downsample_rate`.

  attention: "reference" (explicit logits, fp32 softmax) or "xla" / "cudnn"
  (jax.nn.dot_product_attention with the key mask); None: decoder_attention's default.
  """
  embedding_dim: int
  num_heads: int
  downsample_rate: int = 1
  dtype: Dtype = jnp.float32
  attention: str | None = None

  @nn.compact
  def __call__(self, q, k, v, key_mask=None):
    """key_mask [B, Nk] bool (None: every key): False keys get no attention."""
    internal = self.embedding_dim // self.downsample_rate
    if internal % self.num_heads:
      raise ValueError(f"num_heads {self.num_heads} must divide the internal dim {internal}")
    impl = decoder_attention(self.attention)
    q = dense(internal, (EMBED, HEADS), self.dtype, name="q_proj")(q)
    k = dense(internal, (EMBED, HEADS), self.dtype, name="k_proj")(k)
    v = dense(internal, (EMBED, HEADS), self.dtype, name="v_proj")(v)
    split = lambda x: x.reshape(x.shape[:-1] + (self.num_heads, internal // self.num_heads))
    q, k, v = split(q), split(k), split(v)
    if impl == "reference":
      attn = jnp.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(internal // self.num_heads)
      attn = attn.astype(jnp.float32)  # fp32 softmax under bf16
      if key_mask is not None:
        attn = jnp.where(key_mask[..., None, None, :], attn, -jnp.inf)
      attn = jax.nn.softmax(attn, axis=-1).astype(v.dtype)
      out = jnp.einsum("...hqk,...khd->...qhd", attn, v)
    else:  # the fused kernels take [B, T, H, d]: leading axes flattened into one batch axis
      flat = lambda x: x.reshape((-1,) + x.shape[-3:])
      mask = None if key_mask is None else key_mask.reshape(-1, 1, 1, key_mask.shape[-1])
      out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), mask=mask, implementation=impl)
      out = out.reshape(q.shape[:-3] + out.shape[-3:])
    out = out.reshape(out.shape[:-2] + (internal,))
    return dense(self.embedding_dim, (HEADS, EMBED), self.dtype, name="out_proj")(out)


class TwoWayAttentionBlock(nn.Module):
  """Token self-attn, token->image cross-attn, MLP, image->token cross-attn."""
  embedding_dim: int
  num_heads: int
  mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  skip_first_layer_pe: bool = False
  dtype: Dtype = jnp.float32
  attention: str | None = None  # Attention implementation

  @nn.compact
  def __call__(self, queries, keys, query_pe, key_pe, token_mask=None):
    """token_mask [B, Nq] bool (None: all): absent tokens are never attended to."""
    dim, heads, rate, dt = self.embedding_dim, self.num_heads, self.attention_downsample_rate, self.dtype
    attn = functools.partial(Attention, dtype=dt, attention=self.attention)
    if self.skip_first_layer_pe:
      queries = attn(dim, heads, name="self_attn")(queries, queries, queries, token_mask)
    else:
      q = queries + query_pe
      queries = queries + attn(dim, heads, name="self_attn")(q, q, queries, token_mask)
    queries = _layer_norm(dt, "norm1")(queries)

    q, k = queries + query_pe, keys + key_pe
    queries = queries + attn(dim, heads, rate, name="cross_attn_token_to_image")(q, k, keys)
    queries = _layer_norm(dt, "norm2")(queries)

    queries = queries + MLPBlock(dim, self.mlp_dim, dt, act=nn.relu, name="mlp")(queries)
    queries = _layer_norm(dt, "norm3")(queries)

    q, k = queries + query_pe, keys + key_pe
    keys = keys + attn(dim, heads, rate, name="cross_attn_image_to_token")(k, q, queries, token_mask)
    keys = _layer_norm(dt, "norm4")(keys)
    return queries, keys


class TwoWayTransformer(nn.Module):
  """Prompt tokens and image tokens attend to each other; returns both."""
  depth: int
  embedding_dim: int
  num_heads: int
  mlp_dim: int
  attention_downsample_rate: int = 2
  dtype: Dtype = jnp.float32
  attention: str | None = None  # Attention implementation

  @nn.compact
  def __call__(self, image_embedding, image_pe, point_embedding, token_mask=None):
    """image_embedding, image_pe [B, h, w, C]; point_embedding [B, N, C]; token_mask [B, N]
    (None: all present) -> ([B, N, C], [B, hw, C])."""
    b, h, w, c = image_embedding.shape
    keys = image_embedding.reshape(b, h * w, c)
    key_pe = jnp.broadcast_to(image_pe, image_embedding.shape).reshape(b, h * w, c)
    queries = point_embedding
    for i in range(self.depth):
      queries, keys = TwoWayAttentionBlock(
          self.embedding_dim, self.num_heads, self.mlp_dim, self.attention_downsample_rate,
          skip_first_layer_pe=(i == 0), dtype=self.dtype, attention=self.attention, name=f"layers_{i}")(
              queries, keys, point_embedding, key_pe, token_mask)
    q, k = queries + point_embedding, keys + key_pe
    queries = queries + Attention(self.embedding_dim, self.num_heads, self.attention_downsample_rate, self.dtype,
                                  self.attention, name="final_attn_token_to_image")(q, k, keys)
    queries = _layer_norm(self.dtype, "norm_final_attn")(queries)
    return queries, keys


# ----------------------------------------------------------------------------- mask decoder


class MaskDecoder(nn.Module):
  """Predicts low-res mask logits and IoU scores for K prompts per image."""
  transformer_dim: int = 256
  num_multimask_outputs: int = 3
  iou_head_depth: int = 3
  iou_head_hidden_dim: int = 256
  depth: int = 2
  num_heads: int = 8
  mlp_dim: int = 2048
  attention_downsample_rate: int = 2
  dtype: Dtype = jnp.float32
  attention: str | None = None  # the two-way transformer's Attention implementation

  @nn.compact
  def __call__(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
               multimask_output: bool | None, sparse_present=None):
    """image_embeddings [B,h,w,C], image_pe [h,w,C], sparse [B,K,N,C], dense [B,K,h,w,C],
    sparse_present [B,K,N] bool (None: all; False = an ABSENT slot)
    -> (masks [B,K,M,4h,4w], iou [B,K,M]); M = num_multimask_outputs if multimask_output else 1,
    or every mask token's output (single-mask first, M = num_multimask_outputs + 1) for None."""
    dim, dt = self.transformer_dim, self.dtype
    num_mask_tokens = self.num_multimask_outputs + 1
    b, k, n, _ = sparse_prompt_embeddings.shape
    _, h, w, _ = image_embeddings.shape

    output_tokens = jnp.concatenate([Embedding(1, dim, name="iou_token")(),
                                     Embedding(num_mask_tokens, dim, name="mask_tokens")()], axis=0)
    tokens = jnp.concatenate([jnp.broadcast_to(output_tokens.astype(dt), (b * k,) + output_tokens.shape),
                              sparse_prompt_embeddings.reshape(b * k, n, dim).astype(dt)], axis=1)
    # Every prompt of an image sees that image's embedding plus its own dense prompt.
    src = (image_embeddings[:, None].astype(dt) + dense_prompt_embeddings.astype(dt)).reshape(b * k, h, w, dim)
    pos_src = jnp.broadcast_to(image_pe.astype(dt), src.shape)

    token_mask = None
    if sparse_present is not None:
      token_mask = jnp.concatenate([jnp.ones((b * k, output_tokens.shape[0]), bool),
                                    sparse_present.reshape(b * k, n)], axis=1)
    hs, src = TwoWayTransformer(self.depth, dim, self.num_heads, self.mlp_dim, self.attention_downsample_rate,
                                dt, self.attention, name="transformer")(src, pos_src, tokens, token_mask)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1:1 + num_mask_tokens, :]

    x = src.reshape(b * k, h, w, dim)
    x = _conv_transpose(dim // 4, dt, "output_upscaling_0")(x)
    x = _gelu(LayerNorm2d(dim // 4, dtype=dt, name="output_upscaling_1")(x))
    x = _gelu(_conv_transpose(dim // 8, dt, "output_upscaling_3")(x))  # [BK, 4h, 4w, C/8]

    hyper_in = jnp.stack([MLPHead(dim, dim // 8, 3, dt, name=f"output_hypernetworks_mlps_{i}")(mask_tokens_out[:, i])
                          for i in range(num_mask_tokens)], axis=1)  # [BK, T, C/8]
    masks = jnp.einsum("btc,bhwc->bthw", hyper_in, x)
    iou_pred = MLPHead(self.iou_head_hidden_dim, num_mask_tokens, self.iou_head_depth, dt,
                   name="iou_prediction_head")(iou_token_out)

    if multimask_output is not None:
      sl = slice(1, None) if multimask_output else slice(0, 1)
      masks, iou_pred = masks[:, sl], iou_pred[:, sl]
    return masks.reshape((b, k) + masks.shape[1:]), iou_pred.reshape(b, k, -1)


# ----------------------------------------------------------------------------- Sam


class Sam(nn.Module):
  """Image encoder + prompt encoder + mask decoder, with segment_anything's submodule names."""
  config: SamConfig
  dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str | None = None  # vit_det.REMAT_POLICIES key (implies remat)
  attention: str | None = None  # encoder's and decoder's attention implementation; None: per backend
  scan_blocks: bool = False  # ImageEncoderViT.scan_blocks

  def setup(self):
    cfg = self.config
    self.image_encoder = ImageEncoderViT(cfg.image_encoder, dtype=self.dtype, remat=self.remat,
                                         remat_policy=self.remat_policy, attention=self.attention,
                                         scan_blocks=self.scan_blocks)
    self.prompt_encoder = PromptEncoder(cfg.prompt_embed_dim, cfg.image_embedding_size,
                                        (cfg.image_size, cfg.image_size), cfg.mask_in_chans, self.dtype)
    self.mask_decoder = MaskDecoder(cfg.prompt_embed_dim, cfg.num_multimask_outputs, cfg.iou_head_depth,
                                    cfg.iou_head_hidden_dim, cfg.decoder_depth, cfg.decoder_num_heads,
                                    cfg.decoder_mlp_dim, cfg.attention_downsample_rate, self.dtype,
                                    self.attention)

  def __call__(self, images, point_coords, point_labels, mask_input=None, multimask_output: bool = True):
    """Whole model (initialises every parameter): images normalised, padded [B,S,S,3];
    point_coords [B,K,N,2]; point_labels [B,K,N]; mask_input [B,K,4h,4w,1] -> (masks, iou)."""
    embeddings, _ = self.image_encoder(images)
    return self.predict_masks(embeddings, point_coords, point_labels, mask_input, multimask_output)

  def encode_image(self, images):
    """Normalised, padded images [B,H,W,3] -> (embeddings [B,H/16,W/16,C], aux)."""
    return self.image_encoder(images)

  def encode_prompts(self, point_coords, point_labels, mask_input=None):
    """-> (sparse [..., N, C], dense [..., h, w, C])."""
    return self.prompt_encoder(point_coords, point_labels, mask_input)

  def get_dense_pe(self):
    return self.prompt_encoder.get_dense_pe()

  def decode_masks(self, image_embeddings, sparse, dense, multimask_output: bool = True, sparse_present=None):
    return self.mask_decoder(image_embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense,
                             multimask_output, sparse_present)

  def predict_masks(self, image_embeddings, point_coords, point_labels, mask_input=None,
                    multimask_output: bool = True):
    """Image embeddings [B,h,w,C] + K prompts per image -> (low-res logits [B,K,M,4h,4w], iou [B,K,M])."""
    sparse, dense = self.prompt_encoder(point_coords, point_labels, mask_input)
    return self.decode_masks(image_embeddings, sparse, dense, multimask_output, present(point_labels))


def example_inputs(config: SamConfig, batch: int = 1, num_prompts: int = 1, num_points: int = 2):
  """Zero inputs of the right shapes for `Sam(config).init`."""
  s = config.image_size
  mh, mw = config.mask_input_size
  return (jnp.zeros((batch, s, s, 3), jnp.float32),
          jnp.zeros((batch, num_prompts, num_points, 2), jnp.float32),
          jnp.ones((batch, num_prompts, num_points), jnp.int32),
          jnp.zeros((batch, num_prompts, mh, mw, 1), jnp.float32))


def init_params(config: SamConfig, rng=None):
  """Random parameters (boxed with logical axis names: nn.unbox for arrays)."""
  rng = jax.random.key(0) if rng is None else rng
  return Sam(config).init(rng, *example_inputs(config))["params"]


def abstract_params(config: SamConfig):
  """ShapeDtypeStruct tree of the parameters (no compute, no memory)."""
  return nn.unbox(jax.eval_shape(lambda: init_params(config)))


def preprocess(images, valid_hw=None):
  """RGB [B,H,W,3] (uint8 or float) -> normalised float32.

  SAM pads *after* normalising, so its padding is 0, not (0 - mean) / std: with `valid_hw`
  [B,2] (the resized image's height, width in each padded image) everything outside is set
  to 0, which makes zero-padded uint8 batches match SAM's preprocessing.
  """
  x = (jnp.asarray(images, jnp.float32) - jnp.array(PIXEL_MEAN, jnp.float32)) / jnp.array(PIXEL_STD, jnp.float32)
  if valid_hw is not None:
    valid_hw = jnp.asarray(valid_hw)
    rows = jnp.arange(x.shape[-3])[None, :, None] < valid_hw[:, 0, None, None]
    cols = jnp.arange(x.shape[-2])[None, None, :] < valid_hw[:, 1, None, None]
    x = jnp.where((rows & cols)[..., None], x, 0.0)
  return x


def load_sam_config(directory: str) -> SamConfig:
  """The SamConfig of a SAM model dir, without reading its parameters."""
  return SamConfig.from_dict(checkpoint.load_config(directory, expected_type="sam"))


def load_sam(directory: str, target=None) -> tuple[SamConfig, dict]:
  """Reads a model directory written by convert/sam.py -> (SamConfig, params).

  params is the tree under "params" (apply with {"params": params}); `target`, a tree of
  jax.ShapeDtypeStruct with shardings, restores straight into that layout.
  """
  params, config = checkpoint.load_model(directory, expected_type="sam", target=target)
  return SamConfig.from_dict(config), params
