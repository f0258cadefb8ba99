"""Ask a trained run a question about your own image.

  python predict_main.py --workdir=/tmp/gaze_demo --image=photo.png \\
      --question="Where is the red shape?"

Loads the run's latest checkpoint as it was trained (the model its checkpoint records; its
tokenizer and image processing from ``<workdir>/config.json``; ``--override=gaze.top_k=2``
changes how attention routes, and says so), resizes the image to the model's input size,
generates the answer, prints it with the regions the answer looked at (their share of the
answer tokens' selections over all layers and heads), and writes a gaze map next to the image
(``<image>_gaze.png``, or ``--gaze_map``). The workdir, the image and the gaze map may be local
or ``gs://``. An error is one line (``--verbose``: with its traceback).
"""

from __future__ import annotations

from absl import app, flags
from etils import epath

from gaze_jax import cli
from gaze_jax.predict import check_question

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's --workdir.", required=True)
flags.DEFINE_string("image", None, "An image file (PNG, JPEG, ...).", required=True)
flags.DEFINE_string("question", None, "The question about the image (UTF-8 text).",
                    required=True)
flags.DEFINE_string("gaze_map", None, "Where to write the gaze map (default: next to the image, "
                    "<image stem>_gaze.png).")
flags.DEFINE_integer("max_new_tokens", 16, "The most answer tokens to generate (at least 1).",
                     lower_bound=1)
flags.DEFINE_integer("step", None, "A checkpoint step (default: the latest).", lower_bound=0)
flags.DEFINE_bool("allow_nonfinite", False, "Answer even with weights that hold NaN or infinite "
                  "values (a diverged run; refused otherwise).")
flags.DEFINE_list("override", [], "Answer with the trained weights changed so, e.g. "
                  "gaze.top_k=2 (printed).")


@flags.validator("question")
def _question_is_text(question):
  """An empty question or one not in UTF-8 is a usage error naming --question."""
  if question is not None:           # a missing one is the required flag's error
    try:
      check_question(question)
    except ValueError as e:
      raise flags.ValidationError(str(e)) from None
  return True


def main(argv):
  del argv
  from gaze_jax import runs
  from gaze_jax.predict import predict

  try:
    overrides = runs.parse_overrides(FLAGS.override)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if overrides:
    print("model overrides (not the trained model): " +
          ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
  p = predict(FLAGS.workdir, FLAGS.image, FLAGS.question, max_new_tokens=FLAGS.max_new_tokens,
              step=FLAGS.step, overrides=overrides, allow_nonfinite=FLAGS.allow_nonfinite)
  print(f"question: {p.question}")
  print(f"answer:   {p.answer}")
  print("where the answer's first token looked (the regions its query heads selected):")
  print("  " + p.summary().replace("\n", "\n  "))
  image = epath.Path(FLAGS.image)
  out = epath.Path(FLAGS.gaze_map) if FLAGS.gaze_map else image.with_name(f"{image.stem}_gaze.png")
  if p.write_gaze_map(out):
    print(f"gaze map: {out}")


if __name__ == "__main__":
  cli.run(main)
