"""Pallas kernels for gaze attention (GPU via Triton, TPU via Mosaic).

Not built yet: ``gaze_attention(implementation="pallas")`` raises NotImplementedError until they
land; ``implementation="xla"`` is the fast path meanwhile.
"""
