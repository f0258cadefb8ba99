"""The demo driver (benchmarks/demo.py): its steps, its record, and the README section with the
targets, from a hand-made evaluation whose figures are worked out by hand."""

import json

import pytest

from benchmarks import demo


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
          "seconds": {"install": 120.0, "train_dense": 240.0, "train_gaze": 300.0, "eval": 60.0},
          "results": {"gaze": gaze,
                      "dense": {"accuracy": 0.5, "visual_kv": {"measured": 20.0,
                                                               "fraction_of_dense": 1.0}},
                      "demo_dense (trained, step 2000)": {
                          "accuracy": dense_acc,
                          "visual_kv": {"measured": 20.0, "fraction_of_dense": 1.0}},
                      "answer_prior": {"accuracy": 0.06}}}


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
  assert "2026-12-03 on a 2-core test box: 12.0 min (install 2.0, dense twin 4.0, gaze model " \
         "5.0, evaluation 1.0)" in text
  assert "| gaze (K = 2 of 16 regions) | 80.0% | 6.0 | 30% | 40.0% (6.2%, 12.5%), layer 2 " \
         "| 0.25 |" in text
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
    if cmd[1].endswith("eval_main.py"):
      out = tmp_path / "eval"
      out.mkdir()
      (out / "eval_results.json").write_text(json.dumps({"splits": [
          {"split": "test", "examples": 512, "results": _record()["results"]}]}))

  monkeypatch.setattr(demo, "install_seconds", lambda: 99.0)
  rec = demo.run_demo(tmp_path, execute=execute, log=lambda *_: None)
  assert [c[1].rsplit("/", 1)[-1] for c in ran] == ["train_main.py", "train_main.py",
                                                    "eval_main.py"]
  assert "--config=" + str(demo.ROOT / "configs" / "demo_dense.py") in ran[0]
  assert f"--compare_workdir={tmp_path / 'dense'}" in ran[2]
  assert "--splits=test" in ran[2]
  assert list(rec["seconds"]) == ["train_dense", "train_gaze", "eval", "install"]
  assert rec["seconds"]["install"] == 99.0
  assert rec["examples"] == 512 and rec["split"] == "test"
