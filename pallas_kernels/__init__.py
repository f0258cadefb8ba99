"""Pallas kernels for gaze attention: block-sparse attention over the selected regions.

``ops.gaze_attention`` takes ``gaze_jax.gaze.gaze_attention``'s arguments (the model calls it
for ``GazeConfig(implementation="pallas")``); ``ops.attention`` takes selected region ids
directly. The kernels build on the method (``gaze_jax.gaze``), which never imports them.
Modules:
  * ``config``: ``KernelConfig`` (tiles, passes, launches), its defaults and the mesh axes a
    kernel call is split over (no Pallas import);
  * ``blocks``: the KV block table (regions and text/context chunks) and the per-tile block
    lists, built with plain jnp outside the kernels;
  * ``plan``: the layout-derived plan of a forward pass (block table, packed rows, base-pass
    lists) and the per-layer packing of queries and selections;
  * ``core``: the forward passes and their ``custom_vjp`` backward, for both kernel families;
  * ``common``: the exact gaze mask of a (row tile x key block) pair, shared by the kernels;
  * ``gaze_gpu``: generic Pallas kernels (Triton on the GPU, ``interpret=True`` on CPU):
    forward with split-K (prefill, training and decode), backward dq and dk/dv;
  * ``gaze_tpu``: Mosaic forward, decode and backward with ``pltpu.PrefetchScalarGridSpec``
    (one program holds every KV head, so that K/V windows start at any slot);
  * ``ops``: routing, the dense-rows split and ``shard_map`` under a device mesh;
  * ``reference``: ``ops.attention``'s contract in plain jnp (tests);
  * ``splash``: dense causal attention on a TPU by jax's splash attention kernel (the dense
    model and the kernels' dense rows), in ``shard_map`` under a mesh.
See ``pallas_kernels/README.md`` for the designs and their costs. Nothing here is imported by
``gaze_jax`` unless the Pallas implementation is asked for.
"""
