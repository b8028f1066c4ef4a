"""Optimizer: regex parameter groups (LR multipliers), freezing, AdamW + warmup-cosine + clipping.

Paths are "/"-joined parameter names ("clip_head/blocks_0/attn/qkv/kernel"); patterns are
matched with re.fullmatch, first matching group wins, unmatched trainable params get 1.0.
Frozen params are split out of the trainable tree, so they get no gradient and no
optimizer state at all (big_vision-style regex lists in the config).
"""
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


def path_str(path: Sequence[str]) -> str:
  return "/".join(str(p) for p in path)


def flat_paths(tree) -> dict[str, Any]:
  """{"a/b/c": leaf} of a nested dict of params."""
  return {path_str(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _check_patterns(patterns: Sequence[str], paths: Sequence[str], what: str) -> None:
  """A pattern matching no parameter is almost surely a typo: say so before training."""
  for pat in patterns:
    rx = re.compile(pat)
    if not any(rx.fullmatch(p) for p in paths):
      raise ValueError(f"{what} pattern {pat!r} matches no parameter; "
                       f"top-level names are {sorted({p.split('/')[0] for p in paths})}")


def is_frozen_fn(frozen_patterns: Sequence[str]):
  rxs = [re.compile(p) for p in frozen_patterns]
  return lambda path: any(rx.fullmatch(path) for rx in rxs)


def split_params(params, frozen_patterns: Sequence[str], check: bool = True):
  """(trainable, frozen): two nested dicts partitioning `params` by the frozen regexes."""
  flat = traverse_util.flatten_dict(params)
  paths = [path_str(k) for k in flat]
  if check:
    _check_patterns(frozen_patterns, paths, "optim.frozen")
  frozen_fn = is_frozen_fn(frozen_patterns)
  trainable = {k: v for k, v in flat.items() if not frozen_fn(path_str(k))}
  frozen = {k: v for k, v in flat.items() if frozen_fn(path_str(k))}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable, frozen):
  """Inverse of split_params."""
  flat = dict(traverse_util.flatten_dict(frozen))
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)


def all_finite(tree):
  """Scalar bool: every floating leaf of `tree` is finite (traceable)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def group_multipliers(trainable, groups: Sequence[tuple[str, float]]):
  """Tree like `trainable` holding each param's LR multiplier (first matching group)."""
  rxs = [(re.compile(pat), float(mult)) for pat, mult in groups]

  def mult(path, _):
    p = path_str(path)
    for rx, m in rxs:
      if rx.fullmatch(p):
        return m
    return 1.0

  return traverse_util.path_aware_map(mult, trainable)


def decay_mask(trainable, no_decay: Sequence[str]):
  """Weight decay on matrices / conv kernels only: not on biases, norms or listed patterns."""
  rxs = [re.compile(p) for p in no_decay]
  return traverse_util.path_aware_map(
      lambda path, x: x.ndim > 1 and not any(rx.fullmatch(path_str(path)) for rx in rxs),
      trainable)


class ScaleByTreeState(NamedTuple):
  pass


def scale_by_tree(multipliers) -> optax.GradientTransformation:
  """Multiplies each update by a constant per-parameter factor (per-group LR multipliers).

  Applied after AdamW's learning-rate scaling, it scales the Adam step and the decoupled
  weight decay together, i.e. exactly "lr * multiplier" for that group.
  """
  def init(params):
    del params
    return ScaleByTreeState()

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

  return optax.GradientTransformation(init, update)


def lr_schedule(config) -> optax.Schedule:
  """Linear warmup to config.learning_rate, then cosine decay to lr * optim.end_lr_factor."""
  total = max(int(config.total_steps), 1)
  warmup = min(int(config.warmup_steps), total - 1) if total > 1 else 0
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(config.learning_rate), warmup_steps=warmup,
      decay_steps=total, end_value=float(config.learning_rate) * float(config.optim.end_lr_factor))


def build_optimizer(config, trainable, all_paths: Sequence[str] | None = None):
  """(optax transform, schedule) for the trainable tree, from config.optim and friends."""
  groups = [tuple(g) for g in config.optim.groups]
  if all_paths is not None:
    _check_patterns([g[0] for g in groups], all_paths, "optim.groups")
  schedule = lr_schedule(config)
  chain = []
  if config.grad_clip_norm and config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(float(config.grad_clip_norm)))
  chain.append(optax.adamw(schedule, b1=float(config.optim.b1), b2=float(config.optim.b2),
                           eps=float(config.optim.eps), weight_decay=float(config.optim.weight_decay),
                           mask=decay_mask(trainable, list(config.optim.no_decay))))
  mults = group_multipliers(trainable, groups)
  if any(m != 1.0 for m in jax.tree.leaves(mults)):
    chain.append(scale_by_tree(mults))
  return optax.chain(*chain), schedule
