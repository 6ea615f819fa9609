"""The tests compile with JAX's ``jax_disable_most_optimizations``, as flax's examples' tests do.

On CPU most of a test's time is XLA compiling programs that then run on a few
tiny batches: LLVM's optimizations cost more than they save. Without them
(XLA's backend optimization level 0, no expensive LLVM passes) the suite took
725 s instead of 1,050 s on a 2-core AMD EPYC Zen 3, and every test passed
either way (docs/performance_log.md, session 28). XLA's own graph passes
(fusion, layout, algebraic simplification) still run, and what the tests
compare, agejax's convolutions against ``lax.conv`` and one program against
another, is compiled alike on both sides.

Set here, before any test module imports JAX, so the pytest-xdist workers and
the tests' subprocesses (which start JAX afresh) inherit it. To run the suite
on fully optimized programs, as training and the benchmarks run:
``JAX_DISABLE_MOST_OPTIMIZATIONS=0 python -m pytest -q -n 2 tests``.
"""

import os

os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
