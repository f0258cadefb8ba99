"""Example features: next-token targets by position, answer-only loss, boxes -> region ids, image
preprocessing, chat rendering with images, static shapes and clear errors."""

import numpy as np
import pytest

pytest.importorskip("PIL", reason="the [data] extra is not installed")

from gaze_jax.data.boxes import boxes_to_regions  # noqa: E402
from gaze_jax.data.features import (ExampleProcessor, ExampleTooLong, FeatureConfig,  # noqa: E402
                                    batch_to_model_inputs, next_token_targets,
                                    render_conversation)
from gaze_jax.data.tokenizers import ByteTokenizer, ChatTemplate  # noqa: E402
from gaze_jax.gaze import (CTX, PAD, PATCH, TEXT, Image, LayoutSpec, Text, Video,  # noqa: E402
                           build_layout)
from tests.gaze.random_cases import REGION_SHAPES, random_example, spec_for  # noqa: E402


def _row(layout):
  return {k: np.asarray(v)[0] for k, v in layout.to_features().items()}


def test_targets_by_position_hand_made():
  # [a b c] [3x3 image, 2x2 regions: 4 padded regions, region-major] [d e](answer), no ctx.
  spec = LayoutSpec(seq_len=23, max_regions=4, max_images=1, region_shape=(2, 2), num_ctx=0)
  row = _row(build_layout([[Text(3), Image(3, 3), Text(2, generated=True)]], spec))
  # Storage: slots 3-6 raster 0,1,3,4; 7-10 raster 2,-,5,-; 11-14 raster 6,7,-,-;
  # 15-18 raster 8,-,-,-; answer d, e at slots 19, 20; slots 21, 22 batch padding.
  assert row["position"][15] == 11 and row["kind"][16] == PAD and row["position"][19] == 12
  tokens = np.zeros(23, np.int32)
  tokens[[0, 1, 2, 19, 20]] = [11, 12, 13, 14, 15]
  targets, mask = next_token_targets(tokens, row["kind"], row["position"], row["generated"])
  want = np.zeros(23, np.int32)
  want[0], want[1] = 12, 13          # a -> b, b -> c; c -> first patch (no text target)
  want[15] = 14                      # the last raster patch (slot 15) predicts d, not slot 16
  want[19] = 15                      # d -> e; e is last
  np.testing.assert_array_equal(targets, want)
  np.testing.assert_array_equal(np.nonzero(mask)[0], [15, 19])


def test_targets_match_a_brute_force_search():
  rng = np.random.default_rng(0)
  for _ in range(20):
    rs = REGION_SHAPES[rng.integers(len(REGION_SHAPES))]
    num_ctx = int(rng.integers(0, 3))
    segs = random_example(rng, rs)
    spec = spec_for([segs], rs, num_ctx, rng, slack=3)
    row = _row(build_layout([segs], spec))
    kind, pos, gen = row["kind"], row["position"], row["generated"]
    tokens = rng.integers(1, 100, size=spec.seq_len).astype(np.int32)
    targets, mask = next_token_targets(tokens, kind, pos, gen)
    for s in range(spec.seq_len):
      nxt = [t for t in range(spec.seq_len) if kind[t] != PAD and pos[t] == pos[s] + 1]
      ok = kind[s] != PAD and len(nxt) == 1 and kind[nxt[0]] == TEXT
      assert targets[s] == (tokens[nxt[0]] if ok else 0)
      assert mask[s] == float(ok and gen[nxt[0]])


def test_boxes_to_regions_hand_made():
  spec = LayoutSpec(seq_len=200, max_regions=40, max_images=3, region_shape=(2, 2), num_ctx=1)
  # 64 px images, 8 x 8 patches of 8 px: a 4 x 4 grid of 16 px regions per image.
  row = _row(build_layout([[Text(2), Image(8, 8), Text(1), Image(8, 8)]], spec))
  regions = lambda boxes, frames: boxes_to_regions(row, boxes, frames, (64, 64), (2, 2)).tolist()
  assert regions([[1, 1, 10, 10]], [0]) == [0]                   # top-left region of frame 0
  assert regions([[0, 0, 16, 16]], [0]) == [0]                   # touching edges do not count
  assert regions([[16, 16, 20, 20]], [0]) == [5]                 # ... from either side
  assert regions([[10, 2, 20, 12]], [0]) == [0, 1]               # straddles two columns
  assert regions([[2, 14, 6, 18]], [0]) == [0, 4]                # straddles two rows
  assert regions([[14, 14, 18, 18]], [0]) == [0, 1, 4, 5]
  assert regions([[1, 1, 10, 10]], [1]) == [16]                  # frame 1's regions follow
  assert regions([[60, 60, 64, 64], [1, 1, 2, 2]], [1, 0]) == [0, 31]
  with pytest.raises(ValueError, match="frames \\[2\\]"):
    regions([[0, 0, 1, 1]], [2])
  # A 3 x 3 grid of 16 px patches (48 px), 2 x 2 regions: the second region row is cut at 48.
  row = _row(build_layout([[Image(3, 3)]], spec))
  assert boxes_to_regions(row, [[40, 40, 47, 47]], [0], (48, 48), (2, 2)).tolist() == [3]
  assert boxes_to_regions(row, [[20, 30, 40, 34]], [0], (48, 48), (2, 2)).tolist() == [0, 1, 2, 3]
  # Pooled video frames: 4 x 4 grid over 64 px (16 px patches), 2 x 2 regions per frame.
  row = _row(build_layout([[Video(3, 4, 4)]], spec))
  assert boxes_to_regions(row, [[40, 40, 50, 50]], [2], (64, 64), (2, 2)).tolist() == [11]


def _cfg(seq_len=160, max_images=2, **kw):
  spec = LayoutSpec(seq_len=seq_len, max_regions=32, max_images=max_images, region_shape=(2, 2),
                    num_ctx=2)
  return FeatureConfig(spec=spec, image_size=64, patch_size=8, **kw)


def _white_corner_image(size, corner):
  im = np.zeros((size, size, 3), np.uint8)
  im[:corner, :corner] = 255
  return im


def test_processor_on_a_hand_made_example():
  tok = ByteTokenizer()
  cfg = _cfg(seq_len=192)
  big = _white_corner_image(128, 20)                   # 128 px: resized to 64
  small = np.full((64, 64, 3), 128, np.uint8)
  ex = {"id": b"hand-1", "images": [big, small], "is_video": False,
        "turns": {"question": [b"Left <image> right <image>\nWhat is white?"],
                  "answer": [b"top left"]},
        "boxes": np.asarray([[0, 0, 20, 20], [56, 56, 64, 64]], np.float32),
        "box_image": np.asarray([0, 1], np.int32),
        "object_boxes": np.asarray([[0, 0, 20, 20], [56, 56, 64, 64], [32, 0, 48, 16]],
                                   np.float32),
        "object_box_image": np.asarray([0, 1, 1], np.int32)}
  f = ExampleProcessor(tok, cfg)(ex)
  S = cfg.spec.seq_len
  assert f["tokens"].shape == (S,) and f["tokens"].dtype == np.int32
  assert f["images"].shape == (2, 64, 64, 3) and f["gt_regions"].shape == (16,)
  kind = f["kind"]
  text_ids = f["tokens"][kind == TEXT]
  assert tok.decode(text_ids, skip_special=False) == (
      "<bos><|user|>Left  right \nWhat is white?<|assistant|>top left<|end|>")
  assert (f["tokens"][kind != TEXT] == 0).all()
  # Order of kinds: text, image 0 (+ctx), text, image 1 (+ctx), text, then padding.
  runs = [int(k) for i, k in enumerate(kind) if i == 0 or k != kind[i - 1]]
  assert runs == [TEXT, PATCH, CTX, TEXT, PATCH, CTX, TEXT, PAD]
  # The loss covers exactly the answer and its end-of-turn token.
  assert tok.decode(f["targets"][f["loss_mask"] > 0], skip_special=False) == "top left<|end|>"
  last_prompt = np.nonzero(f["tokens"] == tok.encode("<|assistant|>")[0])[0][0]
  assert f["loss_mask"][last_prompt] == 1 and f["loss_mask"].sum() == len("top left") + 1
  assert f["generated"].sum() == len("top left") + 1
  # Box (0, 0, 20, 20) on the 128 px image is (0, 0, 10, 10) on the 64 px one: region 0 only
  # (unscaled it would hit regions 0, 1, 4, 5); the bottom-right box hits image 1's region 15.
  assert f["gt_regions"].tolist() == [0, 31] + [-1] * 14
  # Object boxes the same way, padded to max_regions: (32, 0, 48, 16) on the 64 px image 1 is
  # its region (row 0, column 2) = 16 + 2.
  assert f["object_regions"].tolist() == [0, 18, 31] + [-1] * 29
  # SigLIP normalisation: white -> 1, black -> -1, grey 128 -> 0.0039.
  np.testing.assert_allclose(f["images"][0, 0, 0], 1.0, atol=1e-6)
  np.testing.assert_allclose(f["images"][0, 63, 63], -1.0, atol=1e-6)
  np.testing.assert_allclose(f["images"][1], 128 / 127.5 - 1, atol=1e-6)


def test_video_example_uses_pooled_frames_and_frame_boxes():
  tok = ByteTokenizer()
  cfg = _cfg(seq_len=120, max_images=4, video_grid=4)
  frames = [np.zeros((64, 64, 3), np.uint8) for _ in range(3)]
  ex = {"id": "clip", "images": frames, "is_video": True,
        "turns": [{"question": "Which frame?", "answer": "3"}],
        "boxes": np.asarray([[40, 40, 50, 50]], np.float32), "box_image": np.asarray([2])}
  f = ExampleProcessor(tok, cfg)(ex)
  assert f["frame_valid"].tolist() == [True, True, True, False]
  assert f["frame_grid"][:3].tolist() == [[4, 4]] * 3
  assert (f["frame_media"][:3] == 0).all()               # one video segment
  assert f["gt_regions"][:2].tolist() == [11, -1]
  assert f["images"].shape == (4, 64, 64, 3) and not f["images"][3].any()


def test_render_conversation_places_images_and_marks_answers():
  t = ChatTemplate.chatml(system="Be brief.")
  parts = render_conversation(t, [("What?", "A."), ("<image>\nAnd this?", "B.")], 1)
  assert parts == [
      ("text", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat?<|im_end|>\n"
               "<|im_start|>assistant\n", False),
      ("text", "A.<|im_end|>", True),
      ("text", "\n<|im_start|>user\n", False), ("media", 0),
      ("text", "\nAnd this?<|im_end|>\n<|im_start|>assistant\n", False),
      ("text", "B.<|im_end|>", True), ("text", "\n", False)]
  # No markers: the images go first, each followed by a newline.
  parts = render_conversation(ChatTemplate(user_start="U:"), [("Q", "A")], 2)
  assert parts[:4] == [("text", "U:", False), ("media", 0), ("text", "\n", False), ("media", 1)]
  with pytest.raises(ValueError, match="ex-9: 2 <image> markers but 1"):
    render_conversation(t, [("<image><image>Q", "A")], 1, where="ex-9")


def test_too_long_examples_raise_or_are_skipped_and_counted():
  tok = ByteTokenizer()
  long = {"id": "long-7", "images": [np.zeros((64, 64, 3), np.uint8)],
          "turns": [{"question": "x" * 200, "answer": "y"}]}
  short = {"id": "short-1", "images": [], "turns": [{"question": "hi", "answer": "yo"}]}
  with pytest.raises(ExampleTooLong, match="'long-7' needs .* slots, more than .* 160"):
    ExampleProcessor(tok, _cfg())(long)
  proc = ExampleProcessor(tok, _cfg(skip_too_long=True))
  assert proc(long) is None and proc(short) is not None
  assert proc.skipped == 1 and proc.skipped_ids == ["long-7"]
  three = dict(long, id="three", images=[np.zeros((8, 8, 3), np.uint8)] * 3,
               turns=[{"question": "q", "answer": "a"}])
  with pytest.raises(ExampleTooLong, match="'three' needs 3 images/frames"):
    ExampleProcessor(tok, _cfg(seq_len=400))(three)


def test_batch_to_model_inputs():
  tok = ByteTokenizer()
  cfg = _cfg()
  proc = ExampleProcessor(tok, cfg)
  exs = [{"id": str(i), "images": [np.zeros((64, 64, 3), np.uint8)],
          "turns": [{"question": "q" * i, "answer": "a"}]} for i in range(3)]
  feats = [proc(e) for e in exs]
  batch = {k: np.stack([f[k] for f in feats]) for k in feats[0]}
  tokens, images, layout, targets, loss_mask, gt, objects = batch_to_model_inputs(batch,
                                                                                 cfg.spec)
  assert tokens.shape == (3, 160) and images.shape == (3, 2, 64, 64, 3)
  assert layout.kind.shape == (3, 160) and layout.region_valid.shape == (3, 32)
  np.testing.assert_array_equal(layout.position, batch["position"])
  assert targets.shape == loss_mask.shape == (3, 160) and gt.shape == (3, 16)
  assert objects.shape == (3, 32) and (objects == -1).all()      # no object boxes given
  assert batch_to_model_inputs({k: v for k, v in batch.items() if k != "object_regions"},
                               cfg.spec).object_regions is None
  other = LayoutSpec(seq_len=128, max_regions=32, max_images=2, region_shape=(2, 2), num_ctx=2)
  with pytest.raises(ValueError, match="seq_len=128"):
    batch_to_model_inputs(batch, other)
  with pytest.raises(ValueError, match="missing \\['loss_mask'\\]"):
    batch_to_model_inputs({k: v for k, v in batch.items() if k != "loss_mask"}, cfg.spec)


def test_feature_config_errors():
  spec = LayoutSpec(seq_len=8, max_regions=1, max_images=1, region_shape=(2, 2), num_ctx=0)
  with pytest.raises(ValueError, match="image_size=6 is below one patch of 8 px"):
    FeatureConfig(spec=spec, image_size=6, patch_size=8)
  with pytest.raises(ValueError, match=r"video_grid=9 must be in \[1, grid=8\]"):
    FeatureConfig(spec=spec, image_size=64, patch_size=8, video_grid=9)
  # LLaVA-OneVision's native 384 px with 14 px patches: 27 x 27 (the remainder dropped).
  assert FeatureConfig(spec=spec, image_size=384, patch_size=14).grid == 27


def test_token_ids_outside_the_model_vocabulary_raise(caplog):
  """A tokenizer whose ids reach past the model's vocabulary: the example is named (the model
  would clamp such ids silently inside jit); a negative id always raises."""
  tok = ByteTokenizer()
  ex = {"id": b"vocab-1", "images": [], "is_video": False,
        "turns": {"question": [b"hi"], "answer": [b"yo"]}}
  ExampleProcessor(tok, _cfg(vocab_size=tok.vocab_size))(ex)         # all ids fit
  with caplog.at_level("WARNING", logger="gaze_jax.data.features"):
    proc = ExampleProcessor(tok, _cfg(vocab_size=64))
  assert f"tokenizer has {tok.vocab_size} ids" in caplog.text
  with pytest.raises(ValueError, match=r"example 'vocab-1': the tokenizer gave ids \[\d+.*"
                     r"outside the model's vocabulary \[0, 64\)"):
    proc(ex)

  class Negative(ByteTokenizer):
    def encode(self, text):
      return [-3] + super().encode(text)

  with pytest.raises(ValueError, match=r"ids \[-3\] outside"):
    ExampleProcessor(Negative(), _cfg())(ex)
  with pytest.raises(ValueError, match="vocab_size must be >= 1"):
    _cfg(vocab_size=0)
