"""List flags whose entries are, or hold, regexes (--stages, --dont_load, --extra_flags).

Why: such a regex may hold ``,`` (a quantifier such as ``block\\d{1,2}``) and
``|`` (inside a group), and absl's list flag splits at every comma. Here a
separator counts only outside regex groups, character classes and quantifier
braces, and not when escaped; an entry in double quotes is taken whole, as
absl's CSV list flags take it. `split_top_level` also splits a stage's freeze
patterns at their top-level ``|``.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

_OPEN = {'(': ')', '{': '}'}


def _top_level_end(text: str, start: int, sep: str) -> int:
  """Index of the first ``sep`` at or after ``start`` outside groups, classes and braces.

  ``len(text)`` if there is none. Raises ValueError for a ``(``, ``{`` or ``[``
  never closed, which would swallow every separator after it.
  """
  closers, escaped, class_at = [], False, None  # class_at: the class's first member
  for i in range(start, len(text)):
    ch = text[i]
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
      return i
  if closers or class_at is not None:
    unclosed = ''.join(reversed(closers)) if closers else ']'
    raise ValueError(f'{text[start:]!r} has an unclosed bracket (missing {unclosed!r}).')
  return len(text)


def split_top_level(text: str, sep: str) -> tuple[str, ...]:
  """Splits ``text`` at each ``sep`` outside groups, classes and braces.

  ``split_top_level('a|b(c|d)', '|')`` is ``('a', 'b(c|d)')``;
  ``split_top_level('s:1:0.1:x{1,2},t:1:0.1:y', ',')`` is
  ``('s:1:0.1:x{1,2}', 't:1:0.1:y')``. A ``]`` first in a class (``[]a]``,
  ``[^]a]``) is a literal, as in Python's ``re``.

  Raises:
    ValueError: a ``(``, ``{`` or ``[`` is never closed.
  """
  parts, start = [], 0
  while True:
    end = _top_level_end(text, start, sep)
    parts.append(text[start:end])
    if end == len(text):
      return tuple(parts)
    start = end + 1


def split_entries(argument: str) -> list[str]:
  """The entries of a list-flag value, stripped of spaces.

  Commas separate entries at the top level (`split_top_level`); an entry in
  double quotes, CSV-style (``""`` for a quote), is taken whole, so a path
  with a comma can be passed (``"--manual_dir=/data, v2",--batch_size=64``),
  as absl's own list flags allow.

  Raises:
    ValueError: an unclosed quote or bracket, or text after a closing quote.
  """
  entries, i, n = [], 0, len(argument)
  while True:
    while i < n and argument[i] == ' ':
      i += 1
    if i < n and argument[i] == '"':
      chars, i = [], i + 1
      while True:
        if i >= n:
          raise ValueError(f'{argument!r} has an unclosed quote.')
        if argument.startswith('""', i):
          chars.append('"')
          i += 2
        elif argument[i] == '"':
          i += 1
          break
        else:
          chars.append(argument[i])
          i += 1
      while i < n and argument[i] == ' ':
        i += 1
      if i < n and argument[i] != ',':
        raise ValueError(f'{argument!r}: text after a closing quote must be a comma.')
      entries.append(''.join(chars))
    else:
      end = _top_level_end(argument, i, ',')
      entries.append(argument[i:end].strip())
      i = end
    if i >= n:
      return entries
    i += 1


def join_entries(entries: Sequence[str]) -> str:
  """The list-flag value `split_entries` reads back as ``entries``.

  Entries whose commas are not all inside brackets (or that hold a quote or
  an unclosed bracket) are quoted, CSV-style.
  """
  def plain(entry: str) -> bool:
    if not entry or '"' in entry or entry != entry.strip():
      return False
    try:
      return _top_level_end(entry, 0, ',') == len(entry)
    except ValueError:
      return False

  return ','.join(e if plain(e) else '"' + e.replace('"', '""') + '"' for e in entries)


class RegexListParser(flags.BaseListParser):
  """A comma-separated list whose commas inside regex groups, braces or quotes stay."""

  def __init__(self) -> None:
    super().__init__(',', 'comma')

  def parse(self, argument: str | list[str]) -> list[str]:
    """The entries of ``argument`` (a list is taken as it is), stripped of spaces."""
    if isinstance(argument, list):
      return argument
    if not argument:
      return []
    return split_entries(argument)


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
      serializer=_Serializer(),
  )


class _Serializer(flags.ArgumentSerializer):
  """Writes a list flag's value as `join_entries` does."""

  def serialize(self, value: Sequence[str]) -> str:
    return join_entries(value)
