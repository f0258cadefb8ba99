"""grain pipeline: static batch shapes, per-host shards, determinism by seed, iterator state
save / restore, skipped examples, and a forward pass of the tiny model on a batch."""

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets", reason="the [data] extra is not installed")
pytest.importorskip("grain", reason="the [data] extra is not installed")

from gaze_jax.data import pipeline  # noqa: E402
from gaze_jax.data.features import (ExampleProcessor, FeatureConfig,  # noqa: E402
                                    batch_to_model_inputs)
from gaze_jax.data.tokenizers import ByteTokenizer  # noqa: E402
from gaze_jax.gaze import TEXT, LayoutSpec  # noqa: E402
from tests.data.helpers import text  # noqa: E402

SPEC = LayoutSpec(seq_len=160, max_regions=16, max_images=1, region_shape=(2, 2), num_ctx=4)
FCFG = FeatureConfig(spec=SPEC, image_size=64, patch_size=8)


def _ids(batch):
  """Identify examples by their question + answer tokens (the sources have unique scenes)."""
  return [bytes(t[k == TEXT].astype(np.uint8)) for t, k in zip(batch["tokens"], batch["kind"])]


def _dataset(builder, seed=0, batch_size=4, num_epochs=None, **kw):
  src = pipeline.data_source(builder, "train", process_index=0, process_count=1)
  proc = ExampleProcessor(ByteTokenizer(), FCFG)
  return pipeline.make_dataset(src, proc, batch_size=batch_size, seed=seed,
                               num_epochs=num_epochs, **kw)


def test_batches_have_static_shapes_and_answer_masks(tiny_builders):
  b = tiny_builders["gaze_shapes"]
  ds = _dataset(b, num_epochs=1)
  tok = ByteTokenizer()
  batches = list(ds)
  assert len(batches) == b.info.splits["train"].num_examples // 4
  for batch in batches:
    assert batch["tokens"].shape == (4, 160) and batch["tokens"].dtype == np.int32
    assert batch["images"].shape == (4, 1, 64, 64, 3) and batch["images"].dtype == np.float32
    assert batch["loss_mask"].dtype == np.float32 and batch["gt_regions"].shape == (4, 16)
    for i in range(4):
      # The loss covers the answer plus its end token, and nothing else.
      answer = tok.decode(batch["targets"][i][batch["loss_mask"][i] > 0], skip_special=False)
      assert answer.endswith("<|end|>") and answer[:-7]
      prompt = tok.decode(batch["tokens"][i], skip_special=False)
      assert prompt.split("<|assistant|>")[1].startswith(answer)
      assert (batch["gt_regions"][i] >= 0).sum() >= 1
      assert np.abs(batch["images"][i]).max() <= 1.0


def test_shards_are_disjoint_and_cover_the_split(tiny_builders):
  b = tiny_builders["gaze_shapes"]
  n = b.info.splits["train"].num_examples
  shards = [pipeline.data_source(b, "train", process_index=i, process_count=2) for i in range(2)]
  ids = [{text(s[j]["id"]) for j in range(len(s))} for s in shards]
  assert len(shards[0]) == len(shards[1]) == n // 2
  assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == n


def test_same_seed_same_order_other_seed_other_order(tiny_builders):
  b = tiny_builders["gaze_shapes"]
  first = lambda seed: [_ids(x) for x, _ in zip(_dataset(b, seed=seed), range(3))]
  assert first(0) == first(0)
  assert first(0) != first(1)


def test_iterator_state_restores_to_the_same_element(tiny_builders):
  b = tiny_builders["gaze_shapes"]
  ds = _dataset(b, seed=5)                        # endless, reshuffled every epoch
  it = iter(ds)
  for _ in range(9):                              # past the first epoch (8 batches)
    next(it)
  state = json.loads(json.dumps(it.get_state()))   # it is saved as JSON with checkpoints
  want = [_ids(next(it)) for _ in range(3)]
  fresh = iter(_dataset(b, seed=5))
  fresh.set_state(state)
  assert [_ids(next(fresh)) for _ in range(3)] == want
  # The second epoch is a new permutation of the same examples.
  it = iter(_dataset(b, seed=5))
  e1 = sum((_ids(next(it)) for _ in range(8)), [])
  e2 = sum((_ids(next(it)) for _ in range(8)), [])
  assert sorted(e1) == sorted(e2) and e1 != e2


def test_skipped_examples_are_counted_and_dropped(tiny_builders):
  b = tiny_builders["gaze_shapes"]
  short = LayoutSpec(seq_len=118, max_regions=16, max_images=1, region_shape=(2, 2), num_ctx=4)
  src = pipeline.data_source(b, "train", process_index=0, process_count=1)
  # 64 patches + 4 ctx leave 50 text slots: the longer questions do not fit.
  proc = ExampleProcessor(ByteTokenizer(), FeatureConfig(spec=short, image_size=64,
                                                         patch_size=8, skip_too_long=True))
  got = sum(len(x["tokens"]) for x in pipeline.make_dataset(src, proc, batch_size=1,
                                                             shuffle=False, num_threads=1))
  assert 0 < proc.skipped < len(src) and got == len(src) - proc.skipped
  strict = ExampleProcessor(ByteTokenizer(), FeatureConfig(spec=short, image_size=64,
                                                           patch_size=8))
  with pytest.raises(Exception, match="example 'train-.*' needs .* slots"):
    list(pipeline.make_dataset(src, strict, batch_size=1, shuffle=False, num_threads=1))


def test_unprepared_builder_and_unknown_split(tmp_path, tiny_builders):
  from gaze_jax.data import builders
  with pytest.raises(ValueError, match="not prepared.*prepare first"):
    pipeline.data_source(builders.builder("digit_grid", tmp_path, "tiny"), "train")
  with pytest.raises(ValueError, match="no split 'dev'"):
    pipeline.data_source(tiny_builders["digit_grid"], "dev")


def test_tiny_model_runs_on_a_pipeline_batch(tiny_builders, data_dir):
  jnp = pytest.importorskip("jax.numpy")
  from flax import nnx

  from gaze_jax.model import MLLM
  from gaze_jax.model.presets import tiny

  cfg = tiny()
  ds, proc = pipeline.make_pipeline(
      "gaze_video", "train", data_dir, ByteTokenizer(),
      FeatureConfig(spec=LayoutSpec(seq_len=192, max_regions=16, max_images=4,
                                    region_shape=cfg.gaze.region_shape, num_ctx=cfg.gaze.num_ctx),
                    image_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size,
                    video_grid=cfg.vision.grid // cfg.vision.video_pool),
      batch_size=2, config="tiny", process_index=0, process_count=1)
  batch = next(iter(ds))
  tokens, images, layout, targets, loss_mask, gt, _ = batch_to_model_inputs(batch,
                                                                            proc.cfg.spec)
  assert np.asarray(layout.frame_grid)[:, :4].tolist() == [[[4, 4]] * 4] * 2   # pooled frames
  model = MLLM(cfg, rngs=nnx.Rngs(0))
  logits = nnx.jit(lambda m, t, lay, im: m(t, lay, im))(model, jnp.asarray(tokens), layout,
                                                       jnp.asarray(images))
  assert logits.shape == (2, 192, cfg.decoder.vocab_size)
  logp = _log_softmax(logits)
  nll = -np.take_along_axis(np.asarray(logp), targets[..., None], -1)[..., 0]
  loss = (nll * loss_mask).sum() / loss_mask.sum()
  assert np.isfinite(loss) and abs(loss - np.log(cfg.decoder.vocab_size)) < 1.0
  assert ((gt >= 0).sum(1) >= 1).all()


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))
