"""Results JSON and Markdown table of ``evaluate`` outputs.

``write_report(results, out_dir)`` takes one ``evaluate`` result or several (a list, or a dict
``{split: result}``) and writes ``{name}.json`` (everything, NaN as null) and ``{name}.md``: one
table per split, rows model / baseline, columns accuracy (``exact_match``: every answer token
argmax-correct), visual KV entries per query (measured, configured and % of the dense model's),
routing accuracy against the random-choice rate, and attention GFLOPs per decode query
(measured; routing included for gaze).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence, Union

import numpy as np
from etils import epath

ROW_ORDER = ("dense", "token_matched", "fixed_from_question", "random_routing", "answer_prior")
ROW_LABELS = {"dense": "dense (same weights)", "token_matched": "dense, token-matched input",
              "fixed_from_question": "fixed-from-question eviction",
              "random_routing": "random routing (same K)",
              "dense_trained": "trained with dense attention",
              "answer_prior": "answer prior (no image)"}


def to_jsonable(x: Any) -> Any:
  """numpy scalars / arrays -> Python; NaN and inf -> None; tuples -> lists."""
  if isinstance(x, Mapping):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return to_jsonable(x.tolist())
  if isinstance(x, (np.bool_, bool)):
    return bool(x)
  if isinstance(x, (np.integer, int)):
    return int(x)
  if isinstance(x, (np.floating, float)):
    x = float(x)
    return x if math.isfinite(x) else None
  return x


def _splits(results) -> list[dict]:
  if isinstance(results, Mapping) and "results" in results:
    return [dict(results)]
  if isinstance(results, Mapping):
    return [dict(v, split=v.get("split", k)) for k, v in results.items()]
  return list(results)


def _num(x) -> bool:
  return x is not None and isinstance(x, (int, float, np.floating)) and math.isfinite(float(x))


def _pct(x, digits: int = 1) -> str:
  return f"{100 * float(x):.{digits}f}%" if _num(x) else "-"


def _fmt(x, spec: str = ".1f") -> str:
  return format(float(x), spec) if _num(x) else "-"


def _gflops(x) -> str:
  if not _num(x):
    return "-"
  x = float(x)
  return f"{x:.3f}" if x >= 0.01 else f"{x:.3g}"


def _row_order(result: Mapping) -> list[str]:
  res = result["results"]
  main = result.get("model", {}).get("name") or next(iter(res))
  return [main] + [k for k in ROW_ORDER if k in res and k != main] + \
      [k for k in res if k not in ROW_ORDER and k != main]


def markdown_by_type(result: Mapping) -> str:
  """Accuracy per question type (rows) and model / baseline (columns), for the variants that
  report ``by_type``; empty when none does."""
  res = result["results"]
  cols = [k for k in _row_order(result) if res[k].get("by_type")]
  if not cols:
    return ""
  types = sorted({t for k in cols for t in res[k]["by_type"]})
  lines = ["| question type | examples | " + " | ".join(ROW_LABELS.get(k, k) for k in cols)
           + " |", "|---|---:|" + "---:|" * len(cols)]
  for t in types:
    n = next(res[k]["by_type"][t]["examples"] for k in cols if t in res[k]["by_type"])
    cells = [_pct(res[k]["by_type"].get(t, {}).get("accuracy")) for k in cols]
    lines.append(f"| {t} | {n} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def markdown_table(result: Mapping) -> str:
  """One split's table (see the module docstring)."""
  res = result["results"]
  main = result.get("model", {}).get("name") or next(iter(res))
  order = _row_order(result)
  head = ("| model | accuracy | visual KV / query | configured | % of dense | routing acc. "
          "(random) | attn GFLOPs / decode query |")
  lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
  for k in order:
    r = res[k]
    label = ROW_LABELS.get(k, k)
    if k == "token_matched" and "token_match" in r:
      gh, gw = r["token_match"]["grid"]
      label += f" ({gh}x{gw} grid)"
    if k == main and r.get("configured", {}).get("top_k"):
      label += f" (K={r['configured']['top_k']})"
    acc = _pct(r.get("exact_match", r.get("accuracy")))     # older results: "accuracy"
    if _num(r.get("text_accuracy")):
      acc += f" (text {_pct(r['text_accuracy'])})"
    kv = r.get("visual_kv", {})
    rt = r.get("routing")
    routing = f"{_pct(rt.get('accuracy'))} ({_pct(rt.get('random'))})" if rt else "-"
    lines.append(f"| {label} | {acc} | {_fmt(kv.get('measured'))} | "
                 f"{_fmt(kv.get('configured'))} | {_pct(kv.get('fraction_of_dense'))} | "
                 f"{routing} | {_gflops(r.get('attention_gflops_per_query'))} |")
  return "\n".join(lines)


def markdown_report(results) -> str:
  """All splits: a heading, the table and a few notes per split."""
  out = ["# Evaluation", ""]
  for res in _splits(results):
    out += [f"## {res.get('split', 'eval')} ({res.get('examples', '?')} examples)", "",
            markdown_table(res), ""]
    per_type = markdown_by_type(res)
    if per_type:
      out += ["Accuracy per question type:", "", per_type, ""]
    main = res["results"].get(res.get("model", {}).get("name", ""), {})
    rt = main.get("routing")
    if rt and rt.get("per_layer"):
      per = ", ".join(f"{_pct(a, 0)}/{_pct(b, 0)}" for a, b in zip(rt["per_layer"],
                                                                  rt["random_per_layer"]))
      out += [f"Routing accuracy per layer (hit / random): {per}", ""]
    if rt and rt.get("top1_per_layer"):
      out += ["Routing per layer (share of selections that hit / its ceiling; top-1 at the "
              "row that predicts the answer against a uniform pick and a salience pick, a "
              "random region that holds an object; coverage of the candidates by the union "
              "over heads):", "",
              "| layer | share | ceiling | top-1 | top-1 uniform | top-1 salience | coverage |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
      salience = rt.get("top1_salience_per_layer") or [float("nan")] * len(rt["per_layer"])
      for i, row in enumerate(zip(rt["per_layer"], rt["share_ceiling_per_layer"],
                                  rt["top1_per_layer"], rt["top1_random_per_layer"], salience,
                                  rt["coverage_per_layer"])):
        out.append(f"| {i} | " + " | ".join(_pct(x) for x in row) + " |")
      out.append("")
    if res.get("skipped"):
      out += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in res["skipped"].items()), ""]
  out += ["Accuracy: exact match of the teacher-forced answer (every answer token "
          "argmax-correct). Visual KV / query: patch tokens of the selected regions (all "
          "earlier patches for dense rows) plus the context tokens before the query, mean over "
          "answer rows, heads and layers; configured: K x region size + N x frames (dense: all "
          "patches + context tokens). GFLOPs: one decode query, all layers and heads, visual "
          "keys only (plus routing scores for gaze). Routing accuracy: share of the selected "
          "regions at answer rows that overlap the answer's ground-truth boxes; random: the same "
          "number drawn uniformly from the causal candidates. Answer prior: the most common "
          "training answer to the same question text, without the image.", ""]
  return "\n".join(out)


def write_report(results: Union[Mapping, Sequence[Mapping]], out_dir: Union[str, os.PathLike],
                 *, name: str = "eval_results") -> dict[str, str]:
  """Writes ``{out_dir}/{name}.json`` and ``{out_dir}/{name}.md`` (``out_dir`` local or
  ``gs://``, through ``etils.epath``); returns their paths."""
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  splits = _splits(results)
  data = {"splits": to_jsonable(splits)}
  json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
  json_path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
  md_path.write_text(markdown_report(splits))
  return {"json": str(json_path), "markdown": str(md_path)}
