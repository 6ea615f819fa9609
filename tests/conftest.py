"""The order pytest hands tests to its workers: the longest modules first.

pytest-xdist (`pytest -n 2`, the README's test command) gives tests to its
workers in collection order, so a long test collected last keeps one worker
busy while the other has nothing left to run. These modules' tests take
tens of seconds each (whole-network compilations; subprocesses on 8 devices
or 2 hosts); started first, the many short tests fill in around them.
"""

_LONGEST_FIRST = (
    'test_parallel.py',
    'test_model_speed_equivalence.py',
    'test_train.py',
    'test_onednn.py',
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
