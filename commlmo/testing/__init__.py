"""Testing tools for commlmo plugins: tensor strategies and the compressor contract kit.

Check that your compressor keeps the contract it declares (its
``capabilities``, ``alpha``, ``omega``, ``wire_nbytes``)::

    from commlmo.testing import check_compressor

    def test_my_compressor():
        check_compressor(MyCompressor(k=0.1), max_examples=50)

and use the same tensors in your own property tests::

    from hypothesis import given
    from commlmo.testing import tensors

    @given(tensors(max_numel=256))
    def test_something(x): ...

See :mod:`commlmo.testing.contract` for every check and how the statistical
tolerances are derived from the sample size.

Check an LMO the same way: ``check_lmo(MyLMO())`` tests duality
(``<G, direction(G)> = dual_norm(G)``), the norm ball, optimality, scale
invariance, shapes and dtypes, no mutation, determinism and ``directions``
(see :mod:`commlmo.testing.lmo_kit`; approximate LMOs declare an
:class:`LMOTolerance`).

Check an aggregator on simulated workers: ``check_aggregator(MyAggregator(),
uplink="identity")`` runs ``message -> compress -> aggregate`` on 1, 2 and 3
workers and tests the result count, shapes, dtypes, finiteness, bitwise
agreement of the ranks, the plugin's own single-process ``reference``, that a
failed collective leaves the state unchanged, and the attacks it declares in
``capabilities.robust`` (see :mod:`commlmo.testing.aggregator_kit`).
"""

from .aggregator_kit import AggregatorContractError, AggregatorKitNote, AggregatorReport, check_aggregator
from .contract import check_compressor
from .lmo_kit import LMOContractError, LMOTolerance, check_lmo, declared_tolerance
from .strategies import (
    DTYPES,
    PATTERNS,
    TensorExample,
    shapes,
    tensor_examples,
    tensors,
)

__all__ = [
    "AggregatorContractError",
    "AggregatorKitNote",
    "AggregatorReport",
    "DTYPES",
    "PATTERNS",
    "LMOContractError",
    "LMOTolerance",
    "TensorExample",
    "check_aggregator",
    "check_compressor",
    "check_lmo",
    "declared_tolerance",
    "shapes",
    "tensor_examples",
    "tensors",
]
