"""torchvision::nms where torchvision's compiled ops cannot load (the small CPU torch wheel).

segment_anything imports torchvision, and PyPI's torchvision _C.so is linked against CUDA
torch: with the CPU torch of the [test] extra, `import torchvision` fails with 'operator
torchvision::nms does not exist'. `ensure_nms()` registers a port of torchvision's CPU kernel
first; where _C.so loads, it is used as is.
"""
import functools
import glob
import importlib.util
import os


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
def ensure_nms():
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
