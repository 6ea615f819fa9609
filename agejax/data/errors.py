"""The error raised for bad data a user can fix (missing, corrupt or malformed input files).

Also the reader of dataset folders' files, which raises it for a file it cannot read.
"""


class DataError(ValueError):
  """A dataset input is missing or unusable; the message names the file and the fix."""


def read_input_file(path: str) -> bytes:
  """The bytes of one file of a dataset folder; a `DataError` naming it if it cannot be read."""
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError as e:
    raise DataError(
        f'{path} cannot be read ({type(e).__name__}: {e.strerror or e}); fix its permissions'
        ' or replace it (a broken link: copy the file itself), or move it out of the folder.'
    ) from e
