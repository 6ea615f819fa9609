"""Tests for agejax.host_malloc."""

import fnmatch
import importlib.metadata
import os
import platform
import subprocess
import sys
import textwrap
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized

from agejax import host_malloc

_RETAINED = dict(host_malloc.RETAIN_ENV)
_PURGE = dict(host_malloc.MIMALLOC_ENV)
_LIB = '/site/cmeel.prefix/lib/libmimalloc.so.3'


class HostMallocEnvTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('retain_adds_settings', {'A': '1'}, 'retain', 'glibc', {'A': '1', **_RETAINED}),
      ('retain_keeps_retained', {'A': '1', **_RETAINED}, 'retain', 'glibc', None),
      ('retain_keeps_user_setting', {'MALLOC_ARENA_MAX': '4'}, 'retain', 'glibc', None),
      (
          'retain_drops_mimalloc',
          {'LD_PRELOAD': f'{_LIB} /x/liba.so', **_PURGE},
          'retain',
          'glibc',
          {'LD_PRELOAD': '/x/liba.so', **_PURGE, **_RETAINED},
      ),
      ('system_removes_settings', {'A': '1', **_RETAINED}, 'system', 'glibc', {'A': '1'}),
      ('system_removes_one_setting', {'A': '1', 'MALLOC_MMAP_MAX_': '0'}, 'system', 'glibc', {'A': '1'}),
      ('system_keeps_clean_env', {'A': '1'}, 'system', 'glibc', None),
      ('system_drops_mimalloc', {'A': '1', 'LD_PRELOAD': _LIB}, 'system', 'glibc', {'A': '1'}),
      ('mimalloc_preloads', {'A': '1'}, 'mimalloc', 'glibc', {'A': '1', 'LD_PRELOAD': _LIB, **_PURGE}),
      (
          'mimalloc_goes_first',
          {'LD_PRELOAD': '/x/liba.so:/x/libb.so'},
          'mimalloc',
          'glibc',
          {'LD_PRELOAD': f'{_LIB} /x/liba.so /x/libb.so', **_PURGE},
      ),
      (
          'mimalloc_keeps_user_purge_delay',
          {'MIMALLOC_PURGE_DELAY': '10'},
          'mimalloc',
          'glibc',
          {'LD_PRELOAD': _LIB, 'MIMALLOC_PURGE_DELAY': '10'},
      ),
      ('mimalloc_preloaded_already', {'LD_PRELOAD': '/opt/libmimalloc.so.2'}, 'mimalloc', 'glibc', None),
      ('mimalloc_leaves_user_allocator', {'LD_PRELOAD': '/usr/lib/libjemalloc.so.2'}, 'mimalloc', 'glibc', None),
      ('other_libc_unchanged', {'A': '1'}, 'retain', '', None),
      ('musl_unchanged', {'A': '1', **_RETAINED}, 'system', 'musl', None),
      ('mimalloc_elsewhere_unchanged', {'A': '1'}, 'mimalloc', '', None),
  )
  def test_env(self, environ, mode, libc, expected):
    self.assertEqual(
        host_malloc.host_malloc_env(environ, mode, libc, _LIB), expected
    )

  @parameterized.product(
      start=(
          {},
          _RETAINED,
          {'LD_PRELOAD': _LIB, **_PURGE},
          {'LD_PRELOAD': f'/x/liba.so:{_LIB}', 'MALLOC_ARENA_MAX': '4'},
      ),
      mode=host_malloc.MODES,
  )
  def test_restarted_environment_needs_no_restart(self, start, mode):
    # What reexec restarts with must not make the restarted process restart.
    env = host_malloc.host_malloc_env(start, mode, 'glibc', _LIB)
    env = start if env is None else env
    self.assertIsNone(host_malloc.host_malloc_env(env, mode, 'glibc', _LIB))

  def test_unknown_mode_raises(self):
    with self.assertRaisesRegex(ValueError, 'AGEJAX_HOST_MALLOC'):
      host_malloc.host_malloc_env({}, 'jemalloc', 'glibc', _LIB)

  def test_mimalloc_mode_without_library_raises(self):
    with self.assertRaisesRegex(ValueError, 'pip install cmeel-mimalloc'):
      host_malloc.host_malloc_env({}, 'mimalloc', 'glibc', None)

  @parameterized.named_parameters(
      ('variable_wins', 'system', _LIB, False, 'system'),
      ('variable_wins_on_an_accelerator', 'mimalloc', _LIB, True, 'mimalloc'),
      ('mimalloc_where_installed', None, _LIB, False, 'mimalloc'),
      ('retain_otherwise', None, None, False, 'retain'),
      ('system_on_an_accelerator', None, _LIB, True, 'system'),
  )
  def test_default_mode(self, variable, library, accelerator, expected):
    env = {k: v for k, v in os.environ.items() if k != host_malloc.MODE_VARIABLE}
    if variable:
      env[host_malloc.MODE_VARIABLE] = variable
    with mock.patch.dict(os.environ, env, clear=True), mock.patch.object(
        host_malloc, 'mimalloc_library', return_value=library
    ), mock.patch.object(host_malloc, 'accelerator_expected', return_value=accelerator):
      self.assertEqual(host_malloc.default_mode(), expected)

  @parameterized.named_parameters(
      ('tpu_first', {'JAX_PLATFORMS': 'tpu,cpu'}, (), (), True),
      ('cpu_first', {'JAX_PLATFORMS': 'cpu,cuda'}, ('jax-cuda12-plugin',), ('/dev/nvidia0',), False),
      ('cuda_plugin_and_gpu', {}, ('jax-cuda12-plugin', 'numpy'), ('/dev/nvidia0',), True),
      ('libtpu_on_a_tpu_vm', {}, ('libtpu',), ('/dev/accel0',), True),
      ('libtpu_on_a_newer_tpu', {}, ('libtpu',), ('/dev/vfio/3',), True),
      ('plugin_without_its_device', {}, ('jax-cuda12-plugin',), ('/dev/vfio/vfio',), False),
      ('device_without_a_plugin', {}, ('numpy',), ('/dev/nvidia0',), False),
      ('empty_platforms_is_unset', {'JAX_PLATFORMS': ''}, ('libtpu',), ('/dev/accel1',), True),
  )
  def test_accelerator_expected(self, environ, installed, devices, expected):
    dists = [mock.Mock(metadata={'Name': name}) for name in installed]
    with mock.patch.object(
        host_malloc.importlib.metadata, 'distributions', return_value=dists
    ), mock.patch.object(
        host_malloc.glob, 'glob', side_effect=lambda pattern: fnmatch.filter(devices, pattern)
    ):
      self.assertEqual(host_malloc.accelerator_expected(environ), expected)

  @parameterized.named_parameters(
      ('plain', '/site/cmeel.prefix/lib', True),
      ('space', '/my site/cmeel.prefix/lib', False),
      ('colon', '/site:x/cmeel.prefix/lib', False),
  )
  def test_mimalloc_library_needs_a_preloadable_path(self, folder, usable):
    path = os.path.join(folder, 'libmimalloc.so.3')
    file = mock.Mock(locate=lambda: path)
    file.name = 'libmimalloc.so.3'
    dist = mock.Mock(files=[file])
    with mock.patch.object(
        importlib.metadata, 'distribution', return_value=dist
    ), mock.patch.object(os.path, 'isfile', return_value=True):
      self.assertEqual(host_malloc.mimalloc_library(), path if usable else None)

  def test_mimalloc_library_missing_package(self):
    with mock.patch.object(
        importlib.metadata,
        'distribution',
        side_effect=importlib.metadata.PackageNotFoundError('cmeel-mimalloc'),
    ):
      self.assertIsNone(host_malloc.mimalloc_library())

  @absltest.skipUnless(sys.platform == 'linux', 'a dependency on Linux only')
  def test_mimalloc_library_is_installed(self):
    path = host_malloc.mimalloc_library()
    self.assertIsNotNone(path)
    self.assertTrue(os.path.isfile(path), path)
    self.assertTrue(os.path.basename(path).startswith('libmimalloc.so'), path)


_SCRIPT = textwrap.dedent("""
    import os, sys
    print('started', flush=True)
    from agejax import host_malloc
    if os.environ.get('IN_KERNEL'):
      sys.modules['ipykernel'] = sys  # as when a notebook kernel runs the program
    host_malloc.reexec(*sys.argv[1:2])
    print('args', sys.argv[1:])
    print('env', [os.environ.get(k) for k in sorted(host_malloc.RETAIN_ENV)])
    print('purge', os.environ.get('MIMALLOC_PURGE_DELAY'))
    with open('/proc/self/maps') as maps:
      print('mimalloc', 'libmimalloc' in maps.read())
""")


@absltest.skipUnless(platform.libc_ver()[0] == 'glibc', 'glibc only')
class ReexecTest(parameterized.TestCase):
  """`reexec` restarts the program once, with its arguments, in the new env."""

  def _run(self, args, env):
    env = {**env, 'PYTHONPATH': os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, '-c', _SCRIPT, *args],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    return out.splitlines()

  def _clean_env(self):
    dropped = {
        *host_malloc.RETAIN_ENV,
        *host_malloc.MIMALLOC_ENV,
        host_malloc.MODE_VARIABLE,
        'LD_PRELOAD',
    }
    return {k: v for k, v in os.environ.items() if k not in dropped}

  def test_retain_restarts_once(self):
    retained = [host_malloc.RETAIN_ENV[k] for k in sorted(host_malloc.RETAIN_ENV)]
    lines = self._run(['retain', 'x y'], self._clean_env())
    self.assertEqual(
        lines,
        [
            'started',
            'started',
            "args ['retain', 'x y']",
            f'env {retained}',
            'purge None',
            'mimalloc False',
        ],
    )

  def test_mode_variable_opts_out(self):
    env = {**self._clean_env(), host_malloc.MODE_VARIABLE: 'system'}
    lines = self._run([], env)
    self.assertEqual(
        lines,
        ['started', 'args []', 'env [None, None, None]', 'purge None', 'mimalloc False'],
    )

  def test_no_restart_in_a_notebook_kernel(self):
    lines = self._run(['retain'], {**self._clean_env(), 'IN_KERNEL': '1'})
    self.assertEqual(
        lines,
        ['started', "args ['retain']", 'env [None, None, None]', 'purge None', 'mimalloc False'],
    )

  def test_system_removes_settings(self):
    env = {**self._clean_env(), **host_malloc.RETAIN_ENV}
    lines = self._run(['system'], env)
    self.assertEqual(
        lines,
        [
            'started',
            'started',
            "args ['system']",
            'env [None, None, None]',
            'purge None',
            'mimalloc False',
        ],
    )

  def test_mimalloc_restarts_once_and_loads(self):
    if host_malloc.mimalloc_library() is None:
      self.skipTest('cmeel-mimalloc is not installed')
    lines = self._run(['mimalloc'], self._clean_env())
    self.assertEqual(
        lines,
        [
            'started',
            'started',
            "args ['mimalloc']",
            'env [None, None, None]',
            'purge -1',
            'mimalloc True',
        ],
    )

  def test_default_is_mimalloc_and_system_takes_it_out(self):
    if host_malloc.mimalloc_library() is None:
      self.skipTest('cmeel-mimalloc is not installed')
    lines = self._run([], self._clean_env())
    self.assertEqual(lines[-1], 'mimalloc True')
    preloaded = {
        **self._clean_env(),
        'LD_PRELOAD': host_malloc.mimalloc_library(),
        **host_malloc.MIMALLOC_ENV,
    }
    lines = self._run(['system'], preloaded)
    self.assertEqual(lines[:3], ['started', 'started', "args ['system']"])
    self.assertEqual(lines[-1], 'mimalloc False')


if __name__ == '__main__':
  absltest.main()
