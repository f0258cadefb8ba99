"""TokenLayout: structure, region-major storage, positions, and clear errors."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gaze_jax.gaze import (CTX, PAD, PATCH, TEXT, Image, LayoutSpec, Text, Video, build_layout,
                           frames_needed, region_major_order, slots_needed)
from tests.gaze.random_cases import REGION_SHAPES, random_example, spec_for


def test_hand_made_layout():
  # 2x3 grid, 2x2 regions -> 1 x 2 regions, the second has two padding slots.
  spec = LayoutSpec(seq_len=16, max_regions=4, max_images=2, region_shape=(2, 2), num_ctx=1)
  lay = build_layout([[Text(2), Image(2, 3), Text(1, generated=True)]], spec)
  T, P, C, X = TEXT, PATCH, CTX, PAD
  np.testing.assert_array_equal(lay.kind[0], [T, T, P, P, P, P, P, X, P, X, C, T, X, X, X, X])
  # Raster positions: patch (i, j) at 2 + 3 i + j; region 0 = (0,0),(0,1),(1,0),(1,1).
  np.testing.assert_array_equal(lay.position[0, :12], [0, 1, 2, 3, 5, 6, 4, 0, 7, 0, 8, 9])
  np.testing.assert_array_equal(lay.patch_index[0, :10], [-1, -1, 0, 1, 3, 4, 2, -1, 5, -1])
  np.testing.assert_array_equal(lay.region[0, :11], [-1, -1, 0, 0, 0, 0, 1, -1, 1, -1, -1])
  np.testing.assert_array_equal(lay.frame[0, :12], [-1, -1, 0, 0, 0, 0, 0, -1, 0, -1, 0, -1])
  np.testing.assert_array_equal(lay.region_valid[0], [True, True, False, False])
  np.testing.assert_array_equal(lay.region_first[0, :2], [2, 6])
  np.testing.assert_array_equal(lay.region_last[0, :2], [5, 9])
  np.testing.assert_array_equal(lay.region_last_pos[0, :2], [6, 7])
  np.testing.assert_array_equal(lay.region_col[0, :2], [0, 1])
  np.testing.assert_array_equal(lay.nonvisual_index[0, :5], [0, 1, 10, 11, -1])
  np.testing.assert_array_equal(lay.generated[0, :12], [0] * 11 + [1])
  np.testing.assert_array_equal(lay.frame_grid[0, 0], [2, 3])


def test_newline_rows_are_text_slots_at_the_end_of_each_row():
  # The grid of test_hand_made_layout with a newline slot after each row: patch (i, j) at
  # 2 + 4 i + j, newline i at 2 + 4 i + 3, stored after the regions, before the context token.
  spec = LayoutSpec(seq_len=16, max_regions=4, max_images=2, region_shape=(2, 2), num_ctx=1)
  segs = [Text(2), Image(2, 3, newline_rows=True), Text(1, generated=True)]
  lay = build_layout([segs], spec)
  T, P, C, X = TEXT, PATCH, CTX, PAD
  np.testing.assert_array_equal(lay.kind[0], [T, T, P, P, P, P, P, X, P, X, T, T, C, T, X, X])
  np.testing.assert_array_equal(lay.position[0, :14],
                                [0, 1, 2, 3, 6, 7, 4, 0, 8, 0, 5, 9, 10, 11])
  np.testing.assert_array_equal(lay.patch_index[0, :14], [-1, -1, 0, 1, 3, 4, 2, -1, 5, -1,
                                                          -1, -1, 0, -1])
  np.testing.assert_array_equal(lay.region[0, 10:12], [-1, -1])
  np.testing.assert_array_equal(lay.frame[0, 10:13], [0, 0, 0])      # the image's rows
  np.testing.assert_array_equal(lay.region_last_pos[0, :2], [7, 8])
  np.testing.assert_array_equal(lay.nonvisual_index[0, :7], [0, 1, 10, 11, 12, 13, -1])
  np.testing.assert_array_equal(lay.generated[0, :14], [0] * 13 + [1])
  assert slots_needed(segs, spec) == 14


def test_a_tiled_image_takes_one_frame_id_per_tile():
  spec = LayoutSpec(seq_len=40, max_regions=8, max_images=5, region_shape=(2, 2), num_ctx=1)
  segs = [Text(1), Image(3, 4, newline_rows=True, tiles=(2, 2)), Image(2, 2), Text(1)]
  assert frames_needed(segs) == 5
  lay = build_layout([segs], spec)
  np.testing.assert_array_equal(lay.frame_valid[0], [True, False, False, False, True])
  np.testing.assert_array_equal(lay.frame_media[0], [0, 0, 0, 0, 1])
  np.testing.assert_array_equal(lay.frame_tiles[0], [[2, 2]] + [[0, 0]] * 4)
  np.testing.assert_array_equal(lay.frame_grid[0], [[3, 4]] + [[0, 0]] * 3 + [[2, 2]])
  # The second image's patches and context token are frame 4; tile frames hold no token.
  kind, frame = lay.kind[0], lay.frame[0]
  assert set(frame[kind == PATCH]) == {0, 4} and list(frame[kind == CTX]) == [0, 4]
  with pytest.raises(ValueError, match=r"segment 1 \(Image\): more than max_images=3 "
                     r"images/frames \(a tiled image takes 4, one per tile\)"):
    build_layout([segs], LayoutSpec(seq_len=40, max_regions=8, max_images=3, region_shape=(2, 2)))


def test_region_major_order_pads_missing_tokens():
  order = region_major_order(3, 3, 2, 2)
  np.testing.assert_array_equal(order, [[0, 1, 3, 4], [2, -1, 5, -1], [6, 7, -1, -1],
                                        [8, -1, -1, -1]])


def test_video_frames_each_get_regions_and_context():
  spec = LayoutSpec(seq_len=40, max_regions=8, max_images=3, region_shape=(2, 2), num_ctx=2)
  lay = build_layout([[Text(1), Video(3, 2, 4), Text(2)]], spec)
  np.testing.assert_array_equal(lay.region_frame[0], [0, 0, 1, 1, 2, 2, -1, -1])
  np.testing.assert_array_equal(lay.frame_media[0], [0, 0, 0])
  ctx = np.flatnonzero(lay.kind[0] == CTX)
  np.testing.assert_array_equal(lay.frame[0, ctx], [0, 0, 1, 1, 2, 2])
  # Context tokens follow their frame directly.
  np.testing.assert_array_equal(ctx, [9, 10, 19, 20, 29, 30])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_layout_invariants(seed):
  rng = np.random.default_rng(seed)
  rs = REGION_SHAPES[int(rng.integers(len(REGION_SHAPES)))]
  examples = [random_example(rng, rs, newline_rows=bool(seed % 2)) for _ in range(3)]
  spec = spec_for(examples, rs, int(rng.integers(0, 3)), rng, slack=2)
  lay = build_layout(examples, spec)
  R = spec.region_size
  for b in range(3):
    kind, pos = lay.kind[b], lay.position[b]
    real = kind != PAD
    # Positions of real tokens are 0..n-1, each once: a permutation of the dense sequence.
    np.testing.assert_array_equal(np.sort(pos[real]), np.arange(real.sum()))
    # Every patch of every frame is stored exactly once.
    for f in np.flatnonzero(lay.frame_valid[b]):
      gh, gw = lay.frame_grid[b, f]
      idx = lay.patch_index[b][(kind == PATCH) & (lay.frame[b] == f)]
      np.testing.assert_array_equal(np.sort(idx), np.arange(gh * gw))
    # Regions are contiguous blocks of R slots holding only their own patches (or padding).
    for r in np.flatnonzero(lay.region_valid[b]):
      first = lay.region_first[b, r]
      block = slice(first, first + R)
      assert lay.region_last[b, r] == first + R - 1
      assert set(lay.region[b, block][kind[block] == PATCH]) == {r}
      assert np.all((kind[block] == PATCH) | (kind[block] == PAD))
      assert lay.region_last_pos[b, r] == pos[block][kind[block] == PATCH].max()
    assert set(lay.region[b][kind == PATCH]) == set(np.flatnonzero(lay.region_valid[b]))
    nv = lay.nonvisual_index[b]
    np.testing.assert_array_equal(nv[nv >= 0], np.flatnonzero((kind == TEXT) | (kind == CTX)))


@pytest.mark.parametrize("segments, spec_kw, match", [
    ([Image(4, 4)], dict(region_shape=(6, 6)), r"segment 0 \(Image\): region_shape \(6, 6\) is larger than the grid \(4, 4\)"),
    ([Text(-1)], {}, r"segment 0 \(Text\): length must be >= 0, got -1"),
    ([Text(2), Image(0, 4)], {}, r"segment 1 \(Image\): gh must be >= 1"),
    ([Video(0, 4, 4)], {}, r"frames must be >= 1"),
    ([Image(8, 8)], dict(max_regions=3), r"more than max_regions=3 regions"),
    ([Text(60)], {}, r"sequence longer than seq_len=50"),
    ([Image(4, 4), Image(4, 4)], dict(max_images=1), r"more than max_images=1"),
    ([Text(2), "image"], {}, r"unknown segment type str"),
    ([Text(40)], dict(max_nonvisual=30), r"exceed max_nonvisual=30"),
    ([Image(4, 4, newline_rows=1)], {}, r"segment 0 \(Image\): newline_rows must be a bool"),
    ([Image(4, 4, tiles=(0, 2))], {}, r"segment 0 \(Image\): tiles must be >= 1, got 0"),
    ([Image(4, 4, tiles=3)], {}, r"segment 0 \(Image\): tiles must be None or two ints"),
    # Newline slots are text: they count against max_nonvisual.
    ([Text(26), Image(4, 4, newline_rows=True)], dict(max_nonvisual=30),
     r"31 text and context tokens exceed max_nonvisual=30"),
])
def test_bad_structure_names_the_field(segments, spec_kw, match):
  kw = dict(seq_len=50, max_regions=8, max_images=2, region_shape=(2, 2), num_ctx=1)
  kw.update(spec_kw)
  with pytest.raises(ValueError, match=match):
    build_layout([[Text(1)], segments], LayoutSpec(**kw))


@pytest.mark.parametrize("kw, match", [
    (dict(seq_len=0), "seq_len"), (dict(region_shape=(0, 2)), "region_shape"),
    (dict(num_ctx=-1), "num_ctx"), (dict(max_nonvisual=100), "max_nonvisual"),
    # Not whole numbers: refused when the spec is made, not later inside build_layout.
    (dict(seq_len=2.7), r"LayoutSpec.seq_len must be an int, got 2.7 \(float\)"),
    (dict(seq_len="64"), r"LayoutSpec.seq_len must be an int, got '64' \(str\)"),
    (dict(max_regions=True), "LayoutSpec.max_regions must be an int"),
    (dict(region_shape=(2.0, 2)), "LayoutSpec.region_shape must be an int"),
    (dict(region_shape="22"), "LayoutSpec.region_shape must be two positive ints"),
    (dict(max_nonvisual=3.5), "LayoutSpec.max_nonvisual must be an int"),
])
def test_bad_spec(kw, match):
  base = dict(seq_len=50, max_regions=8, max_images=2)
  base.update(kw)
  with pytest.raises(ValueError, match=match):
    LayoutSpec(**base)


def test_spec_accepts_numpy_ints():
  spec = LayoutSpec(seq_len=np.int64(50), max_regions=np.int32(8), max_images=2,
                    region_shape=(np.int64(2), 2))
  assert type(spec.seq_len) is int and spec.region_shape == (2, 2) and spec.max_nonvisual == 50


def test_error_names_the_example():
  spec = LayoutSpec(seq_len=20, max_regions=8, max_images=2, region_shape=(2, 2))
  with pytest.raises(ValueError, match=r"example 1, segment 0"):
    build_layout([[Text(3)], [Text(-2)]], spec)


def test_features_round_trip_and_batch_by_stacking():
  spec = LayoutSpec(seq_len=30, max_regions=6, max_images=2, region_shape=(2, 2), num_ctx=1)
  a, b = [Text(2), Image(2, 4, newline_rows=True, tiles=(1, 2)), Text(3)], [Text(5), Video(2, 2, 2)]
  both = build_layout([a, b], spec)
  rows = [build_layout([e], spec).to_features() for e in (a, b)]
  stacked = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
  rebuilt = type(both).from_features(stacked, spec)
  for k, v in both.to_features().items():
    np.testing.assert_array_equal(getattr(rebuilt, k), v, err_msg=k)
  with pytest.raises(ValueError, match="missing"):
    type(both).from_features({"kind": stacked["kind"]}, spec)


def test_for_decoding_cuts_the_text_and_context_keys_to_what_the_batch_holds():
  """A decode step reads ``nonvisual_index``: cut to the largest count in the batch, rounded up
  to a multiple (at most S), the slots unchanged; a traced layout cannot be cut."""
  spec = LayoutSpec(seq_len=200, max_regions=8, max_images=2, region_shape=(2, 2), num_ctx=1)
  lay = build_layout([[Text(3), Image(4, 4), Text(5)], [Text(20), Text(2, generated=True)]],
                     spec)
  assert lay.nonvisual_index.shape == (2, 200)
  counts = (np.asarray(lay.nonvisual_index) >= 0).sum(axis=1).tolist()
  assert counts == [9, 22]
  cut = lay.for_decoding(multiple=8)
  assert cut.spec.max_nonvisual == 24 and cut.nonvisual_index.shape == (2, 24)
  np.testing.assert_array_equal(cut.nonvisual_index, np.asarray(lay.nonvisual_index)[:, :24])
  assert cut.spec.seq_len == 200 and np.array_equal(cut.kind, lay.kind)
  assert lay.for_decoding(multiple=512).nonvisual_index.shape == (2, 200)     # at most S
  with pytest.raises(ValueError, match="concrete"):
    jax.jit(lambda l: l.for_decoding().kind)(lay)
