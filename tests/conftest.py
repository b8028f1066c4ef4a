"""Test setup: 8 simulated CPU devices (for sharding tests), float32 everywhere; torchvision's nms;
a quick end for xdist workers."""
import functools
import gc
import glob
import importlib.util
import os

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _nms_cpu(dets, scores, iou_threshold):
  """torchvision's CPU nms kernel (csrc/ops/cpu/nms_kernel.cpp), step for step, in float32."""
  import torch
  x1, y1, x2, y2 = dets.unbind(1)
  areas = (x2 - x1) * (y2 - y1)
  order = torch.sort(scores, stable=True, descending=True).indices
  suppressed = torch.zeros(len(dets), dtype=torch.bool)
  keep = []
  for pos, i in enumerate(order.tolist()):
    if suppressed[i]:
      continue
    keep.append(i)
    rest = order[pos + 1:]    # the kernel's inner loop over j, vectorised
    w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp(min=0)
    h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp(min=0)
    inter = w * h
    iou = inter / (areas[i] + areas[rest] - inter)        # in the boxes' dtype; NaN (0/0) keeps
    suppressed[rest] |= iou.double() > iou_threshold      # compared in double, as in C++
  return torch.tensor(keep, dtype=torch.int64)


@functools.cache   # keeps the registrations (they live as long as the Library object)
def _give_torchvision_an_nms():
  """Register torchvision::nms where torchvision's compiled ops cannot load.

  The [test] extra pairs the small CPU torch wheel with PyPI's torchvision, whose _C.so is
  linked against CUDA torch: without this, `import torchvision` (segment_anything, open_clip)
  fails with 'operator torchvision::nms does not exist'. Where _C.so loads, it is used as is.
  """
  spec = importlib.util.find_spec("torchvision")
  if spec is None or importlib.util.find_spec("torch") is None:
    return None
  import torch
  for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):   # _C, _C_stable
    try:
      torch.ops.load_library(path)
      return None
    except OSError:
      pass
  lib = torch.library.Library("torchvision", "DEF")
  lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")  # only declared
  lib.impl("nms", _nms_cpu, "CPU")
  import torchvision.extension
  torchvision.extension._has_ops = lambda: True   # ops.nms asserts this before calling the op
  return lib


def pytest_collectstart():
  """Before the first test module imports torchvision (an xdist controller collects nothing, so
  it never pays for importing torch)."""
  _give_torchvision_an_nms()


@pytest.hookimpl(trylast=True)   # after fixture teardown, before xdist reports the worker finished
def pytest_sessionfinish():
  """Collect the garbage now and freeze what is left, so the end of the run is quick.

  Once every worker has reported finished, execnet gives each 5 s to return and then sends it
  SIGINT. pytest's unconfigure runs two full collections over the worker's large heap (jax,
  torch, compiled functions): on a busy machine they overran, and the KeyboardInterrupt surfaced
  as 'PytestUnraisableExceptionWarning ... _xla_gc_callback ... KeyboardInterrupt'. Frozen
  objects are skipped by those collections; anything unreachable was freed just before.
  """
  gc.collect()
  gc.freeze()
