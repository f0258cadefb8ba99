"""The study runner (``make study``): train and evaluate each run of a sweep for every seed,
one JSON per (run, seed) under ``benchmarks/results/study/<sweep>/``, then mean +- std over seeds.

  python -m benchmarks.study --sweep=demo_seeds --seeds=0,1,2     # trains, evaluates, resumes
  python -m benchmarks.study --sweep=demo_seeds --summarize        # the summary only

A run is a config file and its overrides; each (run, seed) trains with ``train_main.py`` into
``<out>/<sweep>/<run>/s<seed>`` (``--config.train.seed`` and ``--config.data.seed`` set to the
seed), evaluates on the held-out split with ``eval_main.py`` and writes its JSON last, so a
sweep stopped half way resumes at the first (run, seed) without one (a checkpointed but
unfinished training run resumes from its checkpoint). Every run shares one data directory, so
each dataset is generated once. The JSON keeps the commands, the wall time of each step, the
date, the machine and the evaluation's rows (accuracy, visual KV, routing measures).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "study"


@dataclasses.dataclass(frozen=True)
class Run:
  """One model of a sweep: ``config`` (a file under configs/) with ``overrides`` (config
  fields -> values, as ``--config.<field>=<value>``) and the eval baselines to report.

  ``init_from`` names an earlier run of the same sweep, or ``"<sweep>/<run>"`` of another: this
  run starts from that run's final parameters (``config.init_from_checkpoint``; a fresh
  optimizer), so that several variants share one dense first stage. By default the first stage
  of the same seed; ``init_seed`` fixes it to one seed's, so that every seed converts the same
  pretrained model and the seeds vary only this run (its initial new parameters, such as the
  context tokens, and its data order). ``only_seeds``: when set, the run trains only at these
  seeds (a first stage that every seed converts) and is skipped at the others."""
  name: str
  config: str
  overrides: tuple = ()
  baselines: tuple = ("dense", "token_matched", "fixed_from_question", "random_routing")
  split: str = "test"
  init_from: str = ""
  init_seed: Optional[int] = None
  only_seeds: tuple = ()


SWEEPS: dict[str, tuple[Run, ...]] = {
    # The README's demo across seeds (configs/demo*.py: "Where is the red shape?" with one 16 px
    # patch per cell and region): its dense first stage, then from it the dense twin, gaze at
    # K = 3 of 16 regions (the demo: 7 of 20 visual KV entries per query, 35%) and K = 1 (5 of
    # 20, 25%), each evaluated with eviction, token-matched and random routing at its budget.
    # The first stage trains from scratch at every seed, but only seed 0's escapes the early
    # plateau in 1,500 steps; like the paper, which converts one pretrained model, every seed
    # converts seed 0's (init_seed), so the seeds vary the conversion alone.
    "demo_seeds": (
        Run("base", "configs/demo_base.py", baselines=(), only_seeds=(0,)),
        Run("dense", "configs/demo_dense.py", init_from="base", init_seed=0, baselines=()),
        Run("gaze_k3", "configs/demo.py", init_from="base", init_seed=0),
        Run("gaze_k1", "configs/demo.py", init_from="base", init_seed=0,
            overrides=(("model.gaze.top_k", 1),)),
    ),
    # Ablations of demo_seeds' gaze_k3, from the same first stage (seed 0's) unless they change
    # the parameters.
    "demo_ablations": (
        Run("gaze_k3_progressive", "configs/demo.py", init_from="demo_seeds/base",
            init_seed=0, overrides=(("topk_schedule.enabled", True),)),
        Run("gaze_k3_head_routing", "configs/demo.py", init_from="demo_seeds/base",
            init_seed=0, overrides=(("model.gaze.routing", "head"),)),
        Run("gaze_k3_cosine", "configs/demo.py", init_from="demo_seeds/base",
            init_seed=0, overrides=(("model.gaze.score", "cosine"),)),
        # Region size at one budget, 4 patch tokens per query: K = 4 of 16 one-patch regions
        # against K = 1 of 4 regions of 2 x 2 patches.
        Run("gaze_k4", "configs/demo.py", init_from="demo_seeds/base",
            init_seed=0, overrides=(("model.gaze.top_k", 4),)),
        Run("gaze_k1_regions_2x2", "configs/demo.py", init_from="demo_seeds/base",
            init_seed=0, overrides=(("model.gaze.top_k", 1), ("model.gaze.region_shape", (2, 2)),
                                    ("data.max_regions", 4))),
        # Is K = 1's gap to dense (demo_seeds) one of training length? Twice the conversion,
        # and the dense twin as long.
        Run("gaze_k1_3000_steps", "configs/demo.py", init_from="demo_seeds/base",
            init_seed=0, overrides=(("model.gaze.top_k", 1), ("train.num_steps", 3000))),
        Run("dense_3000_steps", "configs/demo_dense.py", init_from="demo_seeds/base",
            init_seed=0, baselines=(), overrides=(("train.num_steps", 3000),)),
        # Without context tokens the parameters differ, so from a first stage of their own.
        Run("base_ctx0", "configs/demo_base.py", baselines=(), only_seeds=(0,),
            overrides=(("model.gaze.num_ctx", 0),)),
        Run("gaze_k3_ctx0", "configs/demo.py", init_from="base_ctx0", init_seed=0,
            overrides=(("model.gaze.num_ctx", 0),)),
        # The smallest budget: K = 1 of 16 and no context tokens, 1 of 16 entries (6%).
        Run("gaze_k1_ctx0", "configs/demo.py", init_from="base_ctx0", init_seed=0,
            overrides=(("model.gaze.num_ctx", 0), ("model.gaze.top_k", 1))),
    ),
    # A first look at the digit task: gaze K = 2 of 16 (group routing) against dense, short.
    "digits_probe": (
        Run("gaze_k2", "configs/study_digits.py", overrides=(("train.num_steps", 1500),)),
        Run("dense", "configs/study_digits.py", overrides=(("train.num_steps", 1500),
                                                           ("model.gaze.attention", "dense")),
            baselines=())),
    # The cell-question shapes task (configs/study_shapes.py): gaze K = 2 of 16 (group routing)
    # against dense, with the salience baseline.
    "shapes_probe": (
        Run("gaze_k2", "configs/study_shapes.py"),
        Run("dense", "configs/study_shapes.py", overrides=(("model.gaze.attention", "dense"),),
            baselines=())),
    # The main study (configs/study_where.py, "Where is the red shape?"), in two stages: a dense
    # first stage (3,000 steps at a constant learning rate), then 2,000 steps from it for each
    # variant: dense; gaze at K = 3 of 16 regions (16 of 68 visual KV entries per query, 24%)
    # and K = 1 (8 of 68, 12%), each evaluated with eviction, token-matched and random routing
    # at its own budget.
    "where": (
        Run("base", "configs/study_where.py", baselines=(), overrides=(
            ("model.gaze.attention", "dense"), ("train.num_steps", 3000),
            ("optim.end_lr_ratio", 1.0))),
        Run("dense", "configs/study_where.py", baselines=(), init_from="base", overrides=(
            ("model.gaze.attention", "dense"), ("train.num_steps", 2000))),
        Run("gaze_k3", "configs/study_where.py", init_from="base", overrides=(
            ("model.gaze.top_k", 3), ("train.num_steps", 2000))),
        Run("gaze_k1", "configs/study_where.py", init_from="base", overrides=(
            ("model.gaze.top_k", 1), ("train.num_steps", 2000))),
    ),
    # Ablations of where's gaze_k3, from the same dense first stage (where/base) unless they
    # change the parameters (no context tokens: a first stage of their own).
    "where_ablations": (
        Run("gaze_k3_sparse_from_step_0", "configs/study_where.py", init_from="where/base",
            overrides=(("model.gaze.top_k", 3), ("train.num_steps", 2000),
                       ("topk_schedule.enabled", False))),
        Run("gaze_k3_head_routing", "configs/study_where.py", init_from="where/base",
            overrides=(("model.gaze.top_k", 3), ("train.num_steps", 2000),
                       ("model.gaze.routing", "head"))),
        Run("gaze_k3_cosine", "configs/study_where.py", init_from="where/base",
            overrides=(("model.gaze.top_k", 3), ("train.num_steps", 2000),
                       ("model.gaze.score", "cosine"))),
        # 1 x 1 regions (64 per image): K = 12 keeps the budget at 16 entries per query.
        Run("gaze_k12_regions_1x1", "configs/study_where.py", init_from="where/base",
            overrides=(("model.gaze.top_k", 12), ("train.num_steps", 2000),
                       ("model.gaze.region_shape", (1, 1)), ("data.max_regions", 64))),
        Run("base_ctx0", "configs/study_where.py", baselines=(), overrides=(
            ("model.gaze.attention", "dense"), ("model.gaze.num_ctx", 0),
            ("train.num_steps", 3000), ("optim.end_lr_ratio", 1.0))),
        Run("gaze_k3_ctx0", "configs/study_where.py", init_from="base_ctx0", overrides=(
            ("model.gaze.top_k", 3), ("model.gaze.num_ctx", 0), ("train.num_steps", 2000))),
    ),
    # A video question about one frame (configs/study_video.py: "What colour was the triangle in
    # the last frame?" about the shape that changed colour, clips of 2 to 4 frames, 16 one-patch
    # regions per frame, no context tokens): a dense first stage (seed 0's, converted at every
    # seed), then from it the dense twin and gaze at the ratio 1/16 with K from the batch's
    # max_regions (K = 4 for every clip) and per example (the paper's semantics: K = 2, 3, 4
    # for clips of 2, 3, 4 frames).
    "video": (
        Run("base", "configs/study_video_base.py", baselines=(), only_seeds=(0,)),
        Run("dense", "configs/study_video.py", init_from="base", init_seed=0, baselines=(),
            overrides=(("model.gaze.attention", "dense"),)),
        Run("gaze_max_regions", "configs/study_video.py", init_from="base", init_seed=0),
        Run("gaze_per_example", "configs/study_video.py", init_from="base", init_seed=0,
            overrides=(("model.gaze.top_k_per_example", True),)),
    ),
}

# The figures kept per evaluation row (dotted paths into the row's dict), and the per-layer
# lists, kept as "<name>_per_layer".
METRICS = ("accuracy", "visual_kv.fraction_of_dense", "visual_kv.measured",
           "visual_kv.configured", "visual_kv.dense_measured", "routing.accuracy", "routing.random",
           "routing.share_ceiling", "routing.top1", "routing.top1_random", "routing.top1_salience",
           "routing.coverage")
PER_LAYER = {"top1": "routing.top1_per_layer", "top1_random": "routing.top1_random_per_layer",
             "top1_salience": "routing.top1_salience_per_layer",
             "coverage": "routing.coverage_per_layer", "share": "routing.per_layer",
             "share_ceiling": "routing.share_ceiling_per_layer"}


def overrides_flags(overrides: Sequence) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides]


def first_stage(sweep: str, run: Run) -> tuple[str, Run]:
  """``(sweep, Run)`` that ``run.init_from`` names: an earlier run of ``sweep``, or
  ``"<sweep>/<run>"`` of another. ValueError when there is none."""
  other, _, name = run.init_from.rpartition("/")
  runs = SWEEPS.get(other or sweep, ())
  if not other:
    runs = runs[:[r.name for r in runs].index(run.name)] if run in runs else runs
  for r in runs:
    if r.name == name:
      return other or sweep, r
  raise ValueError(f"sweep {sweep!r}: run {run.name!r} starts from {run.init_from!r}, which is "
                   f"not {'a run of sweep ' + repr(other) if other else 'an earlier run of it'}")


def workdir_of(out: Path, sweep: str, run_name: str, seed: int) -> Path:
  return out / sweep / run_name / f"s{seed}"


def commands(run: Run, seed: int, workdir: Path, data_dir: Path,
             python: str = sys.executable,
             init_dir: Optional[Path] = None) -> dict[str, list[str]]:
  """The train and eval command lines of ``run`` at ``seed`` (starting from the parameters in
  ``init_dir``, a workdir, when given)."""
  common = [f"--config={ROOT / run.config}", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", *overrides_flags(run.overrides)]
  init = [f"--config.init_from_checkpoint={init_dir}"] if init_dir else []
  train = [python, str(ROOT / "train_main.py"), *common, *init, f"--config.train.seed={seed}",
           f"--config.data.seed={seed}"]
  evaluate = [python, str(ROOT / "eval_main.py"), *common, f"--splits={run.split}",
              f"--baselines={','.join(run.baselines)}", f"--random_seed={seed}",
              f"--out_dir={workdir / 'eval'}"]
  return {"train": train, "eval": evaluate}


def result_path(results: Path, sweep: str, run: Run, seed: int) -> Path:
  return results / sweep / f"{run.name}_s{seed}.json"


# Gaze maps of the first examples of each (run, seed), copied beside its JSON.
GAZE_MAPS = 3


def gaze_map_path(results: Path, sweep: str, run: Run, seed: int, i: int) -> Path:
  return results / sweep / "gaze_maps" / f"{run.name}_s{seed}_{i}.png"


def machine() -> str:
  """The machine, in words, as the JSON records name it."""
  import os
  return f"{os.cpu_count()}-core {platform.machine()} CPU machine ({platform.system()})"


def evaluation_record(eval_dir: Path, seconds: Mapping, cmds: Mapping) -> dict:
  """What a run's JSON keeps of an ``eval_main`` output directory (its first split), with the
  seconds and command lines of the steps that made it, the date and the machine."""
  split = json.loads((Path(eval_dir) / "eval_results.json").read_text())["splits"][0]
  return {"split": split["split"], "examples": split["examples"],
          "model": split.get("model", {}), "results": split["results"],
          "seconds": dict(seconds), "commands": dict(cmds),
          "date": datetime.date.today().isoformat(), "machine": machine()}


def run_one(sweep: str, run: Run, seed: int, *, out: Path, results: Path,
            execute: Callable[[list[str]], None], log=print) -> Optional[dict]:
  """Trains and evaluates ``run`` at ``seed`` unless its JSON exists; returns the record (None
  when skipped)."""
  path = result_path(results, sweep, run, seed)
  if path.exists():
    log(f"[study] {run.name} seed {seed}: done before ({path.name}), skipped")
    return None
  workdir = workdir_of(out, sweep, run.name, seed)
  init_dir = None
  if run.init_from:
    base_sweep, base = first_stage(sweep, run)
    base_seed = seed if run.init_seed is None else run.init_seed
    done = result_path(results, base_sweep, base, base_seed)
    if not done.exists():
      raise RuntimeError(f"run {run.name!r} starts from run {run.init_from!r}, which has not "
                         f"finished for seed {base_seed} (no {done})")
    init_dir = workdir_of(out, base_sweep, base.name, base_seed)
    if not (init_dir / "checkpoints").is_dir():
      # A fresh clone has the first stage's JSON but not its workdir (not committed): train
      # it again (the same seed gives the same run) before starting from it.
      log(f"[study] {run.name} seed {seed} starts from {run.init_from}, whose checkpoint is "
          f"not in {init_dir}: training {base.name} seed {base_seed} again (its JSON is kept)")
      execute(commands(base, base_seed, init_dir, out / "tfds")["train"])
  cmds = commands(run, seed, workdir, out / "tfds", init_dir=init_dir)
  seconds = {}
  for step in ("train", "eval"):
    log(f"[study] {run.name} seed {seed}: {step} ...")
    t0 = time.time()
    execute(cmds[step])
    seconds[step] = round(time.time() - t0, 1)
  evaluation = evaluation_record(workdir / "eval", seconds, cmds)
  maps = sorted((workdir / "eval" / "gaze_maps" / evaluation["split"]).glob("*.png"))
  for i, png in enumerate(maps[:GAZE_MAPS]):  # kept beside the JSON (workdirs are not committed)
    dst = gaze_map_path(results, sweep, run, seed, i)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, dst)
  record = {"sweep": sweep, "run": run.name, "seed": seed, "config": run.config,
            "overrides": dict(run.overrides), "init_from": run.init_from,
            "init_seed": run.init_seed, **evaluation}
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(record, indent=1) + "\n")
  tmp.replace(path)                 # the JSON appears whole, or not at all
  return record


def get_dotted(d: Mapping, dotted: str):
  """``d["a"]["b"]`` for ``"a.b"``; None where a part is missing."""
  for part in dotted.split("."):
    if not isinstance(d, Mapping) or part not in d:
      return None
    d = d[part]
  return d


def mean_std(values: Sequence[float]) -> dict:
  """``{"mean", "std", "n"}``; std is the sample standard deviation (0 for one value)."""
  n = len(values)
  mean = sum(values) / n
  var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
  return {"mean": mean, "std": math.sqrt(var), "n": n}


def collect(records: Sequence[Mapping]) -> dict:
  """``{(run, row): {"seeds": [...], metric: stats, ..., "train_s": stats}}`` over seeds, for
  the metrics of the tables, plus per-layer stats under ``"<metric>_per_layer"`` (lists)."""
  values: dict = {}
  for rec in sorted(records, key=lambda r: (r["run"], r["seed"])):
    for row, res in rec["results"].items():
      if row == "gaze" and (rec.get("model") or {}).get("attention") == "dense":
        row = "dense_trained"             # the name eval_main gives it since 2026-12-02
      entry = values.setdefault((rec["run"], row), {"seeds": []})
      entry["seeds"].append(rec["seed"])
      entry.setdefault("train_s", []).append(float(rec["seconds"]["train"]))
      for m in METRICS:
        v = get_dotted(res, m)
        if isinstance(v, (int, float)) and math.isfinite(v):
          entry.setdefault(m, []).append(float(v))
      for m, dotted in PER_LAYER.items():
        layers = get_dotted(res, dotted)
        if layers:
          entry.setdefault(f"{m}_per_layer", []).append([float(x) for x in layers])
  out = {}
  for key, entry in values.items():
    stats = {"seeds": entry.pop("seeds")}
    for m, vs in entry.items():
      if m.endswith("_per_layer"):
        stats[m] = [mean_std(list(col)) for col in zip(*vs)]
      else:
        stats[m] = mean_std(vs)
    out[key] = stats
  return out


def summarize(records: Sequence[Mapping]) -> dict:
  """``{run: {"seeds": [...], "rows": {row: {metric: {"mean", "std", "n"}}}}}`` of ``METRICS``
  over the records' seeds (``collect`` reshaped for summary.json)."""
  out: dict = {}
  for (run, row), stats in collect(records).items():
    entry = out.setdefault(run, {"seeds": stats["seeds"], "rows": {}})
    entry["rows"][row] = {m: stats[m] for m in METRICS if m in stats}
  return out


def load_records(results: Path, sweep: str) -> list[dict]:
  return [json.loads(p.read_text()) for p in sorted((results / sweep).glob("*_s*.json"))]


def run_sweep(sweep: str, seeds: Sequence[int], *, out: Path, results: Path = RESULTS,
              execute: Optional[Callable[[list[str]], None]] = None, log=print) -> dict:
  """Every (run, seed) of ``sweep`` (resuming), then its summary, written beside the runs."""
  if sweep not in SWEEPS:
    raise ValueError(f"unknown sweep {sweep!r}; known: {sorted(SWEEPS)}")
  for r in SWEEPS[sweep]:
    if r.init_from:                         # every first stage exists, before anything trains
      _, base = first_stage(sweep, r)
      if base.only_seeds and r.init_seed not in base.only_seeds:
        raise ValueError(f"sweep {sweep!r}: run {r.name!r} starts from {r.init_from!r}, which "
                         f"trains only at seeds {base.only_seeds}; give init_seed one of them")
  execute = execute or (lambda cmd: subprocess.run(cmd, check=True, cwd=ROOT))
  todo = [(run, s) for run in SWEEPS[sweep] for s in seeds
          if not run.only_seeds or s in run.only_seeds]
  t0, done = time.time(), 0
  for i, (run, seed) in enumerate(todo):
    if run_one(sweep, run, seed, out=out, results=results, execute=execute, log=log):
      done += 1
      per = (time.time() - t0) / done
      left = sum(not result_path(results, sweep, r, s).exists() for r, s in todo[i + 1:])
      log(f"[study] {i + 1}/{len(todo)} runs; about {per * left / 60:.0f} min left")
  summary = {"sweep": sweep, "date": datetime.date.today().isoformat(),
             "machine": machine(), "runs": summarize(load_records(results, sweep))}
  (results / sweep).mkdir(parents=True, exist_ok=True)
  (results / sweep / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  return summary


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--sweep", required=True, choices=sorted(SWEEPS))
  ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run each")
  ap.add_argument("--out", default=str(ROOT / "out" / "study"),
                  help="workdirs and the shared data directory")
  ap.add_argument("--summarize", action="store_true", help="only rewrite summary.json")
  a = ap.parse_args(argv)
  seeds = [] if a.summarize else [int(s) for s in a.seeds.split(",") if s.strip()]
  summary = run_sweep(a.sweep, seeds, out=Path(a.out))
  for run, entry in summary["runs"].items():
    for row, ms in entry["rows"].items():
      acc = ms.get("accuracy")
      if acc:
        print(f"{run:>24} {row:>24}: accuracy {100 * acc['mean']:.1f} +- "
              f"{100 * acc['std']:.1f} (n={acc['n']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
