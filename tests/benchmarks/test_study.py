"""The study runner with a stand-in for train_main / eval_main: the commands carry the seed,
a finished (run, seed) is skipped on the next call (resume), and the summary's mean and
standard deviation over seeds are the hand-computed ones."""

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import study


def _fake_executor(calls, accuracy_by_seed):
  """Records each command; an eval command writes an eval_results.json whose gaze accuracy is
  ``accuracy_by_seed[seed]``."""
  def execute(cmd):
    calls.append(cmd)
    if cmd[1].endswith("train_main.py"):
      workdir = next(a for a in cmd if a.startswith("--workdir=")).split("=", 1)[1]
      (Path(workdir) / "checkpoints").mkdir(parents=True, exist_ok=True)
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
      (out / "gaze_maps" / "test").mkdir(parents=True)
      for i in range(study.GAZE_MAPS + 1):
        (out / "gaze_maps" / "test" / f"gaze_map_{i:04d}.png").write_bytes(b"png %d" % i)
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
  # The first GAZE_MAPS gaze maps of each (run, seed) are kept beside the JSON, in order.
  kept = sorted(p.name for p in (tmp_path / "res" / "t" / "gaze_maps").iterdir())
  assert kept == [f"a_s{s}_{i}.png" for s in range(3) for i in range(study.GAZE_MAPS)]
  assert (tmp_path / "res" / "t" / "gaze_maps" / "a_s1_2.png").read_bytes() == b"png 2"
  rec = json.loads((tmp_path / "res" / "t" / "a_s2.json").read_text())
  assert rec["seed"] == 2 and set(rec["seconds"]) == {"train", "eval"}
  assert json.loads((tmp_path / "res" / "t" / "summary.json").read_text())["runs"] == \
      summary["runs"]


def test_unknown_sweep_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="unknown sweep 'nope'"):
    study.run_sweep("nope", [0], out=tmp_path)


def _record(tmp, sweep, run, seed, acc, top1_layers, salience_layers):
  rec = {"run": run, "seed": seed, "date": "2026-12-03", "machine": "test machine",
         "seconds": {"train": 120.0 * (seed + 1), "eval": 1.0},
         "results": {"gaze": {"accuracy": acc, "visual_kv": {"fraction_of_dense": 0.25},
                              "routing": {"top1": sum(top1_layers) / len(top1_layers),
                                          "top1_per_layer": top1_layers,
                                          "top1_salience_per_layer": salience_layers,
                                          "top1_random_per_layer": [0.0625] * len(top1_layers),
                                          "accuracy": 0.2, "share_ceiling": 0.5}},
                     "dense": {"accuracy": 0.9, "visual_kv": {"fraction_of_dense": 1.0}}}}
  path = tmp / sweep / f"{run}_s{seed}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(rec))


def test_study_report_tables_plots_and_markers(tmp_path):
  """The doc's marked section is replaced by tables whose figures are the seeds' mean ± std
  (worked out by hand), per layer with top-1 / salience, and the two plots are written."""
  from benchmarks import study_report

  pytest.importorskip("matplotlib")
  res = tmp_path / "res"
  _record(res, "sw", "g", 0, 0.5, [0.1, 0.4], [0.2, 0.2])
  _record(res, "sw", "g", 1, 0.7, [0.1, 0.6], [0.2, 0.2])
  from PIL import Image
  maps = res / "sw" / "gaze_maps"
  maps.mkdir(parents=True)
  for seed in (0, 1):
    for i in range(2):
      Image.new("RGB", (20, 10), (200, 0, 0)).save(maps / f"g_s{seed}_{i}.png")
  doc = tmp_path / "docs" / "study.md"
  doc.parent.mkdir()
  doc.write_text("# Study\n\nintro\n<!-- study:sw begin -->\nold\n<!-- study:sw end -->\ntail\n")
  assert study_report.main([f"--doc={doc}", f"--results={res}"]) == 0
  text = doc.read_text()
  assert "old" not in text and text.startswith("# Study\n\nintro\n") and text.endswith("tail\n")
  # accuracy 60.0 ± 14.1 (sample std of 50, 70); visual KV 25; share / ceiling 0.2 / 0.5;
  # train minutes (2 + 4) / 2 = 3.0 ± 1.4.
  row = next(l for l in text.splitlines() if l.startswith("| g | gaze | 2 |"))
  assert "| 60.0 ± 14.1 | 25 ± 0 |" in row and "| 0.40 |" in row and "| 3.0 ± 1.4 |" in row
  # Layer 1: top-1 50.0 ± 14.1, salience 20.0, ratio 2.50.
  layer = next(l for l in text.splitlines() if l.startswith("| g | gaze | 1 |"))
  assert "| 50.0 ± 14.1 | 6.2 ± 0.0 | 20.0 ± 0.0 | 2.50 |" in layer
  grid = Image.open(tmp_path / "docs" / "study" / "sw_gaze_maps.png")
  assert grid.size == (44, 30) and "(study/sw_gaze_maps.png)" in text     # one row: seed 0's 2
  narrow = tmp_path / "narrow.png"                        # only one 20 px map fits in 30 px
  assert study_report.gaze_map_grid(res, "sw", narrow, max_width=30)
  assert Image.open(narrow).size == (20, 30)
  for kind in ("accuracy", "routing"):
    png = tmp_path / "docs" / "study" / f"sw_{kind}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(study/sw_{kind}.png)" in text
  assert "No results yet" in study_report.sweep_section("none", results=res)


def test_runs_start_from_an_earlier_run_of_the_same_seed(tmp_path, monkeypatch):
  """``init_from``: the later run's training starts from the earlier run's workdir at the same
  seed; a run naming a later (or missing) run is refused before anything trains."""
  monkeypatch.setitem(study.SWEEPS, "t", (study.Run("base", "configs/demo.py", baselines=()),
                                          study.Run("ft", "configs/demo.py", init_from="base")))
  calls = []
  kw = dict(out=tmp_path / "out", results=tmp_path / "res", log=lambda m: None)
  study.run_sweep("t", [0, 1], execute=_fake_executor(calls, {0: 0.2, 1: 0.4}), **kw)
  trains = [c for c in calls if c[1].endswith("train_main.py")]
  assert len(trains) == 4
  base_runs = [c for c in trains if any(a.endswith("/base/s0") or a.endswith("/base/s1")
                                        for a in c if a.startswith("--workdir="))]
  assert all(not any(a.startswith("--config.init_from_checkpoint") for a in c)
             for c in base_runs)
  ft1 = next(c for c in trains if f"--workdir={tmp_path / 'out' / 't' / 'ft' / 's1'}" in c)
  assert f"--config.init_from_checkpoint={tmp_path / 'out' / 't' / 'base' / 's1'}" in ft1
  assert json.loads((tmp_path / "res" / "t" / "ft_s1.json").read_text())["init_from"] == "base"
  # A fresh clone: base's JSON is there, its workdir is not. A new run starting from it trains
  # base again into its workdir first (and does not rewrite its JSON).
  import shutil
  shutil.rmtree(tmp_path / "out")
  base_json = (tmp_path / "res" / "t" / "base_s0.json").read_text()
  monkeypatch.setitem(study.SWEEPS, "t2", (study.Run("ft2", "configs/demo.py",
                                                     init_from="t/base"),))
  calls.clear()
  study.run_sweep("t2", [0], execute=_fake_executor(calls, {0: 0.3}), **kw)
  assert [c[1].rsplit("/", 1)[1] for c in calls] == ["train_main.py"] * 2 + ["eval_main.py"]
  assert f"--workdir={tmp_path / 'out' / 't' / 'base' / 's0'}" in calls[0]
  assert f"--config.init_from_checkpoint={tmp_path / 'out' / 't' / 'base' / 's0'}" in calls[1]
  assert (tmp_path / "res" / "t" / "base_s0.json").read_text() == base_json
  monkeypatch.setitem(study.SWEEPS, "bad", (study.Run("ft", "configs/demo.py", init_from="base"),
                                            study.Run("base", "configs/demo.py")))
  with pytest.raises(ValueError, match="not an earlier run"):
    study.run_sweep("bad", [0], execute=_fake_executor([], {0: 0.1}), **kw)
  monkeypatch.setitem(study.SWEEPS, "other", (study.Run("x", "configs/demo.py",
                                                        init_from="nosuch/base"),))
  with pytest.raises(ValueError, match="not a run of sweep 'nosuch'"):
    study.run_sweep("other", [0], execute=_fake_executor([], {0: 0.1}), **kw)
  # A first stage that exists but has not run for this seed.
  monkeypatch.setitem(study.SWEEPS, "later", (study.Run("y", "configs/demo.py",
                                                        init_from="t/base"),))
  with pytest.raises(RuntimeError, match="has not finished for seed 5"):
    study.run_sweep("later", [5], execute=_fake_executor([], {5: 0.1}), **kw)


def test_init_seed_converts_one_first_stage_at_every_seed(tmp_path, monkeypatch):
  """``init_seed``: every seed of the later run starts from the first stage of that one seed
  (retrained first when its workdir is missing), and its own seed flags stay its own."""
  monkeypatch.setitem(study.SWEEPS, "t", (
      study.Run("base", "configs/demo.py", baselines=()),
      study.Run("ft", "configs/demo.py", init_from="base", init_seed=0)))
  calls = []
  kw = dict(out=tmp_path / "out", results=tmp_path / "res", log=lambda m: None)
  study.run_sweep("t", [0, 1, 2], execute=_fake_executor(calls, {0: .2, 1: .4, 2: .6}), **kw)
  base0 = f"--config.init_from_checkpoint={tmp_path / 'out' / 't' / 'base' / 's0'}"
  for seed in (1, 2):
    ft = next(c for c in calls if f"--workdir={tmp_path / 'out' / 't' / 'ft' / f's{seed}'}" in c
              and c[1].endswith("train_main.py"))
    assert base0 in ft and f"--config.train.seed={seed}" in ft
    rec = json.loads((tmp_path / "res" / "t" / f"ft_s{seed}.json").read_text())
    assert (rec["init_from"], rec["init_seed"]) == ("base", 0)
  # Seed 0's first stage missing on disk (a fresh clone): trained again at seed 0, not at 5.
  import shutil
  shutil.rmtree(tmp_path / "out" / "t" / "base" / "s0")
  calls.clear()
  study.run_sweep("t", [5], execute=_fake_executor(calls, {5: .1}), **kw)
  retrain = next(c for c in calls if f"--workdir={tmp_path / 'out' / 't' / 'base' / 's0'}" in c)
  assert "--config.train.seed=0" in retrain


def test_only_seeds_trains_a_first_stage_once(tmp_path, monkeypatch):
  """``only_seeds``: the first stage trains at seed 0 alone, every seed converts it; a run that
  would start from a seed it skips is refused before anything trains."""
  monkeypatch.setitem(study.SWEEPS, "t", (
      study.Run("base", "configs/demo.py", baselines=(), only_seeds=(0,)),
      study.Run("ft", "configs/demo.py", init_from="base", init_seed=0)))
  calls = []
  kw = dict(out=tmp_path / "out", results=tmp_path / "res", log=lambda m: None)
  summary = study.run_sweep("t", [0, 1, 2], execute=_fake_executor(calls, {0: .2, 1: .4, 2: .6}),
                            **kw)
  trained = sorted(next(a for a in c if a.startswith("--workdir=")).rsplit("/", 2)[1:]
                   for c in calls if c[1].endswith("train_main.py"))
  assert trained == [["base", "s0"], ["ft", "s0"], ["ft", "s1"], ["ft", "s2"]]
  assert summary["runs"]["base"]["seeds"] == [0] and summary["runs"]["ft"]["seeds"] == [0, 1, 2]
  monkeypatch.setitem(study.SWEEPS, "bad", (
      study.Run("base", "configs/demo.py", baselines=(), only_seeds=(0,)),
      study.Run("ft", "configs/demo.py", init_from="base")))
  with pytest.raises(ValueError, match="trains only at seeds \\(0,\\); give init_seed"):
    study.run_sweep("bad", [1], execute=_fake_executor([], {1: .1}), **kw)


def _run_config(run):
  """The run's config file with its overrides set (as the command line would)."""
  import importlib
  module = importlib.import_module(run.config.removesuffix(".py").replace("/", "."))
  c = module.get_config()
  for dotted, value in run.overrides:
    *path, field = dotted.split(".")
    node = c
    for p in path:
      node = node[p]
    node[field] = value
  return c


@pytest.mark.parametrize("sweep", sorted(study.SWEEPS))
def test_every_sweep_run_builds_and_starts_from_matching_parameters(sweep):
  """Each run's overrides name real fields and give a valid model and top-K plan; a run with
  ``init_from`` has exactly its first stage's parameter shapes (else the restore would fail
  an hour into the sweep)."""
  import jax
  from gaze_jax.train import checkpoint as ckpt_lib
  from gaze_jax.train.config import run_config

  def shapes(run):
    _, params, _ = ckpt_lib.abstract_params(run_config(_run_config(run)).train_model)
    return jax.tree.map(lambda x: (x.shape, x.dtype), params)

  for run in study.SWEEPS[sweep]:
    got = shapes(run)
    if run.init_from:
      _, first = study.first_stage(sweep, run)
      assert got == shapes(first), (run.name, run.init_from)


def test_goals_table_figures_and_verdicts():
  """Each goal's figure from hand-made results: gaze_k3 0.5 points under dense (met), gaze_k1
  3 points over eviction but 1 over random routing (not met), per-layer ratios, and the
  ablations' differences."""
  from benchmarks import study_report

  def rec(run, results, attention="gaze"):
    return {"run": run, "seed": 0, "seconds": {"train": 1.0}, "model": {"attention": attention},
            "results": results}

  routing = {"top1_per_layer": [0.1, 0.5, 0.3], "top1_salience_per_layer": [0.2, 0.2, 0.2],
             "coverage_per_layer": [0.4, 0.3, 0.6], "per_layer": [0.1, 0.2, 0.1],
             "share_ceiling_per_layer": [0.3, 0.3, 0.3]}
  main = study_report.collect([
      rec("dense", {"dense_trained": {"accuracy": 0.600}}, attention="dense"),
      rec("gaze_k3", {"gaze": {"accuracy": 0.595, "routing": routing,
                               "visual_kv": {"fraction_of_dense": 0.24}},
                      "fixed_from_question": {"accuracy": 0.5},
                      "random_routing": {"accuracy": 0.3}}),
      rec("gaze_k1", {"gaze": {"accuracy": 0.50, "routing": routing,
                               "visual_kv": {"fraction_of_dense": 0.12}},
                      "fixed_from_question": {"accuracy": 0.47},
                      "random_routing": {"accuracy": 0.49}})])
  abl = study_report.collect([rec("gaze_k3_ctx0", {"gaze": {"accuracy": 0.60}}),
                              rec("gaze_k3_sparse_from_step_0", {"gaze": {"accuracy": 0.55}}),
                              rec("gaze_k1_ctx0", {
                                  "gaze": {"accuracy": 0.40,
                                           "visual_kv": {"fraction_of_dense": 0.06}},
                                  "fixed_from_question": {"accuracy": 0.37},
                                  "random_routing": {"accuracy": 0.10}})])
  lines = study_report.goals_table(main, abl).splitlines()

  def line(start):
    return next(l for l in lines if l.startswith(f"| {start}"))

  assert line("gaze_k3 at 24% of the visual KV: within").endswith(
      "| -0.5 points (gaze_k3 - dense) | yes |")
  assert line("gaze_k1 at 12% of the visual KV: within").endswith(
      "| -10.0 points (gaze_k1 - dense) | no |")
  assert line("gaze_k3 at 24%: clearly").endswith(
      "| +9.5 points vs eviction, +29.5 points vs random routing | yes |")
  assert line("gaze_k1 at 12%: clearly").endswith(
      "| +3.0 points vs eviction, +1.0 points vs random routing | no |")
  assert line("gaze_k1_ctx0 at 6% (no context tokens): clearly").endswith(
      "| +3.0 points vs eviction, +30.0 points vs random routing | yes |")
  assert line("gaze_k3, layers after the first: top-1").endswith("| 2.50x / 1.50x | no |")
  assert line("gaze_k3, layers after the first: coverage").endswith("| 0.30 / 0.60 | no |")
  assert line("gaze_k3, layers after the first: share").endswith("| 0.67 / 0.33 | no |")
  assert line("context tokens help").endswith("| -0.5 points (gaze_k3 - gaze_k3_ctx0) | no |")
  assert line("the progressive schedule").endswith(
      "| +4.5 points (gaze_k3 - gaze_k3_sparse_from_step_0) | yes |")
  # Against the main sweep on the ablations' seeds only (gaze_k3 at 0.65 there).
  on_seeds = study_report.collect([rec("gaze_k3", {"gaze": {"accuracy": 0.65}})])
  lines = study_report.goals_table(main, abl, main_on_ablation_seeds=on_seeds).splitlines()
  assert line("the progressive schedule").endswith(
      "| +10.0 points (gaze_k3 - gaze_k3_sparse_from_step_0) | yes |")
  # A sweep whose gaze_k3 is sparse from step 0 ablates the schedule by adding it; without a
  # gaze_k1_ctx0 run there is no smallest-budget row.
  abl = study_report.collect([rec("gaze_k3_progressive", {"gaze": {"accuracy": 0.58}})])
  lines = study_report.goals_table(main, abl).splitlines()
  assert not any(l.startswith("| gaze_k1_ctx0") for l in lines)
  assert line("the progressive schedule").endswith(
      "| -1.5 points (gaze_k3_progressive - gaze_k3) | no |")


def test_kv_entries_table_for_the_video_sweep(tmp_path):
  """The video sweep's section lists the visual KV entries per query, mean ± std over seeds
  (worked out by hand); other sweeps' sections do not."""
  from benchmarks import study_report

  res = tmp_path / "res"
  for sweep in ("video", "other"):
    for seed, measured in ((0, 10.0), (1, 14.0)):
      rec = {"run": "g", "seed": seed, "date": "2026-12-06", "machine": "test machine",
             "seconds": {"train": 60.0, "eval": 1.0},
             "results": {"gaze": {"accuracy": 0.5, "visual_kv": {
                 "measured": measured, "configured": 12.0, "dense_measured": 40.0,
                 "fraction_of_dense": measured / 40.0}},
                         "answer_prior": {"accuracy": 0.2}}}
      path = res / sweep / f"g_s{seed}.json"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(rec))
  table = study_report.kv_entries_table(study.collect(study.load_records(res, "video")))
  # measured: mean 12, sample std sqrt(((10-12)^2 + (14-12)^2) / 1) = 2.83.
  assert "| g | gaze | 12.0 ± 2.8 | 12.0 ± 0.0 | 40.0 ± 0.0 |" in table.splitlines()
  assert not any(line.startswith("| g | answer_prior") for line in table.splitlines())
  assert table in study_report.sweep_section("video", results=res)
  assert "Visual KV entries" not in study_report.sweep_section("other", results=res)


def _family_record(run, top_k, attention="gaze", overrides=None):
  return {"run": run, "seed": 0, "config": "configs/demo.py", "init_from": "base",
          "overrides": {**({} if top_k is None else {"model.gaze.top_k": top_k}),
                        **(overrides or {})},
          "model": {"attention": attention, "top_k": top_k, "num_ctx": 4, "num_layers": 2}}


def test_accuracy_plot_colours_each_run_and_joins_only_one_method_at_several_k(tmp_path):
  """Every run has its own colour (12 runs: more than tab10 holds); lines join only the runs
  that differ in K alone (gaze_k1 / gaze_k3 / gaze_k4, row by row, in budget order), never a
  run that changes anything else (ctx0) nor a dense run."""
  pytest.importorskip("matplotlib")
  from benchmarks import study_report

  records = [_family_record("gaze_k3", None), _family_record("gaze_k1", 1),
             _family_record("gaze_k4", 4), _family_record("gaze_k3_ctx0", None,
                                                          overrides={"model.gaze.num_ctx": 0}),
             _family_record("dense", None, attention="dense")]
  records += [_family_record(f"other_{i}", 3, overrides={"train.num_steps": 10 + i})
              for i in range(7)]
  fam = study_report.run_families(records)
  assert fam["gaze_k1"] == fam["gaze_k3"] == fam["gaze_k4"]
  assert len({fam[r] for r in ("gaze_k3", "gaze_k3_ctx0", "dense", "other_0")}) == 4

  def stats(budget, acc):
    return {"accuracy": {"mean": acc, "std": 0.0, "n": 1},
            "visual_kv.fraction_of_dense": {"mean": budget, "std": 0.0, "n": 1}}

  budgets = {"gaze_k1": 0.1, "gaze_k3": 0.3, "gaze_k4": 0.4, "gaze_k3_ctx0": 0.2}
  st = {}
  for r in fam:
    b = budgets.get(r, 0.3)
    st[(r, "gaze")] = stats(b, 0.5)
    st[(r, "random_routing")] = stats(b, 0.1)
    st[(r, "dense" if r != "dense" else "dense_trained")] = stats(1.0, 0.9)
  png = tmp_path / "acc.png"
  drawn = study_report.plot_accuracy(st, png, "t", fam)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert set(drawn["colours"]) == set(fam) and len(set(drawn["colours"].values())) == 12
  # One line per row that the family has at distinct budgets; the dense rows (all at 100%)
  # are not joined.
  assert sorted(drawn["lines"]) == [("gaze", ["gaze_k1", "gaze_k3", "gaze_k4"]),
                                    ("random_routing", ["gaze_k1", "gaze_k3", "gaze_k4"])]
  # Without families: points only.
  assert study_report.plot_accuracy(st, png, "t")["lines"] == []
  assert study_report.run_colours(["a", "b", "a"]) == {"a": "#1f77b4", "b": "#ff7f0e"}


def test_a_video_gaze_map_is_wrapped_and_its_frames_captioned(tmp_path):
  """A gaze map as eval_main draws it for a video (4 frames side by side in each of 4 layers,
  2104 px wide) comes into the doc's grid at most 1200 px wide: two layers per line, every
  panel captioned with its layer and frame and copied unchanged (positions worked out by
  hand from the drawing's geometry)."""
  from PIL import Image as PILImage

  from benchmarks import study_report
  from gaze_jax.eval import gaze_maps
  from gaze_jax.gaze import LayoutSpec, Text, Video, build_layout

  spec = LayoutSpec(seq_len=120, max_regions=16, max_images=4, region_shape=(2, 2), num_ctx=0)
  layout = build_layout([[Text(2), Video(4, 4, 4), Text(4)]], spec)
  rows = [int(r) for r in np.flatnonzero(np.asarray(layout.kind)[0] == 0)[-2:]]
  sel = [np.full((1, 120, 2, 1), -1, np.int32) for _ in range(4)]
  for layer in range(4):
    sel[layer][0, rows[0]] = 4 * layer + 1
  images = np.random.default_rng(0).uniform(-1, 1, (1, 4, 64, 64, 3)).astype(np.float32)
  res = tmp_path / "res"
  maps = res / "vid" / "gaze_maps"
  (path,) = gaze_maps.write_gaze_maps(maps, images, layout, sel, {0: rows},
                                      layers=[0, 1, 2, 3], labels={0: ["token 0", "token 1"]},
                                      titles={0: ["question", "answers", "legend"]},
                                      panel_size=160)
  src = PILImage.open(path).convert("RGB")
  assert src.size == (2104, 342)              # 4 layers x (4 x 127 + 3 x 4) + 3 x 8
  geo = study_report.gaze_map_geometry(src.size, 4)
  assert (geo["layers"], geo["frames"], geo["rows"], geo["pw"], geo["ph"]) == (4, 4, 2, 127, 127)
  assert study_report.gaze_map_geometry(src.size, 3) is None
  assert study_report.gaze_map_geometry((20, 10)) is None
  PILImage.open(path).save(maps / "v_s0_0.png")
  (res / "vid" / "v_s0.json").write_text(json.dumps({"run": "v", "seed": 0,
                                                      "model": {"num_layers": 4}}))
  out = tmp_path / "grid.png"
  assert study_report.gaze_map_grid(res, "vid", out)
  grid = np.asarray(PILImage.open(out).convert("RGB"))
  # Run caption 14; title lines 42; per token: caption 14 and two lines of (14 + 127 + 4).
  assert grid.shape[:2] == (14 + 42 + 2 * (14 + 2 * 145) + 6, 1200)
  src = np.asarray(src)
  # Layer 3, frame 2 of token 1: at x 3 x 528 + 2 x 131 = 1846, y 56 + 145 + 14 = 215 in the
  # map; line 1 of token 1 in the grid: x 528 + 2 x 131 = 790, y 14 + 42 + 304 + 14 + 145 + 14.
  np.testing.assert_array_equal(grid[533:533 + 127, 790:790 + 127],
                                src[215:215 + 127, 1846:1846 + 127])
  # Every panel's caption row holds text; the map's own column captions are gone.
  assert grid[519:533, 790:790 + 127].max() > 0
