"""Tests for agejax.host_malloc."""

import os
import platform
import subprocess
import sys
import textwrap

from absl.testing import absltest
from absl.testing import parameterized

from agejax import host_malloc

_RETAINED = dict(host_malloc.RETAIN_ENV)


class HostMallocEnvTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('retain_adds_settings', {'A': '1'}, 'retain', 'glibc', {'A': '1', **_RETAINED}),
      ('retain_keeps_retained', {'A': '1', **_RETAINED}, 'retain', 'glibc', None),
      ('retain_keeps_user_setting', {'MALLOC_ARENA_MAX': '4'}, 'retain', 'glibc', None),
      ('system_removes_settings', {'A': '1', **_RETAINED}, 'system', 'glibc', {'A': '1'}),
      ('system_removes_one_setting', {'A': '1', 'MALLOC_MMAP_MAX_': '0'}, 'system', 'glibc', {'A': '1'}),
      ('system_keeps_clean_env', {'A': '1'}, 'system', 'glibc', None),
      ('other_libc_unchanged', {'A': '1'}, 'retain', '', None),
      ('musl_unchanged', {'A': '1', **_RETAINED}, 'system', 'musl', None),
  )
  def test_env(self, environ, mode, libc, expected):
    self.assertEqual(host_malloc.host_malloc_env(environ, mode, libc), expected)

  def test_unknown_mode_raises(self):
    with self.assertRaisesRegex(ValueError, 'AGEJAX_HOST_MALLOC'):
      host_malloc.host_malloc_env({}, 'jemalloc', 'glibc')


_SCRIPT = textwrap.dedent("""
    import os, sys
    print('started', flush=True)
    from agejax import host_malloc
    host_malloc.reexec(*sys.argv[1:2])
    print('args', sys.argv[1:])
    print('env', [os.environ.get(k) for k in sorted(host_malloc.RETAIN_ENV)])
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
    return {
        k: v
        for k, v in os.environ.items()
        if k not in host_malloc.RETAIN_ENV and k != host_malloc.MODE_VARIABLE
    }

  def test_retain_restarts_once(self):
    retained = [host_malloc.RETAIN_ENV[k] for k in sorted(host_malloc.RETAIN_ENV)]
    lines = self._run(['retain', 'x y'], self._clean_env())
    self.assertEqual(
        lines, ['started', 'started', "args ['retain', 'x y']", f'env {retained}']
    )

  def test_mode_variable_opts_out(self):
    env = {**self._clean_env(), host_malloc.MODE_VARIABLE: 'system'}
    lines = self._run([], env)
    self.assertEqual(lines, ['started', 'args []', 'env [None, None, None]'])

  def test_system_removes_settings(self):
    env = {**self._clean_env(), **host_malloc.RETAIN_ENV}
    lines = self._run(['system'], env)
    self.assertEqual(
        lines, ['started', 'started', "args ['system']", 'env [None, None, None]']
    )


if __name__ == '__main__':
  absltest.main()
