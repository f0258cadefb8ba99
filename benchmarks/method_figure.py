"""docs/method_layout.png: docs/method.md's picture of the layout and the routing, drawn from
the code (``gaze_jax.gaze``), not by hand.

  python -m benchmarks.method_figure [--out=docs/method_layout.png]

A tiny sequence, text + an image + text, is built with ``build_layout`` (``EXAMPLE``: a 5 x 6
patch grid cut into 2 x 2 regions, so the last row of regions is padded; 2 context tokens).
Random pre-RoPE queries and keys (seed ``SEED``) go through the real routing: the region
descriptors (``region_descriptors``), the scores of one text query (``region_scores``), its
top-K (``route``) and the slots it then reads (``reference.gaze_mask``). The picture shows

- the storage slots in order, coloured by kind (text, a patch coloured by its region, a
  context token, padding), with the region ids, and below them the slots the query reads;
- the image's patch grid in raster order (each patch's storage slot), the regions, and the
  query's top-K regions outlined;
- the query's score for every region, the top-K highlighted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "method_layout.png"
SEED = 0
TOP_K = 3
HEAD_DIM = 8
REGION_SHAPE = (2, 2)
NUM_CTX = 2
GRID = (5, 6)                   # gh x gw patches: 5 rows do not divide into 2-row regions
TEXT_BEFORE, TEXT_AFTER = 3, 6


def routed_example(seed: int = SEED, top_k: int = TOP_K) -> dict:
  """The example's layout and the routing of its last text row, run by ``gaze_jax.gaze``:
  ``{"layout", "spec", "query" (slot), "scores" [NR], "selected" (region ids), "reads" (bool
  [S], the slots the query reads), "candidates" (bool [NR])}`` (one KV head and one query
  head, random q and k)."""
  import jax
  import jax.numpy as jnp

  from gaze_jax.gaze import (Image, LayoutSpec, Text, build_layout, candidate_regions,
                             gaze_mask, region_descriptors, region_scores, route, routed_rows,
                             token_info)

  gh, gw = GRID
  rh, rw = REGION_SHAPE
  nr = -(-gh // rh) * -(-gw // rw)
  seq = TEXT_BEFORE + (-(-gh // rh) * rh) * (-(-gw // rw) * rw) + NUM_CTX + TEXT_AFTER
  spec = LayoutSpec(seq_len=seq + 1, max_regions=nr, max_images=1, region_shape=REGION_SHAPE,
                    num_ctx=NUM_CTX)
  layout = build_layout([[Text(TEXT_BEFORE), Image(gh, gw), Text(TEXT_AFTER)]], spec)
  S = spec.seq_len
  kq, kk = jax.random.split(jax.random.PRNGKey(seed))
  q = jax.random.normal(kq, (1, S, 1, HEAD_DIM))
  k = jax.random.normal(kk, (1, S, 1, HEAD_DIM))
  info = token_info(layout, jnp.arange(S)[None])
  routed = routed_rows(info, True)
  desc = region_descriptors(k, layout)
  sel = route(q, desc, layout.region_valid, layout.region_last_pos, layout.position, routed,
              top_k=top_k)
  kind = np.asarray(layout.kind[0])
  query = int(np.flatnonzero(kind == 0)[-1])            # the last text token
  mask = gaze_mask(layout, info, routed, sel)            # [B, T, Hq, S]
  cand = candidate_regions(layout.region_valid, layout.region_last_pos, layout.position)
  ids = np.asarray(sel.ids[0, query, 0])
  return {"layout": layout, "spec": spec, "query": query,
          "scores": np.asarray(region_scores(q, desc)[0, query, 0]),
          "selected": sorted(int(i) for i in ids if i >= 0),
          "reads": np.asarray(mask[0, query, 0]), "candidates": np.asarray(cand[0, query])}


def region_colours(n: int) -> list:
  """A distinct colour per region (tab10, then tab20)."""
  import matplotlib
  cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
  return [cmap(i % cmap.N) for i in range(n)]


def draw(ex: dict, path: Path) -> None:
  """The three panels (module docstring) into ``path``."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Patch, Rectangle

  from gaze_jax.gaze import CTX, PAD, PATCH, TEXT

  lay = ex["layout"]
  kind = np.asarray(lay.kind[0])
  region = np.asarray(lay.region[0])
  position = np.asarray(lay.position[0])
  patch_index = np.asarray(lay.patch_index[0])
  S, NR = len(kind), lay.max_regions
  colours = region_colours(NR)
  text_c, ctx_c, pad_c = "0.82", "#3b3b58", "white"
  selected, query = set(ex["selected"]), ex["query"]

  fig = plt.figure(figsize=(11, 6.6))
  grid = fig.add_gridspec(2, 2, height_ratios=[1.0, 2.2], width_ratios=[1, 1.25],
                          hspace=0.45, wspace=0.25)
  ax = fig.add_subplot(grid[0, :])

  def fill(s):
    return {TEXT: text_c, CTX: ctx_c, PAD: pad_c}.get(int(kind[s]), None) or colours[region[s]]

  for s in range(S):               # row 1: the slots; row 0: what the query reads
    ax.add_patch(Rectangle((s, 1), 1, 1, facecolor=fill(s), edgecolor="0.3", lw=0.5,
                           hatch="///" if kind[s] == PAD else None))
    label = {TEXT: "T", CTX: "C", PAD: ""}.get(int(kind[s]), str(region[s]))
    ax.text(s + 0.5, 1.5, label, ha="center", va="center", fontsize=7,
            color="white" if kind[s] == CTX else "black")
    if kind[s] != PAD:
      ax.text(s + 0.5, 2.25, str(position[s]), ha="center", va="center", fontsize=5.5,
              color="0.35")
    ax.add_patch(Rectangle((s, 0), 1, 0.8, facecolor=fill(s) if ex["reads"][s] else "white",
                           edgecolor="0.3", lw=0.5))
  ax.annotate("query", xy=(query + 0.5, 0.0), xytext=(query + 0.5, -0.9), ha="center",
              fontsize=8, arrowprops=dict(arrowstyle="->", lw=1))
  ax.text(-0.6, 2.25, "RoPE position", ha="right", va="center", fontsize=7, color="0.35")
  ax.text(-0.6, 1.5, "storage slot", ha="right", va="center", fontsize=8)
  ax.text(-0.6, 0.4, "read by the query", ha="right", va="center", fontsize=8)
  ax.set_xlim(-0.2, S + 0.2)
  ax.set_ylim(-1.1, 2.6)
  ax.axis("off")
  ax.set_title(f"Storage order ({S} slots, region-major: the {ex['spec'].region_size} slots of "
               "a region are contiguous; positions stay raster order) and the slots one text "
               "query reads", fontsize=9)
  ax.legend(handles=[Patch(facecolor=text_c, edgecolor="0.3", label="text (T)"),
                     Patch(facecolor=colours[0], edgecolor="0.3",
                           label="patch (its region's id)"),
                     Patch(facecolor=ctx_c, edgecolor="0.3", label="context token (C)"),
                     Patch(facecolor=pad_c, edgecolor="0.3", hatch="///", label="padding")],
            loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=4, fontsize=8, frameon=False)

  # The image: patches in raster order, coloured by region; the padded cells dashed.
  ax = fig.add_subplot(grid[1, 0])
  g = int(np.flatnonzero(np.asarray(lay.frame_valid[0]))[0])
  gh, gw = (int(x) for x in np.asarray(lay.frame_grid[0, g]))
  rh, rw = ex["spec"].region_shape
  rows_r, cols_r = -(-gh // rh), -(-gw // rw)
  for s in np.flatnonzero(kind == PATCH):
    i, j = divmod(int(patch_index[s]), gw)
    ax.add_patch(Rectangle((j, gh - 1 - i), 1, 1, facecolor=colours[region[s]],
                           alpha=1.0 if region[s] in selected else 0.45, edgecolor="white",
                           lw=0.8))
    ax.text(j + 0.5, gh - 0.5 - i, str(s), ha="center", va="center", fontsize=7)
  row_of, col_of = np.asarray(lay.region_row[0]), np.asarray(lay.region_col[0])
  for r in range(NR):
    if not lay.region_valid[0, r]:
      continue
    x, y = col_of[r] * rw, gh - (row_of[r] + 1) * rh
    chosen = r in selected
    ax.add_patch(Rectangle((x, y), rw, rh, fill=False, lw=3 if chosen else 1,
                           edgecolor="black" if chosen else "0.4",
                           linestyle="-" if chosen else "--"))
    ax.text(x + 0.08, y + rh - 0.1, f"r{r}", ha="left", va="top", fontsize=7,
            fontweight="bold" if chosen else "normal")
  ax.set_xlim(-0.1, cols_r * rw + 0.1)
  ax.set_ylim(gh - rows_r * rh - 0.1, gh + 0.1)
  ax.set_aspect("equal")
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(f"The image: {gh} x {gw} patches (numbers: storage slot), {NR} regions of "
               f"{rh} x {rw}\n(the last row padded); thick: the query's top-{len(selected)}",
               fontsize=9)

  # The query's scores.
  ax = fig.add_subplot(grid[1, 1])
  sc = ex["scores"]
  bars = ax.bar(range(NR), sc, color=[colours[r] for r in range(NR)],
                edgecolor="black")
  for r, b in enumerate(bars):          # the selected ones solid and framed, the others faded
    b.set_linewidth(2 if r in selected else 0)
    b.set_alpha(1.0 if r in selected else 0.45)
  ax.axhline(0, color="0.5", lw=0.8)
  ax.set_xticks(range(NR), [f"r{r}" for r in range(NR)])
  ax.set_ylabel("score q . d / sqrt(D)")
  n_cand = int(ex["candidates"].sum())
  ax.set_title(f"The query's score per region (random q, k; seed {SEED}): the top-"
               f"{len(selected)}\nof its {n_cand} candidates, regions "
               f"{', '.join(map(str, sorted(selected)))}, are read with the earlier text "
               "and context keys", fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)


def main(argv: Optional[list] = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default=str(OUT))
  a = ap.parse_args(argv)
  ex = routed_example()
  draw(ex, Path(a.out))
  print(f"[method_figure] {a.out}: query slot {ex['query']}, top-{TOP_K} regions "
        f"{ex['selected']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
