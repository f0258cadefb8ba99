"""What a model gets without looking: the answer prior, and accuracy per question type.

* ``answer_prior``: answer each evaluation question with the answer most often given to the
  same question text in the training split. A model that does not beat this row has not learned
  to use the image (the synthetic datasets' questions are templates, so the prior is strong:
  "How many purple shapes are there?" is usually "1").
* ``by_group``: accuracy per label (e.g. question type) from per-example hits.

Both work on ``qa_records``: the question, answer and type of raw examples of the common schema
(``gaze_jax.data.builders``), read once from a random-access source; no model is needed.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping, NamedTuple, Optional, Sequence


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class QA(NamedTuple):
  """An example's first question, its answer and its question type."""
  question: str
  answer: str
  type: str


def qa_records(source, n: Optional[int] = None) -> list[QA]:
  """The first ``n`` examples (all when None) of a random-access ``source`` of the common
  schema as ``QA`` records, in source order (the order the eval batches read them)."""
  n = len(source) if n is None else min(n, len(source))
  out = []
  for i in range(n):
    ex = source[i]
    turns = ex["turns"]
    if isinstance(turns, Mapping):             # tfds Sequence feature: dict of lists
      q, a = turns["question"][0], turns["answer"][0]
    else:                                      # generator dicts: list of turns
      q, a = turns[0]["question"], turns[0]["answer"]
    out.append(QA(_text(q), _text(a), _text(ex.get("question_type", "all"))))
  return out


def by_group(hits: Sequence[bool], groups: Sequence[str]) -> dict[str, dict[str, float]]:
  """``{group: {"accuracy", "examples"}}`` over the examples that have a group label
  (``hits[i]`` belongs to ``groups[i]``; extra hits or labels are ignored)."""
  right, total = collections.Counter(), collections.Counter()
  for h, g in zip(hits, groups):
    total[g] += 1
    right[g] += int(bool(h))
  return {g: {"accuracy": right[g] / total[g], "examples": total[g]} for g in sorted(total)}


def answer_prior(train: Sequence[QA], evaluation: Sequence[QA]) -> dict[str, Any]:
  """Accuracy of answering every question of ``evaluation`` with the most common training
  answer to the same question text (ties: the answer seen first; unseen question: the most
  common answer overall).

  Returns ``{"exact_match", "accuracy" (the same), "examples", "by_type": by_group(...),
  "hits": [bool]}``.
  """
  per_question: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  overall: collections.Counter = collections.Counter()
  for r in train:
    per_question[r.question][r.answer] += 1
    overall[r.answer] += 1
  if not overall:
    raise ValueError("answer_prior: the training examples are empty")
  if not evaluation:
    raise ValueError("answer_prior: the evaluation examples are empty")
  fallback = overall.most_common(1)[0][0]
  hits = [(per_question[r.question].most_common(1)[0][0] if r.question in per_question
           else fallback) == r.answer for r in evaluation]
  exact = sum(hits) / len(hits)
  return {"exact_match": exact, "accuracy": exact, "examples": len(hits),
          "by_type": by_group(hits, [r.type for r in evaluation]), "hits": hits}
