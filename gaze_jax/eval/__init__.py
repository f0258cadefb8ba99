"""Evaluation: answer accuracy, visual KV budget, routing accuracy, decode FLOPs, baselines
from the same weights (dense, token-matched dense, fixed-from-question eviction) and gaze maps.

Typical use (``eval_main.py``)::

  results = evaluate(model, batches, spec, split="validation")
  write_report(results, out_dir)

Submodules: ``metrics`` (numpy metrics per batch), ``budget`` (configured budget and FLOPs),
``layouts`` (layout rebuilding), ``baselines``, ``evaluate``, ``gaze_maps`` (Pillow), ``report``,
``text`` (answer normalisation).
"""

from gaze_jax.eval.baselines import (dense_twin, fixed_selections, gaze_budget_tokens,
                                     token_matched_inputs)
from gaze_jax.eval.budget import configured_budget, measured_flops
from gaze_jax.eval.evaluate import (BASELINES, REGISTRY, Baseline, GazeMaps, TextGeneration,
                                    evaluate, generate_answers, predict,
                                    predict_fixed_from_question)
from gaze_jax.eval.gaze_maps import (render_gaze_map, selection_heat, write_batch_gaze_maps,
                                     write_gaze_maps)
from gaze_jax.eval.layouts import (example_segments, match_tokens, question_anchor_rows,
                                   relayout)
from gaze_jax.eval.metrics import (KVStats, RoutingStats, answer_rows, dense_kv_entries,
                                   routed_kv_entries, routing_accuracy,
                                   teacher_forced_exact_match, token_accuracy)
from gaze_jax.eval.report import markdown_report, markdown_table, to_jsonable, write_report
from gaze_jax.eval.text import normalize_answer, text_exact_match
