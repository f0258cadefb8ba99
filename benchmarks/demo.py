"""The README's demo (``make demo``): on "Where is the red shape?" and a CPU, trains a tiny model
with dense attention (configs/demo_base.py), then from it the gaze model (configs/demo.py) and
its dense twin (configs/demo_dense.py), and evaluates both on the test split with the baselines
from the gaze model's weights.

A run writes only into its run folder (``--out``, by default ``out/demo``, which git ignores):
the workdirs, the data, the evaluation with its gaze maps, ``demo.json`` (the evaluation, the
minutes of every step, the date and the machine; no absolute path) and ``demo.md`` (the README
section it would make). Publishing a run (``make demo-readme``) is a separate, maintainer's step:
it copies the run's ``demo.json`` to ``benchmarks/results/demo.json``, its first gaze map to
``docs/demo_gaze_map.png`` and rewrites the README's demo section and summary line.

  python -m benchmarks.demo --out=out/demo                           # train, evaluate, report
  python -m benchmarks.demo --publish=out/demo --readme=README.md    # commit a run's figures
  python -m benchmarks.demo --table_only --readme=README.md          # the README from the JSON

Rerunning resumes: a trained run restores its last checkpoint and stops at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

from benchmarks.readme import replace_between
from benchmarks.study import ROOT, SWEEPS, Run, evaluation_record
from benchmarks.study import commands as study_commands

RESULT = ROOT / "benchmarks" / "results" / "demo.json"
GAZE_MAP = ROOT / "docs" / "demo_gaze_map.png"
COMPARE = "demo_dense"
BEGIN, END = "<!-- demo begin -->", "<!-- demo end -->"
SUMMARY_BEGIN, SUMMARY_END = "<!-- demo-summary begin -->", "<!-- demo-summary end -->"
# The demo's targets (issue: the model learns where to look): gaze within 2 points of its dense
# twin, and top-1 routing at least twice the salience baseline at coverage at most 0.5 in some
# layer after the first (the first cannot know the question when it routes).
MAX_GAP_POINTS = 2.0
MIN_SALIENCE_RATIO = 2.0
MAX_COVERAGE = 0.5


def runs() -> dict[str, Run]:
  """The demo's runs, the study's demo_seeds runs (one definition of the recipe): the dense
  first stage, and from it the dense twin and the gaze model (K = 3)."""
  by_name = {r.name: r for r in SWEEPS["demo_seeds"]}
  return {"base": by_name["base"], "dense": by_name["dense"], "gaze": by_name["gaze_k3"]}


def commands(out: Path, python: str = sys.executable) -> dict[str, list[str]]:
  """The demo's steps in order (seed 0): the first stage, from it the dense twin and the gaze
  model, then the evaluation of the gaze model with the dense twin beside it."""
  r = runs()
  data = out / "tfds"
  cmd = {name: study_commands(run, 0, out / name, data, python=python,
                              init_dir=out / "base" if run.init_from else None)
         for name, run in r.items()}
  compare = [f"--compare_config={ROOT / r['dense'].config}", f"--compare_workdir={out / 'dense'}",
             f"--compare_config.data.data_dir={data}", f"--compare_name={COMPARE}"]
  return {"train_base": cmd["base"]["train"], "train_dense": cmd["dense"]["train"],
          "train_gaze": cmd["gaze"]["train"], "eval": cmd["gaze"]["eval"] + compare}


def install_seconds(venv: Path = ROOT / ".venv") -> Optional[float]:
  """Seconds the Makefile's install took when it made ``venv`` (None if it did not record)."""
  try:
    return float((venv / ".install_seconds").read_text())
  except (OSError, ValueError):
    return None


def run_step(cmd: list[str]) -> None:
  """Runs one step of the demo (a command line) from the repository's root."""
  subprocess.run(cmd, check=True, cwd=ROOT)


def run_demo(out: Path, *, execute: Optional[Callable[[list[str]], None]] = None,
             log=print) -> dict:
  """Runs every step, timing each; returns the record that ``demo.json`` keeps (its paths as
  the steps saw them: ``portable`` makes them relative)."""
  execute = execute or run_step
  cmds = commands(out)
  seconds, resumed = {}, []
  for i, (step, cmd) in enumerate(cmds.items()):
    workdir = next((Path(a.split("=", 1)[1]) for a in cmd if a.startswith("--workdir=")), None)
    if step.startswith("train") and workdir is not None and (workdir / "checkpoints").is_dir():
      resumed.append(step)
      log(f"[demo] {step}: {workdir} holds an earlier run, which resumes: its minutes are not "
          f"a fresh run's (remove {out} to measure one)")
    log(f"[demo] step {i + 1}/{len(cmds)}: {step} ...")
    t0 = time.time()
    execute(cmd)
    seconds[step] = round(time.time() - t0, 1)
    log(f"[demo] {step}: {seconds[step] / 60:.1f} min")
  inst = install_seconds()
  if inst is not None:
    seconds["install"] = inst
  record = evaluation_record(out / "gaze" / "eval", seconds, cmds)
  maps = sorted((out / "gaze" / "eval" / "gaze_maps" / record["split"]).glob("*.png"))
  return {**record, "resumed": resumed, "gaze_maps": [str(p) for p in maps]}


def portable_path(path: str, root: Path = ROOT, run: Optional[Path] = None) -> str:
  """``path`` as ``demo.json`` keeps it: relative to the repository ``root`` when inside it,
  else ``<run>/...`` when inside the run folder ``run``, else its file name; a relative path or
  any other text stays as it is. ``--flag=<path>`` keeps its flag."""
  if path.startswith("--") and "=" in path:
    flag, value = path.split("=", 1)
    return f"{flag}={portable_path(value, root, run)}"
  if not os.path.isabs(path):
    return path
  p = Path(os.path.normpath(path))
  for base, prefix in ((Path(root), ""), (Path(run) if run else None, "<run>/")):
    if base is not None and p.is_relative_to(base):
      rel = p.relative_to(base).as_posix()
      return prefix + rel if rel != "." else (prefix.rstrip("/") or ".")
  return p.name


def portable(record, root: Path = ROOT, run: Optional[Path] = None):
  """``record`` with every path made relative (``portable_path``): the command lines, the gaze
  maps and any path the evaluation wrote; the JSON then says nothing of the machine's folders."""
  if isinstance(record, Mapping):
    return {k: portable(v, root, run) for k, v in record.items()}
  if isinstance(record, (list, tuple)):
    return [portable(v, root, run) for v in record]
  if isinstance(record, str):
    return portable_path(record, root, run)
  return record


def _pct(x, digits: int = 1) -> str:
  return "-" if x is None else f"{100 * x:.{digits}f}%"


def _trained_dense_key(results: Mapping) -> str:
  keys = [k for k in results if k.startswith(COMPARE)]
  if len(keys) != 1:
    raise ValueError(f"the demo record needs one {COMPARE!r} row, has {sorted(results)}")
  return keys[0]


def salience_ratio(routing: Mapping, layer: int) -> float:
  """Top-1 routing over the salience baseline in ``layer``."""
  return routing["top1_per_layer"][layer] / routing["top1_salience_per_layer"][layer]


def best_routing_layer(routing: Mapping) -> Optional[int]:
  """The layer after the first with the highest top-1 / salience ratio among those with
  coverage at most ``MAX_COVERAGE`` (None without per-layer figures)."""
  top1 = routing.get("top1_per_layer") or []
  sal = routing.get("top1_salience_per_layer") or []
  cov = routing.get("coverage_per_layer") or []
  ok = [l for l in range(1, len(top1))
        if l < len(sal) and sal[l] and l < len(cov) and cov[l] <= MAX_COVERAGE]
  return max(ok, key=lambda l: salience_ratio(routing, l)) if ok else None


def checks(record: Mapping) -> list[tuple[str, str, bool]]:
  """``(target, figure, met)`` for the demo's two targets."""
  res = record["results"]
  gaze, dense = res["gaze"], res[_trained_dense_key(res)]
  gap = 100 * (gaze["accuracy"] - dense["accuracy"])
  out = [(f"gaze within {MAX_GAP_POINTS:g} points of its dense twin, or better",
          f"{gap:+.1f} points", gap >= -MAX_GAP_POINTS)]
  rt = gaze.get("routing") or {}
  best = best_routing_layer(rt)
  target = (f"top-1 routing at least {MIN_SALIENCE_RATIO:g}x the salience baseline at coverage "
            f"at most {MAX_COVERAGE:g}, in a layer after the first")
  if best is None:
    out.append((target, "no layer after the first has the figures", False))
  else:
    ratio = salience_ratio(rt, best)
    out.append((target, f"layer {best}: {ratio:.2f}x at coverage "
                f"{rt['coverage_per_layer'][best]:.2f}", ratio >= MIN_SALIENCE_RATIO))
  return out


ROWS = (("gaze", "gaze"), ("dense", "the same weights, dense attention"),
        ("token_matched", "the same weights, dense on a token-matched image"),
        ("fixed_from_question", "the same weights, regions fixed from the question (eviction)"),
        ("random_routing", "the same weights, random regions at the same K"),
        (COMPARE, "`demo_dense`: trained with dense attention"),
        ("answer_prior", "answer prior (most common training answer, no image)"))


def readme_table(record: Mapping) -> str:
  """The README's demo section: when and where it ran, the minutes of each step, the table of
  every row, the routing per layer, the targets and the first gaze map."""
  res = record["results"]
  secs = record["seconds"]
  total = sum(secs.values())
  parts = ", ".join(f"{name} {secs[k] / 60:.1f}" for k, name in (
      ("install", "install"), ("train_base", "dense first stage"), ("train_dense", "dense twin"),
      ("train_gaze", "gaze model"), ("eval", "evaluation")) if k in secs)
  cfg = res["gaze"].get("configured", {})
  lines = [f"`make demo`, {record['date']} on a {record['machine']}: {total / 60:.1f} min "
           f"({parts}). {record['split'].capitalize()} split, {record['examples']} examples, "
           "exact match of the teacher-forced answer; top-1 routing is at the row that "
           "predicts the answer, in the gaze model's best layer after the first (uniform and "
           "salience: the chance rates of a random region and of a random region that holds a "
           "shape)." + (f" Resumed from earlier runs, so not a fresh run's minutes: "
                        f"{', '.join(record['resumed'])}." if record.get("resumed") else ""),
           "",
           "| model | accuracy | visual KV / query | % of dense | top-1 routing (uniform, salience) "
           "| coverage |", "|---|---:|---:|---:|---:|---:|"]
  key = {COMPARE: _trained_dense_key(res)}
  # Every row's routing at the gaze model's best layer (a baseline's own best of several
  # layers would flatter it).
  best = best_routing_layer(res["gaze"].get("routing") or {})
  for row, label in ROWS:
    r = res.get(key.get(row, row))
    if r is None:
      continue
    kv = r.get("visual_kv", {})
    if row == "gaze" and cfg.get("top_k") and kv.get("routing_candidates"):
      label += f" (K = {cfg['top_k']} of {kv['routing_candidates']:.0f} regions)"
    rt = r.get("routing") or {}
    routing = cov = "-"
    if best is not None and rt.get("top1_per_layer"):
      routing = (f"{_pct(rt['top1_per_layer'][best])} ({_pct(rt['top1_random_per_layer'][best])}"
                 f", {_pct(rt['top1_salience_per_layer'][best])}), layer {best}")
      cov = f"{rt['coverage_per_layer'][best]:.2f}"
    measured = kv.get("measured")
    lines.append(f"| {label} | {_pct(r.get('accuracy'))} | "
                 f"{'-' if measured is None else f'{measured:.1f}'} | "
                 f"{_pct(kv.get('fraction_of_dense'), 0)} | {routing} | {cov} |")
  rt = res["gaze"].get("routing") or {}
  if rt.get("top1_per_layer"):
    per = ", ".join(f"layer {l}: {_pct(t, 0)} ({t / s:.1f}x salience, coverage {c:.2f})"
                    if s else f"layer {l}: {_pct(t, 0)}"
                    for l, (t, s, c) in enumerate(zip(rt["top1_per_layer"],
                                                      rt["top1_salience_per_layer"],
                                                      rt["coverage_per_layer"])))
    lines += ["", f"Gaze routing per layer, top-1: {per}."]
  lines += ["", "| target | figure | met |", "|---|---|---|"]
  lines += [f"| {t} | {f} | {'yes' if m else 'no'} |" for t, f, m in checks(record)]
  lines += ["", "![A gaze map of the demo: the question, the predicted and true answers, and "
            "the regions each layer's heads selected](docs/demo_gaze_map.png)"]
  return "\n".join(lines)


def summary_line(record: Mapping) -> str:
  """The README's one-sentence result, from the same record as its table."""
  res = record["results"]
  gaze, dense = res["gaze"], res[_trained_dense_key(res)]
  rt = gaze.get("routing") or {}
  best = best_routing_layer(rt)
  where = ""
  if best is not None:
    ratio = salience_ratio(rt, best)
    where = (f"; in layer {best}, the region it scores highest holds the shape {ratio:.1f}x as "
             "often as a shape picked at random")
  return (f"The tiny CPU demo learns where to look. Asked \"Where is the red shape?\", gaze "
          f"attention answers {_pct(gaze['accuracy'])} of the test questions with "
          f"{_pct(gaze['visual_kv']['fraction_of_dense'], 0)} of the visual KV entries per "
          f"query, against {_pct(dense['accuracy'])} for its dense twin{where} (`make demo`, "
          f"{record['date']} on a {record['machine']}; the exact figures vary with the "
          "machine, see below).")


RUN_RECORD, RUN_SECTION = "demo.json", "demo.md"   # what a run writes into its run folder


def first_gaze_map(run: Path, record: Mapping) -> Optional[Path]:
  """The run's first gaze map of the evaluated split (None when it drew none)."""
  maps = sorted((Path(run) / "gaze" / "eval" / "gaze_maps" / record["split"]).glob("*.png"))
  return maps[0] if maps else None


def publish(run: Path, readme: Optional[Path] = None) -> dict:
  """Makes the run in folder ``run`` the repository's demo: its record becomes
  ``benchmarks/results/demo.json`` (paths relative, ``portable``), its first gaze map
  ``docs/demo_gaze_map.png``, and ``readme``'s demo section and summary line are rewritten from
  it. The maintainer's step (``make demo-readme``); ``make demo`` never does it."""
  run = Path(run).resolve()
  source = run / RUN_RECORD
  if not source.is_file():
    raise SystemExit(f"error: {source} does not exist: run `make demo` (DEMO_DIR={run}) first")
  record = portable(json.loads(source.read_text()), run=run)
  RESULT.write_text(json.dumps(record, indent=1) + "\n")
  gaze_map = first_gaze_map(run, record)
  if gaze_map is not None:
    shutil.copyfile(gaze_map, GAZE_MAP)
  if readme:
    write_readme(Path(readme), record)
  return record


def write_readme(readme: Path, record: Mapping) -> None:
  replace_between(readme, BEGIN, END, readme_table(record))
  replace_between(readme, SUMMARY_BEGIN, SUMMARY_END, summary_line(record))


def _shown(path: Path) -> str:
  path = Path(path).resolve()
  return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default=str(ROOT / "out" / "demo"),
                  help="the run folder: workdirs, data, evaluation, demo.json and demo.md")
  ap.add_argument("--publish", default="", metavar="RUN_FOLDER",
                  help="no training: copy this run's figures into benchmarks/results/demo.json "
                       "and docs/demo_gaze_map.png (and the README with --readme)")
  ap.add_argument("--table_only", action="store_true",
                  help="no training: the README section from benchmarks/results/demo.json")
  ap.add_argument("--readme", default="",
                  help="with --publish or --table_only: rewrite this README's demo section")
  a = ap.parse_args(argv)
  if a.publish and a.table_only:
    ap.error("--publish and --table_only exclude each other")
  if a.readme and not (a.publish or a.table_only):
    ap.error("a run writes only into its run folder: rewrite the README with --publish=<run "
             "folder> (make demo-readme) or --table_only")
  if a.publish:
    record = publish(Path(a.publish), a.readme or None)
    print(readme_table(record))
    print(f"published {_shown(Path(a.publish))}: {_shown(RESULT)}, {_shown(GAZE_MAP)}"
          + (f", {a.readme}" if a.readme else ""))
    return 0
  if a.table_only:
    record = json.loads(RESULT.read_text())
    if a.readme:
      write_readme(Path(a.readme), record)
    print(readme_table(record))
    return 0
  out = Path(a.out).resolve()
  record = portable(run_demo(out), run=out)
  (out / RUN_RECORD).write_text(json.dumps(record, indent=1) + "\n")
  table = readme_table(record)
  (out / RUN_SECTION).write_text(summary_line(record) + "\n\n" + table + "\n")
  print(table)
  print(f"\nrun folder: {_shown(out)} (record {RUN_RECORD}, README section {RUN_SECTION}, "
        f"evaluation and gaze maps gaze/eval/); no tracked file changed. A maintainer publishes "
        f"this run into README.md, docs/demo_gaze_map.png and benchmarks/results/demo.json "
        f"with `make demo-readme DEMO_DIR={_shown(out)}`.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
