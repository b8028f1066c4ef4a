"""Mesh creation, logical rules -> NamedSharding, batch placement, FSDP memory."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from samclip_jax import sharding


def test_mesh_shape_fill_and_errors():
  assert sharding.mesh_shape({"data": -1, "fsdp": 1, "model": 1}, 8) == (8, 1, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": -1, "model": 1}, 8) == (2, 4, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": 4}, 8) == (2, 4, 1)
  with pytest.raises(ValueError, match="do not divide"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "model": 1}, 8)
  with pytest.raises(ValueError, match="needs 4 devices, but 8"):
    sharding.mesh_shape({"data": 2, "fsdp": 2, "model": 1}, 8)
  with pytest.raises(ValueError, match="at most one"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.mesh_shape({"dp": 8}, 8)


def test_make_mesh_auto_axes():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "model": 1})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  one = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
  assert one.devices.size == 1


class _Toy(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(64, kernel_init=sharding.param_with_axes(nn.initializers.lecun_normal(), "embed", "mlp"),
                 bias_init=sharding.param_with_axes(nn.initializers.zeros_init(), "mlp"))(x)
    x = nn.LayerNorm(scale_init=sharding.param_with_axes(nn.initializers.ones_init(), "norm"),
                     bias_init=sharding.param_with_axes(nn.initializers.zeros_init(), "norm"))(x)
    odd = self.param("odd", sharding.param_with_axes(nn.initializers.zeros_init(), "embed", "mlp"), (6, 64))
    return x + odd.sum()


def test_tree_shardings_rules_fallback_and_divisibility():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "model": 2})
  abstract = jax.eval_shape(_Toy().init, jax.random.key(0), jnp.zeros((1, 32)))
  sh = sharding.tree_shardings(abstract, mesh, sharding.DEFAULT_RULES)["params"]
  assert sh["Dense_0"]["kernel"].spec == P("fsdp", "model")
  assert sh["Dense_0"]["bias"].spec == P("model")
  assert sh["LayerNorm_0"]["scale"].spec == P()
  # 6 rows do not split 4 ways: that dim replicates, the other keeps its axis.
  assert sh["odd"].spec == P(None, "model")
  # Only FSDP: the MLP dim falls back to fsdp when embed cannot take it.
  rules = (("embed", "fsdp"), ("mlp", "model"), ("mlp", "fsdp"))
  sh2 = sharding.tree_shardings(abstract, mesh, rules)["params"]
  assert sh2["odd"].spec == P(None, "model")
  mesh8 = sharding.make_mesh({"data": 1, "fsdp": 8, "model": 1})
  sh3 = sharding.tree_shardings(abstract, mesh8, (("embed", "fsdp"), ("mlp", "fsdp")))["params"]
  assert sh3["odd"].spec == P(None, "fsdp")  # embed (6) cannot split, mlp (64) can


def test_rules_validation():
  with pytest.raises(ValueError, match="unknown mesh axis"):
    sharding.normalize_rules([("embed", "tensor")])
  assert sharding.normalize_rules([["batch", ["data", "fsdp"]]]) == (("batch", ("data", "fsdp")),)


def test_put_batch_and_divisibility():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "model": 1})
  batch = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  out = sharding.put_batch(batch, mesh)
  assert out["image"].sharding.spec == P(("data", "fsdp"))
  assert len(out["image"].addressable_shards) == 8
  assert out["image"].addressable_shards[0].data.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
  sharding.check_batch_divisible("clip_batch_size", 16, mesh, micro_steps=2)
  with pytest.raises(ValueError, match="data-parallel size 8"):
    sharding.check_batch_divisible("sam_batch_size", 12, mesh)
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    sharding.check_batch_divisible("clip_batch_size", 16, mesh, micro_steps=3)


def test_per_device_bytes():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "model": 1})
  x = jax.device_put(jnp.zeros((64, 4), jnp.float32),
                     jax.sharding.NamedSharding(mesh, P("fsdp")))
  assert sharding.per_device_bytes(x) == 64 * 4 * 4 // 8
  r = jax.device_put(jnp.zeros((64, 4), jnp.float32), sharding.replicated(mesh))
  assert sharding.per_device_bytes(r) == 64 * 4 * 4


def test_multiprocess_detection(monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
            "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  assert not sharding.multiprocess_env_detected()
  assert sharding.maybe_initialize_distributed("auto") is False
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host0,host1")
  assert sharding.multiprocess_env_detected()
  assert sharding.maybe_initialize_distributed("never") is False


@pytest.mark.parametrize("kwargs,message", [
    # jax segfaulted on a port that is no number and hung on a host with a stray ':'
    (dict(coordinator_address="127.0.0.1:notaport", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator_address="127.0.0.1:12345:9", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator_address="nocolon", num_processes=2, process_id=0), "HOST:PORT"),   # an IndexError
    (dict(coordinator_address="h:99999"), "port in 1..65535"),
    (dict(coordinator_address="h:1234", num_processes=2, process_id=5), "process_id must be in 0..1"),
    (dict(mode="sometimes"), "distributed must be one of"),                        # read as "auto"
    (dict(num_processes=2, process_id=1), "nothing starts a multi-process job"),   # a one-process run
])
def test_bad_launch_settings_are_refused_before_joining(monkeypatch, kwargs, message):
  for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
            "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  with pytest.raises(ValueError, match=message):
    sharding.maybe_initialize_distributed(**kwargs)


# ----------------------------------------------------------------------------- the train step
def _tiny_merge_config(scan_blocks=False, **mesh):
  from configs import merge
  c = merge.get_config("tiny")
  c.scan_blocks = scan_blocks
  c.sam_batch_size = 8  # divisible by 8 data-parallel devices
  c.optim.eps = 1e-6  # Adam's first step is sign-like: keep near-zero grads from amplifying noise
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


def test_sharded_step_matches_single_device_and_fsdp_memory():
  """One step of the tiny merge on 1 device and on a data=2 x fsdp=4 mesh gives the same
  losses, params and optimizer state (the sharded run with the backbone's blocks scanned, the
  single one unrolled); per-device params + optimizer memory under 8-way FSDP
  is at most 1/6 of the replicated size. (One test: xdist would rebuild a shared fixture.)

  The initial state and teachers are built once (one device) and laid out on each mesh with
  device_put, so the comparison isolates the sharded step itself.
  """
  from samclip_jax import loop
  from samclip_jax.tasks import merge as merge_task
  single = merge_task.create(_tiny_merge_config(data=-1, fsdp=1), jax.devices()[:1])
  sharded = merge_task.create(_tiny_merge_config(data=2, fsdp=4, scan_blocks=True))
  teachers = single.init_aux()
  state = jax.device_get(single.init_state(teachers))  # host copy: steps donate theirs
  host = single.fake_batches(seed=3, sam_frame=128)  # 128 px frame: exercises the resize
  out = {}
  for name, exp in (("single", single), ("sharded", sharded)):
    s = jax.device_put(state, exp.state_shardings)
    t = jax.device_put(teachers, exp.aux_shardings)
    nbytes = sharding.per_device_bytes((s.params, s.frozen, s.opt_state))
    s, metrics = loop.make_train_step(exp)(s, t, exp.device_batches(host))
    out[name] = dict(state=s, metrics=jax.device_get(metrics), bytes=nbytes)
  one, many = out["single"], out["sharded"]

  # The sharded state really is sharded (FSDP on embed dims).
  kernel = many["state"].params["clip_head"]["blocks_0"]["mlp"]["lin1"]["kernel"]
  assert kernel.sharding.spec[0] == "fsdp"
  assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 4, kernel.shape[1])
  for k in ("clip_loss", "sam_loss", "total_loss", "grad_norm"):
    np.testing.assert_allclose(many["metrics"][k], one["metrics"][k], rtol=1e-5)
  assert many["metrics"]["finite"]
  got = jax.device_get((many["state"].params, many["state"].opt_state))
  want = jax.device_get((one["state"].params, one["state"].opt_state))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)

  # Memory: one device holds everything (= the replicated per-device size).
  replicated = one["bytes"]
  fsdp8 = merge_task.create(_tiny_merge_config(data=1, fsdp=8))
  s8 = jax.device_put(state, fsdp8.state_shardings)
  fsdp = sharding.per_device_bytes((s8.params, s8.frozen, s8.opt_state))
  assert fsdp <= replicated / 6, (fsdp, replicated, fsdp / replicated)
  assert many["bytes"] <= replicated / 3  # data=2 x fsdp=4: FSDP over 4


def test_teachers_and_init_from_restore_into_the_mesh(tmp_path):
  """The local merge on a data=2 x fsdp=4 mesh: the shipped teachers and an init_from export
  are restored straight into the run's shardings (on a pod each host reads only its shards),
  with the stored values; the CLIP teacher's text tower is not read at all."""
  from configs import merge
  from samclip_jax import loop, optim
  from samclip_jax.models import samclip as samclip_lib
  from samclip_jax.models.clip import load_clip
  from samclip_jax.models.sam import load_sam
  from samclip_jax.tasks import merge as merge_task
  c = merge.get_config("local")
  c.mesh.data, c.mesh.fsdp = 2, 4
  c.sam_batch_size, c.clip_batch_size = 8, 16
  exp = merge_task.create(c)
  teachers = exp.init_aux()
  want = {"sam": load_sam(c.sam_checkpoint)[1], "clip": load_clip(c.clip_checkpoint)[1]["visual"]}
  fsdp_leaves = 0
  for name in ("sam", "clip"):
    for got, sh, ref in zip(jax.tree.leaves(teachers[name]), jax.tree.leaves(exp.aux_shardings[name]),
                            jax.tree.leaves(want[name])):
      assert got.sharding == sh
      fsdp_leaves += "fsdp" in jax.tree.leaves(tuple(sh.spec))
      np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  assert fsdp_leaves > 10  # the layout really splits weights across devices

  state = exp.init_state(teachers)  # the student starts from the SAM teacher
  samclip_lib.save_samclip(str(tmp_path / "stage"), exp.model_config,
                           jax.device_get(optim.merge_params(state.params, state.frozen)))
  c.unlock()
  c.init_from = str(tmp_path / "stage")
  again = merge_task.create(c)
  restored = again.init_state(again.init_aux())
  target = loop.params_target(again.abstract_state())
  for got, t, ref in zip(jax.tree.leaves(optim.merge_params(restored.params, restored.frozen)),
                         jax.tree.leaves(target), jax.tree.leaves(optim.merge_params(state.params, state.frozen))):
    assert got.sharding == t.sharding
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
