"""Test setup: 8 simulated CPU devices (for sharding tests), float32 everywhere; one compilation
cache for the whole run; torchvision's nms; a quick end for xdist workers."""
import gc
import os
import shutil
import tempfile

from cpu_devices import xla_flags

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Two thirds of the suite's CPU is XLA compiling train steps, and many tests (and the `main`
# processes they start) compile the same ones: one persistent cache serves them all. The
# controller makes it before xdist starts its workers, which inherit it with the environment,
# as every subprocess does. A cache the user set is used as it is and never removed.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="samclip-test-jax-cache-")
  os.environ["SAMCLIP_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

from convert.torchvision_nms import ensure_nms  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collectstart():
  """Before the first test module imports torchvision (an xdist controller collects nothing, so
  it never pays for importing torch)."""
  ensure_nms()


def pytest_unconfigure():
  """The process that made the cache removes it (xdist workers share the controller's)."""
  if _OWN_CACHE and os.environ.get("SAMCLIP_TEST_CACHE_OWNER") == str(os.getpid()):
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


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
