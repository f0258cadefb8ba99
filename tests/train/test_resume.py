"""Fault tolerance through ``train_main.py``: SIGKILL after a checkpoint then resume, SIGTERM
(preemption) saves and stops, and the final parameters and the per-step data order equal an
uninterrupted run's. Also damaged checkpoints and ``restore_model``."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.train.helpers import ROOT

NUM_STEPS = 40
CONFIG = """
from tests.train.helpers import small_config


def get_config():
  return small_config({data!r}, train__num_steps={n}, checkpoint__save_every=4,
                      train__log_fingerprints=True, train__log_every=2)
"""


def _launch(config_file, workdir):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.Popen([sys.executable, str(ROOT / "train_main.py"),
                           f"--config={config_file}", f"--workdir={workdir}"],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _finished(p, timeout=400):
  out, _ = p.communicate(timeout=timeout)
  return p.returncode, out


def _ckpt_steps(workdir):
  d = Path(workdir) / "checkpoints"
  if not d.exists():
    return []
  return sorted(int(x.name) for x in d.iterdir() if x.name.isdigit())


def _wait_for(cond, p, timeout=300):
  t0 = time.time()
  while not cond():
    if p.poll() is not None:
      raise AssertionError(f"training ended early ({p.returncode}):\n{p.stdout.read()[-4000:]}")
    if time.time() - t0 > timeout:
      p.kill()
      raise AssertionError("timed out waiting for the training run")
    time.sleep(0.02)


def _metric_steps(workdir, split="train"):
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  # A line being written may be partial.
  recs = [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]
  return [r["step"] for r in recs if r["split"] == split]


def _fingerprints(workdir):
  """step -> fingerprint, and the list of steps in log order (a resumed run drops the rows of
  the steps after its checkpoint, which it redoes)."""
  recs = [json.loads(x) for x in (Path(workdir) / "data_log.0.jsonl").read_text().splitlines()]
  return {r["step"]: r["fingerprint"] for r in recs}, [r["step"] for r in recs]


@pytest.fixture(scope="module")
def runs(train_data_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("resume")
  cfg = root / "cfg.py"
  cfg.write_text(CONFIG.format(data=str(train_data_dir), n=NUM_STEPS))
  a, b = root / "uninterrupted", root / "interrupted"
  pa = _launch(cfg, a)                          # runs while the interrupted run is driven
  # 1) SIGKILL once a checkpoint is complete and metrics were logged past it (steps the resumed
  #    run redoes).
  pb = _launch(cfg, b)
  _wait_for(lambda: _ckpt_steps(b) and max(_metric_steps(b), default=0) > max(_ckpt_steps(b)), pb)
  pb.send_signal(signal.SIGKILL)
  pb.wait()
  killed_at = _ckpt_steps(b)
  logged_past = max(_metric_steps(b)) > max(killed_at)
  # 2) Resume, then SIGTERM once it has gone past its checkpoint.
  logged = len(_fingerprints(b)[1])
  pb = _launch(cfg, b)
  _wait_for(lambda: len(_fingerprints(b)[1]) > logged + 2, pb)
  pb.send_signal(signal.SIGTERM)
  rc_term, out_term = _finished(pb)
  summary_term = json.loads((b / "summary.json").read_text())
  steps_after_term = _ckpt_steps(b)
  # 3) Resume to the end.
  rc_end, out_end = _finished(_launch(cfg, b))
  # The first step of each restart: right after the step it says it resumed from.
  first_steps = [int(re.search(r"resumed from step (\d+)", out).group(1)) + 1
                 for out in (out_term, out_end)]
  rc_a, out_a = _finished(pa)
  assert rc_a == 0, out_a[-4000:]
  assert rc_end == 0, out_end[-4000:]
  return dict(a=a, b=b, cfg=cfg, killed_at=killed_at, logged_past=logged_past,
              rc_term=rc_term, out_term=out_term,
              out_a=out_a,
              first_steps=first_steps,
              summary_term=summary_term, steps_after_term=steps_after_term)


def test_killed_run_had_not_finished(runs):
  assert runs["killed_at"] and max(runs["killed_at"]) < NUM_STEPS


def test_metrics_hold_every_step_once_after_kill_and_resume(runs):
  """The steps logged between the last checkpoint and the kill are dropped on resume: the
  resumed run logs them again."""
  assert runs["logged_past"]            # the kill did leave records past the checkpoint
  steps = _metric_steps(runs["b"])
  assert steps == sorted(set(steps)), steps
  assert set(_metric_steps(runs["a"])) <= set(steps) and steps[-1] == NUM_STEPS


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(runs):
  assert runs["rc_term"] == 0, runs["out_term"][-3000:]
  s = runs["summary_term"]
  assert s["preempted"] and s["step"] < NUM_STEPS
  assert s["step"] in runs["steps_after_term"]
  assert "SIGTERM" in runs["out_term"]


def test_resumed_run_matches_the_uninterrupted_run(runs):
  fa, order_a = _fingerprints(runs["a"])
  fb, order_b = _fingerprints(runs["b"])
  assert order_a == list(range(1, NUM_STEPS + 1))
  # Same batch at every step: nothing skipped, nothing repeated in the data order.
  assert sorted(fb) == list(range(1, NUM_STEPS + 1)) and fb == fa
  assert order_b == list(range(1, NUM_STEPS + 1))     # each step once, after two restarts
  assert len(set(fa.values())) > NUM_STEPS // 2      # the fingerprints do tell batches apart
  # Each restart resumed right after the checkpoint it restored.
  assert runs["first_steps"] == [max(runs["killed_at"]) + 1, runs["summary_term"]["step"] + 1]

  from gaze_jax.train.checkpoint import restore_model
  from tests.train.helpers import small_config
  from flax import nnx
  cfg = small_config("unused")
  ma, sa = restore_model(runs["a"], cfg)
  mb, sb = restore_model(runs["b"], cfg)
  assert sa == sb == NUM_STEPS
  pa, pb = nnx.state(ma, nnx.Param), nnx.state(mb, nnx.Param)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
  # The metrics file has the documented fields.
  rec = json.loads((runs["a"] / "metrics.jsonl").read_text().splitlines()[-1])
  for key in ("loss", "token_accuracy", "grad_norm", "lr", "k", "union_per_kv_head",
              "tokens_per_s"):
    assert key in rec
  assert list((runs["a"] / "tb").glob("events.out.tfevents.*"))
  # Past the 3-step K warm-up the run switched, once, to the step compiled for the target K.
  assert runs["out_a"].count("K reached its target 1") == 1, runs["out_a"][-3000:]
  assert json.loads((runs["a"] / "summary.json").read_text())["traces"] == 2


def test_restored_run_uses_the_target_k_on_its_eval_batches(runs, train_data_dir):
  """``gaze_jax.runs`` (what eval_main.py loads a run with): the model of a step at the target
  K, its layout spec and tokenizer, and one ordered pass over a split."""
  from gaze_jax import runs as run_lib
  from gaze_jax.train.config import run_config
  from tests.train.helpers import small_config
  cfg = run_config(small_config(train_data_dir))
  model, step, model_cfg, spec, tok, config = run_lib.restore(cfg, runs["a"], step=36)
  assert step == 36 and model.cfg.gaze.top_k == 1         # the target K, not the start
  assert model_cfg == model.cfg and spec == cfg.spec and config is cfg
  _, it = run_lib.eval_batches(cfg, runs["a"], model_cfg, spec, tok, "validation")
  assert len(list(it)) == 1                   # 8 validation examples, batch 8
  _, it = run_lib.eval_batches(cfg, runs["a"], model_cfg, spec, tok, "validation")
  from gaze_jax.data.features import batch_to_model_inputs
  tokens, images, layout, targets, mask, *_ = batch_to_model_inputs(next(it), spec)
  logits = model(tokens, layout, images)
  assert np.isfinite(np.asarray(logits)).all()


def test_a_run_is_restored_as_it_was_trained(runs, train_data_dir):
  """Without a config the run comes back as its checkpoint recorded it (the target K); a config
  of another model is refused, naming the fields, unless they are overridden out loud; a
  checkpoint of other weights is refused naming the fields, before any weight is read."""
  import dataclasses

  from gaze_jax import runs as run_lib
  from gaze_jax.train.checkpoint import CheckpointError, restore_model
  from gaze_jax.train.config import run_config
  from tests.train.helpers import small_config
  cfg = small_config(train_data_dir)
  trained, meta = run_lib.trained_model(runs["a"])
  assert trained == run_config(cfg).model and meta["trained_model"]["gaze"]["top_k"] == 1
  run = run_lib.restore(None, runs["a"])
  assert run.model_cfg == trained and run.model.cfg.gaze.top_k == 1 and run.step == NUM_STEPS
  # Another attention and K in --config: refused, both fields named.
  dense = small_config(train_data_dir)
  dense.model.gaze.attention = "dense"
  dense.model.gaze.top_k = 2
  with pytest.raises(ValueError, match=r"model.gaze.attention: trained 'gaze', --config 'dense'"
                     r".*model.gaze.top_k: trained 1, --config 2.*--override="):
    run_lib.restore(dense, runs["a"])
  # Said out loud, it is the same weights evaluated another way.
  over = run_lib.parse_overrides(["gaze.attention=dense", "gaze.top_k=2"])
  assert over == {"gaze.attention": "dense", "gaze.top_k": 2}
  run = run_lib.restore(dense, runs["a"], overrides=over)
  assert run.model_cfg.gaze.attention == "dense" and run.model_cfg.gaze.top_k == 2
  with pytest.raises(ValueError, match="decoder.hidden_size: only gaze.attention"):
    run_lib.parse_overrides(["decoder.hidden_size=64"])
  with pytest.raises(ValueError, match="use field=value"):
    run_lib.parse_overrides(["gaze.top_k"])
  # Other weights: the fields that differ, not a tree dump.
  wide = dataclasses.replace(trained, decoder=dataclasses.replace(trained.decoder,
                                                                  hidden_size=48))
  with pytest.raises(CheckpointError, match=r"holds another model's weights: "
                     r"decoder.hidden_size: checkpoint 32, asked 48"):
    restore_model(runs["a"], wide)


def test_eval_main_refuses_another_model_before_evaluating(runs, tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  p = subprocess.run([sys.executable, str(ROOT / "eval_main.py"), f"--config={runs['cfg']}",
                      f"--workdir={runs['a']}", "--config.model.gaze.attention=dense",
                      f"--out_dir={tmp_path / 'eval'}"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert p.returncode != 0
  assert "model.gaze.attention: trained 'gaze', --config 'dense'" in p.stderr, p.stderr[-3000:]
  assert "Traceback" not in p.stderr and not (tmp_path / "eval").exists()


def test_checkpoints_refuse_another_tokenizer(runs, train_data_dir):
  from gaze_jax.data.scenes import VOCABULARY
  from gaze_jax.data.tokenizers import ByteTokenizer, WordTokenizer
  from gaze_jax.train.checkpoint import CheckpointError, restore_model
  from tests.train.helpers import small_config
  cfg = small_config(train_data_dir)
  _, step = restore_model(runs["a"], cfg, tokenizer=ByteTokenizer())     # the run's own
  assert step == NUM_STEPS
  with pytest.raises(CheckpointError, match="tokenizer 'byte'.*token ids would not match"):
    restore_model(runs["a"], cfg, tokenizer=WordTokenizer(VOCABULARY))


def test_check_tokenizer_accepts_old_checkpoints_and_refuses_other_vocabularies():
  from gaze_jax.data.tokenizers import WordTokenizer, fingerprint
  from gaze_jax.train.checkpoint import CheckpointError, check_tokenizer
  tok = WordTokenizer(["red"])
  meta = {"tokenizer": {"name": "words", "fingerprint": fingerprint(tok)}}
  check_tokenizer(meta, tok, "here")
  check_tokenizer({"model": {}}, tok, "here")            # written before fingerprints
  check_tokenizer(None, tok, "here")
  with pytest.raises(CheckpointError, match="here was trained with tokenizer 'words'"):
    check_tokenizer(meta, WordTokenizer(["red", "blue"]), "here")


def test_eval_main_writes_table_answer_prior_and_gaze_maps(runs, tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = tmp_path / "eval"
  # As trained (its own config.json), with the routing's K overridden out loud.
  p = subprocess.run([sys.executable, str(ROOT / "eval_main.py"), f"--workdir={runs['a']}",
                      f"--out_dir={out}", "--max_batches=1", "--num_gaze_maps=1",
                      "--baselines=dense", "--override=gaze.top_k=2"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert p.returncode == 0, p.stderr[-4000:]
  assert "model overrides (not the trained model): gaze.top_k=2" in p.stdout
  split = json.loads((out / "eval_results.json").read_text())["splits"][0]
  assert split["model_overrides"] == {"gaze.top_k": 2}
  res = split["results"]
  assert set(res) == {"gaze", "dense", "answer_prior"}
  n = split["examples"]
  for row in res.values():
    by_type = row["by_type"]
    assert sum(t["examples"] for t in by_type.values()) == n
    # The per-type accuracies add back up to the row's accuracy.
    right = sum(t["accuracy"] * t["examples"] for t in by_type.values())
    assert right / n == pytest.approx(row["accuracy"])
  assert res["answer_prior"]["examples"] == n
  md = (out / "eval_results.md").read_text()
  assert "| answer prior (no image) |" in md and "Accuracy per question type" in md
  assert len(list((out / "gaze_maps" / "validation").glob("*.png"))) == 1


# ----------------------------------------------------------------------------- damage

def _small_state(v):
  return {"params": {"w": np.full((4, 3), v, np.float32)},
          "opt_state": {"m": np.full((4, 3), -v, np.float32)}}


def _abstract():
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  s = jax.ShapeDtypeStruct((4, 3), np.float32, sharding=dev)
  return {"w": s}, {"m": s}


def test_damaged_checkpoints_fall_back_loudly_or_raise(tmp_path, caplog):
  from gaze_jax.train.checkpoint import CheckpointError, Checkpointer
  ck = Checkpointer(tmp_path, save_every=1, keep=3, async_save=False)
  for step in (1, 2, 3):
    ck.save(step, jax.tree.map(jax.numpy.asarray, _small_state(step)), {"pos": step})
  ck.close()
  # Corrupt step 3's parameters (truncate every data file) and drop its checksums (as saved
  # before they were recorded: orbax's own error), remove step 2's parameters.
  for f in (tmp_path / "3" / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  (tmp_path / "3" / "checksums.json").unlink()
  for f in sorted((tmp_path / "2" / "params").rglob("*"), reverse=True):
    f.rmdir() if f.is_dir() else f.unlink()
  (tmp_path / "2" / "params").rmdir()
  # An interrupted save leaves a temporary folder.
  (tmp_path / "4.orbax-checkpoint-tmp-1234").mkdir()
  caplog.set_level(logging.WARNING)
  ck = Checkpointer(tmp_path, save_every=1, keep=3, async_save=False)
  assert "4.orbax-checkpoint-tmp-1234" in caplog.text and "incomplete" in caplog.text
  with pytest.raises(CheckpointError, match=f"{tmp_path / '3'} could not be restored"):
    ck.restore(*_abstract(), fallback=False)
  with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
    ck.restore(*_abstract(), step=7)
  got = ck.restore(*_abstract())
  assert got.step == 1 and float(got.params["w"][0, 0]) == 1.0
  assert got.data["states"] == [{"pos": 1}]
  assert f"checkpoint {tmp_path / '3'} could not be restored" in caplog.text
  assert f"checkpoint {tmp_path / '3'} has no checksums.json" in caplog.text
  assert f"checkpoint {tmp_path / '2'} is incomplete (step 2)" in caplog.text
  assert "falling back" in caplog.text
  assert ck.steps() == [1] and (tmp_path / "2.damaged").is_dir()     # moved aside
  ck.close()
  # Nothing restorable at all: one error listing every step.
  for f in (tmp_path / "1" / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  ck = Checkpointer(tmp_path, save_every=1, keep=3, async_save=False)
  with pytest.raises(CheckpointError, match="no checkpoint in .* could be restored"):
    ck.restore(*_abstract())
  ck.close()


def test_restore_model_without_checkpoints_says_so(tmp_path):
  from gaze_jax.train.checkpoint import CheckpointError, restore_model
  from tests.train.helpers import small_config
  with pytest.raises(CheckpointError, match="no checkpoint under"):
    restore_model(tmp_path, small_config("unused"))
