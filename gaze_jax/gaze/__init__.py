"""Gaze Attention as pure, jit-able JAX functions (no Flax): layout, regions, routing,
attention and accounting. See docs/method.md."""

from gaze_jax.gaze.accounting import (KVBudget, attention_flops, decode_flops, routing_flops,
                                      selected_union_size, visual_kv_budget)
from gaze_jax.gaze.attention import JNP_IMPLEMENTATIONS, gaze_attention
from gaze_jax.gaze.dense import causal_attention
from gaze_jax.gaze.layout import (CTX, PAD, PATCH, TEXT, Image, LayoutSpec, Text, TokenLayout,
                                  Video, build_layout, frames_needed, num_regions,
                                  region_major_order, slots_needed)
from gaze_jax.gaze.masks import (base_mask, base_rule, masked_softmax, region_rule, routed_rows,
                                 token_info)
from gaze_jax.gaze.plan import IMPLEMENTATIONS, AttentionPlan, build_plan
from gaze_jax.gaze.reference import gaze_mask
from gaze_jax.gaze.regions import region_descriptors
from gaze_jax.gaze.routing import (Selection, candidate_regions, random_selection, region_scores,
                                   ResolvedK, resolve_k, resolve_top_k, route, select_top_k,
                                   unique_ids)
from gaze_jax.gaze.schedules import progressive_top_k
