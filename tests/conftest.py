"""Test setup: 8 simulated CPU devices (for sharding tests), float32 everywhere; torchvision's nms;
a quick end for xdist workers."""
import gc
import os

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from convert.torchvision_nms import ensure_nms  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collectstart():
  """Before the first test module imports torchvision (an xdist controller collects nothing, so
  it never pays for importing torch)."""
  ensure_nms()


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
