"""FLOPs of one ATen op from its shapes: shardflow's own formulas, one per op, in one registry.

The convention, written once so that every count can be checked by hand:

=================================================  =====================================================
work                                               FLOPs
=================================================  =====================================================
a multiply-add (matmuls, convolutions, attention)  2
add, subtract, multiply, compare, select, max      1 per element
divide, square root, reciprocal                    4 per element
exp, log, erf, tanh, sine (transcendentals)        8 per element
a reduction over ``n`` elements                    ``n`` (one add or compare per element)
moving data (views, copies, gathers, factories)    0
=================================================  =====================================================

Fused ops are counted as the steps they compute, each by the table (``native_layer_norm`` is a mean, a
variance, a reciprocal square root, a normalisation and the affine map); each formula's docstring lists
them. These are AIPerf's per-op costs. Attention kernels count the full score square even when causal (as
``torch.utils.flop_counter``, PaLM's MFU and nanoGPT do, so figures compare across systems), and their
backward's recomputation of the scores is hardware work, counted apart (``recompute``), not model work.
An op with no formula counts nothing and is listed by the caller, never guessed.
"""

from shardflow.ops.flops import gathers, pointwise, products, reductions  # noqa: F401  (registers the formulas)
from shardflow.ops.flops.registry import ADD, DIV, EXP, FORMULAS, FREE, OpFlops, formula, op_flops, per_element

__all__ = ["ADD", "DIV", "EXP", "FORMULAS", "FREE", "OpFlops", "formula", "op_flops", "per_element"]
