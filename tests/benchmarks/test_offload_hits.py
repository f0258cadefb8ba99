"""benchmarks/offload_hits.py on a tiny random model (no GGUF file, no demo run): the record's
fields, and its token and byte accounting recomputed here from the model's shapes."""

import json

import jax
import pytest

from benchmarks import offload_hits
from gaze_jax.model import GazeConfig
from tests.model.test_generate import M, make_batch, make_model

# K = 2 of 4 or 8 regions, 2 query heads per KV head: a step reads up to 4 regions a KV head.
GAZE = GazeConfig(attention="gaze", top_k=2, region_shape=(2, 2), num_ctx=2)
ROW_FIELDS = ("offload_cache", "capacity", "capacity_over_union", "examples", "batches",
              "decode_steps", "tokens", "regions_read", "regions_fetched", "hit_rate",
              "regions_read_per_token", "regions_fetched_per_token",
              "regions_read_per_step_layer_kv_head", "bytes_fetched_per_token",
              "device_bytes_read_per_token", "region_cache_bytes_per_example",
              "tokens_equal_in_device", "max_abs_logit_diff")


@pytest.fixture(scope="module")
def measured():
  """(model, the measure() result) at 1x and 2x the union, one batch of 2 examples."""
  model = make_model(GAZE)
  res = offload_hits.measure(model, [make_batch(model)], max_new_tokens=M, multiples=(1, 2),
                             log=lambda *_: None)
  return model, res


def test_the_record_is_json_with_its_fields(measured, tmp_path):
  _, res = measured
  rec = json.loads(json.dumps(offload_hits.record({"tiny": res})))
  assert {"date", "machine", "backend", "jax_version", "git_commit", "settings"} <= set(rec)
  assert rec["jax_version"] == jax.__version__
  tiny = rec["settings"]["tiny"]
  assert sorted(tiny["settings"]) == ["1x", "2x"]
  for row in tiny["settings"].values():
    assert set(ROW_FIELDS) <= set(row), set(ROW_FIELDS) - set(row)
  assert len(tiny["example_tokens"]) == M
  # The README table: a row per cache size, with its hit rate.
  table = offload_hits.readme_table(rec).splitlines()
  rows = [line for line in table if line.startswith("| tiny |")]
  assert len(rows) == 2 and all(f"{r['hit_rate']:.1%}" in line for line, r in
                                zip(rows, tiny["settings"].values()))
  # The bytes' time at the nominal rates: copied bytes over 64 GB/s, read bytes over 3.35 TB/s.
  for line, r in zip(rows, tiny["settings"].values()):
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[5] == f"{r['bytes_fetched_per_token'] / 64e3:,.2f} us"
    assert cells[6] == f"{r['device_bytes_read_per_token'] / 3.35e6:,.2f} us"


def test_token_and_byte_accounting(measured):
  model, res = measured
  L, Hkv = 2, 2                         # make_model: 2 layers, 4 query and 2 KV heads
  R, D = 2 * 2, 32 // 4                 # 2 x 2 regions; head_dim = hidden 32 / 4 heads
  block = R * D * 2 * 4                 # K and V, float32
  union = 2 * 2                         # 2 query heads per KV head x K = 2 (of 8 regions)
  assert (res["block_bytes"], res["union"], res["region_size"]) == (block, union, R)
  assert res["visual_kv_bytes_per_example"] == 8 * block * Hkv * L
  tokens = 2 * (M - 1)                  # 2 examples; no stop token; token 0 is the prefill's
  rows = res["settings"]
  for m, row in ((1, rows["1x"]), (2, rows["2x"])):
    assert row["capacity"] == m * union
    assert row["offload_cache"] == (0 if m == 1 else m * union)
    assert row["region_cache_bytes_per_example"] == m * union * block * Hkv * L
    assert (row["tokens"], row["decode_steps"], row["examples"]) == (tokens, M - 1, 2)
    read, fetched = row["regions_read"], row["regions_fetched"]
    assert row["bytes_fetched_per_token"] == pytest.approx(fetched * block / tokens)
    assert row["device_bytes_read_per_token"] == pytest.approx(read * block / tokens)
    assert row["regions_read_per_token"] == pytest.approx(read / tokens)
    assert row["hit_rate"] == pytest.approx(1 - fetched / read)
    # The first step of each example, layer and KV head fetches; a step reads at most the
    # union of each KV head.
    assert 2 * L * Hkv <= fetched < read <= tokens * L * Hkv * union
    assert row["regions_read_per_step_layer_kv_head"] <= union
    assert row["tokens_equal_in_device"] and row["max_abs_logit_diff"] <= 1e-5
  # The same steps read the same regions; a larger cache copies no more of them.
  assert rows["1x"]["regions_read"] == rows["2x"]["regions_read"]
  assert rows["2x"]["regions_fetched"] <= rows["1x"]["regions_fetched"]


def test_without_the_demo_run_the_script_says_how_to_make_it(tmp_path):
  out = tmp_path / "hits.json"
  rec = offload_hits.main([f"--out={out}", f"--demo_workdir={tmp_path / 'nothing'}",
                           "--no_smollm2"])
  assert "make demo" in rec["settings"]["demo"]["skipped"]
  assert json.loads(out.read_text())["settings"] == rec["settings"]
