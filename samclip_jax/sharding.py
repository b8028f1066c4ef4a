"""Logical axis names, the device mesh, and logical rules -> NamedSharding trees.

Modules name their parameter axes with the logical names below; a config maps them to the
mesh axes ("data", "fsdp", "model") with `logical_axis_rules`. The same config runs on one
CPU, 8 simulated CPU devices, one GPU or a multi-host TPU slice: only the mesh shape changes.
"""
import math
import os
import sys
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# Every parameter names its axes with these; configs map them to ("data", "fsdp", "model").
EMBED = "embed"      # model width (d_model) of a transformer
MLP = "mlp"          # hidden width of an MLP
HEADS = "heads"      # fused q/k/v or per-head feature output of attention projections
CONV_IN = "conv_in"  # input channels of a conv kernel
CONV_OUT = "conv_out"
VOCAB = "vocab"
NORM = "norm"        # LayerNorm scale/bias
POS = "pos"          # position tables (absolute / relative)
NONE = None
BATCH = "batch"      # leading axis of activations and input batches

MESH_AXES = ("data", "fsdp", "model")

# FSDP over "fsdp" for every weight matrix, tensor parallelism over "model" for MLP / heads.
# Rules are tried in order; a later rule for the same logical name is a fallback used when
# the earlier mesh axis is taken by another dim of the same array, does not divide the dim,
# or has size 1 (see logical_to_mesh_spec). So with model=1, MLP biases still get FSDP.
DEFAULT_RULES = (
    (BATCH, ("data", "fsdp")),
    (EMBED, "fsdp"),
    (MLP, "model"),
    (HEADS, "model"),
    (CONV_OUT, "fsdp"),
    (CONV_IN, "fsdp"),
    (VOCAB, "model"),
    (MLP, "fsdp"),
    (HEADS, "fsdp"),
    (VOCAB, "fsdp"),
    (NORM, None),
    (POS, None),
)


def param_with_axes(init, *names):
  """Wraps an initializer so the parameter carries logical axis names."""
  return nn.with_logical_partitioning(init, names)


# ---------------------------------------------------------------- mesh
def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes of ("data", "fsdp", "model"); one -1 fills the devices left. Raises if they don't fit."""
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; expected {MESH_AXES}")
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh {dict(mesh_config)}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh {dict(mesh_config)}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(mesh_config)}: the fixed axes ({known} devices) do not "
                       f"divide the {num_devices} available devices")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh {dict(mesh_config)} needs {math.prod(sizes)} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A ("data", "fsdp", "model") mesh over all (or the given) devices.

  Axis types are Auto on purpose: shardings come from logical annotations, jit in/out
  shardings and with_sharding_constraint, and the compiler propagates the rest. Explicit
  axes (sharding in types) would demand a sharding rule at every op of linen modules that
  carry none (reshapes of sharded dims in window partitioning, einsums), for no gain here.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def axis_size(mesh: Mesh, axes) -> int:
  """Number of devices along a mesh axis name, a tuple of names, or None (1)."""
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def batch_axes(rules: Sequence[tuple[str, Any]]):
  """Mesh axes the batch dimension is split over, read from the rules."""
  for name, axes in rules:
    if name == BATCH:
      return tuple(axes) if isinstance(axes, (list, tuple)) else axes
  return ("data", "fsdp")


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
  """How many ways a global batch is split."""
  return axis_size(mesh, batch_axes(rules))


# ---------------------------------------------------------------- logical -> mesh
def normalize_rules(rules) -> tuple:
  """Rules from a config (lists from JSON / ConfigDict) -> tuple of (name, axes) pairs."""
  out = []
  for rule in rules:
    name, axes = rule
    if isinstance(axes, list):
      axes = tuple(axes)
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f"logical rule {rule}: unknown mesh axis {a!r}; expected {MESH_AXES}")
    out.append((name, axes))
  return tuple(out)


def logical_to_mesh_spec(names, shape, mesh: Mesh, rules) -> P:
  """One array: logical axis names -> PartitionSpec over the mesh.

  flax's priority semantics (rules in order; a rule applies if its logical name is one of
  the array's dims, that dim is unassigned and its mesh axes are still free), plus one
  conditions: the dim must divide evenly by the mesh axes' size, and that size must be > 1.
  So a later fallback rule can still shard the array when an earlier one would split an
  odd-sized dim or name a trivial axis (e.g. "mlp" -> "model" with model=1 falls back to
  "fsdp"); dims nothing fits stay replicated.
  """
  if not names:
    return P()
  names = tuple(names)
  dup = {n for n in names if n is not None and names.count(n) > 1}
  if dup:
    raise ValueError(f"logical axis names {sorted(dup)} occur more than once in {names}")
  assigned = [None] * len(names)
  used = set()
  for name, axes in normalize_rules(rules):
    if name not in names or axes is None:
      continue
    i = names.index(name)
    mesh_axes = axes if isinstance(axes, tuple) else (axes,)
    if assigned[i] is not None or used & set(mesh_axes):
      continue
    size = axis_size(mesh, mesh_axes)
    if size == 1 or shape[i] % size:  # a size-1 axis shards nothing: let a fallback rule try
      continue
    assigned[i] = axes
    used |= set(mesh_axes)
  while assigned and assigned[-1] is None:
    assigned.pop()
  return P(*assigned)


def _is_spec(x):
  return isinstance(x, P)


def tree_shardings(abstract_boxed, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding tree (unboxed structure) for a tree of (possibly) logically boxed leaves.

  `abstract_boxed` is typically `jax.eval_shape(model.init, ...)`: leaves wrapped in
  nn.LogicallyPartitioned carry their axis names; plain leaves are replicated.
  """
  logical = nn.get_partition_spec(abstract_boxed)
  shapes = nn.unbox(abstract_boxed)
  return jax.tree.map(
      lambda names, x: NamedSharding(mesh, logical_to_mesh_spec(tuple(names), x.shape, mesh, rules)),
      logical, shapes, is_leaf=_is_spec)


def shaped(shapes, shardings):
  """ShapeDtypeStructs of `shapes` laid out by `shardings`: a restore target (each process
  reads only its shards and gets global arrays)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel mesh axes, the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(normalize_rules(rules))))


def put_batch(batch, mesh: Mesh, rules=DEFAULT_RULES):
  """Host-local numpy batch (this process's share) -> global jax.Arrays sharded on batch.

  Works unchanged on one process and many: each process hands over its local rows and
  `make_array_from_process_local_data` assembles the global array.
  """
  sharding = batch_sharding(mesh, rules)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def check_batch_divisible(name: str, global_batch: int, mesh: Mesh, rules=DEFAULT_RULES,
                          micro_steps: int = 1) -> None:
  """Clear error when a global batch cannot be split over data-parallel devices / micro-batches."""
  dp = data_parallel_size(mesh, normalize_rules(rules))
  if global_batch % micro_steps:
    raise ValueError(f"{name}={global_batch} is not divisible by grad_accum_steps={micro_steps}")
  micro = global_batch // micro_steps
  if micro % dp:
    raise ValueError(f"{name}={global_batch} (micro-batch {micro} with grad_accum_steps="
                     f"{micro_steps}) is not divisible by the data-parallel size {dp} "
                     f"(mesh {dict(mesh.shape)})")
  if global_batch % jax.process_count():
    raise ValueError(f"{name}={global_batch} is not divisible by the {jax.process_count()} processes")


# ---------------------------------------------------------------- memory
def per_device_bytes(tree, device=None) -> int:
  """Bytes of `tree` held by one device (the first local one by default)."""
  device = device or jax.local_devices()[0]
  total = 0
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


# ---------------------------------------------------------------- multi-host
_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def multiprocess_env_detected() -> bool:
  """True where the environment describes a multi-process job (coordinator, SLURM, TPU pod)."""
  if any(os.environ.get(k) for k in _MULTIPROCESS_ENV):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  # A TPU VM slice with more than one host lists them comma-separated.
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def maybe_initialize_distributed(mode="auto", *, coordinator_address: str = "",
                                 num_processes: int = 0, process_id: int = -1,
                                 timeout_s: int = 300, heartbeat_timeout_s: int = 100) -> bool:
  """jax.distributed.initialize() when asked (True), when an explicit coordinator_address is
  given, or when the environment says so ("auto").

  coordinator_address / num_processes / process_id launch a job without a cluster manager;
  left empty (""/0/-1) they come from the environment (TPU VM, SLURM, Open MPI). timeout_s
  bounds the wait for every process to join; a process silent for heartbeat_timeout_s is
  declared gone and the job stops instead of waiting in a collective forever. Must run before
  anything touches jax devices; idempotent (main.py and train both call it). Returns whether
  the job is (now) multi-process initialized.
  """
  check_distributed_settings(mode, coordinator_address, num_processes, process_id)
  if jax.distributed.is_initialized():
    return True
  if mode is False or mode == "never":
    return False
  wanted = (mode is True or mode == "always" or coordinator_address
            or (mode == "auto" and multiprocess_env_detected()))
  if not wanted:
    if num_processes > 0 or process_id >= 0:   # they would be ignored: a one-process run
      raise ValueError(f"num_processes={num_processes} / process_id={process_id} are set, but nothing "
                       "starts a multi-process job: give coordinator_address=HOST:PORT (or run under a "
                       "cluster manager with distributed='auto' / 'always')")
    return False
  # Multi-process CPU computations need a cross-process collectives backend (older jax: none).
  if jax.config.jax_cpu_collectives_implementation in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  explicit = dict(coordinator_address=coordinator_address or None,
                  num_processes=num_processes if num_processes > 0 else None,
                  process_id=process_id if process_id >= 0 else None)
  given = ", ".join(f"{k}={v}" for k, v in explicit.items() if v is not None)
  # jax aborts the process (no Python exception) when a peer is gone (its message names the
  # silent process ids) or the join times out (it says only DEADLINE_EXCEEDED): this line
  # says what was being joined.
  print(f"jax.distributed: joining ({given or 'from the environment'}; all processes within "
        f"{timeout_s}s, heartbeat timeout {heartbeat_timeout_s}s)", file=sys.stderr, flush=True)
  jax.distributed.initialize(**explicit, initialization_timeout=int(timeout_s),
                             heartbeat_timeout_seconds=int(heartbeat_timeout_s))
  return True


DISTRIBUTED_MODES = ("auto", "always", "never")


def check_distributed_settings(mode, coordinator_address: str, num_processes: int, process_id: int) -> None:
  """Launch settings that jax would hang on, abort on (a segfault for a port that is no
  number) or ignore are refused here, by name."""
  if mode not in DISTRIBUTED_MODES and not isinstance(mode, bool):
    raise ValueError(f"distributed must be one of {DISTRIBUTED_MODES}, got {mode!r}")
  if coordinator_address:
    host, _, port = coordinator_address.rpartition(":")
    bare_ipv6 = ":" in host and not (host.startswith("[") and host.endswith("]"))
    if not host or bare_ipv6 or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f"coordinator_address must be HOST:PORT with a port in 1..65535, got "
                       f"{coordinator_address!r}")
  if num_processes > 0 and not 0 <= process_id < num_processes and process_id != -1:
    raise ValueError(f"process_id must be in 0..{num_processes - 1} (num_processes={num_processes}), "
                     f"got {process_id}")


def initialize_from_config(config) -> bool:
  """maybe_initialize_distributed with a training config's fields (configs/common.py)."""
  return maybe_initialize_distributed(
      config.distributed, coordinator_address=config.coordinator_address,
      num_processes=config.num_processes, process_id=config.process_id,
      timeout_s=config.distributed_timeout_s, heartbeat_timeout_s=config.heartbeat_timeout_s)


# ---------------------------------------------------------------- agreeing across processes
# Each is a no-op (returns its input) with one process, so single-process behaviour is unchanged.
def from_process_0(value):
  """Process 0's value (a numpy array or tree of them, same shapes everywhere), on every process.
  Use int/float arrays: the broadcast is a sum, which bools do not take."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return multihost_utils.broadcast_one_to_all(value)


def gather_objects(obj) -> list:
  """[obj of process 0, obj of process 1, ...] on every process (any picklable value)."""
  if jax.process_count() == 1:
    return [obj]
  import pickle
  from jax.experimental import multihost_utils
  data = np.frombuffer(pickle.dumps(obj), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32))).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:len(data)] = data
  every = np.asarray(multihost_utils.process_allgather(buf))
  return [pickle.loads(every[i, :sizes[i]].tobytes()) for i in range(len(sizes))]


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
