"""Checks notebooks/colab_tpu.ipynb against the programs it drives.

A TPU runtime is not available here, so the notebook's own code is run where
it can be: its Settings and helper cells, and the flags they build, parsed by
`experiments.run_study` and `experiments.report` in a subprocess (as the
notebook runs them).
"""

import ast
import importlib.metadata
import json
import pathlib
import re
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
from packaging import requirements

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'notebooks' / 'colab_tpu.ipynb'
CONSTRAINTS = ROOT / 'notebooks' / 'constraints.txt'
# Dependencies whose versions decide what a run computes: the install must pin them.
_PINNED = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint')

_PARSE = """
import importlib, json, sys
from absl import flags
importlib.import_module(sys.argv[1])
from experiments import run_study
flags.FLAGS(['prog', *json.loads(sys.argv[2])])
plan = run_study.plan_from_flags()
print(json.dumps([plan.root, plan.schedule, list(plan.protocols), list(plan.extra_flags)]))
"""


def _code_cells() -> list[str]:
  cells = json.loads(NOTEBOOK.read_text())['cells']
  return [''.join(c['source']) for c in cells if c['cell_type'] == 'code']


def _python(source: str) -> str:
  """A cell without its IPython magics and shell lines."""
  return '\n'.join(
      line for line in source.splitlines() if not line.lstrip().startswith(('%', '!'))
  )


def _commands() -> list[tuple[str, list[str]]]:
  """``(module, literal flags)`` of each ``run([sys.executable, '-m', module, ...])`` call."""
  commands = []
  for source in _code_cells():
    for node in ast.walk(ast.parse(_python(source))):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
          and node.func.id == 'run' and node.args and isinstance(node.args[0], ast.List)):
        items = node.args[0].elts
        literals = [e.value for e in items if isinstance(e, ast.Constant)]
        commands.append((literals[1], literals[2:]))
  return commands


def _cell(marker: str) -> str:
  (cell,) = [c for c in _code_cells() if marker in c]
  return cell


def _study_flags(**settings) -> list[str]:
  """STUDY_FLAGS as the notebook builds them, after its Settings cell and ``settings``."""
  namespace: dict = {}
  exec(_cell('# ---- Settings'), namespace)  # pylint: disable=exec-used
  namespace.update(settings)
  exec(_cell('def list_flag('), namespace)  # pylint: disable=exec-used
  return namespace['STUDY_FLAGS']


def _parsed(module: str, args: list[str]) -> list:
  """The run_study plan (root, schedule, protocols, extra flags) that ``module`` parses from args."""
  result = subprocess.run(
      [sys.executable, '-c', _PARSE, module, json.dumps(args)],
      cwd=ROOT, capture_output=True, text=True, check=False,
  )
  if result.returncode:
    raise AssertionError(f'flags {args} do not parse:\n{result.stderr[-2000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


class NotebookTest(parameterized.TestCase):

  def test_code_cells_compile(self):
    for source in _code_cells():
      compile(_python(source), str(NOTEBOOK), 'exec')

  def test_runs_the_study_then_the_report(self):
    self.assertEqual(
        [module for module, _ in _commands()],
        ['experiments.run_study', 'experiments.report'],
    )

  @parameterized.named_parameters(
      ('defaults', {}, '/content/drive/MyDrive/agejax_data'),
      ('comma_in_path', {'DATA_DIR': '/content/drive/My Drive/data, v2'}, '/content/drive/My Drive/data, v2'),
  )
  def test_commands_parse(self, settings, data_dir):
    study_flags = _study_flags(**settings)
    for module, literal_flags in _commands():
      with self.subTest(module):
        root, schedule, protocols, extra = _parsed(module, [*literal_flags, *study_flags])
        self.assertEqual(root, 'runs/study')
        self.assertEqual(schedule, 'paper')
        self.assertEqual(protocols, ['dedup', 'paper', 'leaky'])
        self.assertEqual(extra[0], f'--manual_dir={data_dir}')
        self.assertIn('--batch_size=64', extra)
        self.assertIn('--matmul_precision=float32', extra)

  def test_both_installs_are_held_to_the_constraints(self):
    installs = [l for l in _cell('pip install').splitlines() if l.startswith('!pip install')]
    self.assertLen(installs, 2)
    for line in installs:
      self.assertIn(' -c notebooks/constraints.txt', line)

  def test_constraints_pin_versions_agejax_accepts(self):
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
      if line.strip() and not line.startswith('#'):
        match = re.fullmatch(r'([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.]*)', line.strip())
        self.assertIsNotNone(match, f'{CONSTRAINTS}: {line!r} is not name==version')
        pins[match[1].lower()] = match[2]
    self.assertContainsSubset(_PINNED, pins)
    self.assertEqual(pins['jax'], pins['jaxlib'])  # jax[tpu] requires its own jaxlib
    for dependency in importlib.metadata.requires('agejax'):
      requirement = requirements.Requirement(dependency)
      name = requirement.name.lower()
      if name in pins and requirement.marker is None:
        self.assertIn(pins[name], requirement.specifier, f'{name} in {CONSTRAINTS}')

  def test_unknown_flag_is_caught(self):
    with self.assertRaisesRegex(AssertionError, 'runs'):
      _parsed('experiments.report', ['--runs=runs/study'])


if __name__ == '__main__':
  absltest.main()
