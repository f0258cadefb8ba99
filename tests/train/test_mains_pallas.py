"""``train_main.py`` and ``eval_main.py`` with the Pallas kernels (interpret mode on CPU): the
demo recipe, shrunk from the command line, trains a few steps and evaluates."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.train.helpers import ROOT


def _main(script, args, timeout=900):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  p = subprocess.run([sys.executable, str(ROOT / script)] + args, cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=timeout)
  assert p.returncode == 0, f"{script} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
  return p


# CI time (make test-all runs it): the kernels in the sharded train step are tested in
# test_sharded_pallas.py, the mains end to end in test_journey.py.
@pytest.mark.slow
def test_train_and_eval_mains_with_the_pallas_kernels(tmp_path):
  work = tmp_path / "run"
  config = ["--config=configs/demo.py", "--config.model.gaze.implementation=pallas",
            "--config.model.gaze.kernel.routed_rows=8",
            f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.batch_size=4",
            "--config.data.builder_overrides.num_train=16",
            "--config.data.builder_overrides.num_validation=8",
            "--config.data.builder_overrides.num_test=8"]
  _main("train_main.py", config + [f"--workdir={work}", "--config.train.num_steps=3",
                                   "--config.train.log_every=1", "--config.train.eval_every=0",
                                   "--config.checkpoint.save_every=3"])
  saved = json.loads((work / "config.json").read_text())
  assert saved["model"]["gaze"]["implementation"] == "pallas"
  assert saved["model"]["gaze"]["kernel"]["routed_rows"] == 8     # kept with the run
  steps = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in steps if "loss" in r]
  assert losses and all(math.isfinite(x) for x in losses)
  out = tmp_path / "eval"
  _main("eval_main.py", config + [f"--workdir={work}", f"--out_dir={out}", "--max_batches=1",
                                  "--num_gaze_maps=0", "--baselines=dense",
                                  "--noanswer_prior"])
  split = json.loads((out / "eval_results.json").read_text())["splits"][0]
  assert set(split["results"]) >= {"gaze", "dense"}
  assert 0.0 <= split["results"]["gaze"]["accuracy"] <= 1.0
