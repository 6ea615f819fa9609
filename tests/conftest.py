"""Test-session setup: a persistent XLA compilation cache.

Every `train_and_evaluate` builds a new optimizer, so `jax.jit` retraces its
steps; the HLO is the same, and the cache lets XLA skip recompiling it, which
is most of the time of the end-to-end tests on a CPU.

XLA:CPU cannot write programs that call oneDNN (`agejax.onednn`) to that
cache ("Error writing persistent compilation cache entry ... std::bad_alloc"):
those are compiled again in each process, and the warning is expected.
"""

import os
import tempfile

import jax

jax.config.update(
    'jax_compilation_cache_dir',
    os.environ.get(
        'AGEJAX_TEST_COMPILATION_CACHE',
        os.path.join(tempfile.gettempdir(), 'agejax-test-xla-cache'),
    ),
)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def pytest_configure(config):
  config.addinivalue_line(
      'filterwarnings',
      'ignore:Error writing persistent compilation cache entry.*std..bad_alloc:UserWarning',
  )
