"""The training loop: ``train(config, workdir)``.

What it does, in order:

0. The config becomes a typed, checked ``RunConfig`` (``config.run_config``, once: train_main.py
   passes its own), the mesh and the tokenizer are made, and what the config alone does not
   show is checked (``preflight.check_before_writing``), before anything is written to the
   workdir.
1. ``jax.distributed.initialize`` when the run is multi-process (``maybe_initialize_distributed``).
2. Mesh ``data x fsdp x tensor`` (``config.mesh``), logical axis rules, parameter / optimizer
   state / batch shardings.
3. The dataset (built once by process 0), this host's grain iterator.
4. The train state: restored from ``<workdir>/checkpoints`` when one exists (any mesh shape;
   the data iterator resumes where it was), else initialised (random, sharded at creation
   by ``jax.jit(out_shardings=...)``; optionally decoder weights from a GGUF file, or the
   parameters of another run's checkpoint, ``config.init_from_checkpoint``).
5. The loop: jitted step (K of the progressive top-K is computed inside it: one compile),
   a progress line logged every ``train.log_every`` steps (``logging`` under the
   ``gaze_jax.train`` name, which absl's handler formats under ``train_main.py``; from Python
   or a notebook that configured no logging, ``gaze_jax.logs.show_progress`` prints it to
   stderr), metrics to ``<workdir>/metrics.jsonl`` and TensorBoard ``<workdir>/tb``
   (``train/loss``, ``train/token_accuracy``, ...; ``eval/loss``, ``eval/token_accuracy``,
   ``eval/exact_match``), periodic teacher-forced evaluation, asynchronous checkpoints.
6. SIGTERM (preemption): the current step finishes, a checkpoint is written, the loop stops;
   rerunning the same command resumes.

With ``train.profile_steps`` a ``jax.profiler`` trace of that many steps (the first ones after
the step that compiles) goes to ``<workdir>/profile`` (``gaze_jax.train.profile``).

With ``train.log_fingerprints`` each step's batch fingerprint goes to
``<workdir>/data_log.<process>.jsonl`` (``{"step", "process", "fingerprint"}``), to check the
data order across restarts.

The workdir may be a local folder or ``gs://bucket/...``: every file goes through
``etils.epath`` (``gaze_jax.paths``), the dataset of a ``gs://`` data_dir through a local
mirror (``gaze_jax.data.builders``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from gaze_jax import logs
from gaze_jax.convert import gguf
from gaze_jax.data.tokenizers import fingerprint as tokenizer_fingerprint
from gaze_jax.gaze.accounting import train_flops
from gaze_jax.model.mllm import MLLM
from gaze_jax.train import checkpoint as ckpt_lib
from gaze_jax.train import data as data_lib
from gaze_jax.train import metrics as metrics_lib
from gaze_jax.train import model_init
from gaze_jax.train import preflight
from gaze_jax.train import sharding as shard_lib
from gaze_jax.train.config import RunConfig, run_config
from gaze_jax.train.dicts import config_json
from gaze_jax.train.optim import make_optimizer, trainable_mask
from gaze_jax.train.profile import StepProfile
from gaze_jax.train.nonfinite import NonFiniteGuard, check_finite
from gaze_jax.train.resume import check_resume
from gaze_jax.train.step import TrainStep, check_static_grids, step_batch
from gaze_jax.train.tokenizer import run_tokenizer
from gaze_jax.train.workdir_lock import WorkdirLock

log = logging.getLogger("gaze_jax.train")


def maybe_initialize_distributed(run: RunConfig) -> bool:
  """Calls ``jax.distributed.initialize`` for a multi-process run, before any device use.

  Multi-process when ``config.distributed.coordinator_address`` is set (with
  ``num_processes`` and ``process_id``), or when the environment names a coordinator
  (``JAX_COORDINATOR_ADDRESS``, or the cluster variables jax detects itself: Slurm, TPU pods,
  ``config.distributed.auto=True``). On CPU, cross-process collectives use gloo.
  Returns whether it initialised.
  """
  dist = run.distributed
  addr = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  auto = dist.auto
  if not addr and not auto:
    return False
  if dist.cpu_collectives:
    try:
      jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
    except Exception as e:  # older / newer jax without the option
      log.info("cpu collectives option not set: %s", e)
  kw = {}
  if addr:
    kw = dict(coordinator_address=addr,
              num_processes=int(dist.num_processes or os.environ.get("JAX_NUM_PROCESSES", 1)),
              process_id=int(dist.process_id if dist.process_id >= 0
                             else os.environ.get("JAX_PROCESS_ID", 0)))
  jax.distributed.initialize(**kw)
  log.info("jax.distributed: process %d of %d, %d local / %d global devices",
           jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


@dataclasses.dataclass
class Setup:
  """Everything the loop needs, built from a run config (also used by tests). ``model_cfg``
  is the model the step compiles (``RunConfig.train_model``), ``spec`` the layout, ``plan`` the
  top-K plan."""
  config: RunConfig
  model_cfg: Any
  spec: Any
  plan: Any
  mesh: Any
  rules: Any
  graphdef: Any
  rest: Any
  abstract_params: Any
  abstract_opt_state: Any
  tx: Any
  lr_fn: Any
  state_shardings: Any
  batch_sharding: Any
  train_step: TrainStep
  # The step once the top-K warm-up is over (None without one): compiled with the static
  # target K, so it no longer gathers the K_max - K regions that ``train_step`` masks.
  settled_step: Optional[TrainStep] = None


def build(config: Any, mesh=None) -> Setup:
  """Model, optimizer and shardings for ``config`` (a ``RunConfig``, or what ``run_config``
  converts) on ``mesh`` (default from ``config.mesh``)."""
  run = run_config(config)
  model_cfg, spec, plan = run.train_model, run.spec, run.topk
  check_static_grids(model_cfg, jax.process_count())
  mesh = mesh or shard_lib.make_mesh(dataclasses.asdict(run.mesh))
  rules = run.logical_axis_rules
  shards = shard_lib.batch_shards(rules, mesh)
  if run.data.batch_size % shards:
    raise ValueError(f"config.data.batch_size={run.data.batch_size} must be a multiple of "
                     f"the {shards} batch shards of mesh {dict(mesh.shape)}")
  gd, abs_state, rest = ckpt_lib.abstract_params(model_cfg)
  abs_params = nnx.to_pure_dict(abs_state)
  pshard = shard_lib.named(mesh, shard_lib.param_specs(abs_state, rules, mesh))
  tx, lr_fn = make_optimizer(run.optim, abs_params, run.train.num_steps)
  abs_opt = jax.eval_shape(tx.init, abs_params)
  repl = NamedSharding(mesh, P())
  oshard = shard_lib.opt_state_shardings(tx, abs_opt, pshard, repl)
  state_shardings = {"params": pshard, "opt_state": oshard, "step": repl}
  mask = trainable_mask(abs_params, run.optim.param_groups)
  kv_heads = model_cfg.decoder.num_kv_heads
  skip = run.train.on_nonfinite == "skip"
  step = TrainStep(gd, rest, tx, lr_fn, spec, plan, mask, kv_heads, rules, skip_nonfinite=skip)
  settled = None
  target_cfg = run.model
  if plan.gaze and target_cfg != model_cfg:
    gd_t, _, rest_t = ckpt_lib.abstract_params(target_cfg)
    settled = TrainStep(gd_t, rest_t, tx, lr_fn, spec,
                        dataclasses.replace(plan, start=plan.target, warmup_steps=0), mask,
                        kv_heads, rules, skip_nonfinite=skip)
  return Setup(run, model_cfg, spec, plan, mesh, rules, gd, rest, abs_params, abs_opt, tx,
               lr_fn, state_shardings, NamedSharding(mesh, shard_lib.batch_spec(rules, mesh)),
               step, settled)


def init_state(s: Setup, seed: int) -> dict:
  """A fresh train state, each array created directly with its sharding."""
  def init():
    model = MLLM(s.model_cfg, rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {"params": params, "opt_state": s.tx.init(params), "step": jnp.zeros((), jnp.int32)}
  return jax.jit(init, out_shardings=s.state_shardings)()


def hf_init_state(s: Setup, folder: str, seed: int) -> dict:
  """A fresh train state whose parameters come from a Hugging Face folder, read straight into
  their shardings (``model_init.init_params``); the optimizer state is made on the mesh."""
  params = model_init.init_params(
      folder, s.model_cfg, ckpt_lib.abstract_like(s.abstract_params, s.state_shardings["params"]),
      seed=seed)
  opt_state = jax.jit(s.tx.init, out_shardings=s.state_shardings["opt_state"])(params)
  return {"params": params, "opt_state": opt_state,
          "step": jax.device_put(jnp.zeros((), jnp.int32), s.state_shardings["step"])}


def _load_decoder_init(s: Setup, state: dict, source: str) -> dict:
  """Replaces the decoder weights by those of a GGUF file ("gguf:smollm2" or a path)."""
  path = gguf.find_smollm2_gguf() if source == "gguf:smollm2" else source
  lm = gguf.load_gguf_causal_lm(path)
  got = nnx.to_pure_dict(nnx.state(lm, nnx.Param))["decoder"]
  want = s.abstract_params["decoder"]
  if jax.tree.structure(got) != jax.tree.structure(want):
    raise ValueError(f"{path}: its decoder parameters do not match config.model.decoder")
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    if tuple(g.shape) != tuple(w.shape):
      raise ValueError(f"{path}: decoder shapes differ from config.model.decoder "
                       f"({g.shape} vs {w.shape})")
  params = dict(state["params"])
  params["decoder"] = jax.device_put(jax.tree.map(lambda g, w: np.asarray(g, w.dtype), got, want),
                                     s.state_shardings["params"]["decoder"])
  log.info("initialised the decoder from %s", path)
  return {**state, "params": params}


def _meta(s: Setup, tokenizer) -> dict:
  """What a checkpoint records of its run. ``model``: the model the steps compile (K = the
  schedule's start); ``trained_model``: the model the run trains to (the target K), which
  evaluation and serving build (``gaze_jax.runs.restore``)."""
  return {"model": dataclasses.asdict(s.model_cfg),
          "trained_model": _jsonable(dataclasses.asdict(s.config.model)),
          "config": config_json(s.config),
          "topk_plan": dataclasses.asdict(s.plan),
          "tokenizer": {"name": s.config.data.tokenizer,
                        "fingerprint": tokenizer_fingerprint(tokenizer)}}


def _jsonable(x):
  return json.loads(json.dumps(x, default=str))


class _Preemption:
  """SIGTERM sets a flag; the loop saves and stops after the current step. Before the first
  step has run (the data's first batch, the step's compile) there is nothing to save: SIGTERM
  ends the run at once (``SystemExit``)."""

  def __init__(self):
    self.requested = False
    self.started = False                 # set by the loop once a step has run
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:          # not the main thread: no handler
      self._old = None
    return self

  def _handle(self, signum, frame):
    if not self.started:
      log.warning("SIGTERM received before the first step: stopping (nothing to save)")
      signal.signal(signal.SIGTERM, self._old if self._old is not None else signal.SIG_DFL)
      raise SystemExit(128 + signum)
    self.requested = True
    log.warning("SIGTERM received: saving a checkpoint after this step, then stopping")

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def agreed(self) -> bool:
    """The flag, OR-ed over processes (every host must stop at the same step)."""
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.asarray([self.requested], np.int32))
    return bool(np.max(flags))


def tower_patches(run: RunConfig, cfg) -> int:
  """The vision tower's patches per frame slot (for the FLOPs): a Qwen-VL tower's at the
  largest bucket (``config.data.buckets``), else the square image's; 0 without a tower."""
  if cfg.qwen_vision is not None:
    p = cfg.qwen_vision.patch_size
    buckets = data_lib.media_processor(run).buckets
    return max((H // p) * (W // p) for H, W in buckets)
  v = cfg.vision
  return 0 if v is None else (v.image_size // v.patch_size) ** 2


def evaluate(s: Setup, params, builder, tokenizer, *, max_batches: int,
             eval_fn=None) -> dict:
  """Teacher-forced answer metrics on ``config.data.eval_split`` (the first ``max_batches``
  batches, in order), at the target K: ``loss`` (per answer token), ``token_accuracy`` (share
  of answer tokens argmax-correct), ``exact_match`` (share of examples whose answer tokens all
  are; what ``eval_main.py`` reports as ``accuracy``) and ``examples``."""
  it = data_lib.make_iterator(s.config, builder, tokenizer, s.model_cfg, s.spec, train=False)
  k = jnp.int32(s.plan.target) if s.plan.gaze else None
  sums, n_tok, n_ex = {}, 0.0, 0.0
  for i, batch in enumerate(it):
    if i >= max_batches:
      break
    gb = step_batch(batch, s.batch_sharding, s.model_cfg)
    m = jax.device_get(eval_fn(params, gb, k))
    n_tok += float(m["answer_tokens"])
    n_ex += float(m["examples"])
    for key, w in (("loss", m["answer_tokens"]), ("token_accuracy", m["answer_tokens"]),
                   ("exact_match", m["examples"])):
      sums[key] = sums.get(key, 0.0) + float(m[key]) * float(w)
  if not n_tok:
    return {}
  return {"loss": sums["loss"] / n_tok, "token_accuracy": sums["token_accuracy"] / n_tok,
          "exact_match": sums["exact_match"] / max(n_ex, 1.0), "examples": n_ex}


def train(config: Any, workdir, *, mesh=None, stop_after: Optional[int] = None) -> dict:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint). Returns a summary
  (final step, last train / eval metrics, wall time, whether it was preempted).

  ``stop_after``: stop (with a checkpoint) after this many steps of this call (tests).
  """
  t_begin = time.time()
  logs.show_progress()          # plain Python / a notebook: the progress lines show
  workdir = epath.Path(workdir)
  primary = jax.process_index() == 0
  # Everything checkable is checked before the workdir is written.
  run = run_config(config)
  s = build(run, mesh)
  tokenizer = run_tokenizer(run)
  folder = model_init.hf_folder(run.init)
  if folder is not None:           # the folder's weights fit the model: checked from the headers
    model_init.check_folder(folder, s.model_cfg, s.abstract_params)
  # The workdir, dtype, tokenizer, smallest example and memory: refused before any write.
  preflight.check_before_writing(run, workdir, tokenizer)
  # One run per workdir: a second one would overwrite the first's checkpoints and metrics.
  # SIGTERM: until the first step has run, the run ends at once; from then on after a save.
  with _Preemption() as pre, WorkdirLock(workdir) if primary else contextlib.nullcontext():
    return _run(run, workdir, s, tokenizer, folder, pre, stop_after=stop_after,
                t_begin=t_begin)


def _restore(s: Setup, ckpt: ckpt_lib.Checkpointer, tokenizer) -> Optional[ckpt_lib.Restored]:
  """The latest checkpoint, once its meta says it is this run's (``check_resume``: same
  weights' shapes, tokenizer and training settings), checked before any weight is read; None
  without one. Refuses non-finite parameters."""
  abs_params = ckpt_lib.abstract_like(s.abstract_params, s.state_shardings["params"])
  abs_opt = ckpt_lib.abstract_like(s.abstract_opt_state, s.state_shardings["opt_state"])
  checked = None
  if ckpt.latest_step() is not None:
    try:
      checked, meta = ckpt.read_meta()
    except ckpt_lib.CheckpointError as e:   # a damaged step: the restore falls back past it
      log.warning("%s", e)
    else:
      check_resume(meta, s.config, s.model_cfg, tokenizer,
                   f"checkpoint step {checked} in {ckpt.directory}")
  restored = ckpt.restore(abs_params, abs_opt, fallback=s.config.checkpoint.fallback)
  if restored is None:
    return None
  where = f"checkpoint step {restored.step} in {ckpt.directory}"
  if restored.step != checked:
    check_resume(restored.meta, s.config, s.model_cfg, tokenizer, where)
  check_finite(restored.params, where)
  return restored


def _run(run: RunConfig, workdir: epath.Path, s: Setup, tokenizer, folder, pre: "_Preemption", *,
         stop_after: Optional[int], t_begin: float) -> dict:
  """``train`` once the config is checked and the workdir is this run's."""
  primary = jax.process_index() == 0
  tc = run.train
  num_steps = tc.num_steps
  log.info("mesh %s; model: decoder %d layers x %d, attention %s%s", dict(s.mesh.shape),
           s.model_cfg.decoder.num_layers, s.model_cfg.decoder.hidden_size,
           s.model_cfg.gaze.attention,
           f" K {s.plan.start}->{s.plan.target} over {s.plan.warmup_steps} steps ({s.plan.shape})"
           if s.plan.gaze else "")

  cc = run.checkpoint
  ckpt = ckpt_lib.Checkpointer(workdir / ckpt_lib.CHECKPOINT_DIR, save_every=cc.save_every,
                               keep=cc.keep, async_save=cc.async_save)
  try:
    restored = _restore(s, ckpt, tokenizer)
  except BaseException:
    ckpt.close()
    raise
  data_state = None
  if restored is not None:
    state = {"params": restored.params, "opt_state": restored.opt_state,
             "step": jax.device_put(jnp.int32(restored.step), s.state_shardings["step"])}
    d = restored.data or {}
    if d.get("process_count") == jax.process_count():
      data_state = d["states"][jax.process_index()]
    else:
      log.warning("checkpoint data state is for %s processes, this run has %d: the data "
                  "iterator restarts from its beginning", d.get("process_count"),
                  jax.process_count())
    log.info("resumed from step %d of %s", restored.step, ckpt.directory)
  else:
    if folder is not None:
      state = hf_init_state(s, folder, tc.seed)
    else:
      state = init_state(s, tc.seed)
      if run.init:
        state = _load_decoder_init(s, state, run.init)
    src = run.init_from_checkpoint
    if src:
      other = ckpt_lib.Checkpointer(epath.Path(src) / ckpt_lib.CHECKPOINT_DIR, read_only=True)
      got = other.restore(ckpt_lib.abstract_like(s.abstract_params, s.state_shardings["params"]))
      other.close()
      if got is None:
        raise ckpt_lib.CheckpointError(f"config.init_from_checkpoint: no checkpoint in {src}")
      check_finite(got.params, f"config.init_from_checkpoint: step {got.step} of {src}")
      state = {**state, "params": got.params}
      log.info("initialised the parameters from step %d of %s", got.step, src)
  # Written once the state is this config's: a refused resume leaves the run's config.json.
  if primary:
    (workdir / "config.json").write_text(json.dumps(config_json(run), indent=2))
  builder = data_lib.prepare(run, workdir)
  start = int(jax.device_get(state["step"]))
  it = data_lib.make_iterator(run, builder, tokenizer, s.model_cfg, s.spec, train=True,
                              state=data_state)

  metric_sharding = NamedSharding(s.mesh, P())
  step_fn = s.train_step.jit(s.state_shardings, s.batch_sharding, metric_sharding)
  # Past the warm-up (state step >= warmup_steps) K is the target for good: the settled step.
  settled_fn = (s.settled_step.jit(s.state_shardings, s.batch_sharding, metric_sharding)
                if s.settled_step is not None else None)
  eval_fn = jax.jit((s.settled_step or s.train_step).eval_fn,
                    in_shardings=(s.state_shardings["params"], s.batch_sharding, None),
                    out_shardings=metric_sharding)
  logger = metrics_lib.MetricsLogger(workdir, enabled=primary, start_step=start)
  if logger.dropped:
    log.info("metrics.jsonl: dropped %d record(s) past step %d (logged before the run stopped; "
             "this run redoes those steps)", logger.dropped, start)
  fp_log = None
  if tc.log_fingerprints:
    fp_path = workdir / f"data_log.{jax.process_index()}.jsonl"
    # The steps past the checkpoint are redone: their rows go, as in metrics.jsonl.
    metrics_lib.drop_records_after(fp_path, start)
    fp_log = metrics_lib.JsonlWriter(fp_path)
  log_every, eval_every, eval_batches = tc.log_every, tc.eval_every, tc.eval_batches
  B, S = run.data.batch_size, s.spec.seq_len
  flops = train_flops(s.model_cfg, batch=B, seq_len=S, frames=s.spec.max_images,
                      patches=tower_patches(run, s.model_cfg))
  peak = metrics_lib.peak_flops(jax.devices()[0].device_kind, tc.peak_flops_per_device)
  log.info("train FLOPs per step %.3g; peak %s FLOP/s per device; %d devices", flops,
           f"{peak:.3g}" if peak else "unknown", jax.device_count())
  meta = _meta(s, tokenizer)
  guard = NonFiniteGuard(skip=tc.on_nonfinite == "skip", max_skipped=tc.max_skipped,
                         sharding=metric_sharding)
  # The first steps after the one that compiles (this start's first).
  profile = StepProfile(workdir / "profile", first=start + 2, steps=tc.profile_steps)
  last, last_eval, preempted = {}, {}, False
  t_mark, step_mark, t_loop = time.time(), start, time.time()
  s_done = start
  # The mesh as context while the steps trace: the Pallas kernels run in shard_map over it.
  with jax.set_mesh(s.mesh):
    for s_done in range(start + 1, num_steps + 1):
      batch = next(it)
      if fp_log is not None:
        fp_log.write({"step": s_done, "process": jax.process_index(),
                      "fingerprint": data_lib.fingerprint(batch)})
      fn = step_fn
      if settled_fn is not None and s_done - 1 >= s.plan.warmup_steps:
        if s_done - 1 == max(start, s.plan.warmup_steps) and primary:
          log.info("step %d: K reached its target %d; compiling the step for K = %d (K_max was "
                   "%d)", s_done, s.plan.target, s.plan.target, s.plan.start)
        fn = settled_fn
      profile.before(s_done)
      state, metrics = fn(state, step_batch(batch, s.batch_sharding, s.model_cfg))
      profile.after(s_done, state)
      pre.started = True
      guard.update(s_done, metrics["finite"])
      stop = pre.agreed() or (stop_after is not None and s_done - start >= stop_after)
      force = stop or s_done == num_steps
      logged = s_done % log_every == 0 or s_done == num_steps or s_done == start + 1
      if logged or force or ckpt.should_save(s_done):
        # Before a save: a state past a non-finite step is never saved.
        guard.check(s_done, metrics, ckpt, lambda: (ckpt.close(), logger.close()))
      if logged:
        m = {k: float(x) for k, x in jax.device_get(metrics).items()}
        if guard.skip:
          m["skipped_steps"] = float(guard.skipped)
        now = time.time()
        dt = max(now - t_mark, 1e-9)
        steps_dt = s_done - step_mark
        m["tokens_per_s"] = B * S * steps_dt / dt
        m["steps_per_s"] = steps_dt / dt
        if peak:
          m["mfu"] = flops * steps_dt / dt / (peak * jax.device_count())
        # The first step of a (re)start includes compilation: no ETA from it.
        eta = (None if s_done == start + 1 else
               (num_steps - s_done) / max(m["steps_per_s"], 1e-9))
        if primary:
          log.info("%s", metrics_lib.progress_line(s_done, num_steps, m, m["tokens_per_s"], eta))
        logger.write(s_done, m)
        last = m
        t_mark, step_mark = time.time(), s_done
      if eval_every and (s_done % eval_every == 0 or s_done == num_steps):
        last_eval = evaluate(s, state["params"], builder, tokenizer, max_batches=eval_batches,
                             eval_fn=eval_fn)
        if last_eval:
          logger.write(s_done, last_eval, prefix="eval")
          if primary:
            log.info("eval step %d: loss %.4f | token accuracy %.3f | exact match %.3f (%d "
                     "examples)", s_done, last_eval["loss"], last_eval["token_accuracy"],
                     last_eval["exact_match"], int(last_eval["examples"]))
        t_mark = time.time()      # do not count eval time in tokens/s
      ckpt.save(s_done, state, it.get_state(), meta, force=force)
      if stop:
        preempted = pre.requested
        log.warning("stopping at step %d (%s); checkpoint saved, rerun to resume", s_done,
                    "SIGTERM" if preempted else "stop_after")
        break
  profile.stop(state)
  ckpt.close()
  logger.close()
  if fp_log is not None:
    fp_log.close()
  summary = {"step": s_done, "train": last, "eval": last_eval, "preempted": preempted,
             "wall_s": time.time() - t_begin, "loop_s": time.time() - t_loop,
             "traces": s.train_step.traces + (s.settled_step.traces if s.settled_step else 0)}
  if primary:
    (workdir / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2))
  return summary
