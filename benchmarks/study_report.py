"""docs/study.md's tables and plots, regenerated from the study's JSON (``make study-report``).

  python -m benchmarks.study_report --doc=docs/study.md

For every sweep named by a pair of marker lines in the doc (``<!-- study:<sweep> begin -->`` ...
``<!-- study:<sweep> end -->``) the text between them is replaced by the sweep's tables, read
from ``benchmarks/results/study/<sweep>/*_s<seed>.json``: one row per (run, evaluation row)
with mean +- std over seeds, the routing measures per layer of each gaze row, and the PNGs
(``docs/study/<sweep>_accuracy.png``: accuracy against the visual KV budget, a colour per run
and a marker per evaluation row, lines only between runs that differ only in K;
``docs/study/<sweep>_routing.png``: top-1 routing per layer against its baselines;
``docs/study/<sweep>_gaze_maps.png``: the gaze maps the runs kept, a video's frames wrapped to
at most 1,200 px and captioned by layer and frame).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from benchmarks.readme import replace_between
from benchmarks.study import RESULTS, ROOT, collect, load_records

def _pm(stats: Optional[Mapping], scale: float = 100.0, digits: int = 1) -> str:
  """``mean +- std`` of ``stats`` (``study.mean_std``' dict) times ``scale``; "-" when
  missing."""
  if not stats:
    return "-"
  m, s = stats["mean"] * scale, stats["std"] * scale
  return f"{m:.{digits}f} ± {s:.{digits}f}" if stats["n"] > 1 else f"{m:.{digits}f}"


def results_table(stats: Mapping) -> str:
  """Markdown: one line per (run, evaluation row), figures in % as mean ± std over seeds."""
  lines = ["| run | evaluated as | seeds | accuracy | visual KV | top-1 routing | uniform | "
           "salience | coverage | share / ceiling | train min |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for (run, row), s in stats.items():
    share = s.get("routing.accuracy")
    ceiling = s.get("routing.share_ceiling")
    ratio = (f"{share['mean'] / ceiling['mean']:.2f}" if share and ceiling and ceiling["mean"]
             else "-")
    lines.append(
        f"| {run} | {row} | {len(s['seeds'])} | {_pm(s.get('accuracy'))} | "
        f"{_pm(s.get('visual_kv.fraction_of_dense'), digits=0)} | {_pm(s.get('routing.top1'))} | "
        f"{_pm(s.get('routing.top1_random'))} | {_pm(s.get('routing.top1_salience'))} | "
        f"{_pm(s.get('routing.coverage'), 1.0, 2)} | {ratio} | "
        f"{_pm(s.get('train_s'), 1 / 60, 1)} |")
  return "\n".join(lines)


def per_layer_table(stats: Mapping) -> str:
  """Markdown: top-1 routing, salience and coverage per decoder layer of each run's trained
  routing (the ``gaze`` row)."""
  lines = ["| run | evaluated as | layer | top-1 routing | uniform | salience | top-1 / salience "
           "| coverage |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  for (run, row), s in stats.items():
    top1 = s.get("top1_per_layer")
    if not top1 or row != "gaze":           # the trained routing, not the baselines' rows
      continue
    uni = s.get("top1_random_per_layer") or [None] * len(top1)
    sal = s.get("top1_salience_per_layer") or [None] * len(top1)
    cov = s.get("coverage_per_layer") or [None] * len(top1)
    for layer, (t, u, a, c) in enumerate(zip(top1, uni, sal, cov)):
      x = f"{t['mean'] / a['mean']:.2f}" if a and a["mean"] else "-"
      lines.append(f"| {run} | {row} | {layer} | {_pm(t)} | {_pm(u)} | {_pm(a)} | {x} | "
                   f"{_pm(c, 1.0, 2)} |")
  return "\n".join(lines)


# Sweeps whose section also lists the visual KV entries per query, where K differs between
# examples (video: K as a ratio of each clip's regions against a ratio of max_regions).
KV_ENTRIES_SWEEPS = ("video",)


def kv_entries_table(stats: Mapping) -> str:
  """Markdown: visual KV entries per query of each (run, evaluation row) of ``collect``'s
  stats, mean ± std over seeds: measured (what the answer rows read), configured (the budget's
  upper bound) and the dense model's on the same examples."""
  keys = ("visual_kv.measured", "visual_kv.configured", "visual_kv.dense_measured")
  lines = ["| run | evaluated as | visual KV / query (measured) | configured | dense |",
           "|---|---|---:|---:|---:|"]
  for (run, row), s in stats.items():
    if any(k in s for k in keys):
      lines.append(f"| {run} | {row} | {' | '.join(_pm(s.get(k), 1.0) for k in keys)} |")
  return "\n".join(lines)


def _mean(stats: Mapping, key) -> Optional[float]:
  s = stats.get(key)
  return None if not s else s["mean"]


# The gaze runs of every main sweep, at its larger and its smaller visual KV budget, and the
# ablation at the smallest budget (K = 1 without context tokens).
GOAL_RUNS = ("gaze_k3", "gaze_k1")
LOW_BUDGET_RUN = "gaze_k1_ctx0"


def goals_table(main: Mapping, ablations: Optional[Mapping] = None,
                main_on_ablation_seeds: Optional[Mapping] = None) -> str:
  """Markdown: the study's goals, each with its figure and whether it is met, from the
  ``collect`` stats of a main sweep (and of its ablations when given), for the gaze runs
  ``GOAL_RUNS`` at their measured share of the visual KV. The ablations are compared with
  ``main_on_ablation_seeds`` (the main sweep's stats over the ablations' seeds only; default
  ``main``), so that a seed the ablations lack cannot move the difference."""
  def acc(stats, run, row="gaze"):
    return _mean(stats.get((run, row), {}), "accuracy")

  def diff(a, b):
    return None if a is None or b is None else 100 * (a - b)

  def fmt(x, unit=" points"):
    return "-" if x is None else f"{x:+.1f}{unit}"

  lines = ["| goal | figure | met |", "|---|---|---|"]

  def add(goal, figure, met):
    lines.append(f"| {goal} | {figure} | {'-' if met is None else ('yes' if met else 'no')} |")

  def budget(stats, run):
    kv = _mean(stats.get((run, "gaze"), {}), "visual_kv.fraction_of_dense")
    return "?" if kv is None else f"{100 * kv:.0f}%"

  def beats_baselines(stats, run, note=""):
    e = diff(acc(stats, run), acc(stats, run, "fixed_from_question"))
    r = diff(acc(stats, run), acc(stats, run, "random_routing"))
    add(f"{run} at {budget(stats, run)}{note}: clearly (> 2 points) better than eviction and "
        f"than random routing", f"{fmt(e)} vs eviction, {fmt(r)} vs random routing",
        None if e is None or r is None else min(e, r) > 2)

  for run in GOAL_RUNS:
    d = diff(acc(main, run), acc(main, "dense", "dense_trained"))
    add(f"{run} at {budget(main, run)} of the visual KV: within 1 point of dense, or better",
        f"{fmt(d)} ({run} - dense)", None if d is None else d >= -1)
    beats_baselines(main, run)
  if ablations is not None and (LOW_BUDGET_RUN, "gaze") in ablations:
    # Without context tokens a budget of 10% or less exists: the goal's smallest budget.
    beats_baselines(ablations, LOW_BUDGET_RUN, " (no context tokens)")
  for run in GOAL_RUNS:
    s = main.get((run, "gaze"), {})
    top1, sal = s.get("top1_per_layer"), s.get("top1_salience_per_layer")
    cov, share, ceil = (s.get("coverage_per_layer"), s.get("share_per_layer"),
                        s.get("share_ceiling_per_layer"))
    if not (top1 and sal and cov and share and ceil) or len(top1) < 2:
      add(f"{run}: routing goals", "no per-layer routing", None)
      continue
    later = range(1, len(top1))
    ratio = [top1[i]["mean"] / sal[i]["mean"] for i in later if sal[i]["mean"]]
    add(f"{run}, layers after the first: top-1 >= 2x salience",
        " / ".join(f"{x:.2f}x" for x in ratio), bool(ratio) and min(ratio) >= 2)
    add(f"{run}, layers after the first: coverage <= 0.5",
        " / ".join(f"{cov[i]['mean']:.2f}" for i in later), max(cov[i]["mean"] for i in later)
        <= 0.5)
    part = [share[i]["mean"] / ceil[i]["mean"] for i in later if ceil[i]["mean"]]
    add(f"{run}, layers after the first: share >= half its ceiling",
        " / ".join(f"{x:.2f}" for x in part), bool(part) and min(part) >= 0.5)
  if ablations is not None:
    k3 = acc(main if main_on_ablation_seeds is None else main_on_ablation_seeds, "gaze_k3")
    def value(run):                 # gaze_k3 itself on the ablations' seeds
      return k3 if run == "gaze_k3" else acc(ablations, run)

    # A sweep whose gaze_k3 trains sparse from step 0 ablates the schedule by adding it.
    schedule = (("gaze_k3_progressive", "gaze_k3") if ("gaze_k3_progressive", "gaze") in ablations
                else ("gaze_k3", "gaze_k3_sparse_from_step_0"))
    for name, with_it, without in (
        ("context tokens help (4 vs 0)", "gaze_k3", "gaze_k3_ctx0"),
        ("the progressive schedule helps (vs sparse from step 0)", *schedule)):
      d = diff(value(with_it), value(without))
      add(name, f"{fmt(d)} ({with_it} - {without})", None if d is None else d > 0)
  return "\n".join(lines)


def _figure(size):
  import matplotlib
  matplotlib.use("Agg")               # files only, no display
  import matplotlib.pyplot as plt
  return plt.subplots(figsize=size)


def _save(fig, ax, path: Path, legends: Optional[Sequence] = None) -> None:
  """Saves the figure with a grid and ``legends`` (default: one legend of the labelled
  artists, beside the axes), all of them inside the picture."""
  import matplotlib.pyplot as plt
  ax.grid(alpha=0.3)
  if legends is None:
    # Beside the axes, where it hides no point (ablation sweeps have many series).
    legends = [ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))]
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight", bbox_extra_artists=list(legends))
  plt.close(fig)


def run_colours(runs: Sequence[str]) -> dict[str, str]:
  """A distinct colour per run (hex), in the order given: the qualitative palette tab10 up to 10
  runs, tab20 up to 20, evenly spaced hues beyond. Every plot of a sweep takes the same map, so
  a run keeps its colour from one plot to the next."""
  import matplotlib
  runs = list(dict.fromkeys(runs))
  if len(runs) <= 10:
    cols = matplotlib.colormaps["tab10"].colors[:len(runs)]
  elif len(runs) <= 20:
    cols = matplotlib.colormaps["tab20"].colors[:len(runs)]
  else:
    cols = [matplotlib.colormaps["hsv"](i / len(runs)) for i in range(len(runs))]
  return {r: matplotlib.colors.to_hex(c) for r, c in zip(runs, cols)}


# The key that the model's K takes in a run's overrides and in its record's "model".
TOP_K_OVERRIDE, TOP_K_MODEL = "model.gaze.top_k", "top_k"


def run_families(records: Sequence[Mapping]) -> dict[str, tuple]:
  """Run -> family: the gaze runs that differ only in K (the same config file, overrides, first
  stage and model but for ``model.gaze.top_k``) share a family, the same method at several
  budgets; every other run (a dense run, a run that changes anything else) is a family of its
  own. Read from the records (``study.load_records``)."""
  import json
  out = {}
  for rec in records:
    model = dict(rec.get("model") or {})
    if model.get("attention") != "gaze":
      out[rec["run"]] = ("run", rec["run"])
      continue
    model.pop(TOP_K_MODEL, None)
    over = {k: v for k, v in (rec.get("overrides") or {}).items() if k != TOP_K_OVERRIDE}
    out[rec["run"]] = ("family", rec.get("config"), rec.get("init_from"),
                       json.dumps(over, sort_keys=True), json.dumps(model, sort_keys=True))
  return out


# The marker of each evaluation row (the tables' "evaluated as"); a row not listed takes the
# next of EXTRA_MARKERS.
ROW_MARKERS = {"gaze": "o", "fixed_from_question": "s", "random_routing": "^",
               "token_matched": "D", "dense": "v", "dense_trained": "*"}
EXTRA_MARKERS = "Xph<>d"
ROW_NOTES = {"gaze": "trained routing", "fixed_from_question": "KV eviction",
             "random_routing": "random regions", "token_matched": "dense, fewer tokens",
             "dense": "same weights, dense", "dense_trained": "trained dense"}


def plot_accuracy(stats: Mapping, path: Path, title: str,
                  families: Optional[Mapping[str, tuple]] = None,
                  colours: Optional[Mapping[str, str]] = None) -> dict:
  """Accuracy (%) against the visual KV budget (% of dense): a colour per run
  (``run_colours``), a marker per evaluation row, error bars = std over seeds. Points only,
  except that the runs of one family (``run_families``: the same method at several K) are
  joined, row by row, by a dashed line in order of budget. Returns what was drawn:
  ``{"colours": {run: colour}, "lines": [(row, [runs in budget order])]}``."""
  from matplotlib.lines import Line2D

  pts = {key: (s["visual_kv.fraction_of_dense"], s["accuracy"]) for key, s in stats.items()
         if s.get("accuracy") and s.get("visual_kv.fraction_of_dense")}
  runs = sorted({run for run, _ in pts})
  colours = dict(colours or run_colours(runs))
  families = dict(families or {})
  order = list(ROW_MARKERS)
  rows = sorted({row for _, row in pts},
                key=lambda r: (order.index(r) if r in order else len(order), r))
  extra = iter(EXTRA_MARKERS * len(rows))
  markers = {row: ROW_MARKERS.get(row) or next(extra) for row in rows}
  fig, ax = _figure((6.5, 4))
  lines = []
  members: dict = {}
  for run in runs:
    members.setdefault(families.get(run, ("run", run)), []).append(run)
  for fam_runs in members.values():
    for row in rows:
      got = sorted((pts[(r, row)][0]["mean"], r) for r in fam_runs if (r, row) in pts)
      xs = [x for x, _ in got]
      if len(got) > 1 and len(set(xs)) == len(xs):       # an ordered budget: a line
        ax.plot([100 * x for x in xs], [100 * pts[(r, row)][1]["mean"] for _, r in got],
                "--", color="black", alpha=0.5, lw=1, zorder=1)
        lines.append((row, [r for _, r in got]))
  for (run, row), (b, a) in sorted(pts.items()):
    ax.errorbar([100 * b["mean"]], [100 * a["mean"]], yerr=[100 * a["std"]],
                marker=markers[row], color=colours[run], capsize=3, linestyle="none",
                markersize=8 if markers[row] == "*" else 6, zorder=2)
  ax.set_xlabel("visual KV entries per query (% of dense)")
  ax.set_ylabel("exact-match accuracy (%)")
  ax.set_title(title)
  run_handles = [Line2D([], [], color=colours[r], marker="o", linestyle="none", label=r)
                 for r in runs]
  row_handles = [Line2D([], [], color="0.3", marker=markers[r], linestyle="none",
                        label=f"{r} ({ROW_NOTES[r]})" if r in ROW_NOTES else r) for r in rows]
  if lines:
    row_handles.append(Line2D([], [], color="black", alpha=0.5, lw=1, linestyle="--",
                              label="one method at several K"))
  # Runs beside the axes, evaluation rows under them: neither hides a point.
  first = ax.legend(handles=run_handles, title="run (colour)", fontsize=8, title_fontsize=8,
                    loc="upper left", bbox_to_anchor=(1.02, 1.0))
  ax.add_artist(first)
  second = ax.legend(handles=row_handles, title="evaluated as (marker)", fontsize=8, title_fontsize=8,
            loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
  _save(fig, ax, path, legends=[first, second])
  return {"colours": {r: colours[r] for r in runs}, "lines": lines}


def plot_routing(stats: Mapping, path: Path, title: str,
                 colours: Optional[Mapping[str, str]] = None) -> None:
  """Top-1 routing accuracy (%) per decoder layer of each routed row, with the uniform and
  salience baselines (dashed / dotted in the same colour); a colour per run (``run_colours``)."""
  runs = sorted({run for run, row in stats if row == "gaze" and stats[(run, row)].get(
      "top1_per_layer")})
  colours = dict(colours or run_colours(runs))
  fig, ax = _figure((6, 4))
  for (run, row), s in sorted(stats.items()):
    top1 = s.get("top1_per_layer")
    if not top1 or row != "gaze":           # the trained routing, not the baselines' rows
      continue
    layers = list(range(len(top1)))
    colour = colours[run]
    ax.errorbar(layers, [100 * t["mean"] for t in top1], yerr=[100 * t["std"] for t in top1],
                marker="o", capsize=3, label=f"{run}", color=colour)
    for key, style in (("top1_salience_per_layer", ":"), ("top1_random_per_layer", "--")):
      base = s.get(key)
      if base:
        ax.plot(layers, [100 * b["mean"] for b in base], style, color=colour, alpha=0.7)
  ax.set_xticks(range(max((len(s.get("top1_per_layer") or []) for s in stats.values()),
                          default=0)))
  ax.set_xlabel("decoder layer")
  ax.set_ylabel("top-1 routing accuracy (%)")
  ax.set_title(f"{title}\n(dotted: salience baseline; dashed: uniform random)", fontsize=10)
  _save(fig, ax, path)


# eval_main's gaze maps (gaze_jax.eval.gaze_maps.write_batch_gaze_maps) carry three title lines
# (the question, the answers, the legend) above the layers' column captions.
MAP_TITLE_LINES = 3
# The widest a gaze map may be in the doc; wider ones (a video's frames side by side for every
# layer) are wrapped (``wrap_gaze_map``).
MAP_MAX_WIDTH = 1200


def gaze_map_geometry(size: tuple[int, int], num_layers: Optional[int] = None) -> Optional[dict]:
  """The layout of a gaze map that eval_main drew, solved from its pixel ``size`` (w, h) with
  the drawing code's own geometry (``gaze_jax.eval.gaze_maps``: a column per layer, the
  frames side by side in each, square panels, a row per answer token): ``{"layers", "frames",
  "rows", "pw", "ph", "gap", "label", "top", "col_w"}``, or None when no layout fits (then the
  map is used as drawn). ``num_layers``: the run's decoder layers (all are drawn); when None,
  the only layer count that fits."""
  import inspect

  from gaze_jax.eval import gaze_maps as gm

  render = inspect.signature(gm.render_gaze_map).parameters
  gap, label, max_width = (render[k].default for k in ("gap", "label_height", "max_width"))
  panel = inspect.signature(gm.write_batch_gaze_maps).parameters["panel_size"].default
  w, h = size
  top = label * (MAP_TITLE_LINES + 1)
  found = []
  for layers in ([num_layers] if num_layers else range(1, 33)):
    for frames in range(1, 65):
      ph, pw, _ = gm.panel_geometry((1, 1), layers * frames, panel_size=panel,
                                    max_width=max_width - (layers - 1) * gap, gap=gap)
      col_w = frames * pw + (frames - 1) * gap
      rows, rest = divmod(h - top + gap, label + ph + gap)
      if layers * col_w + (layers - 1) * 2 * gap == w and rest == 0 and rows >= 1:
        found.append(dict(layers=layers, frames=frames, rows=rows, pw=pw, ph=ph, gap=gap,
                          label=label, top=top, col_w=col_w))
  return found[0] if len(found) == 1 else None


def wrap_gaze_map(tile, geo: Mapping, max_width: int = MAP_MAX_WIDTH):
  """``tile`` (a PIL image laid out as ``geo``, from ``gaze_map_geometry``) redrawn at most
  ``max_width`` pixels wide, every panel captioned with its layer and frame: the title lines,
  then for each answer token its caption and its panels, whole layers per line when a layer's
  frames fit (the same number of layers on every line), else a layer's frames over several
  lines."""
  from PIL import Image, ImageDraw

  C, F, T = geo["layers"], geo["frames"], geo["rows"]
  pw, ph, gap, lab, top, col_w = (geo[k] for k in ("pw", "ph", "gap", "label", "top", "col_w"))
  if col_w <= max_width:
    per_line = max(1, (max_width + 2 * gap) // (col_w + 2 * gap))
    per_line = -(-C // -(-C // per_line))               # balanced: as even as the lines allow
    lines = [[(c, f) for c in range(i, min(C, i + per_line)) for f in range(F)]
             for i in range(0, C, per_line)]
  else:
    fit = max(1, (max_width + gap) // (pw + gap))
    lines = [[(c, f) for f in range(i, min(F, i + fit))] for c in range(C) for i in range(0, F, fit)]

  def xs(line):                          # panel x offsets: gap apart, 2 gaps between layers
    out, x = [], 0
    for i, (c, _) in enumerate(line):
      if i:
        x += pw + (gap if c == line[i - 1][0] else 2 * gap)
      out.append(x)
    return out

  width = min(tile.width, max(max_width, max(xs(l)[-1] + pw for l in lines)))
  line_h = lab + ph + gap
  height = top - lab + T * (lab + len(lines) * line_h)
  out = Image.new("RGB", (width, height), (0, 0, 0))
  out.paste(tile.crop((0, 0, width, top - lab)), (0, 0))          # the title lines
  draw = ImageDraw.Draw(out)
  y = top - lab
  for t in range(T):
    row_y = top + t * (lab + ph + gap)                  # the answer token's caption row
    out.paste(tile.crop((0, row_y, width, row_y + lab)), (0, y))
    y += lab
    for line in lines:
      for (c, f), x in zip(line, xs(line)):
        caption = f"layer {c}, frame {f}" if F > 1 else f"layer {c}"
        if draw.textlength(caption) > pw - 2:
          caption = f"L{c} f{f}" if F > 1 else f"L{c}"
        draw.text((x + 2, y + 1), caption, fill=(255, 255, 255))
        sx, sy = c * (col_w + 2 * gap) + f * (pw + gap), row_y + lab
        out.paste(tile.crop((sx, sy, sx + pw, sy + ph)), (x, y + lab))
      y += line_h
  return out


def gaze_map_grid(results: Path, sweep: str, path: Path, max_width: int = 700,
                  map_max_width: int = MAP_MAX_WIDTH) -> bool:
  """One PNG of the gaze maps that the sweep's runs kept (``study.gaze_map_path``): a row per
  run, its lowest seed's maps side by side under the run's name, as many as fit in
  ``max_width`` pixels (at least one). A map wider than ``map_max_width``, or with several
  frames per layer (a video), is first wrapped with each frame captioned
  (``wrap_gaze_map``). False when none were kept."""
  from PIL import Image, ImageDraw

  layers = {r["run"]: (r.get("model") or {}).get("num_layers")
            for r in load_records(results, sweep)}
  by_run: dict = {}
  for png in sorted((results / sweep / "gaze_maps").glob("*_s*_*.png")):
    run, seed, i = png.stem.rsplit("_", 2)
    by_run.setdefault(run, {}).setdefault(int(seed[1:]), []).append((int(i), png))
  if not by_run:
    return False
  rows = []
  for run, seeds in sorted(by_run.items()):
    seed = min(seeds)
    tiles = []
    for _, p in sorted(seeds[seed]):
      tile = Image.open(p).convert("RGB")
      geo = gaze_map_geometry(tile.size, layers.get(run))
      if geo and (tile.width > map_max_width or geo["frames"] > 1):
        tile = wrap_gaze_map(tile, geo, map_max_width)
      if tiles and sum(t.width + 4 for t in tiles) + tile.width > max_width:
        break
      tiles.append(tile)
    w, h = sum(t.width for t in tiles) + 4 * (len(tiles) - 1), max(t.height for t in tiles)
    row = Image.new("RGB", (w, h + 14), (255, 255, 255))
    ImageDraw.Draw(row).text((2, 1), f"{run}, seed {seed}", fill=(0, 0, 0))
    x = 0
    for t in tiles:
      row.paste(t, (x, 14))
      x += t.width + 4
    rows.append(row)
  grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 6 for r in rows)),
                   (255, 255, 255))
  y = 0
  for r in rows:
    grid.paste(r, (0, y))
    y += r.height + 6
  path.parent.mkdir(parents=True, exist_ok=True)
  grid.save(path)
  return True


def sweep_section(sweep: str, *, results: Path = RESULTS, figures: Optional[Path] = None,
                  doc_dir: Optional[Path] = None) -> str:
  """The markdown between a sweep's markers: provenance, tables and (when ``figures`` is
  given) the two plots, written there and linked relative to ``doc_dir``."""
  records = load_records(results, sweep)
  if not records:
    return f"No results yet: `make study STUDY_SWEEP={sweep}` writes them."
  stats = collect(records)
  dates = sorted({r["date"] for r in records})
  machines = sorted({r["machine"] for r in records})
  n = len(records)
  parts = [f"Regenerated from `benchmarks/results/study/{sweep}/` ({n} run{'s' * (n != 1)}, "
           f"{', '.join(dates)}, {'; '.join(machines)}); figures in %, mean ± std over seeds.",
           "", results_table(stats)]
  if sweep in KV_ENTRIES_SWEEPS:
    parts += ["", "Visual KV entries per query (answer rows, all layers and heads):", "",
              kv_entries_table(stats)]
  layers = per_layer_table(stats)
  if layers.count("\n") > 1:
    parts += ["", "Routing per layer (top-1 at the row that predicts the answer's first token):",
              "", layers]
  if figures is not None:
    doc_dir = doc_dir or figures.parent
    colours = run_colours(sorted({run for run, _ in stats}))   # one colour per run, both plots
    for kind, draw in (
        ("accuracy", lambda png: plot_accuracy(stats, png, sweep, run_families(records), colours)),
        ("routing", lambda png: plot_routing(stats, png, sweep, colours))):
      png = figures / f"{sweep}_{kind}.png"
      draw(png)
      parts += ["", f"![{sweep}: {kind}]({png.relative_to(doc_dir).as_posix()})"]
    png = figures / f"{sweep}_gaze_maps.png"
    if gaze_map_grid(results, sweep, png):
      parts += ["", "Gaze maps of the first test examples, as eval_main drew them when the run "
                "was made (the regions the heads selected for each answer token; the ground "
                "truth outlined):", "",
                f"![{sweep}: gaze maps]({png.relative_to(doc_dir).as_posix()})"]
  return "\n".join(parts)


# The goals of each main sweep (``<!-- study-goals:<sweep> begin -->`` ... ``end -->``), with
# the sweep of its ablations.
GOAL_SWEEPS = {"where": "where_ablations", "demo_seeds": "demo_ablations"}


def goal_markers(sweep: str) -> tuple[str, str]:
  return f"<!-- study-goals:{sweep} begin -->", f"<!-- study-goals:{sweep} end -->"


def goals_section(sweep: str, results: Path = RESULTS) -> str:
  main = load_records(results, sweep)
  if not main:
    return f"No results yet: `make study STUDY_SWEEP={sweep}` writes them."
  abl = load_records(results, GOAL_SWEEPS[sweep])
  seeds = sorted({r["seed"] for r in main})
  abl_seeds = sorted({r["seed"] for r in abl})
  return (f"From the {sweep} sweep (seeds {', '.join(map(str, seeds))})"
          + (f" and {GOAL_SWEEPS[sweep]} (seeds {', '.join(map(str, abl_seeds))})" if abl else "")
          + "; figures are means over seeds, the ablations' against the same seeds of the main "
          "sweep.\n\n"
          + goals_table(collect(main), collect(abl) if abl else None,
                        main_on_ablation_seeds=collect(
                            [r for r in main if r["seed"] in abl_seeds]) if abl else None))


def marked_sweeps(doc: str) -> list[str]:
  """The sweeps whose ``<!-- study:<sweep> begin -->`` marker the doc holds, in order."""
  out = []
  for line in doc.splitlines():
    line = line.strip()
    if line.startswith("<!-- study:") and line.endswith(" begin -->"):
      out.append(line[len("<!-- study:"):-len(" begin -->")])
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--doc", default=str(ROOT / "docs" / "study.md"))
  ap.add_argument("--results", default=str(RESULTS))
  a = ap.parse_args(argv)
  doc = Path(a.doc)
  for sweep in marked_sweeps(doc.read_text()):
    text = sweep_section(sweep, results=Path(a.results), figures=doc.parent / "study",
                         doc_dir=doc.parent)
    replace_between(doc, f"<!-- study:{sweep} begin -->", f"<!-- study:{sweep} end -->", text)
    print(f"[study_report] {doc}: {sweep}")
  for sweep in GOAL_SWEEPS:
    begin, end = goal_markers(sweep)
    if begin in doc.read_text():
      replace_between(doc, begin, end, goals_section(sweep, Path(a.results)))
      print(f"[study_report] {doc}: goals of {sweep}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
