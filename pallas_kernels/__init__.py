"""Pallas kernels for gaze attention: block-sparse attention over the selected regions.

``gaze_jax.gaze.gaze_attention(..., implementation="pallas")`` calls ``ops.gaze_attention``;
``ops.attention`` takes selected region ids directly and ``ops.KernelConfig`` picks tiles,
passes and kernels. Modules:
  * ``blocks``: the KV block table (regions and text/context chunks) and the per-tile block
    lists, built with plain jnp outside the kernels;
  * ``common``: the exact gaze mask of a (row tile x key block) pair, shared by the kernels;
  * ``gaze_gpu``: generic Pallas kernels (Triton on the GPU, ``interpret=True`` on CPU):
    forward with split-K (prefill, training and decode), backward dq and dk/dv;
  * ``gaze_tpu``: Mosaic forward, decode and backward with ``pltpu.PrefetchScalarGridSpec``
    (one program holds every KV head, so that K/V windows start at any slot);
  * ``ops``: routing, planning, ``custom_vjp``, the dense-rows split and ``shard_map`` under a
    device mesh.
See ``pallas_kernels/README.md`` for the designs and their costs. Nothing here is imported by
``gaze_jax`` unless the Pallas implementation is asked for.
"""
