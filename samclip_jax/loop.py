"""The one training loop: merge stages and teacher pretraining alike.

A task (samclip_jax/tasks/) says what is trained and on what; the loop does the rest the same
way for every task: the sharded jitted step with gradient accumulation and the non-finite
policy, Orbax checkpoints with data-iterator state (exact, verified resume), console and
TensorBoard metrics with an ETA, periodic evaluation, a workdir lock and the final export.

A task provides:
  config, mesh, rules, tx, schedule, state_shardings, aux_shardings
  abstract_state()                      restore target (ShapeDtypeStructs with shardings)
  init_aux() -> aux                     frozen inputs of every step (teachers; {} if none)
  init_state(aux) -> TrainState         step-0 state, sharded
  metric_names                          what micro_grads reports (summed over micro-batches)
  micro_grads(trainable, frozen, aux, batches) -> (grads, metrics)  traced; metrics hold total_loss
  eval_metrics(params, aux, batches) -> {name: scalar}               traced
  data_paths(workdir) / make_loaders(paths, split) / device_batches(host)
  prepare_workdir(workdir)              files a workdir needs before the first step
  export(state, directory)              collective; the run's product
  describe() -> str, log_keys, images_per_step
"""
import copy
import json
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from samclip_jax import cli, optim, run_checkpoints, sharding
from samclip_jax.workdir_lock import LOCK_FILE, WorkdirLock

NAN_POLICIES = ("stop", "skip")
RUN_CONFIG_FILE = "run_config.json"  # WORKDIR/: the config of the run's latest start (launch fields aside)


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # int32 scalar: optimizer updates done
  params: Any           # trainable parameters (float32 master weights)
  frozen: Any           # frozen parameters: no gradient, no optimizer state
  opt_state: Any        # optimizer state of `params` only
  nonfinite: jax.Array  # int32 scalar: steps whose update was skipped (non-finite loss/grad/update)


def make_state(tx, frozen_patterns, params) -> TrainState:
  """Step-0 train state from full params: split by the frozen regexes, optimizer init."""
  trainable, frozen = optim.split_params(params, list(frozen_patterns), check=False)
  return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen,
                    opt_state=tx.init(trainable), nonfinite=jnp.zeros((), jnp.int32))


def state_layout(config, boxed_params, mesh, rules):
  """(tx, schedule, state shardings, trainable paths, frozen paths) of a task's params."""
  shapes = nn.unbox(boxed_params)
  all_paths = list(optim.flat_paths(shapes))
  frozen_patterns = list(config.optim.frozen)
  abstract_trainable, abstract_frozen = optim.split_params(shapes, frozen_patterns)
  param_sh = sharding.tree_shardings(boxed_params, mesh, rules)
  trainable_sh, frozen_sh = optim.split_params(param_sh, frozen_patterns, check=False)
  if not jax.tree.leaves(abstract_trainable):
    raise ValueError(f"optim.frozen {frozen_patterns} freezes every parameter")
  tx, schedule = optim.build_optimizer(config, abstract_trainable, all_paths)
  abstract_opt = jax.eval_shape(tx.init, abstract_trainable)
  repl = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, trainable_sh,
                                 transform_non_params=lambda _: repl)
  shardings = TrainState(step=repl, params=trainable_sh, frozen=frozen_sh, opt_state=opt_sh,
                         nonfinite=repl)
  return (tx, schedule, shardings, list(optim.flat_paths(abstract_trainable)),
          list(optim.flat_paths(abstract_frozen)))


def abstract_state(tx, frozen_patterns, abstract_params, state_shardings):
  """ShapeDtypeStructs (with shardings) of the train state built from `abstract_params`."""
  shapes = jax.eval_shape(lambda p: make_state(tx, frozen_patterns, p), abstract_params)
  return sharding.shaped(shapes, state_shardings)


def params_target(abstract):
  """The full params (trainable and frozen) of an abstract_state: the target that restores a
  model directory's weights straight into the run's layout (init_from)."""
  return optim.merge_params(abstract.params, abstract.frozen)


# ----------------------------------------------------------------------------- step
def _tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _split_micro(task, batches, n):
  """[n*b, ...] -> [n, b, ...] keeping the batch axis sharded (each device keeps its rows)."""
  spec = jax.sharding.NamedSharding(task.mesh, jax.sharding.PartitionSpec(
      None, sharding.batch_axes(task.rules)))

  def split(x):
    b = x.shape[0] // n
    # Row r goes to micro-batch r % n: a local reshape of each device's contiguous rows.
    y = jnp.swapaxes(x.reshape((b, n) + x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(y, spec)

  return jax.tree.map(split, batches)


def make_train_step(task):
  """jit(step)(state, aux, batches) -> (state, metrics); state donated.

  One optimizer update per step (gradients averaged over config.grad_accum_steps
  micro-batches with lax.scan). The update is decided on the *updated* state: a step whose
  loss, gradient or new parameters are not all finite changes nothing but the counters.
  """
  n_micro = int(task.config.grad_accum_steps)

  def step_fn(state: TrainState, aux, batches):
    if n_micro == 1:
      grads, metrics = task.micro_grads(state.params, state.frozen, aux, batches)
    else:
      def body(carry, mb):
        return _tree_add(carry, task.micro_grads(state.params, state.frozen, aux, mb)), None

      zero = (jax.tree.map(jnp.zeros_like, state.params),
              {k: jnp.zeros((), jnp.float32) for k in task.metric_names})
      (grads, metrics), _ = jax.lax.scan(body, zero, _split_micro(task, batches, n_micro))
      grads = jax.tree.map(lambda g: g / n_micro, grads)
      metrics = {k: v / n_micro for k, v in metrics.items()}
    grad_norm = optax.global_norm(grads)
    updates, opt_state = task.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = (jnp.isfinite(metrics["total_loss"]) & jnp.isfinite(grad_norm)
              & optim.all_finite(params) & optim.all_finite(opt_state))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state),
                              nonfinite=state.nonfinite + (~finite).astype(jnp.int32))
    metrics = dict(metrics, grad_norm=grad_norm, finite=finite,
                   learning_rate=task.schedule(state.step), nonfinite_steps=new_state.nonfinite)
    return new_state, metrics

  repl = sharding.replicated(task.mesh)
  batch_sh = sharding.batch_sharding(task.mesh, task.rules)
  return jax.jit(step_fn, in_shardings=(task.state_shardings, task.aux_shardings, batch_sh),
                 out_shardings=(task.state_shardings, repl), donate_argnums=(0,))


def make_eval_step(task):
  """jit(eval)(state, aux, batches) -> the task's held-out metrics of one batch."""

  def eval_fn(state: TrainState, aux, batches):
    return task.eval_metrics(optim.merge_params(state.params, state.frozen), aux, batches)

  batch_sh = sharding.batch_sharding(task.mesh, task.rules)
  return jax.jit(eval_fn, in_shardings=(task.state_shardings, task.aux_shardings, batch_sh),
                 out_shardings=sharding.replicated(task.mesh))


def evaluate(task, eval_step, state, aux, paths):
  """Means over config.eval_batches held-out batches of each set (fixed order)."""
  its = {k: iter(v) for k, v in task.make_loaders(paths, split="val").items()}
  sums = {}
  for i in range(task.config.eval_batches):
    host = {}
    for k, it in its.items():
      try:
        host[k] = next(it)
      except StopIteration:
        pass
    empty = sorted(set(its) - set(host))
    if i == 0 and empty:  # batches drop their remainder: its metrics would be missing, silently
      raise ValueError(f"the held-out {empty[0]} set ({paths.get(empty[0] + '_val', '?')}) holds fewer "
                       "records than one batch: give more held-out records, a smaller batch size, "
                       "or --config.eval_every_steps=0")
    if not host:
      break
    out = jax.device_get(eval_step(state, aux, task.device_batches(host)))
    for k, v in out.items():
      sums.setdefault(k, []).append(float(v))
  return {k: float(np.mean(v)) for k, v in sums.items()}


# ----------------------------------------------------------------------------- loop helpers
class MetricWriter:
  """Console lines + TensorBoard event files (tensorboardX) in WORKDIR/tensorboard; process 0."""

  def __init__(self, workdir):
    self.enabled = jax.process_index() == 0
    self.workdir = workdir
    self.writer = None

  def scalars(self, step, values, prefix):
    if not self.enabled:
      return
    if self.writer is None:  # opened on first use: a run with nothing to log adds no event file
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(logdir=os.path.join(self.workdir, "tensorboard"))
    for k, v in values.items():
      self.writer.add_scalar(f"{prefix}/{k}", float(v), step)
    self.writer.flush()

  def print(self, msg):
    if self.enabled:
      print(msg, flush=True)
      logging.info(msg)

  def close(self):
    if self.writer:
      self.writer.close()


def check_finite(metrics_host, step, policy):
  """Raises (policy "stop") with the step number when a step's update was not finite."""
  if bool(metrics_host["finite"]):
    return False
  detail = ", ".join(f"{k}={float(v):.4g}" for k, v in metrics_host.items()
                     if k.endswith("loss") or k in ("grad_norm", "learning_rate"))
  if policy == "stop":
    raise FloatingPointError(f"non-finite loss, gradient or update at step {step} ({detail}); the "
                             "update was not applied and nothing non-finite was saved. Set "
                             "nan_policy='skip' to skip such steps.")
  logging.warning("non-finite loss, gradient or update at step %d (%s): update skipped", step, detail)
  return True


def _window_means(host_metrics):
  """A logging window's metrics: losses averaged, counters and LR at the window's end."""
  last = host_metrics[-1]
  mean = {k: float(np.mean([m[k] for m in host_metrics])) for k in last
          if k not in ("finite", "learning_rate", "nonfinite_steps")}
  mean["learning_rate"] = float(last["learning_rate"])
  mean["nonfinite_steps"] = int(last["nonfinite_steps"])
  return mean


def validate_common(config) -> None:
  """The loop's own settings, checked before anything is built."""
  def positive(name, v):
    # Finite in float32 too: 1e39 passes as a Python float but is inf in the optimizer.
    if not (isinstance(v, (int, float)) and np.isfinite(v) and 0 < v <= float(np.finfo(np.float32).max)):
      raise ValueError(f"{name} must be a finite positive number, got {v!r}")

  if int(config.total_steps) <= 0:
    raise ValueError(f"total_steps must be positive, got {config.total_steps}")
  if not 0 <= int(config.seed) < 2 ** 31:   # grain's samplers take a non-negative int32
    raise ValueError(f"seed must be in [0, 2**31), got {config.seed}")
  if config.nan_policy not in NAN_POLICIES:
    raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {config.nan_policy!r}")
  if config.grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {config.grad_accum_steps}")
  positive("learning_rate", config.learning_rate)
  for name in ("log_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep"):
    if int(config[name]) < 1:
      raise ValueError(f"{name} must be >= 1, got {config[name]}")
  if config.eval_every_steps < 0 or config.eval_batches < 0:
    raise ValueError("eval_every_steps and eval_batches must be >= 0")
  if config.warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {config.warmup_steps}")
  o = config.optim
  for name in ("b1", "b2"):
    if not (np.isfinite(o[name]) and 0.0 <= o[name] < 1.0):
      raise ValueError(f"optim.{name} must be in [0, 1), got {o[name]!r}")
  positive("optim.eps", o.eps)
  if not (np.isfinite(o.weight_decay) and o.weight_decay >= 0):
    raise ValueError(f"optim.weight_decay must be finite and >= 0, got {o.weight_decay!r}")
  if not (np.isfinite(o.end_lr_factor) and o.end_lr_factor >= 0):
    raise ValueError(f"optim.end_lr_factor must be finite and >= 0, got {o.end_lr_factor!r}")
  if not np.isfinite(config.grad_clip_norm):
    raise ValueError(f"grad_clip_norm must be finite (<= 0 disables it), got {config.grad_clip_norm!r}")
  for pat, mult in config.optim.groups:
    if not (np.isfinite(mult) and mult >= 0):
      raise ValueError(f"optim.groups multiplier for {pat!r} must be finite and >= 0, got {mult!r}")


# ----------------------------------------------------------------------------- the loop
# How a multi-host job is launched, not what it trains: they differ between processes and
# between launches (num_processes stays: it changes the data order).
LAUNCH_FIELDS = ("distributed", "coordinator_address", "process_id", "distributed_timeout_s",
                 "heartbeat_timeout_s")


def _settings(config) -> dict:
  """{dotted name: value} of a config's training settings, as JSON gives them back (tuples become
  lists)."""
  def flat(d, prefix):
    for k, v in d.items():
      yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]
  settings = dict(flat(json.loads(json.dumps(config.to_dict(), default=str)), ""))
  return {k: v for k, v in settings.items() if k not in LAUNCH_FIELDS}


def _recorded_settings(workdir: str, say=None) -> dict | None:
  """WORKDIR/run_config.json (the settings of the run's last start); None without a readable one."""
  path = os.path.join(os.path.abspath(workdir), RUN_CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      recorded = json.load(f)
    if not isinstance(recorded, dict):
      raise ValueError("not a JSON object")
    return recorded
  except (OSError, ValueError) as e:
    if say:
      say(f"note: {path} is unreadable ({e}); it is rewritten")
    return None


def run_config_changes(workdir: str, config, say) -> list[str]:
  """'KEY OLD -> NEW' for each setting that differs from WORKDIR/run_config.json (the run's
  last start); [] without one."""
  before = _recorded_settings(workdir, say)
  if before is None:
    return []
  now = _settings(config)
  return [f"{k} {before.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}"
          for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]


def resume_config(config, workdir: str, say=print):
  """config for a run in `workdir`: on a resume, init_from is the run's first start's. It made
  the step-0 state the checkpoints carry on, so the export names it whatever this command says,
  and a resume never reads it: a parent deleted since does not stop the run."""
  if config.get("init_from") is None or not run_checkpoints.saved_steps(workdir):
    return config
  recorded = _recorded_settings(workdir)   # unreadable: run_config_changes says so
  if recorded is None:
    return config
  recorded, given = recorded.get("init_from", ""), config.init_from
  if recorded != given:
    say(f"note: a resume keeps the run's first init_from ({recorded or 'none'}); "
        f"--config.init_from={given or '(none)'} is not used")
  if recorded and not os.path.isdir(recorded):
    say(f"note: init_from {recorded} is gone; the checkpoints do not need it, but the export "
        "cannot name what the run started from")
    recorded = ""
  if recorded != given:
    config = copy.deepcopy(config)
    config.init_from = recorded
  return config


def record_run_config(workdir: str, config) -> None:
  """Writes WORKDIR/run_config.json: the settings of this start (process 0)."""
  if jax.process_index() == 0:
    with cli.atomic_write(os.path.join(workdir, RUN_CONFIG_FILE)) as tmp, open(tmp, "w") as f:
      json.dump(_settings(config), f, indent=2, sort_keys=True)


def check_workdir(workdir: str) -> None:
  """A workdir is new, empty, one a run used before (it holds the run's lock file or its
  checkpoints) or one holding only a `sample` directory (the embedded sample's default place,
  which ensure_sample checks in turn): a run never writes its files into a user's directory."""
  if not os.path.lexists(workdir):
    return
  if not os.path.isdir(workdir):
    raise FileExistsError(f"--workdir {workdir} exists and is not a directory")
  entries = set(os.listdir(workdir))
  if entries and not entries & {LOCK_FILE, run_checkpoints.CHECKPOINT_DIR} and entries != {"sample"}:
    raise FileExistsError(f"--workdir {workdir} holds files of something else (e.g. "
                          f"{sorted(entries)[0]!r}); give a new or empty directory, or an earlier run's workdir")


def run(task, workdir: str, *, stop_at_step: int | None = None) -> dict:
  """Runs (or resumes) `task` in `workdir`; returns final metrics, the state and the history.

  stop_at_step: leave the loop after that step (after checkpointing it), as a preemption
  would; rerunning resumes. The schedule still spans config.total_steps.
  """
  workdir = os.path.abspath(workdir)
  check_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  writer = MetricWriter(workdir)
  with WorkdirLock(workdir, say=writer.print):
    try:
      return _run_locked(task, workdir, writer, stop_at_step)
    finally:
      writer.close()


def _run_locked(task, workdir, writer, stop_at_step):
  config = task.config
  total = int(config.total_steps)
  export_dir = os.path.join(workdir, "export")
  # Read from the listing, before Orbax starts its threads: one still cleaning up as the
  # interpreter exits printed a page of "cannot schedule new futures after shutdown".
  saved = run_checkpoints.saved_steps(workdir)
  if saved and saved[-1] >= total and (os.path.isdir(export_dir) or not config.export):
    past = f" (past total_steps {total})" if saved[-1] > total else ""
    writer.print(f"already finished at step {saved[-1]}{past} ({export_dir if config.export else workdir}); "
                 "nothing to do. Use another --workdir (or raise --config.total_steps) to train more.")
    return {"step": saved[-1], "state": None, "history": [], "finished_before": True}
  mngr = run_checkpoints.manager(workdir, config)
  try:
    task.prepare_workdir(workdir)
    writer.print(task.describe())
    if total > 1 and int(config.warmup_steps) >= total:   # optim.schedule clamps it
      writer.print(f"note: warmup_steps {config.warmup_steps} >= total_steps {total}: the LR warms up "
                   f"over {total - 1} steps and never decays")
    paths = task.data_paths(workdir)
    make_iterators = lambda: {k: iter(v) for k, v in task.make_loaders(paths).items()}
    aux = task.init_aux()
    changes = run_config_changes(workdir, config, writer.print) if saved else []
    try:
      latest, state, iterators = run_checkpoints.restore_latest(
          mngr, task.abstract_state(), make_iterators, say=writer.print)
    except ValueError as e:  # the checkpoints refused: a changed setting is the likely cause
      if changes:
        raise ValueError(f"{e} Changed since the run's last start: {'; '.join(changes)}.") from None
      raise
    if state is not None:
      writer.print(f"resumed from step {latest} ({os.path.join(workdir, 'checkpoints', str(latest))})")
      if changes:  # a resume takes the new settings: a longer schedule, another learning rate
        writer.print(f"resuming with {len(changes)} setting(s) changed since the run's last start: "
                     + "; ".join(changes))
      if latest > total:
        writer.print(f"note: step {latest} is past total_steps {total}: nothing to train; the state of "
                     f"step {latest} is {'exported' if config.export else 'final'} as it is")
    else:
      state = task.init_state(aux)
    record_run_config(workdir, config)
    return _train(task, workdir, writer, mngr, paths, aux, state, iterators, stop_at_step)
  except KeyboardInterrupt:
    run_checkpoints.finish(mngr)  # a save in flight completes: it may be the step to resume from
    latest = mngr.latest_step()
    writer.print("interrupted: " + (f"rerun the same command to resume from step {latest} (the last "
                                    "checkpoint)" if latest is not None else
                                    "no checkpoint yet, so a rerun starts from step 0"))
    raise
  finally:
    run_checkpoints.finish(mngr)
    mngr.close()


def _train(task, workdir, writer, mngr, paths, aux, state, iterators, stop_at_step):
  config = task.config
  step = int(jax.device_get(state.step))
  train_step = make_train_step(task)
  eval_step = make_eval_step(task)  # traced and compiled on first use only
  total = int(config.total_steps)
  last = min(total, stop_at_step) if stop_at_step is not None else total
  window, window_start, pending = [], time.time(), None
  rates, seen_shapes, final, history = [], set(), {}, []
  timed_from = None  # (step, time) after the first compiled step: the ETA excludes compilation
  compiled_in_window = False

  def settle():
    """Checks the newest dispatched step (the state must be clean before it is saved)."""
    nonlocal pending
    if pending is not None:
      check_finite(jax.device_get(pending[1]), pending[0], config.nan_policy)
      pending = None

  if step == 0 and config.eval_every_steps > 0:  # baseline before any update
    ev = evaluate(task, eval_step, state, aux, paths)
    writer.print(f"step {step} eval " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()))
    writer.scalars(step, ev, "eval")
  while step < last:
    host = {k: next(it) for k, it in iterators.items()}
    shape_key = tuple((k, v["image"].shape[1]) for k, v in host.items())
    if shape_key not in seen_shapes:
      seen_shapes.add(shape_key)
      compiled_in_window = True  # this window's time is mostly compilation: no images/s from it
      writer.print(f"step {step}: compiling the train step for image sizes {dict(shape_key)}")
    state, metrics = train_step(state, aux, task.device_batches(host))
    step += 1
    # Check the previous step while this one runs (no pipeline stall).
    settle()
    pending = (step, metrics)
    window.append(metrics)

    if step % config.log_every_steps == 0 or step == last:
      host_metrics = jax.device_get(window)
      settle()
      now = time.time()
      if timed_from is None:
        timed_from = (step, now)
        eta = None
      else:
        rates.append(len(window) / max(now - window_start, 1e-9))
        eta = (total - step) * (now - timed_from[1]) / max(step - timed_from[0], 1)
      rate = len(window) / max(now - window_start, 1e-9)  # steps/s
      mean = _window_means(host_metrics)
      if not compiled_in_window:
        mean["images_per_sec"] = rate * task.images_per_step
      parts = [f"{k}={mean[k]:.4f}" for k in task.log_keys if k in mean]
      speed = f"{mean['images_per_sec']:.1f} img/s" if not compiled_in_window else "img/s: compiling"
      writer.print(f"step {step}/{total} " + " ".join(parts) +
                   f" lr={mean['learning_rate']:.3g} {speed}"
                   f" skipped={mean['nonfinite_steps']} eta "
                   + (cli.duration(eta) if eta is not None else "(after compilation)"))
      compiled_in_window = False
      writer.scalars(step, mean, "train")
      history.append(dict(mean, step=step))
      final.update({f"train/{k}": v for k, v in mean.items()})
      window, window_start = [], time.time()

    if step % config.checkpoint_every_steps == 0 or step == last:
      settle()
      run_checkpoints.save(mngr, step, state, iterators, force=True)

    if config.eval_every_steps > 0 and (step % config.eval_every_steps == 0 or step == total):
      eval_start = time.time()
      ev = evaluate(task, eval_step, state, aux, paths)
      writer.print(f"step {step} eval " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()))
      writer.scalars(step, ev, "eval")
      final.update({f"eval/{k}": v for k, v in ev.items()})
      window_start = time.time()  # keep eval time out of images/s and the ETA
      if timed_from is not None:
        timed_from = (timed_from[0], timed_from[1] + (window_start - eval_start))
  settle()
  run_checkpoints.finish(mngr)
  if step >= total and config.export:
    export_dir = os.path.join(workdir, "export")
    task.export(state, export_dir)
    writer.print(f"exported to {export_dir}")
  final.update(step=step, state=state, history=history)
  return final
