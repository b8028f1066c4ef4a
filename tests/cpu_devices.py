"""XLA_FLAGS for test processes: N simulated CPU devices, and cheaper code generation where
many processes compile (test_multiprocess). Every test process that should share the suite's
compilation cache (conftest) must use the same flags: they are part of the cache key."""
# LLVM at -O0 changes float rounding a little (a near-tie argmax can flip), so the parity
# tests run at the default; multi-process tests compare processes under the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int, fast: bool = False) -> str:
  return f"--xla_force_host_platform_device_count={devices}" + (f" {FAST_COMPILE}" if fast else "")
