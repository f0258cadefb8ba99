"""The `make aot` tooling on hand-made inputs: ptxas and thunk-sequence parsing, the occupancy
arithmetic that sizes the decode split-K, the CI rules, and the README table."""

import json

import pytest

from benchmarks.aot import report, run, targets

PTXAS = """ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are \
serialized due to non wgmma instructions in the function 'gaze_fwd_base'
ptxas info    : Compiling entry function 'gaze_fwd_base' for 'sm_90a'
ptxas info    : Function properties for gaze_fwd_base
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 182 registers, used 1 barriers
ptxas info    : Compiling entry function 'gaze_bwd_dkv_base' for 'sm_90a'
ptxas info    : Function properties for gaze_bwd_dkv_base
    8 bytes stack frame, 248 bytes spill stores, 244 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""

THUNKS = """024: kCustomKernel [prev=023 (1)  | next=026 (2) ] loop_transpose_fusion grid: [14, 1, 1] \
threads: [128, 1, 1]  shared_memory: 0 bytes
026: kCustomKernel [prev=025 (1)  | next=035 (9) ] gaze_fwd_base grid: [16, 209, 1] threads: \
[128, 1, 1]  shared_memory: 82688 bytes
034: kCustomKernel [prev=033 (1)  | next=035 (1) ] gaze_bwd_dq_routed grid: [2, 8, 836] threads: \
[256, 1, 1]  shared_memory: 43524 bytes
"""


def test_ptxas_output_is_read_per_entry():
  fwd = targets.parse_ptxas(PTXAS, "gaze_fwd_base")
  assert fwd == {"registers": 182, "spill_store_bytes": 0, "spill_load_bytes": 0,
                 "stack_bytes": 0, "wgmma_serialized": True}
  dkv = targets.parse_ptxas(PTXAS, "gaze_bwd_dkv_base")
  assert (dkv["registers"], dkv["spill_store_bytes"], dkv["spill_load_bytes"],
          dkv["stack_bytes"], dkv["wgmma_serialized"]) == (255, 248, 244, 8, False)
  assert "ptxas_error" in targets.parse_ptxas(PTXAS, "gaze_bwd_dq_base")


def test_thunk_sequence_gives_the_gaze_kernel_launches():
  got = targets.parse_launches(THUNKS)
  assert set(got) == {"gaze_fwd_base", "gaze_bwd_dq_routed"}
  assert got["gaze_fwd_base"] == [{"grid": [16, 209, 1], "threads": 128, "shared_bytes": 82688}]
  assert got["gaze_bwd_dq_routed"][0]["threads"] == 256


@pytest.mark.parametrize("regs, threads, smem, want", [
    (158, 128, 39684, 3),       # 5,120 registers per warp: 3 warps per quarter -> 3 CTAs
    (128, 128, 39428, 4),       # registers allow 4, shared memory 5
    (182, 128, 82688, 2),       # shared memory: 233,472 / 83,712 -> 2
    (255, 256, 0, 1),
    (32, 128, 0, 16),           # threads: 2,048 / 128
])
def test_occupancy_from_registers_shared_memory_and_threads(regs, threads, smem, want):
  assert targets.occupancy(regs, threads, smem) == want


def _report(**kernel):
  rec = {"name": "decode_bfloat16", "dtype": "bfloat16", "compiled": True,
         "kernels": [{"kernel": "gaze_fwd_full", "registers": 158, "spill_store_bytes": 0,
                      "programs_per_sm": 3, **kernel}]}
  return {"target": "h100", "kernels": [rec], "steps": []}


def test_checks_fail_on_bf16_spills_wrong_occupancy_and_compile_failures():
  from pallas_kernels import ops
  assert ops.DECODE_PROGRAMS_PER_SM[2] == 3
  assert run.check(_report()) == []
  assert "spills 8 B" in run.check(_report(spill_store_bytes=8))[0]
  assert "programs per SM" in run.check(_report(programs_per_sm=4))[0]
  f32 = _report(spill_store_bytes=64, programs_per_sm=1)
  f32["kernels"][0].update(name="decode_float32", dtype="float32")
  assert run.check(f32) == []                  # float32 spills are reported, not fatal
  bad = {"target": "tpu", "kernels": [], "steps": [
      {"name": "train_tiny_pallas", "target": "v5p:2x2x2", "compiled": False,
       "error": "Mosaic kernels cannot be automatically partitioned."}]}
  assert "did not compile" in run.check(bad)[0]


def _step(impl, layers, peak, compile_s=30.0):
  return {"name": f"train_{layers}_{impl}", "case": "c", "preset": "cambrian_4b",
          "implementation": impl, "target": "v5p:4x4x4", "mesh": {"fsdp": 16, "tensor": 4},
          "batch": 256, "seq_len": 4096, "decoder_layers": layers, "full_layers": 36,
          "step": "train", "compiled": True, "memory": {"peak": peak}, "hbm_bytes": 95 * 2**30,
          "cost": {"flops": 1e15, "bytes_accessed": 2e12}, "compile_s": compile_s}


def test_table_renders_every_file_and_the_layer_slope(tmp_path):
  gib = 2 ** 30
  full = {"target": "tpu", "date": "2026-12-02", "jax": "0.10.2", "problems": [],
          "steps": [_step("xla", 2, 10 * gib), _step("xla", 4, 14 * gib),
                    _step("pallas", 2, 5 * gib, 40.0), _step("pallas", 36, 22 * gib, 41.0)]}
  # A full depth that ran out of HBM: the compiler's figure, marked as such.
  oom = dict(_step("xla", 36, 900 * gib), compiled=False, out_of_memory=True)
  full["steps"] += [dict(s, batch=16) for s in (_step("xla", 2, 800 * gib), oom)]
  (tmp_path / "aot_full_tpu.json").write_text(json.dumps(full))
  h100 = {"target": "h100", "date": "2026-12-02", "jax": "0.10.2", "problems": [],
          "kernels": _report()["kernels"], "steps": []}
  (tmp_path / "aot_h100.json").write_text(json.dumps(h100))
  text = report.table(tmp_path)
  assert "| decode_bfloat16 | gaze_fwd_full | yes | 158 | 0 |" in text
  # 10 GiB at 2 layers, 14 GiB at 4: 2 GiB per layer, 10 + 2 * 34 = 78 GiB at 36 layers.
  assert ("| xla | 256 | 2: 10.00 GiB | 4: 14.00 GiB | 2.00 GiB | 78.00 GiB (**extrapolated**) "
          "| 30.0 / 30.0 | 95.00 GiB |") in text
  # The full depth compiled: its own figure, and 17 GiB over 34 layers = 512 MiB per layer.
  assert ("| pallas | 256 | 2: 5.00 GiB | 36: 22.00 GiB | 512.0 MiB | 22.00 GiB (compiled) "
          "| 40.0 / 41.0 | 95.00 GiB |") in text
  assert "| xla | 16 | 2: 800.00 GiB | 36: 900.00 GiB | 2.94 GiB | 900.00 GiB (out of HBM) |" in text
  readme = tmp_path / "README.md"
  readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\noutro\n")
  report.update_readme(readme, text)
  out = readme.read_text()
  assert "old" not in out and "78.00 GiB" in out and out.endswith("outro\n")


def test_kv_all_gathers_are_counted_and_fail_a_kernels_step():
  from benchmarks.aot.steps import kv_all_gathers
  hlo = ("%ag.1 = bf16[8,80,2,16]{3,2,1,0} all-gather(%a), dimensions={0}\n"
         "%ag.2 = bf16[4,80,1,16]{3,2,1,0} all-gather(%b), dimensions={2}\n"
         "%ag.3 = f32[8,80]{1,0} all-gather(%c), dimensions={0}\n"       # a layout field
         "%ag.4 = bf16[64,256]{1,0} all-gather(%w), dimensions={0}\n")   # an FSDP weight
  assert kv_all_gathers(hlo, (8, 80, 2, 16)) == 2
  rec = {"name": "train_tiny_pallas", "target": "v5p:2x2x2", "compiled": True,
         "implementation": "pallas", "kv_all_gathers": 2}
  assert "all-gathers of K/V" in run.check({"target": "tpu", "steps": [rec]})[0]
  assert run.check({"target": "tpu", "steps": [dict(rec, implementation="xla")]}) == []


def test_a_splash_step_needs_splash_kernels_and_no_kv_gathers():
  rec = {"name": "train_tiny_dense_splash", "target": "v5p:2x2x2", "compiled": True,
         "implementation": "dense_splash", "kv_all_gathers": 0,
         "kernels": ["splash_mha_dkv_no_residuals", "splash_mha_fwd_residuals"]}
  assert run.check({"target": "tpu", "steps": [rec]}) == []
  missing = run.check({"target": "tpu", "steps": [dict(rec, kernels=[])]})
  assert len(missing) == 1 and "no splash kernel" in missing[0]
  gathered = run.check({"target": "tpu", "steps": [dict(rec, kv_all_gathers=1)]})
  assert len(gathered) == 1 and "all-gathers of K/V" in gathered[0]


def test_out_of_memory_reports_give_the_bytes_needed():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 1.2T of 95.74G hbm. "
         "Exceeded hbm capacity by ... the total memory required for HLO temporaries (922.36G) "
         "exceeds available HBM (95.74G).")
  assert targets.out_of_memory(msg) == int(922.36 * 2 ** 30)
  assert targets.out_of_memory("INVALID_ARGUMENT: something else") is None
