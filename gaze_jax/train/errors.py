"""``CheckpointError``: a checkpoint that could not be restored. Its own leaf module because
both the checkpoints (``gaze_jax.train.checkpoint``, which re-exports it) and the non-finite
checks (``gaze_jax.train.nonfinite``: ``NonFiniteCheckpoint``) raise it, and the checkpoints
call the non-finite checks."""


class CheckpointError(RuntimeError):
  """A checkpoint could not be restored (the message names the folder and the cause)."""
