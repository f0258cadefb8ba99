"""The evaluation on a tiny random model: teacher-forced exact match against greedy ``generate``,
the dense twin against gaze with every region, the fixed-from-question and random-routing
baselines' regions, and ``evaluate`` + ``write_report`` end to end (numbers checked against
independent counts)."""

import dataclasses
import json
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from gaze_jax.data.features import ModelInputs, next_token_targets
from gaze_jax.eval import (Baseline, GazeMaps, TextGeneration, dense_twin, evaluate, predict,
                           predict_fixed_from_question, teacher_forced_exact_match,
                           write_report)
from gaze_jax.eval import baselines as bl
from gaze_jax.eval.evaluate import _forward_given, generate_answers, predict_random_routing
from gaze_jax.gaze import CTX, PAD, PATCH, TEXT, Image, LayoutSpec, Text, build_layout
from gaze_jax.model import MLLM, DecoderConfig, GazeConfig, MLLMConfig, VisionConfig, pack_images
from gaze_jax.model.generate import generate

V = 64
M = 5                      # answer length
SPEC = LayoutSpec(seq_len=96, max_regions=8, max_images=2, region_shape=(2, 2), num_ctx=2)


def make_model(top_k=2, num_ctx=2, route_prompt=True, seed=0) -> MLLM:
  """16 px images, patch 4: a 4x4 grid, four 2x2 regions per image; 2 layers, 4/2 heads."""
  cfg = MLLMConfig(
      decoder=DecoderConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=4, num_kv_heads=2),
      vision=VisionConfig(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32,
                          num_layers=1, num_heads=2),
      gaze=GazeConfig(attention="gaze", top_k=top_k, region_shape=(2, 2), num_ctx=num_ctx,
                      route_prompt=route_prompt))
  return MLLM(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def model():
  return make_model()


def prompts():
  return [[Text(3), Image(4, 4), Text(4)],
          [Text(1), Image(4, 4), Text(2), Image(4, 4), Text(3)],
          [Text(5), Image(4, 4), Text(2)]]


def batch(examples, spec=SPEC, seed=0, answers=None, gt=None) -> ModelInputs:
  """Teacher-forcing inputs: random prompt tokens and images (seeded), ``answers [B, M]`` at
  the generated slots (random when None), targets by position."""
  layout = build_layout(examples, spec)
  rng = np.random.default_rng(seed)
  B, S = np.asarray(layout.kind).shape
  kind, gen = np.asarray(layout.kind), np.asarray(layout.generated)
  tokens = np.where(kind == TEXT, rng.integers(0, V, (B, S)), 0).astype(np.int32)
  n_frames = np.asarray(layout.frame_valid).sum(1)
  images = pack_images([[rng.normal(size=(16, 16, 3)).astype(np.float32)
                         for _ in range(n)] for n in n_frames], layout)
  targets = np.zeros((B, S), np.int32)
  mask = np.zeros((B, S), np.float32)
  for b in range(B):
    slots = np.flatnonzero(gen[b])
    if answers is not None:
      tokens[b, slots[:answers.shape[1]]] = answers[b, :len(slots)]
    targets[b], mask[b] = next_token_targets(tokens[b], kind[b], np.asarray(layout.position)[b],
                                             gen[b])
  gt = np.full((B, 3), -1, np.int32) if gt is None else np.asarray(gt, np.int32)
  return ModelInputs(tokens, images, layout, targets, mask, gt)


def with_answer(examples, trailing=()):
  return [p + [Text(M, generated=True)] + list(t) for p, t in
          zip(examples, list(trailing) + [[]] * (len(examples) - len(trailing)))]


def greedy(model, inputs: ModelInputs) -> np.ndarray:
  """Greedy tokens ``[B, M]`` from ``generate`` on the same prompt (the layout must end with
  the generated span)."""
  return np.asarray(generate(model, inputs.tokens, inputs.layout, inputs.images,
                             max_new_tokens=M).tokens)


# ------------------------------------------------------------------ exact match == greedy


def test_teacher_forced_exact_match_equals_greedy_generate(model):
  base = batch(with_answer(prompts()))
  gen = greedy(model, base)
  answers = gen.copy()
  answers[1, 4] = (gen[1, 4] + 1) % V           # wrong last token
  answers[2, 1] = (gen[2, 1] + 1) % V           # wrong second token
  # The same prompts (same seed), answers written in; example 0 has text after its answer.
  tf = batch(with_answer(prompts(), trailing=[[Text(2)]]), answers=answers)
  pred, _, _ = predict(model, tf)
  match, has = teacher_forced_exact_match(pred, tf.targets, tf.loss_mask)
  assert has.all()
  np.testing.assert_array_equal(match, (gen == answers).all(1))
  np.testing.assert_array_equal(match, [True, False, False])
  # The induction behind it: up to and including the first wrong answer token, the
  # teacher-forced argmax is the greedy token.
  for b, first_wrong in ((0, M - 1), (1, 4), (2, 1)):
    rows = np.flatnonzero(tf.loss_mask[b] > 0)
    assert len(rows) == M
    np.testing.assert_array_equal(pred[b, rows[:first_wrong + 1]], gen[b, :first_wrong + 1])
  # generate_answers rebuilds the prompt from the teacher-forcing layout (dropping the answer
  # and the text after it) and reproduces the greedy tokens.
  toks, lengths, refs = generate_answers(model, tf, max_new_tokens=M)
  np.testing.assert_array_equal(toks, gen)
  np.testing.assert_array_equal(np.stack(refs), answers)


# ------------------------------------------------------------------ dense twin


def test_dense_twin_equals_gaze_with_every_region_and_no_context_tokens():
  gaze = make_model(top_k=1.0, num_ctx=0)
  dense = dense_twin(gaze)
  assert dense.cfg.gaze.attention == "dense" and gaze.cfg.gaze.attention == "gaze"
  p_gaze, p_dense = nnx.state(gaze, nnx.Param), nnx.state(dense, nnx.Param)
  for a, b in zip(jax.tree.leaves(p_gaze), jax.tree.leaves(p_dense)):
    assert a is b or np.array_equal(np.asarray(a), np.asarray(b))
  # The twin equals a dense model built from scratch and given the weights with nnx.update.
  ref = MLLM(dense.cfg, rngs=nnx.Rngs(7))
  nnx.update(ref, nnx.state(gaze, nnx.Param))
  spec = dataclasses.replace(SPEC, num_ctx=0)
  inputs = batch(with_answer(prompts()), spec=spec)
  real = np.asarray(inputs.layout.kind) != PAD
  pg, lg, _ = predict(gaze, inputs)
  pd, ld, _ = predict(dense, inputs)
  pr, lr, _ = predict(ref, inputs)
  np.testing.assert_allclose(lg[real], ld[real], atol=2e-5)
  np.testing.assert_allclose(lr[real], ld[real], atol=1e-6)
  np.testing.assert_array_equal(pg[real], pd[real])
  # Not vacuous: a gaze model with K=2 of 4 (or 8) regions gives other answer-row outputs.
  # (Not K=1: GazeConfig(top_k=1) == GazeConfig(top_k=1.0), so jit would reuse the K=all
  # compilation.)
  k2 = make_model(top_k=2, num_ctx=0)
  _, l2, _ = predict(k2, inputs)
  ans = inputs.loss_mask > 0
  assert np.abs(l2[ans] - ld[ans]).max() > 1e-2
  # Through evaluate: same accuracy and the same measured visual KV entries (all patches).
  res = evaluate(gaze, [inputs], baselines=("dense",))["results"]
  assert res["gaze"]["visual_kv"]["measured"] == res["dense"]["visual_kv"]["measured"]
  assert res["gaze"]["visual_kv"]["fraction_of_dense"] == 1.0
  assert res["gaze"]["answer_nll"] == pytest.approx(res["dense"]["answer_nll"], abs=1e-4)
  # A dense model evaluates alone: the baselines that need routing are skipped with a reason.
  alone = evaluate(dense, [inputs], name="dense")
  assert set(alone["results"]) == {"dense"} and set(alone["skipped"]) == {
      "dense", "token_matched", "fixed_from_question", "random_routing"}
  assert alone["results"]["dense"]["visual_kv"]["measured"] == res["dense"]["visual_kv"][
      "measured"]
  assert "routing" not in alone["results"]["dense"]


# ------------------------------------------------------------------ fixed from question


def _last_prompt_row(layout, b):
  kind, gen = np.asarray(layout.kind)[b], np.asarray(layout.generated)[b]
  first = np.flatnonzero(gen)[0]
  return int(np.flatnonzero((kind == TEXT) & (np.arange(len(kind)) < first))[-1])


def test_fixed_from_question_keeps_the_last_prompt_row_regions(model):
  inputs = batch(with_answer(prompts()))
  _, lp, sel = predict(model, inputs, return_selected=True)
  _, lf, fixed = predict_fixed_from_question(model, inputs)
  varied = False
  for b in range(3):
    gen_rows = np.flatnonzero(np.asarray(inputs.layout.generated)[b])
    anchor = _last_prompt_row(inputs.layout, b)
    for s, f in zip(sel, fixed):
      np.testing.assert_array_equal(f[b, gen_rows], np.broadcast_to(s[b, anchor],
                                                                    f[b, gen_rows].shape))
      np.testing.assert_array_equal(f[b, :anchor + 1], s[b, :anchor + 1])
      assert (f[b, gen_rows] >= 0).all()
      varied |= bool((s[b, gen_rows] != s[b, anchor]).any())
    # Rows up to the last prompt row are untouched; answer rows change.
    np.testing.assert_allclose(lf[b, :anchor + 1], lp[b, :anchor + 1], atol=1e-5)
  assert varied          # the model's own routing does move during the answer
  ans = inputs.loss_mask > 0
  assert np.abs(lf[ans] - lp[ans]).max() > 1e-4


def test_fixed_from_question_without_prompt_routing():
  # route_prompt=False: prompt rows do not route, yet the regions are chosen at the last
  # prompt row (routed in the first pass only) and kept for the whole answer.
  m = make_model(route_prompt=False)
  inputs = batch(with_answer(prompts()))
  _, lp, sel = predict(m, inputs, return_selected=True)
  _, lf, fixed = predict_fixed_from_question(m, inputs)
  K = 2
  for b in range(3):
    gen_rows = np.flatnonzero(np.asarray(inputs.layout.generated)[b])
    anchor = _last_prompt_row(inputs.layout, b)
    for s, f in zip(sel, fixed):
      assert (s[b, :gen_rows[0]] == -1).all() and (f[b, :gen_rows[0]] == -1).all()
      rows = f[b, gen_rows]
      assert ((rows >= 0).sum(-1) == K).all()
      np.testing.assert_array_equal(rows, np.broadcast_to(rows[0], rows.shape))
    np.testing.assert_allclose(lf[b, :anchor + 1], lp[b, :anchor + 1], atol=1e-5)


# ------------------------------------------------------------------ random routing


def _twin(model, **gaze):
  """``model``'s parameters under a changed GazeConfig (like ``dense_twin``)."""
  cfg = dataclasses.replace(model.cfg, gaze=dataclasses.replace(model.cfg.gaze, **gaze))
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: MLLM(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


def test_random_routing_attends_fresh_random_candidates_per_layer(model):
  inputs = batch(with_answer(prompts()))
  lay = inputs.layout
  key = jax.random.PRNGKey(3)
  _, lr, applied = predict_random_routing(model, inputs, key)
  drawn = bl.random_selections(model.cfg, lay, key)
  routed = np.asarray(lay.kind) == TEXT
  cand = (np.asarray(lay.region_valid)[:, None, :]
          & (np.asarray(lay.region_last_pos)[:, None, :] < np.asarray(lay.position)[:, :, None]))
  for a, d in zip(applied, drawn):
    np.testing.assert_array_equal(a[routed], np.asarray(d)[routed])
    assert (a[~routed] == -1).all()
    b, t, _, _ = np.nonzero(a >= 0)
    assert cand[b, t, a[a >= 0]].all()                    # causal candidates only
    # K = 2 per (row, head) wherever the row has 2 candidates.
    n = ((a >= 0).sum(-1))[routed]
    np.testing.assert_array_equal(n, np.minimum(2, cand.sum(-1)[routed])[:, None]
                                  .repeat(n.shape[-1], -1))
  assert (applied[0] != applied[1]).any()                # a fresh draw per layer
  # The same regions through the reference implementation give the same log-probabilities;
  # the model's own routing gives others.
  ref = _twin(model, implementation="reference")
  _, lref, _ = _forward_given(ref, jax.numpy.asarray(inputs.tokens), lay,
                              jax.numpy.asarray(inputs.images),
                              jax.numpy.asarray(inputs.targets), drawn)
  ans = inputs.loss_mask > 0
  np.testing.assert_allclose(np.asarray(lref)[ans], lr[ans], atol=1e-5)
  _, lp, _ = predict(model, inputs)
  assert np.abs(lp[ans] - lr[ans]).max() > 1e-4


# ------------------------------------------------------------------ evaluate end to end


class IdTokenizer:
  """Decodes ids as space-separated numbers (the tiny model's vocabulary has no text)."""
  stop_ids = ()
  pad_id = 0

  def decode(self, ids, skip_special=True):
    return " ".join(str(int(i)) for i in ids)


def _dense_entries_by_loop(inputs):
  """Mean over answer rows of the patch + context tokens at earlier positions (plain loops)."""
  kind, pos = np.asarray(inputs.layout.kind), np.asarray(inputs.layout.position)
  counts = []
  for b, t in zip(*np.nonzero(inputs.loss_mask > 0)):
    counts.append(sum(1 for s in range(kind.shape[1])
                      if kind[b, s] in (PATCH, CTX) and pos[b, s] < pos[b, t]))
  return float(np.mean(counts))


def test_evaluate_and_report(model, tmp_path):
  examples = with_answer(prompts())
  gen = greedy(model, batch(examples))
  answers = np.random.default_rng(5).integers(0, V, gen.shape)
  answers[0] = gen[0]                                   # example 0 answers like greedy
  # Ground truth: regions 1 and 2 (of 4 or 8). Random rate |G| / |candidates|.
  gt = [[1, 2, -1], [1, 2, -1], [1, 2, -1]]
  inputs = batch(examples, answers=answers, gt=gt)
  feats = {"tokens": inputs.tokens, "targets": inputs.targets, "loss_mask": inputs.loss_mask,
           "images": inputs.images, "gt_regions": inputs.gt_regions,
           "object_regions": np.array([[1, 2, 3, -1]] * 3, np.int32),
           **inputs.layout.to_features()}
  out = evaluate(model, [feats, feats], SPEC, tokenizer=IdTokenizer(),
                 text=TextGeneration(max_new_tokens=M),
                 gaze_maps=GazeMaps(tmp_path / "maps", count=2),
                 split="validation", groups=["x", "y", "y", "x", "y", "y"])
  res = out["results"]
  assert set(res) == {"gaze", "dense", "token_matched", "fixed_from_question", "random_routing"}
  assert out["examples"] == 6 and out["batches"] == 2
  g, d, tm, fx = res["gaze"], res["dense"], res["token_matched"], res["fixed_from_question"]
  rr = res["random_routing"]
  # Accuracy: example 0 of each batch reproduces greedy decoding, the random answers do not.
  assert g["accuracy"] == pytest.approx(1 / 3) and g["examples"] == 6
  assert g["text_accuracy"] == pytest.approx(1 / 3)
  assert g["samples"][0]["match"] and g["samples"][0]["prediction"] == " ".join(map(str, gen[0]))
  # Per group: the examples 0 of both batches (group x) are the right ones.
  assert g["by_type"] == {"x": {"accuracy": 1.0, "examples": 2},
                          "y": {"accuracy": 0.0, "examples": 4}}
  # Visual KV: dense reads every earlier patch and context token.
  dense_kv = _dense_entries_by_loop(inputs)
  assert d["visual_kv"]["measured"] == pytest.approx(dense_kv)
  # Gaze: K=2 full regions of 4 tokens + the context tokens (2 per image) before the row.
  n_ctx = {0: 2, 1: 4, 2: 2}
  rows_per = [(inputs.loss_mask[b] > 0).sum() for b in range(3)]
  want = sum(r * (2 * 4 + n_ctx[b]) for b, r in enumerate(rows_per)) / sum(rows_per)
  assert g["visual_kv"]["measured"] == pytest.approx(want)
  assert g["visual_kv"]["fraction_of_dense"] == pytest.approx(want / dense_kv)
  assert fx["visual_kv"]["measured"] == pytest.approx(want)
  assert rr["visual_kv"]["measured"] == pytest.approx(want)   # the same K regions, at random
  # Configured: 2 * 4 + 2 per frame; dense: 16 patches + 2 per image.
  assert g["visual_kv"]["configured"] == pytest.approx((10 + 12 + 10) / 3)
  assert d["visual_kv"]["configured"] == pytest.approx((18 + 36 + 18) / 3)
  # Token-matched: K * region = 8 tokens per example. Mean relative error over the examples
  # (1, 2, 1 images): 2x2 grid (4, 8, 4 tokens) 1/3, 3x3 (9, 18, 9) 1/2, 4x4 2 -> 2x2.
  assert tm["token_match"]["grid"] == [2, 2] and tm["token_match"]["visual_tokens"] == 16 / 3
  # Routing: the random rate is 2/4 for one-image examples and 2/8 for the two-image one.
  rate = sum(r * (0.25 if b == 1 else 0.5) for b, r in enumerate(rows_per)) / sum(rows_per)
  assert g["routing"]["random"] == pytest.approx(rate)
  assert 0.0 <= g["routing"]["accuracy"] <= 1.0 and len(g["routing"]["per_layer"]) == 2
  # Top-1 at the last prompt rows: uniform rate 2 of 4 candidates (2 of 8 with two images);
  # ceiling: 2 selections and 2 ground-truth candidates per head; coverage: the 4 heads' 2
  # regions each cover at least 2 of the 8 candidates.
  assert g["routing"]["top1_random"] == pytest.approx((0.5 + 0.25 + 0.5) / 3)
  assert g["routing"]["share_ceiling"] == pytest.approx(1.0)
  assert 0.25 <= g["routing"]["coverage"] <= 1.0
  # Salience: objects in regions 1, 2 and 3, all candidates at those rows: 2 of 3 hold the
  # ground truth, in every layer.
  assert g["routing"]["top1_salience"] == pytest.approx(2 / 3)
  assert g["routing"]["top1_salience_per_layer"] == pytest.approx([2 / 3, 2 / 3])
  assert "routing" not in d
  # FLOPs: 4 * entries * Hq * D * L (+ routing 2 * candidates * Hq * D * L for gaze).
  hdl = 4 * 8 * 2
  assert d["attention_gflops_per_query"] == pytest.approx(4 * dense_kv * hdl / 1e9)
  cand = sum(r * (8 if b == 1 else 4) for b, r in enumerate(rows_per)) / sum(rows_per)
  assert g["attention_gflops_per_query"] == pytest.approx((4 * want + 2 * cand) * hdl / 1e9)
  assert fx["flops"]["measured"]["routing"] == 0 and fx["flops"]["configured"]["routing"] == 0
  assert rr["flops"]["measured"]["routing"] == 0
  assert rr["routing"]["random"] == pytest.approx(rate)
  assert g["flops"]["configured"]["routing"] == pytest.approx(2 * (4 + 8 + 4) / 3 * hdl)
  # Gaze maps.
  assert len(out["gaze_maps"]) == 2 and all((tmp_path / "maps" / p).exists()
                                            for p in out["gaze_maps"])
  # Report.
  paths = write_report(out, tmp_path / "report")
  data = json.loads(open(paths["json"]).read())
  split = data["splits"][0]
  assert split["split"] == "validation"
  assert split["results"]["gaze"]["accuracy"] == pytest.approx(g["accuracy"])
  assert split["results"]["dense"]["visual_kv"]["measured"] == pytest.approx(dense_kv)
  md = open(paths["markdown"]).read()
  assert "## validation (6 examples)" in md
  gaze_line = next(line for line in md.splitlines() if line.startswith("| gaze (K=2)"))
  assert f"{100 * g['accuracy']:.1f}%" in gaze_line
  assert f"{g['visual_kv']['measured']:.1f}" in gaze_line
  assert f"{100 * g['routing']['random']:.1f}%" in gaze_line
  assert f"{100 * want / dense_kv:.1f}%" in gaze_line
  assert "dense, token-matched input (2x2 grid)" in md and "fixed-from-question" in md
  assert "random routing (same K)" in md
  layer0 = next(line for line in md.splitlines() if line.startswith("| 0 | "))
  assert f"{100 * g['routing']['top1_per_layer'][0]:.1f}%" in layer0
  assert f"{100 * g['routing']['coverage_per_layer'][0]:.1f}%" in layer0
  x_line = next(line for line in md.splitlines() if line.startswith("| x |"))
  assert x_line.startswith("| x | 2 | 100.0% |")


def test_a_model_trained_dense_is_its_own_row(model, tmp_path):
  """eval_main names a dense model's row "dense_trained" (not "gaze", and not "dense", the
  gaze model's dense twin); the report labels it so."""
  from gaze_jax.eval.report import markdown_table
  inputs = batch(with_answer(prompts()))
  out = evaluate(dense_twin(model), [inputs], name="dense_trained")
  assert set(out["results"]) == {"dense_trained"}
  assert markdown_table(out).splitlines()[2].startswith("| trained with dense attention |")


def test_a_baseline_is_one_registry_entry(model, monkeypatch):
  """A row added to the registry runs like the built-in ones: here the dense twin again, under
  another name, gives the dense row's numbers."""
  ev = sys.modules["gaze_jax.eval.evaluate"]        # the package's ``evaluate`` is the function
  again = Baseline("dense_again", lambda m, x, ctx: predict(m, x), model=dense_twin)
  monkeypatch.setattr(ev, "REGISTRY", ev.REGISTRY + (again,))
  inputs = batch(with_answer(prompts()))
  res = evaluate(model, [inputs], baselines=("dense_again", "dense"))["results"]
  assert list(res) == ["gaze", "dense_again", "dense"]
  for key in ("accuracy", "token_accuracy", "answer_nll", "attention_gflops_per_query"):
    assert res["dense_again"][key] == res["dense"][key]
  assert res["dense_again"]["visual_kv"]["measured"] == res["dense"]["visual_kv"]["measured"]
  with pytest.raises(ValueError, match="unknown baselines"):
    evaluate(model, [inputs], baselines=("dense_twice",))


def test_token_ids_outside_the_vocabulary_are_refused(model):
  """An id past the vocabulary at a text slot would be clamped inside the jitted forward: the
  evaluation refuses the batch, naming the id and its slot (ids at other slots are ignored)."""
  inputs = batch(with_answer(prompts()))
  tokens = np.array(inputs.tokens)
  text = np.flatnonzero(np.asarray(inputs.layout.kind)[1] == TEXT)[0]
  tokens[1, text] = V + 7
  with pytest.raises(ValueError, match=rf"batch 0 tokens: 1 ids .* {V + 7} at batch 0 tokens"
                                       rf"\[1, {text}\]"):
    evaluate(model, [inputs._replace(tokens=tokens)], baselines=())
  patch = np.flatnonzero(np.asarray(inputs.layout.kind)[1] != TEXT)[0]
  tokens = np.array(inputs.tokens)
  tokens[1, patch] = V + 7                          # not a text slot: never embedded
  evaluate(model, [inputs._replace(tokens=tokens)], baselines=())
