"""The fine-tuning journey, end to end, for a tiny random SmolVLM, LLaVA-OneVision and
Qwen2.5-VL saved with transformers, on the Cloud Storage emulator (``tests/gcs_emulator``):

1. the model folder is uploaded to the bucket; ``train_main.py`` starts from it
   (``--config.model.init=hf:gs://...``, the family's recipe) on a small ``llava_json`` set, on
   8 simulated devices (fsdp 4 x tensor 2), with gaze attention and ``--workdir=gs://...``;
2. the run is SIGKILLed once a checkpoint is committed, then resumed to the end;
3. ``eval_main.py`` (as trained), ``predict_main.py`` and ``export_main.py`` (a Hugging Face
   folder, and parameters only, which ``predict_main.py`` serves) all on the bucket;
4. transformers loads the export (the gaze parts reported unused) and gives our dense model's
   logits; ``model.init=hf:`` of the export restores our trained gaze model exactly.

Nothing is written to local disk under a ``gs:`` folder.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gaze_jax import paths
from tests.train.helpers import ROOT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NUM_STEPS = 12


def _smolvlm(folder):
  from tests.hf_folders import save_smolvlm
  save_smolvlm(folder)
  # 64 px images -> longest edge 96 -> 2 x 2 tiles of 48 px + the global image, 3 x 3 tokens
  # each, 4 regions of 2 x 2 per tile (padded).
  return transformers.SmolVLMForConditionalGeneration, [
      f"--config={ROOT / 'configs/smolvlm.py'}", "--config.data.image_grid=(2, 2)",
      "--config.data.max_images=5", "--config.data.max_regions=20"]


def _llava_onevision(folder):
  from tests.llava_onevision_folder import save_folder
  save_folder(folder)
  # 64 px images -> 2 x 2 tiles of 32 px: the 4 x 4 base image (4 regions) and the 8 x 8 grid
  # with a newline per row (16 regions), 5 frame ids.
  return transformers.LlavaOnevisionForConditionalGeneration, [
      f"--config={ROOT / 'configs/llava_onevision_0_5b.py'}", "--config.data.image_grid=(2, 2)",
      "--config.data.max_images=5", "--config.data.max_regions=20",
      "--config.model.decoder.remat=False"]


def _qwen2_5_vl(folder):
  from tests.data.qwen_vl_folder import save_model_folder
  save_model_folder(folder, "qwen2_5_vl")
  # 64 px images -> the one bucket of 112 x 112 px: 8 x 8 patches of 14 px, merged to 4 x 4
  # tokens, 4 regions of 2 x 2 (the tower compiles once: MLLMConfig.qwen_grids).
  return transformers.Qwen2_5_VLForConditionalGeneration, [
      f"--config={ROOT / 'configs/qwen2_5_vl_7b.py'}", "--config.data.buckets=((112, 112),)",
      "--config.data.max_images=1", "--config.data.max_regions=4"]


FAMILIES = {"smolvlm": _smolvlm, "llava_onevision": _llava_onevision,
            "qwen2_5_vl": _qwen2_5_vl}


def _env(cache):
  # os.environ holds the emulator's variables (the gcs fixture).
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=8",
              GAZE_JAX_DATA_CACHE=str(cache))


def _main(script, args, cwd, cache, timeout=600):
  p = subprocess.run([sys.executable, str(ROOT / script)] + args, cwd=cwd, env=_env(cache),
                     capture_output=True, text=True, timeout=timeout)
  assert p.returncode == 0, f"{script} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
  return p


def _upload(local, remote):
  for f in sorted(local.iterdir()):
    (remote / f.name).write_bytes(f.read_bytes())


def _download(remote, local):
  local.mkdir(parents=True, exist_ok=True)
  for f in paths.list_files(remote):
    dst = local / f.relative_to(remote).as_posix()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(f.read_bytes())
  return local


# Two minutes each: `make test` takes Qwen2.5-VL's, `make test-all` SmolVLM's and
# LLaVA-OneVision's too (their loading and processing have their own fast tests).
@pytest.mark.parametrize("family", [f if f == "qwen2_5_vl" else pytest.param(
    f, marks=pytest.mark.slow) for f in sorted(FAMILIES)])
def test_journey_from_hf_folder_on_gcs(family, gcs, tmp_path):
  from tests.hf_folders import write_llava_json

  folder = tmp_path / "model"
  folder.mkdir()
  hf_class, recipe = FAMILIES[family](folder)
  model_uri = gcs.root / "models" / family
  _upload(folder, model_uri)
  data = write_llava_json(tmp_path / "data", n=24, size=64)
  run = f"journey_{family}"
  workdir = f"gs://{gcs.bucket}/{run}"
  cwd, cache = tmp_path / "cwd", tmp_path / "cache"
  cwd.mkdir()
  train = [*recipe, f"--workdir={workdir}", f"--config.model.init=hf:{model_uri}",
           f"--config.data.builder_overrides.json_files.train={data['json_files']['train']}",
           "--config.data.builder_overrides.json_files.validation="
           f"{data['json_files']['validation']}",
           f"--config.data.builder_overrides.image_dir={data['image_dir']}",
           "--config.model.dtype=float32", "--config.model.gaze.region_shape=(2, 2)",
           "--config.model.gaze.num_ctx=2", "--config.data.seq_len=192",
           "--config.data.batch_size=8", "--config.data.num_threads=1",
           "--config.mesh.fsdp=4", "--config.mesh.tensor=2",
           f"--config.train.num_steps={NUM_STEPS}", "--config.train.log_every=1",
           "--config.train.eval_every=0", "--config.checkpoint.save_every=4",
           "--config.topk_schedule.enabled=False", "--config.optim.learning_rate=1e-3",
           "--config.optim.warmup_steps=2"]

  def committed():
    return sorted(int(n.split("/")[2]) for n in gcs.objects(f"{run}/checkpoints/")
                  if n.endswith("/commit_success.txt") and n.count("/") == 3)

  t0 = time.time()
  p = subprocess.Popen([sys.executable, str(ROOT / "train_main.py"), *train], cwd=cwd,
                       env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
  while not committed():
    if p.poll() is not None:
      raise AssertionError(f"training ended early ({p.returncode}):\n{p.stdout.read()[-6000:]}")
    if time.time() - t0 > 500:
      p.kill()
      raise AssertionError("timed out waiting for a checkpoint in the bucket")
    time.sleep(0.1)
  p.send_signal(signal.SIGKILL)
  p.wait()
  killed_at = max(committed())
  assert killed_at < NUM_STEPS
  out = _main("train_main.py", train, cwd, cache).stderr
  assert f"resumed from step {killed_at} of {workdir}/checkpoints" in out, out[-3000:]
  assert "initialising the model from" not in out          # restored, not re-initialised
  assert committed()[-1] == NUM_STEPS
  t_train = time.time() - t0
  # The run's files are all in the bucket: each step's metrics once, event files, checksums.
  objects = gcs.objects(f"{run}/")
  names = {n[len(run) + 1:] for n in objects}
  assert {"config.json", "summary.json", "metrics.jsonl"} <= names
  records = [json.loads(l) for l in (gcs.root / run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, NUM_STEPS + 1))
  assert any(n.startswith("tb/events.out.tfevents.") for n in names)
  for step in committed():
    rec = json.loads((gcs.root / run / "checkpoints" / str(step) / "checksums.json").read_text())
    assert rec["files"] and all(objects[f"{run}/checkpoints/{step}/{rel}"] == f["size"]
                                for rel, f in rec["files"].items())

  # Evaluated as trained (its own config.json); the model it trained is recorded.
  _main("eval_main.py", [f"--workdir={workdir}", f"--out_dir={workdir}/eval",
                         "--max_batches=1", "--num_gaze_maps=1", "--baselines=dense"],
        cwd, cache)
  res = json.loads((gcs.root / run / "eval" / "eval_results.json").read_text())["splits"][0]
  assert {"gaze", "dense"} <= set(res["results"]) and res["model_overrides"] == {}

  image = gcs.root / run / "square.png"
  image.write_bytes((paths.absolute(data["image_dir"]) / "0.png").read_bytes())
  ask = [f"--image={image}", "--question=What colour is the square?", "--max_new_tokens=3"]
  p = _main("predict_main.py", [f"--workdir={workdir}", *ask,
                                f"--gaze_map={workdir}/gaze.png"], cwd, cache)
  assert "answer:" in p.stdout and f"gaze map: {workdir}/gaze.png" in p.stdout, p.stdout

  export, serve = f"{workdir}_hf", f"{workdir}_serve"
  got = json.loads(_main("export_main.py", [f"--workdir={workdir}", f"--out={export}"], cwd,
                         cache).stdout.strip().splitlines()[-1])
  assert got["step"] == NUM_STEPS
  _main("export_main.py", [f"--workdir={workdir}", f"--out={serve}", "--params_only"], cwd,
        cache)
  # The serving export answers the same question as the run does.
  served = _main("predict_main.py", [f"--workdir={serve}", *ask], cwd, cache)
  answer = lambda s: next(l for l in s.splitlines() if l.startswith("answer:"))
  assert answer(served.stdout) == answer(p.stdout)
  assert not (gcs.root / (run + "_serve") / "checkpoints" / str(NUM_STEPS) / "opt_state").exists()

  # transformers loads the export; its logits are our trained model's with dense attention.
  from gaze_jax import runs
  from gaze_jax.convert.families import plan_hf
  from gaze_jax.convert.hf import build_planned
  from gaze_jax.convert.mapping import param_paths
  from gaze_jax.gaze import Text

  local = _download(paths.absolute(export), tmp_path / "export")
  hf, info = hf_class.from_pretrained(local, output_loading_info=True)
  hf.eval()
  assert not info["missing_keys"] and sorted(info["unexpected_keys"]) == ["gaze.ctx_embed"]
  trained = runs.restore(None, workdir)
  dense = runs.restore(None, workdir, overrides={"gaze.attention": "dense"}).model
  # Plain text ids (not the image / video tokens, whose slots our model gives image_newline).
  media = set(trained.model_cfg.newline_token_ids or ())
  tokens = np.random.default_rng(0).integers(0, 200, size=(1, 40))
  tokens = tokens[:, [t not in media for t in tokens[0]]][:, :10].astype(np.int32)
  layout = dense.build_layout([[Text(10)]], seq_len=10)
  ours = np.asarray(dense(tokens, layout))
  with torch.no_grad():
    want = hf(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  diff = float(np.max(np.abs(ours - want)))
  print(f"\n[journey] {family}: train+resume {t_train:.0f} s, total {time.time() - t0:.0f} s; "
        f"export text logits vs transformers max |diff| {diff:.1e}")
  assert diff <= 1e-4
  # model.init=hf: of the export (in the bucket) restores the trained gaze model exactly.
  back = param_paths(build_planned(plan_hf(export, trained.model_cfg.gaze), seed=123))
  mine = param_paths(trained.model)
  assert sorted(back) == sorted(mine)
  for k, v in mine.items():
    np.testing.assert_array_equal(np.asarray(back[k].get_value()), np.asarray(v.get_value()),
                                  err_msg=k)
  # Nothing went to local disk in place of the bucket.
  assert list(cwd.iterdir()) == [], list(cwd.iterdir())
  assert not any(p.name == "gs:" for p in tmp_path.rglob("*"))
