"""List flags whose entries are, or end in, regexes (--stages, --dont_load).

Why: such a regex may hold ``,`` (a quantifier such as ``block\\d{1,2}``) and
``|`` (inside a group), and absl's list flag splits at every comma. Here a
separator counts only outside regex groups, character classes and quantifier
braces, and not when escaped; `split_top_level` also splits a stage's freeze
patterns at their top-level ``|``.
"""

from __future__ import annotations

from absl import flags

_OPEN = {'(': ')', '{': '}'}


def split_top_level(text: str, sep: str) -> tuple[str, ...]:
  """Splits ``text`` at each ``sep`` outside groups, classes and braces.

  ``split_top_level('a|b(c|d)', '|')`` is ``('a', 'b(c|d)')``;
  ``split_top_level('s:1:0.1:x{1,2},t:1:0.1:y', ',')`` is
  ``('s:1:0.1:x{1,2}', 't:1:0.1:y')``. A ``]`` first in a class (``[]a]``,
  ``[^]a]``) is a literal, as in Python's ``re``.

  Raises:
    ValueError: a ``(``, ``{`` or ``[`` is never closed, which would swallow
      every separator after it.
  """
  parts, current, closers = [], [], []
  escaped, class_at = False, None  # class_at: index of the class's first member
  for i, ch in enumerate(text):
    if escaped:
      escaped = False
    elif ch == '\\':
      escaped = True
    elif class_at is not None:
      if ch == '^' and i == class_at:
        class_at += 1
      elif ch == ']' and i > class_at:
        class_at = None
    elif ch == '[':
      class_at = i + 1
    elif ch in _OPEN:
      closers.append(_OPEN[ch])
    elif closers and ch == closers[-1]:
      closers.pop()
    elif ch == sep and not closers:
      parts.append(''.join(current))
      current = []
      continue
    current.append(ch)
  if closers or class_at is not None:
    unclosed = ''.join(reversed(closers)) if closers else ']'
    raise ValueError(f'{text!r} has an unclosed bracket (missing {unclosed!r}).')
  parts.append(''.join(current))
  return tuple(parts)


class RegexListParser(flags.BaseListParser):
  """A comma-separated list whose commas inside regex groups and braces stay."""

  def __init__(self) -> None:
    super().__init__(',', 'comma')

  def parse(self, argument: str | list[str]) -> list[str]:
    """The entries of ``argument`` (a list is taken as it is), stripped of spaces."""
    if isinstance(argument, list):
      return argument
    if not argument:
      return []
    return [s.strip() for s in split_top_level(argument, ',')]


def define_regex_list(
    name: str,
    default: list[str] | None,
    help_text: str,
    flag_values: flags.FlagValues = flags.FLAGS,
) -> flags.FlagHolder[list[str]]:
  """Defines a comma-separated list flag parsed by `RegexListParser`."""
  return flags.DEFINE(
      RegexListParser(),
      name,
      default,
      help_text,
      flag_values=flag_values,
      serializer=flags.ListSerializer(','),
  )
