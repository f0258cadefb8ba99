"""What a model gets without looking: the answer prior, and accuracy per question type.

* ``answer_prior``: answer each evaluation question with the answer most often given to the
  same question text in the training split. A model that does not beat this row has not learned
  to use the image (the synthetic datasets' questions are templates, so the prior is strong:
  "How many purple shapes are there?" is usually "1").
* ``by_group``: accuracy per label (e.g. question type) from per-example hits.

Both work on raw examples of the common schema (``gaze_jax.data.builders``), read through a
random-access source, so they need no model.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Mapping, Optional, Sequence


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _first_turn(example: Mapping[str, Any]) -> tuple[str, str]:
  turns = example["turns"]
  if isinstance(turns, Mapping):               # tfds Sequence feature: dict of lists
    return _text(turns["question"][0]), _text(turns["answer"][0])
  return _text(turns[0]["question"]), _text(turns[0]["answer"])


def question_types(source, n: Optional[int] = None) -> list[str]:
  """``question_type`` of the first ``n`` examples of ``source`` (all when None)."""
  n = len(source) if n is None else min(n, len(source))
  return [_text(source[i]["question_type"]) for i in range(n)]


def by_group(hits: Sequence[bool], groups: Sequence[str]) -> dict[str, dict[str, float]]:
  """``{group: {"accuracy", "examples"}}`` over the examples that have a group label
  (``hits[i]`` belongs to ``groups[i]``; extra hits or labels are ignored)."""
  right, total = collections.Counter(), collections.Counter()
  for h, g in zip(hits, groups):
    total[g] += 1
    right[g] += int(bool(h))
  return {g: {"accuracy": right[g] / total[g], "examples": total[g]} for g in sorted(total)}


def answer_prior(train: Iterable[Mapping[str, Any]], evaluation: Iterable[Mapping[str, Any]],
                 ) -> dict[str, Any]:
  """Accuracy of answering every question of ``evaluation`` with the most common training
  answer to the same question text (ties: the answer seen first; unseen question: the most
  common answer overall).

  Returns ``{"accuracy", "examples", "by_type": by_group(...), "hits": [bool]}``.
  """
  per_question: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  overall: collections.Counter = collections.Counter()
  for ex in train:
    q, a = _first_turn(ex)
    per_question[q][a] += 1
    overall[a] += 1
  if not overall:
    raise ValueError("answer_prior: the training examples are empty")
  fallback = overall.most_common(1)[0][0]
  hits, types = [], []
  for ex in evaluation:
    q, a = _first_turn(ex)
    guess = per_question[q].most_common(1)[0][0] if q in per_question else fallback
    hits.append(guess == a)
    types.append(_text(ex.get("question_type", "all")))
  if not hits:
    raise ValueError("answer_prior: the evaluation examples are empty")
  return {"accuracy": sum(hits) / len(hits), "examples": len(hits),
          "by_type": by_group(hits, types), "hits": hits}
