"""Benchmark: prepare UTKFace from the archive and load it into arrays, vs a bare Pillow loop.

The baseline reads the same archive and decodes + resizes all 23,708 faces to 48x48 gray in a
plain single-threaded loop, producing arrays and nothing else. agejax additionally hashes,
parses names, writes the array_record dataset and reads it back. Goal: ratio <= 1.5.

  python -m benchmarks.prepare_utkface --manual_dir=../shared/data --num_workers=2
"""

import io
import os
import shutil
import tarfile
import tempfile
import time

import numpy as np
from absl import app
from absl import flags
from PIL import Image

from agejax.data import utk_face

_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data'),
    'Folder holding UTKFace.tar.gz.')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', 2, 'Decoding threads for agejax.')


def pillow_loop(archive: str, size: int = 48) -> np.ndarray:
  """Decodes and resizes every face of the archive, one after another."""
  images = []
  with tarfile.open(archive, 'r:gz') as tar:
    for member in tar:
      if member.isfile():
        with Image.open(io.BytesIO(tar.extractfile(member).read())) as img:
          img = img.convert('L').resize((size, size), Image.Resampling.BILINEAR)
          images.append(np.asarray(img))
  return np.stack(images)


def main(argv):
  del argv
  archive = os.path.join(_MANUAL_DIR.value, utk_face.ARCHIVE)
  start = time.perf_counter()
  baseline = pillow_loop(archive)
  pillow_s = time.perf_counter() - start

  data_dir = tempfile.mkdtemp()
  try:
    start = time.perf_counter()
    arrays, _ = utk_face.load(_MANUAL_DIR.value, data_dir=data_dir,
                              num_workers=_NUM_WORKERS.value)
    agejax_s = time.perf_counter() - start
    start = time.perf_counter()
    utk_face.load(_MANUAL_DIR.value, data_dir=data_dir)
    reload_s = time.perf_counter() - start
  finally:
    shutil.rmtree(data_dir)
  assert arrays['image'].shape[0] == baseline.shape[0], (arrays['image'].shape, baseline.shape)
  print(f'images: {baseline.shape[0]}  cpu cores: {os.cpu_count()}  '
        f'num_workers: {_NUM_WORKERS.value}')
  print(f'bare Pillow loop (1 thread):          {pillow_s:6.2f} s')
  print(f'agejax prepare + load (array_record): {agejax_s:6.2f} s')
  print(f'agejax load of prepared dataset:      {reload_s:6.2f} s')
  print(f'ratio agejax / Pillow:                {agejax_s / pillow_s:6.2f}x (goal <= 1.5x)')


if __name__ == '__main__':
  app.run(main)
