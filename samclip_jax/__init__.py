"""samclip_jax: SAM-CLIP (arXiv 2310.15308) in JAX/Flax."""
import importlib

# Public API, imported lazily so `import samclip_jax` stays cheap.
_EXPORTS = {
    "SamPredictor": "samclip_jax.predictor",
    "ClipModel": "samclip_jax.clip_model",
    "SamClip": "samclip_jax.api",
    "SamAutomaticMaskGenerator": "samclip_jax.automatic_mask_generator",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'samclip_jax' has no attribute {name!r}")
