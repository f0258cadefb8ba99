"""The demo driver (benchmarks/demo.py): its steps, its record (no absolute path), that a run
(`make demo`) writes only into its run folder and publishing one (`make demo-readme`) the
repository's files, and the README section with the targets, from a hand-made evaluation whose
figures are worked out by hand."""

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import demo
from tests import makefile


def _routing(top1, salience, coverage):
  return {"top1_per_layer": top1, "top1_random_per_layer": [0.0625] * len(top1),
          "top1_salience_per_layer": salience, "coverage_per_layer": coverage}


def _record(gaze_acc=0.80, dense_acc=0.81):
  gaze = {"accuracy": gaze_acc, "configured": {"top_k": 2},
          "visual_kv": {"measured": 6.0, "fraction_of_dense": 0.3, "routing_candidates": 16.0},
          # Layer 0 has the best ratio but cannot count; layer 3's coverage is too high.
          "routing": _routing([0.9, 0.30, 0.40, 0.95], [0.1, 0.125, 0.125, 0.125],
                              [0.2, 0.25, 0.25, 0.6])}
  return {"split": "test", "examples": 512, "date": "2026-12-03", "machine": "2-core test box",
          "seconds": {"install": 120.0, "train_base": 240.0, "train_dense": 60.0,
                      "train_gaze": 90.0, "eval": 30.0},
          "results": {"gaze": gaze,
                      "dense": {"accuracy": 0.5, "visual_kv": {"measured": 20.0,
                                                               "fraction_of_dense": 1.0}},
                      # Its own best layer would be 3; the table shows the gaze model's, 2.
                      "random_routing": {
                          "accuracy": 0.2, "visual_kv": {"measured": 6.0,
                                                         "fraction_of_dense": 0.3},
                          "routing": _routing([0.1, 0.1, 0.07, 0.2], [0.125] * 4,
                                              [0.3] * 4)},
                      "demo_dense (trained, step 2000)": {
                          "accuracy": dense_acc,
                          "visual_kv": {"measured": 20.0, "fraction_of_dense": 1.0}},
                      "answer_prior": {"accuracy": 0.06}}}


ROOT = demo.ROOT


def _fake_step(run):
  """An ``execute`` for ``run_demo`` in the run folder ``run``: the evaluation writes its
  results and two gaze maps, training writes nothing."""
  def execute(cmd):
    if cmd[1].endswith("eval_main.py"):
      out = run / "gaze" / "eval"
      (out / "gaze_maps" / "test").mkdir(parents=True)
      (out / "eval_results.json").write_text(json.dumps({"splits": [
          {"split": "test", "examples": 512, "results": _record()["results"]}]}))
      for i in range(2):
        (out / "gaze_maps" / "test" / f"gaze_map_000{i}.png").write_bytes(b"png %d" % i)
  return execute


def _strings(x):
  if isinstance(x, dict):
    for k, v in x.items():
      yield k
      yield from _strings(v)
  elif isinstance(x, list):
    for v in x:
      yield from _strings(v)
  elif isinstance(x, str):
    yield x


def _absolute(record, *folders):
  """The strings of ``record`` that hold an absolute path or name one of ``folders``."""
  bad = []
  for s in _strings(record):
    value = s.split("=", 1)[1] if s.startswith("--") and "=" in s else s
    if value.startswith("/") or any(str(f) in s for f in folders):
      bad.append(s)
  return bad


def test_best_routing_layer_skips_the_first_layer_and_full_coverage():
  rt = _record()["results"]["gaze"]["routing"]
  assert demo.best_routing_layer(rt) == 2                  # 0.40 / 0.125 = 3.2x beats 2.4x
  assert demo.best_routing_layer({}) is None


def test_checks_figures_and_verdicts():
  (gap_t, gap_f, gap_ok), (rt_t, rt_f, rt_ok) = demo.checks(_record(0.80, 0.81))
  assert (gap_f, gap_ok) == ("-1.0 points", True)
  assert (rt_f, rt_ok) == ("layer 2: 3.20x at coverage 0.25", True)
  (_, gap_f, gap_ok), _ = demo.checks(_record(0.70, 0.725))
  assert (gap_f, gap_ok) == ("-2.5 points", False)
  low = _record()
  low["results"]["gaze"]["routing"] = _routing([0.9, 0.2, 0.2, 0.2], [0.1, 0.125, 0.125, 0.125],
                                               [0.2, 0.25, 0.25, 0.25])
  assert demo.checks(low)[1][1:] == ("layer 1: 1.60x at coverage 0.25", False)


def test_readme_table_rows_times_and_targets():
  text = demo.readme_table(_record())
  assert "2026-12-03 on a 2-core test box: 9.0 min (install 2.0, dense first stage 4.0, dense " \
         "twin 1.0, gaze model 1.5, evaluation 0.5)" in text
  assert "| gaze (K = 2 of 16 regions) | 80.0% | 6.0 | 30% | 40.0% (6.2%, 12.5%), layer 2 " \
         "| 0.25 |" in text
  assert "| the same weights, random regions at the same K | 20.0% | 6.0 | 30% | 7.0% (6.2%, " \
         "12.5%), layer 2 | 0.30 |" in text
  assert "| `demo_dense`: trained with dense attention | 81.0% | 20.0 | 100% | - | - |" in text
  assert "| answer prior (most common training answer, no image) | 6.0% | - | - | - | - |" in text
  assert "layer 2: 40% (3.2x salience, coverage 0.25)" in text
  assert text.count("| yes |") == 2
  assert "docs/demo_gaze_map.png" in text


def test_the_record_needs_one_trained_dense_row():
  rec = _record()
  del rec["results"]["demo_dense (trained, step 2000)"]
  with pytest.raises(ValueError, match="demo_dense"):
    demo.readme_table(rec)


def test_run_demo_times_each_step_in_order(tmp_path, monkeypatch):
  ran = []

  def execute(cmd):
    ran.append(cmd)
    _fake_step(tmp_path)(cmd)

  monkeypatch.setattr(demo, "install_seconds", lambda: 99.0)
  rec = demo.run_demo(tmp_path, execute=execute, log=lambda *_: None)
  assert [c[1].rsplit("/", 1)[-1] for c in ran] == ["train_main.py"] * 3 + ["eval_main.py"]
  configs = [next(a for a in c if a.startswith("--config=")) for c in ran]
  assert [c.rsplit("/", 1)[-1] for c in configs] == ["demo_base.py", "demo_dense.py",
                                                     "demo.py", "demo.py"]
  # Both second stages start from the first stage's parameters.
  init = f"--config.init_from_checkpoint={tmp_path / 'base'}"
  assert init not in ran[0] and init in ran[1] and init in ran[2]
  assert f"--compare_workdir={tmp_path / 'dense'}" in ran[3]
  assert "--splits=test" in ran[3] and f"--out_dir={tmp_path / 'gaze' / 'eval'}" in ran[3]
  # The demo's runs are the study's demo_seeds runs at seed 0.
  assert all("--config.train.seed=0" in c for c in ran[:3])
  assert "--config.model.gaze.top_k" not in " ".join(ran[2])   # gaze_k3: the config's K
  assert list(rec["seconds"]) == ["train_base", "train_dense", "train_gaze", "eval", "install"]
  assert rec["seconds"]["install"] == 99.0
  assert rec["examples"] == 512 and rec["split"] == "test"


def test_summary_line_and_readme_markers(tmp_path, monkeypatch):
  line = demo.summary_line(_record())
  assert "answers 80.0% of the test questions with 30% of the visual KV entries per query, " \
         "against 81.0% for its dense twin; in layer 2, the region it scores highest holds " \
         "the shape 3.2x as often" in line
  assert "(`make demo`, 2026-12-03 on a 2-core test box; the exact figures vary" in line
  readme = tmp_path / "README.md"
  readme.write_text(f"top\n{demo.SUMMARY_BEGIN}\nold\n{demo.SUMMARY_END}\nmid\n{demo.BEGIN}\n"
                    f"old table\n{demo.END}\nend\n")
  result = tmp_path / "demo.json"
  result.write_text(json.dumps(_record()))
  monkeypatch.setattr(demo, "RESULT", result)
  assert demo.main(["--table_only", f"--readme={readme}"]) == 0
  text = readme.read_text()
  assert "old table" not in text and "\nold\n" not in text and line in text and demo.readme_table(_record()) in text
  assert text.startswith("top\n") and text.endswith("end\n")


def test_a_rerun_says_which_steps_resumed(tmp_path, monkeypatch):
  (tmp_path / "base" / "checkpoints").mkdir(parents=True)     # an earlier first stage

  said = []
  monkeypatch.setattr(demo, "install_seconds", lambda: None)
  rec = demo.run_demo(tmp_path, execute=_fake_step(tmp_path), log=said.append)
  assert rec["resumed"] == ["train_base"] and "install" not in rec["seconds"]
  assert any("holds an earlier run" in m for m in said)
  text = demo.readme_table({**_record(), "resumed": rec["resumed"]})
  assert "Resumed from earlier runs, so not a fresh run's minutes: train_base." in text
  assert "Resumed" not in demo.readme_table(_record())


def test_portable_path():
  run = ROOT / "out" / "demo"
  assert demo.portable_path(str(ROOT / "configs" / "demo.py")) == "configs/demo.py"
  assert demo.portable_path(f"--workdir={run / 'base'}", run=run) == "--workdir=out/demo/base"
  assert demo.portable_path("/tmp/x/run/gaze/eval", run=Path("/tmp/x/run")) == "<run>/gaze/eval"
  assert demo.portable_path("--data_dir=/tmp/x/run", run=Path("/tmp/x/run")) == "--data_dir=<run>"
  assert demo.portable_path("/usr/local/bin/python3.11") == "python3.11"
  assert demo.portable_path(str(ROOT)) == "."
  for kept in ("--splits=test", "2-core x86_64 CPU machine (Linux)", "configs/demo.py", ""):
    assert demo.portable_path(kept) == kept


def test_the_demo_record_holds_no_absolute_path(tmp_path, monkeypatch):
  monkeypatch.setattr(demo, "install_seconds", lambda: None)
  raw = demo.run_demo(tmp_path, execute=_fake_step(tmp_path), log=lambda *_: None)
  assert _absolute(raw, tmp_path)                     # the steps themselves see absolute paths
  rec = demo.portable(raw, run=tmp_path)
  assert not _absolute(rec, ROOT, tmp_path), _absolute(rec, ROOT, tmp_path)
  base = rec["commands"]["train_base"]
  assert base[1:4] == ["train_main.py", "--config=configs/demo_base.py", "--workdir=<run>/base"]
  assert "--config.init_from_checkpoint=<run>/base" in rec["commands"]["train_gaze"]
  assert rec["gaze_maps"] == [f"<run>/gaze/eval/gaze_maps/test/gaze_map_000{i}.png"
                              for i in range(2)]
  # A run folder inside the repository (make demo's out/demo): relative to the repository.
  inside = demo.portable(raw, run=ROOT / "out" / "demo")
  assert not _absolute(inside, ROOT)
  # The committed record too.
  committed = json.loads((ROOT / "benchmarks" / "results" / "demo.json").read_text())
  assert not _absolute(committed, ROOT), _absolute(committed, ROOT)


def test_make_demo_writes_only_its_run_folder(tmp_path, monkeypatch):
  assert makefile.recipe("demo") == ["$(PY) -m benchmarks.demo --out=$(DEMO_DIR)"]
  assert makefile.recipe("demo-readme") == [
      "$(PY) -m benchmarks.demo --publish=$(DEMO_DIR) --readme=README.md"]
  demo_dir = makefile.variable("DEMO_DIR")
  ignored = subprocess.run(["git", "check-ignore", "-q", f"{demo_dir}/demo.json"], cwd=ROOT)
  assert ignored.returncode == 0, f"{demo_dir} is not ignored by git"
  # What `make demo` runs, with the steps faked: every file it writes lies in the run folder.
  tracked = tmp_path / "repo"
  monkeypatch.setattr(demo, "RESULT", tracked / "benchmarks" / "results" / "demo.json")
  monkeypatch.setattr(demo, "GAZE_MAP", tracked / "docs" / "demo_gaze_map.png")
  monkeypatch.setattr(demo, "replace_between", lambda *a: pytest.fail(f"wrote {a[0]}"))
  monkeypatch.setattr(demo, "install_seconds", lambda: None)
  run = tmp_path / "run"
  monkeypatch.setattr(demo, "run_step", _fake_step(run))
  assert demo.main([f"--out={run}"]) == 0
  assert not tracked.exists()
  assert {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")} == {"run"}
  record = json.loads((run / demo.RUN_RECORD).read_text())
  assert not _absolute(record, ROOT, run)
  assert (run / demo.RUN_SECTION).read_text().startswith(demo.summary_line(record))
  # Rewriting the README is for --publish / --table_only only.
  with pytest.raises(SystemExit):
    demo.main([f"--out={run}", "--readme=README.md"])


def test_publish_copies_a_run_into_the_repository(tmp_path, monkeypatch):
  run = tmp_path / "run"
  monkeypatch.setattr(demo, "install_seconds", lambda: None)
  monkeypatch.setattr(demo, "run_step", _fake_step(run))
  assert demo.main([f"--out={run}"]) == 0
  result, gaze_map = tmp_path / "demo.json", tmp_path / "demo_gaze_map.png"
  monkeypatch.setattr(demo, "RESULT", result)
  monkeypatch.setattr(demo, "GAZE_MAP", gaze_map)
  readme = tmp_path / "README.md"
  readme.write_text(f"{demo.SUMMARY_BEGIN}\nstale\n{demo.SUMMARY_END}\n{demo.BEGIN}\nstale\n"
                    f"{demo.END}\n")
  assert demo.main([f"--publish={run}", f"--readme={readme}"]) == 0
  record = json.loads(result.read_text())
  assert not _absolute(record, ROOT, run)
  assert gaze_map.read_bytes() == b"png 0"
  assert demo.readme_table(record) in readme.read_text() and "stale" not in readme.read_text()
  with pytest.raises(SystemExit, match="make demo"):
    demo.publish(tmp_path / "nothing")
