"""The answer prior and per-type accuracy on hand-made examples."""

import pytest

from gaze_jax.eval.prior import answer_prior, by_group, question_types


def _ex(q, a, t="t"):
  # Both turn layouts: the tfds one (dict of lists, bytes) and the generator one (list of dicts).
  if t == "bytes":
    return {"turns": {"question": [q.encode()], "answer": [a.encode()]},
            "question_type": b"count"}
  return {"turns": [{"question": q, "answer": a}], "question_type": t}


def test_answer_prior_uses_the_majority_answer_per_question():
  train = [_ex("How many?", "1"), _ex("How many?", "1"), _ex("How many?", "2"),
           _ex("Colour?", "red"), _ex("Colour?", "blue"), _ex("Colour?", "blue")]
  ev = [_ex("How many?", "1", "count"), _ex("How many?", "2", "count"),
        _ex("Colour?", "blue", "colour"), _ex("Shape?", "blue", "shape"),   # unseen question
        _ex("How many?", "1", "bytes")]
  got = answer_prior(train, ev)
  # Majorities: "1", "blue"; the unseen question falls back to the overall majority ("1" and
  # "blue" tie at 3: the first seen, "1"), so it misses.
  assert got["hits"] == [True, False, True, False, True]
  assert got["accuracy"] == pytest.approx(3 / 5) and got["examples"] == 5
  assert got["by_type"] == {"colour": {"accuracy": 1.0, "examples": 1},
                            "count": {"accuracy": 2 / 3, "examples": 3},
                            "shape": {"accuracy": 0.0, "examples": 1}}
  with pytest.raises(ValueError, match="empty"):
    answer_prior([], ev)


def test_by_group_and_question_types():
  assert by_group([True, False, True], ["a", "a", "b", "c"]) == {
      "a": {"accuracy": 0.5, "examples": 2}, "b": {"accuracy": 1.0, "examples": 1}}
  src = [_ex("q", "a", "colour"), _ex("q", "a", "bytes")]
  assert question_types(src) == ["colour", "count"] and question_types(src, 1) == ["colour"]
