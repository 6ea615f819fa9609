"""Parse UTKFace file names (`{age}_{gender}_{race}_{datetime}.jpg.chip.jpg`) into labels.

The distributed archive has a few malformed names (a missing race field, a stray space, a
missing dot); the age is readable in all of them, so they are parsed, flagged, and kept.
"""

import dataclasses
import re

# What the label codes mean (UTKFace's own documentation).
GENDERS = ('male', 'female')
RACES = ('White', 'Black', 'Asian', 'Indian', 'Others')

_SUFFIX = 'jpg.chip.jpg'
# Strict form first; the tolerant one accepts the known malformations.
_STRICT = re.compile(r'^(\d+)_([01])_([0-4])_(\d+)\.jpg\.chip\.jpg$')
_TOLERANT = re.compile(r'^(\d+)_([01])_(?:([0-4])_)?(\d+)\s*\.?jpg\.chip\.jpg$')


@dataclasses.dataclass(frozen=True)
class ParsedName:
  """Labels read from one file name; `race` is -1 where the name lacks it."""

  age: int
  gender: int
  race: int
  malformed: bool


def is_face_file(name: str) -> bool:
  """Whether a base name looks like a UTKFace face image (rather than stray files)."""
  return name.endswith(_SUFFIX) and not name.startswith('.')


def parse_name(name: str) -> ParsedName | None:
  """Parses a base file name; returns None when not even the age can be read."""
  match = _STRICT.match(name)
  malformed = match is None
  if match is None:
    match = _TOLERANT.match(name)
  if match is None:
    return None
  age, gender, race, _ = match.groups()
  return ParsedName(
      age=int(age),
      gender=int(gender),
      race=-1 if race is None else int(race),
      malformed=malformed,
  )
