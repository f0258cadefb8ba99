"""The study runner with a stand-in for train_main / eval_main: the commands carry the seed,
a finished (run, seed) is skipped on the next call (resume), and the summary's mean and
standard deviation over seeds are the hand-computed ones."""

import json
from pathlib import Path

import pytest

from benchmarks import study


def _fake_executor(calls, accuracy_by_seed):
  """Records each command; an eval command writes an eval_results.json whose gaze accuracy is
  ``accuracy_by_seed[seed]``."""
  def execute(cmd):
    calls.append(cmd)
    if cmd[1].endswith("eval_main.py"):
      flags = dict(a[2:].split("=", 1) for a in cmd[2:] if a.startswith("--"))
      seed = int(flags["random_seed"])
      out = Path(flags["out_dir"])
      out.mkdir(parents=True, exist_ok=True)
      res = {"gaze": {"accuracy": accuracy_by_seed[seed],
                      "routing": {"top1": 0.5, "coverage": float("nan")}},
             "dense": {"accuracy": 0.5}}
      (out / "eval_results.json").write_text(json.dumps(
          {"splits": [{"split": "test", "examples": 10, "results": res}]}))
  return execute


def test_sweep_runs_each_seed_once_resumes_and_summarizes(tmp_path, monkeypatch):
  monkeypatch.setitem(study.SWEEPS, "t", (study.Run("a", "configs/demo.py",
                                                    overrides=(("train.num_steps", 5),)),))
  calls = []
  execute = _fake_executor(calls, {0: 0.2, 1: 0.4, 2: 0.9})
  kw = dict(out=tmp_path / "out", results=tmp_path / "res", execute=execute, log=lambda m: None)
  study.run_sweep("t", [0, 1], **kw)
  assert len(calls) == 4                                   # train + eval per seed
  train = calls[0]
  assert "--config.train.seed=0" in train and "--config.data.seed=0" in train
  assert "--config.train.num_steps=5" in train
  assert any(a.startswith("--config.data.data_dir=") for a in train)
  # Resume: seeds 0 and 1 are done; only seed 2 runs.
  summary = study.run_sweep("t", [0, 1, 2], **kw)
  assert len(calls) == 6 and "--config.train.seed=2" in calls[4]
  acc = summary["runs"]["a"]["rows"]["gaze"]["accuracy"]
  assert acc["n"] == 3 and acc["mean"] == pytest.approx(0.5)
  assert acc["std"] == pytest.approx(((0.09 + 0.01 + 0.16) / 2) ** 0.5)
  assert summary["runs"]["a"]["rows"]["dense"]["accuracy"]["std"] == 0.0
  assert "routing.coverage" not in summary["runs"]["a"]["rows"]["gaze"]   # NaN is left out
  rec = json.loads((tmp_path / "res" / "t" / "a_s2.json").read_text())
  assert rec["seed"] == 2 and set(rec["seconds"]) == {"train", "eval"}
  assert json.loads((tmp_path / "res" / "t" / "summary.json").read_text())["runs"] == \
      summary["runs"]


def test_unknown_sweep_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="unknown sweep 'nope'"):
    study.run_sweep("nope", [0], out=tmp_path)
