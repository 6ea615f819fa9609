"""Decode image file bytes into fixed-size uint8 arrays, in parallel threads.

Pillow releases the GIL while it decodes and resizes, so a thread pool uses every core without
the start-up and pickling costs of processes. Unreadable images are returned as errors, not
raised, so that one corrupt file in an archive is skipped and reported rather than fatal.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import re
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import Image

# Exceptions Pillow raises for truncated, corrupt or non-image bytes.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Decoded:
  """One decoded file: `image` is None and `error` says why when it could not be read."""

  name: str
  image: np.ndarray | None
  md5: str
  error: str | None


def decode_image(data: bytes, *, size: int, channels: int) -> np.ndarray:
  """Decodes bytes to uint8 [size, size, channels] (1: luma 'L', 3: RGB), bilinear resize."""
  with Image.open(io.BytesIO(data)) as img:
    img = img.convert('L' if channels == 1 else 'RGB')
    if img.size != (size, size):
      img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).reshape(size, size, channels)


def _decode_one(name: str, data: bytes, size: int, channels: int) -> Decoded:
  md5 = hashlib.md5(data).hexdigest()
  try:
    return Decoded(name, decode_image(data, size=size, channels=channels), md5, None)
  except _DECODE_ERRORS as e:
    # PIL names the in-memory file with its address, which differs every run.
    message = re.sub(r' at 0x[0-9a-fA-F]+', '', str(e))
    return Decoded(name, None, md5, f'{type(e).__name__}: {message}')


def decode_all(
    files: Iterable[tuple[str, bytes]],
    *,
    size: int,
    channels: int,
    num_workers: int,
    max_pending: int = 512,
) -> Iterator[Decoded]:
  """Decodes (name, bytes) pairs in input order, reading ahead at most `max_pending` files."""
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    pending = collections.deque()
    for name, data in files:
      pending.append(pool.submit(_decode_one, name, data, size, channels))
      if len(pending) >= max_pending:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
