"""glibc malloc settings under which XLA:CPU reuses host memory between steps.

Why: XLA:CPU allocates an executable's temporaries afresh on every call, and
glibc serves large requests (and every large request from a worker thread's
arena) with a fresh ``mmap`` that the kernel backs page by page on first touch
and unmaps again on ``free``. So every training step page-faults its whole
working set back in: on the study's network a third of a core, ~20 % of a
2-core CPU's time, went to the kernel (docs/PERFORMANCE.md). With one arena,
no ``mmap`` and no trimming, freed blocks stay in the heap and the next step
reuses them. The price: the process keeps its peak heap until it exits,
and its threads share one malloc arena.

glibc reads these settings when a process starts, and a worker thread's arena
serves large blocks by ``mmap`` whatever ``mallopt`` says later, so they have
to be in the environment before the process starts. `reexec` starts the
program again with them (same interpreter, same arguments, same pid); the
experiments' entry points call it first. Only the GNU C library on Linux
reads them; elsewhere nothing changes.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

# What `reexec` adds for ``'retain'``: one arena, never mmap, never trim.
RETAIN_ENV = {
    'MALLOC_ARENA_MAX': '1',
    'MALLOC_MMAP_MAX_': '0',
    'MALLOC_TRIM_THRESHOLD_': str(2**62),
}
MODES = ('retain', 'system')
# Chooses the mode when `reexec` is given none: ``system`` opts out.
MODE_VARIABLE = 'AGEJAX_HOST_MALLOC'


def host_malloc_env(
    environ: Mapping[str, str], mode: str, libc: str
) -> dict[str, str] | None:
  """The environment to restart with for ``mode``, or None to keep this one.

  ``'retain'`` adds `RETAIN_ENV` unless any of its variables is set already
  (the user's own setting wins); ``'system'`` removes them. Nothing changes
  unless ``libc`` is ``'glibc'``.

  Args:
    environ: The current environment.
    mode: One of `MODES`.
    libc: The C library, as ``platform.libc_ver()[0]`` names it.

  Raises:
    ValueError: ``mode`` is not one of `MODES`.
  """
  if mode not in MODES:
    raise ValueError(
        f'Unknown host malloc mode {mode!r} (from {MODE_VARIABLE} or the'
        f' caller); expected one of {MODES}.'
    )
  if libc != 'glibc':
    return None
  present = [name for name in RETAIN_ENV if name in environ]
  if mode == 'retain':
    return None if present else {**environ, **RETAIN_ENV}
  if not present:
    return None
  return {k: v for k, v in environ.items() if k not in RETAIN_ENV}


def reexec(mode: str | None = None) -> None:
  """Restarts this program under ``mode``'s malloc settings, if they differ.

  Call it first thing in a program's entry point, before output is written
  or files are opened: ``os.execve`` replaces the process, so the program
  runs again from the start with the same interpreter and arguments. Returns
  without restarting when the environment already fits.

  Args:
    mode: ``'retain'`` or ``'system'`` (see `host_malloc_env`); None reads
      `MODE_VARIABLE`, ``'retain'`` if unset.

  Raises:
    ValueError: The mode is not one of `MODES`.
  """
  if mode is None:
    mode = os.environ.get(MODE_VARIABLE, 'retain')
  env = host_malloc_env(os.environ, mode, platform.libc_ver()[0])
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
