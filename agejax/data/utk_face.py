"""UTKFace as a TFDS builder (manual download) and a loader that returns numpy arrays.

Input, in `manual_dir`: `UTKFace.tar.gz` as distributed, or the extracted `UTKFace/` folder.
Every readable face is kept with its raw labels (ages above 99 included); cleaning, dedup and
splitting happen later on the arrays (`cleaning`, `splits`), so one prepared dataset serves
every protocol. What generation skipped or repaired is saved as the dataset's metadata.
"""

import dataclasses
import os
import tarfile
import zlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from agejax.data import image_decode
from agejax.data import tfds_io
from agejax.data import utkface_names
from agejax.data.errors import DataError, read_input_file

ARCHIVE = 'UTKFace.tar.gz'
FOLDER = 'UTKFace'
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


@dataclasses.dataclass(eq=False)
class UtkFaceConfig(tfds.core.BuilderConfig):
  """Face size and colour of one prepared variant (a TFDS config, so not frozen)."""

  size: int = 48
  channels: int = 1


def find_source(manual_dir: str) -> str:
  """The archive or folder to read in `manual_dir`; raises DataError naming what to put there."""
  for name in (ARCHIVE, FOLDER):
    path = os.path.join(manual_dir, name)
    if os.path.exists(path):
      return path
  raise DataError(
      f'UTKFace not found: expected {ARCHIVE!r} (as downloaded) or the extracted {FOLDER!r}/ '
      f'folder in {os.path.abspath(manual_dir)!r}. Download "Aligned & Cropped Faces" from '
      'https://susanqq.github.io/UTKFace/ and put it there.'
  )


def _archive_files(path: str) -> Iterator[tuple[str, bytes]]:
  try:
    with tarfile.open(path, 'r:gz') as archive:
      for member in archive:
        if member.isfile():
          yield os.path.basename(member.name), archive.extractfile(member).read()
  except _TAR_ERRORS as e:
    raise DataError(
        f'{path} is truncated or not a valid .tar.gz ({type(e).__name__}: {e}); '
        'download it again.'
    ) from e


def _folder_files(path: str) -> Iterator[tuple[str, bytes]]:
  for root, _, names in sorted(os.walk(path)):
    for name in sorted(names):
      yield name, read_input_file(os.path.join(root, name))


def _source_files(path: str) -> Iterator[tuple[str, bytes]]:
  return _archive_files(path) if os.path.isfile(path) else _folder_files(path)


class UtkFace(tfds.core.GeneratorBasedBuilder):
  """UTKFace aligned and cropped faces with age, gender, race, file name and content hash."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Download "Aligned & Cropped Faces" ({ARCHIVE}) from https://susanqq.github.io/UTKFace/ '
      f'and place the archive, or its extracted {FOLDER}/ folder, in the manual_dir.'
  )
  BUILDER_CONFIGS = [
      UtkFaceConfig(name='gray48', size=48, channels=1, description='48x48 grayscale (study).'),
      UtkFaceConfig(name='gray64', size=64, channels=1, description='64x64 grayscale.'),
      UtkFaceConfig(name='rgb48', size=48, channels=3, description='48x48 RGB.'),
      UtkFaceConfig(name='rgb64', size=64, channels=3, description='64x64 RGB.'),
  ]
  DEFAULT_CONFIG_NAME = 'gray48'

  def __init__(self, *, num_workers: int | None = None, **kwargs):
    """`num_workers` decoding threads (default: all cores); other kwargs go to TFDS."""
    self._num_workers = num_workers or os.cpu_count() or 1
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size, channels = self.builder_config.size, self.builder_config.channels
    return tfds.core.DatasetInfo(
        builder=self,
        description='UTKFace faces; ages 0-116 as labelled, -1 race where the name lacks it.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(
                shape=(size, size, channels), dtype=np.uint8,
                encoding=tfds.features.Encoding.BYTES),
            'age': tfds.features.Scalar(dtype=np.int32),
            'gender': tfds.features.Scalar(dtype=np.int32),
            'race': tfds.features.Scalar(dtype=np.int32),
            'file_name': tfds.features.Text(),
            'hash': tfds.features.Text(doc='md5 hex digest of the original JPEG bytes.'),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
        homepage='https://susanqq.github.io/UTKFace/',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    return {'train': self._generate_examples(find_source(os.fspath(dl_manager.manual_dir)))}

  def _generate_examples(self, source: str):
    report = {'source': source, 'files_found': 0, 'read': 0, 'corrupt': [],
              'malformed_names': [], 'unparseable_names': [], 'ignored_files': []}
    faces = []
    for name, data in _source_files(source):
      if utkface_names.is_face_file(name):
        faces.append((name, data))
      else:
        report['ignored_files'].append(name)
    report['files_found'] = len(faces)
    if not faces:
      raise DataError(f'No UTKFace images (*.jpg.chip.jpg) found in {source}; '
                      'is it the "Aligned & Cropped Faces" download?')
    examples = []
    decoded = image_decode.decode_all(
        faces, size=self.builder_config.size, channels=self.builder_config.channels,
        num_workers=self._num_workers)
    for item in decoded:
      # Corrupt first: renaming a file cannot make it usable.
      if item.error is not None:
        report['corrupt'].append({'file': item.name, 'error': item.error})
        continue
      parsed = utkface_names.parse_name(item.name)
      if parsed is None:
        report['unparseable_names'].append(item.name)
        continue
      if parsed.malformed:
        report['malformed_names'].append(
            {'file': item.name, 'age': parsed.age, 'gender': parsed.gender, 'race': parsed.race})
      examples.append({'image': item.image, 'age': parsed.age, 'gender': parsed.gender,
                       'race': parsed.race, 'file_name': item.name, 'hash': item.md5})
    if not examples:
      skipped = [c['file'] for c in report['corrupt']] + report['unparseable_names']
      raise DataError(
          f'None of the {len(faces)} UTKFace images in {source} is usable '
          f'({len(report["corrupt"])} unreadable, {len(report["unparseable_names"])} with names'
          f' not age_gender_race_date.jpg.chip.jpg), e.g. {skipped[:3]}. Download the'
          ' "Aligned & Cropped Faces" archive again.')
    examples.sort(key=lambda e: e['file_name'])
    report['read'] = len(examples)
    self.info.metadata.update(report)
    yield from enumerate(examples)


def load(
    manual_dir: str,
    *,
    data_dir: str | None = None,
    config: str = 'gray48',
    num_workers: int | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
  """Prepares UTKFace once (reused afterwards) and returns all readable faces plus the report.

  Returns arrays 'image' uint8 [N,H,W,C], 'age', 'gender', 'race' int32 (raw; race -1 where
  missing), 'file_name' and 'hash' (md5 hex) str, sorted by file name; and the cleaning report
  of the prepare step (files found, read, corrupt, malformed and unparseable names).
  """
  builder = UtkFace(config=config, data_dir=tfds_io.resolve_data_dir(data_dir),
                    file_format=tfds_io.FILE_FORMAT, num_workers=num_workers)
  if not builder.data_path.exists():
    find_source(manual_dir)
  tfds_io.prepare(builder, manual_dir)
  arrays = tfds_io.read_split(builder, 'train')
  report = dict(builder.info.metadata) | {'config': config, 'data_dir': str(builder.data_dir)}
  return arrays, report
