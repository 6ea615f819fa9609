"""The error raised for bad data a user can fix (missing, corrupt or malformed input files)."""


class DataError(ValueError):
  """A dataset input is missing or unusable; the message names the file and the fix."""
