"""commlmo's built-in compressors, registered through the ``commlmo.compressors`` entry points.

* ``identity`` -- the tensor itself; exact (alpha = 1, omega = 0), summable.
* ``sign`` -- ``ceil(d/8)`` bytes of sign bits (+ float32 scales per block); ``sign_bits``,
  contractive when scaled.
* ``topk`` -- k values + k indices in the narrowest integer dtype; contractive, alpha = k/d.
* ``randk`` -- k values, indices from a seed every rank shares; unbiased (scaled) or contractive.
* ``rankk`` -- factors P (m x r), Q (n x r); contractive (svd; power iteration in expectation).
* ``natural`` -- d exponent bytes + ``ceil(d/8)`` sign bytes (9 bits/entry); unbiased, omega = 1/8.
* ``chain`` -- the last stage's wire + earlier stages' indices; contract derived from the stages.

Modules are imported on first use through the registry.  :mod:`commlmo_compressors.bits`
holds the packed-sign format shared with the majority-vote aggregator.  The hot paths
are ``torch.library`` custom ops (``torch.ops.commlmo.*``: ``pack_signs``,
``add_packed_signs``, ``vote_words``, ``topk_abs``, ``natural_encode``, ``natural_decode``,
``block_abs_means``, ``skinny_xq``, ``skinny_xtp``, ``skinny_xq_xtp``), each defined next to
its eager twin, with a fake implementation for FakeTensor and ``torch.compile``: on the
CPU they run the C kernels of :mod:`commlmo_compressors._native`, elsewhere torch ops
(or, on CUDA with ``COMMLMO_TRITON=1``, the Triton kernels of
:mod:`commlmo_compressors._triton`), all with the same bits.
"""
