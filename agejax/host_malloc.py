"""Host allocator settings under which XLA:CPU reuses memory between steps.

Why: XLA:CPU allocates an executable's temporaries afresh on every call, and
glibc serves large requests (and every large request from a worker thread's
arena) with a fresh ``mmap`` that the kernel backs page by page on first touch
and unmaps again on ``free``. So every training step page-faults its whole
working set back in: on the study's network a third of a core, ~20 % of a
2-core CPU's time, went to the kernel (docs/performance_log.md). Three modes:

* ``'mimalloc'``, the default where the ``cmeel-mimalloc`` package (an agejax
  dependency on Linux) is installed: the mimalloc allocator, preloaded, told
  not to purge freed memory (``MIMALLOC_PURGE_DELAY=-1``). Each thread
  allocates from its own heap, without a lock. If ``LD_PRELOAD`` names an
  allocator already (mimalloc, jemalloc, tcmalloc), it is left as it is.
* ``'retain'``, the default otherwise: glibc with one arena, no ``mmap`` and
  no trimming, so freed blocks stay in the heap and the next step reuses
  them. But XLA's worker threads then share that arena's lock, and once a
  training step has fragmented the heap they wait on it: an evaluation step
  ran ~20 % slower after training than before it; against mimalloc,
  training ran 7-12 % and evaluation after training 25-30 % slower
  (docs/performance_log.md, session 11). glibc cannot give each thread an arena
  of its own without those arenas mapping blocks over 64 MB afresh on every
  call.
* ``'system'``: the C library's allocator with its default settings; the
  default where JAX will run on a GPU or TPU (`accelerator_expected`), whose
  steps keep their temporaries in device memory.

Under either of the first two the process keeps most of its peak heap until
it exits. The dynamic loader and glibc read these settings when a process
starts, so they have to be in the environment before it starts. `reexec`
starts the program again with them (same interpreter, same arguments, same
pid); the experiments' entry points call it first. Only the GNU C library on
Linux is handled; elsewhere nothing changes.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import platform
import re
import sys
from typing import Mapping

# What `reexec` adds for ``'retain'``: one arena, never mmap, never trim.
RETAIN_ENV = {
    'MALLOC_ARENA_MAX': '1',
    'MALLOC_MMAP_MAX_': '0',
    'MALLOC_TRIM_THRESHOLD_': str(2**62),
}
# What `reexec` adds for ``'mimalloc'``, besides the preload: keep freed memory.
MIMALLOC_ENV = {'MIMALLOC_PURGE_DELAY': '-1'}
MODES = ('mimalloc', 'retain', 'system')
# Chooses the mode when `reexec` is given none.
MODE_VARIABLE = 'AGEJAX_HOST_MALLOC'

_PRELOAD = 'LD_PRELOAD'
_MIMALLOC_PACKAGE = 'cmeel-mimalloc'
# Preloaded allocators, by file name prefix: the first is what 'mimalloc' adds.
_ALLOCATORS = ('libmimalloc', 'libjemalloc', 'libtcmalloc')
# JAX's GPU and TPU plugins, by distribution name prefix, and the device files
# of the hardware they drive (NVIDIA, AMD, TPU VMs; /dev/vfio/<n> on newer TPUs).
_ACCELERATOR_PLUGINS = ('libtpu', 'jax-cuda', 'jax-rocm', 'jax_cuda', 'jax_rocm')
_ACCELERATOR_DEVICES = ('/dev/nvidia[0-9]*', '/dev/kfd', '/dev/accel[0-9]*', '/dev/vfio/[0-9]*')


def mimalloc_library() -> str | None:
  """The path of the ``cmeel-mimalloc`` package's shared library, or None.

  None also when the path holds whitespace or a colon, which separate
  ``LD_PRELOAD``'s entries: the loader could not preload it.
  """
  try:
    files = importlib.metadata.distribution(_MIMALLOC_PACKAGE).files or ()
  except importlib.metadata.PackageNotFoundError:
    return None
  paths = sorted(
      str(f.locate())
      for f in files
      if re.fullmatch(r'libmimalloc\.so[.\d]*', f.name)
  )
  usable = [
      p for p in paths if os.path.isfile(p) and not re.search(r'[\s:]', p)
  ]
  return usable[0] if usable else None


def accelerator_expected(environ: Mapping[str, str]) -> bool:
  """Whether JAX will run on a GPU or TPU here, judged without starting it.

  ``JAX_PLATFORMS`` decides when set (its first platform is JAX's default);
  otherwise a GPU or TPU plugin must be installed and its hardware present,
  as JAX falls back to the CPU without either.
  """
  platforms = environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() != 'cpu'
  plugins = any(
      (d.metadata['Name'] or '').lower().startswith(_ACCELERATOR_PLUGINS)
      for d in importlib.metadata.distributions()
  )
  return plugins and any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES)


def default_mode() -> str:
  """`MODE_VARIABLE`; else ``'system'`` where `accelerator_expected`; else
  ``'mimalloc'`` if installed, else ``'retain'``."""
  chosen = os.environ.get(MODE_VARIABLE)
  if chosen:
    return chosen
  if accelerator_expected(os.environ):
    return 'system'
  return 'mimalloc' if mimalloc_library() else 'retain'


def _is_mimalloc(entry: str) -> bool:
  return os.path.basename(entry).startswith(_ALLOCATORS[0])


def _is_allocator(entry: str) -> bool:
  return os.path.basename(entry).startswith(_ALLOCATORS)


def host_malloc_env(
    environ: Mapping[str, str], mode: str, libc: str, mimalloc: str | None
) -> dict[str, str] | None:
  """The environment to restart with for ``mode``, or None to keep this one.

  ``'mimalloc'`` puts ``mimalloc`` first in ``LD_PRELOAD`` and adds
  `MIMALLOC_ENV`, unless ``LD_PRELOAD`` names an allocator already (the
  user's own choice wins). ``'retain'`` and ``'system'`` take any mimalloc
  library out of ``LD_PRELOAD``; then ``'retain'`` adds `RETAIN_ENV` unless
  any of its variables is set already (the user's own setting wins), and
  ``'system'`` removes them. Both leave `MIMALLOC_ENV`, which glibc ignores.
  Nothing changes unless ``libc`` is ``'glibc'``.

  Args:
    environ: The current environment.
    mode: One of `MODES`.
    libc: The C library, as ``platform.libc_ver()[0]`` names it.
    mimalloc: The mimalloc library to preload (`mimalloc_library`).

  Raises:
    ValueError: ``mode`` is not one of `MODES`, or, on glibc, is
      ``'mimalloc'`` while ``mimalloc`` is None.
  """
  if mode not in MODES:
    raise ValueError(
        f'Unknown host malloc mode {mode!r} (from {MODE_VARIABLE} or the'
        f' caller); expected one of {MODES}.'
    )
  if libc != 'glibc':
    return None
  preload = re.split(r'[\s:]+', environ.get(_PRELOAD, '').strip())
  preload = [entry for entry in preload if entry]
  env = dict(environ)
  if mode == 'mimalloc':
    if any(_is_allocator(entry) for entry in preload):
      return None
    if mimalloc is None:
      raise ValueError(
          f"Host malloc mode 'mimalloc' needs the {_MIMALLOC_PACKAGE} package:"
          f' pip install {_MIMALLOC_PACKAGE}, or set {MODE_VARIABLE}=retain.'
      )
    env[_PRELOAD] = ' '.join([mimalloc, *preload])
    env.update({k: v for k, v in MIMALLOC_ENV.items() if k not in environ})
    return env
  kept = [entry for entry in preload if not _is_mimalloc(entry)]
  if kept != preload:
    if kept:
      env[_PRELOAD] = ' '.join(kept)
    else:
      del env[_PRELOAD]
  if mode == 'retain' and not any(name in environ for name in RETAIN_ENV):
    env.update(RETAIN_ENV)
  if mode == 'system':
    env = {k: v for k, v in env.items() if k not in RETAIN_ENV}
  return None if env == dict(environ) else env


def reexec(mode: str | None = None) -> None:
  """Restarts this program under ``mode``'s allocator settings, if they differ.

  Call it first thing in a program's entry point, before output is written
  or files are opened: ``os.execve`` replaces the process, so the program
  runs again from the start with the same interpreter and arguments. Returns
  without restarting when the environment already fits, and inside a Jupyter
  or Colab kernel (``%run``), whose process is the kernel's own.

  Args:
    mode: One of `MODES` (see `host_malloc_env`); None for `default_mode`.

  Raises:
    ValueError: The mode is not one of `MODES`, or is ``'mimalloc'`` and
      the ``cmeel-mimalloc`` package is not installed.
  """
  mode = mode or default_mode()
  env = host_malloc_env(
      os.environ, mode, platform.libc_ver()[0], mimalloc_library()
  )
  if env is None or 'ipykernel' in sys.modules:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
