"""The answer prior and per-type accuracy on hand-made examples."""

import pytest

from gaze_jax.eval.prior import QA, answer_prior, by_group, qa_records


def test_answer_prior_uses_the_majority_answer_per_question():
  train = [QA("How many?", "1", "count"), QA("How many?", "1", "count"),
           QA("How many?", "2", "count"), QA("Colour?", "red", "colour"),
           QA("Colour?", "blue", "colour"), QA("Colour?", "blue", "colour")]
  ev = [QA("How many?", "1", "count"), QA("How many?", "2", "count"),
        QA("Colour?", "blue", "colour"), QA("Shape?", "blue", "shape"),   # unseen question
        QA("How many?", "1", "count")]
  got = answer_prior(train, ev)
  # Majorities: "1", "blue"; the unseen question falls back to the overall majority ("1" and
  # "blue" tie at 3: the first seen, "1"), so it misses.
  assert got["hits"] == [True, False, True, False, True]
  assert got["accuracy"] == pytest.approx(3 / 5) and got["examples"] == 5
  assert got["by_type"] == {"colour": {"accuracy": 1.0, "examples": 1},
                            "count": {"accuracy": 2 / 3, "examples": 3},
                            "shape": {"accuracy": 0.0, "examples": 1}}
  with pytest.raises(ValueError, match="training examples are empty"):
    answer_prior([], ev)
  with pytest.raises(ValueError, match="evaluation examples are empty"):
    answer_prior(train, [])


def test_qa_records_read_both_turn_layouts():
  tfds_like = {"turns": {"question": [b"Q1", b"Q2"], "answer": [b"A1", b"A2"]},
               "question_type": b"count"}
  generated = {"turns": [{"question": "Q", "answer": "A"}]}        # no question_type
  assert qa_records([tfds_like, generated]) == [QA("Q1", "A1", "count"), QA("Q", "A", "all")]
  assert qa_records([tfds_like, generated], 1) == [QA("Q1", "A1", "count")]


def test_by_group_ignores_unlabelled_hits():
  assert by_group([True, False, True], ["a", "a", "b", "c"]) == {
      "a": {"accuracy": 0.5, "examples": 2}, "b": {"accuracy": 1.0, "examples": 1}}
