"""FER2013 as a TFDS builder (manual download) and a loader that returns numpy arrays.

Inputs, in `manual_dir`, first found wins: the original `fer2013.csv` (columns emotion, pixels,
Usage), the Kaggle image-folder layout (`train/<emotion>/Training_*.jpg`,
`test/<emotion>/{PublicTest,PrivateTest}_*.jpg`) as a folder, or that layout as `fer2013.zip`.
Splits: train = Training, validation = PublicTest, test = PrivateTest; labels are the original
CSV emotion codes, whatever the input.
"""

import collections
import csv
import hashlib
import os
import zipfile
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from agejax.data import image_decode
from agejax.data import tfds_io
from agejax.data.errors import DataError, read_input_file

# Original CSV codes: the index is the code.
EMOTIONS = ('angry', 'disgust', 'fear', 'happy', 'sad', 'surprise', 'neutral')
SIZE = 48
CSV_FILE = 'fer2013.csv'
ZIP_FILE = 'fer2013.zip'
CSV_COLUMNS = ('emotion', 'pixels', 'Usage')
USAGE_TO_SPLIT = {'Training': 'train', 'PublicTest': 'validation', 'PrivateTest': 'test'}
SPLITS = ('train', 'validation', 'test')
_FOLDERS = ('train', 'test')


def find_source(manual_dir: str) -> str:
  """The CSV, folder root or zip to read; raises DataError naming what to put where.

  In that order: the CSV; a folder holding both train/ and test/ (``manual_dir``
  or its fer2013/); the zip; a folder holding only one of them (its load then
  fails naming the missing split).
  """
  csv_path = os.path.join(manual_dir, CSV_FILE)
  if os.path.isfile(csv_path):
    return csv_path
  roots = (manual_dir, os.path.join(manual_dir, 'fer2013'))
  for root in roots:
    if all(os.path.isdir(os.path.join(root, f)) for f in _FOLDERS):
      return root
  zip_path = os.path.join(manual_dir, ZIP_FILE)
  if os.path.isfile(zip_path):
    return zip_path
  # Only one of the folders: read it, so that the missing split is named.
  for root in roots:
    if any(os.path.isdir(os.path.join(root, f)) for f in _FOLDERS):
      return root
  raise DataError(
      f'FER2013 not found: expected {CSV_FILE!r}, the train/ and test/ image folders, or '
      f'{ZIP_FILE!r} in {os.path.abspath(manual_dir)!r}. Download FER2013 by hand (Kaggle) '
      'and put it there.'
  )


def _split_of(path: str, source: str) -> tuple[str, int]:
  """(split, emotion code) of `<train|test>/<emotion>/<Usage>_*.jpg`, or DataError."""
  parts = path.replace('\\', '/').split('/')
  emotion, base = parts[-2] if len(parts) >= 2 else '', parts[-1]
  usage = base.split('_', 1)[0]
  if emotion not in EMOTIONS or usage not in USAGE_TO_SPLIT:
    raise DataError(
        f'Unexpected file {path!r} in {source}: expected <train|test>/<emotion>/'
        f'<Training|PublicTest|PrivateTest>_*.jpg with emotion one of {EMOTIONS}.'
    )
  return USAGE_TO_SPLIT[usage], EMOTIONS.index(emotion)


def _is_image_entry(path: str) -> bool:
  parts = path.replace('\\', '/').split('/')
  return (not any(p.startswith(('.', '__MACOSX')) for p in parts)
          and parts[-1].lower().endswith(('.jpg', '.jpeg', '.png')))


def _folder_files(root: str) -> Iterator[tuple[str, bytes]]:
  for folder in _FOLDERS:
    for dirpath, _, names in sorted(os.walk(os.path.join(root, folder))):
      for name in sorted(names):
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, root)
        if _is_image_entry(rel):
          yield rel, read_input_file(path)


def _zip_files(path: str) -> Iterator[tuple[str, bytes]]:
  try:
    with zipfile.ZipFile(path) as archive:
      for info in archive.infolist():
        if not info.is_dir() and _is_image_entry(info.filename):
          yield info.filename, archive.read(info)
  except (zipfile.BadZipFile, EOFError, OSError) as e:
    raise DataError(f'{path} is truncated or not a valid zip ({type(e).__name__}: {e}); '
                    'download it again.') from e


def _read_images(source: str, report: dict, num_workers: int) -> dict[str, list]:
  files = _zip_files(source) if source.endswith('.zip') else _folder_files(source)
  examples = {split: [] for split in SPLITS}
  for item in image_decode.decode_all(files, size=SIZE, channels=1, num_workers=num_workers):
    split, label = _split_of(item.name, source)
    if item.error is not None:
      report['corrupt'].append({'file': item.name, 'error': item.error})
      continue
    examples[split].append({'image': item.image, 'label': label, 'file_name': item.name})
  if not any(examples.values()):
    raise DataError(f'No FER2013 images found in {source}; expected train/<emotion>/*.jpg '
                    'and test/<emotion>/*.jpg.')
  return examples


def _parse_row(row: dict, line: int) -> tuple[str, dict] | str:
  """(split, example) for one CSV row, or the reason it is unusable."""
  try:
    label = int(row['emotion'])
    pixels = np.array(row['pixels'].split(), dtype=np.int64)
  except (TypeError, ValueError, AttributeError, OverflowError):
    return 'unparseable emotion or pixels'
  if not 0 <= label < len(EMOTIONS):
    return f'emotion {label} outside 0..6'
  if pixels.size != SIZE * SIZE or pixels.min() < 0 or pixels.max() > 255:
    return f'{pixels.size} pixels (expected {SIZE * SIZE} values in 0..255)'
  if row['Usage'] not in USAGE_TO_SPLIT:
    return f'Usage {row["Usage"]!r} not one of {tuple(USAGE_TO_SPLIT)}'
  image = pixels.astype(np.uint8).reshape(SIZE, SIZE, 1)
  return USAGE_TO_SPLIT[row['Usage']], {
      'image': image, 'label': label, 'file_name': f'{CSV_FILE}:{line}'}


def _read_csv(path: str, report: dict) -> dict[str, list]:
  examples = {split: [] for split in SPLITS}
  # utf-8-sig: a spreadsheet may have saved the file with a byte-order mark.
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    try:
      found = tuple(reader.fieldnames or ())
      if not set(CSV_COLUMNS) <= set(found):
        raise DataError(f'{path} has columns {found}; expected {CSV_COLUMNS} '
                        '(the original FER2013 release).')
      for row in reader:
        parsed = _parse_row(row, reader.line_num)
        if isinstance(parsed, str):
          report['corrupt'].append({'file': f'{CSV_FILE}:{reader.line_num}', 'error': parsed})
        else:
          examples[parsed[0]].append(parsed[1])
    except (UnicodeDecodeError, csv.Error) as e:
      raise DataError(
          f'{path} is not a readable UTF-8 CSV ({type(e).__name__}: {e});'
          ' use the original FER2013 fer2013.csv.'
      ) from e
  if not any(examples.values()):
    raise DataError(f'{path} has no usable rows.')
  return examples


def _check_no_split_empty(source: str, report: dict) -> None:
  """Raises DataError naming the splits of `source` with no usable face."""
  usage = {split: u for u, split in USAGE_TO_SPLIT.items()}
  empty = [split for split, n in report['read'].items() if n == 0]
  if empty:
    wanted = ', '.join(f'{split} ({usage[split]}_*)' for split in empty)
    raise DataError(
        f'{source} has no usable faces for split(s) {wanted}: an incomplete copy of '
        'FER2013? The image folders need train/<emotion>/Training_*.jpg and '
        'test/<emotion>/{PublicTest,PrivateTest}_*.jpg; the CSV needs rows of every Usage. '
        f'{len(report["corrupt"])} unreadable entries were skipped.'
    )


class Fer2013(tfds.core.GeneratorBasedBuilder):
  """FER2013 48x48 grayscale faces labelled with the 7 original emotion codes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Place {CSV_FILE} (original release), or the Kaggle image folders train/ and test/ '
      f'(or {ZIP_FILE}) in the manual_dir.'
  )

  def __init__(self, *, num_workers: int | None = None, **kwargs):
    """`num_workers` decoding threads (default: all cores); other kwargs go to TFDS."""
    self._num_workers = num_workers or os.cpu_count() or 1
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='FER2013 facial expressions; splits Training/PublicTest/PrivateTest.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(
                shape=(SIZE, SIZE, 1), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES),
            'label': tfds.features.ClassLabel(names=EMOTIONS),
            'file_name': tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    source = find_source(os.fspath(dl_manager.manual_dir))
    report = {'source': source, 'corrupt': []}
    if source.endswith('.csv'):
      examples = _read_csv(source, report)
    else:
      examples = _read_images(source, report, self._num_workers)
    report['read'] = {split: len(examples[split]) for split in SPLITS}
    _check_no_split_empty(source, report)
    self.info.metadata.update(report)
    return {split: self._generate_examples(examples[split]) for split in SPLITS}

  def _generate_examples(self, examples: list[dict]):
    yield from enumerate(examples)


def load(
    manual_dir: str,
    *,
    data_dir: str | None = None,
    num_workers: int | None = None,
) -> dict[str, dict[str, np.ndarray]]:
  """Prepares FER2013 once (reused afterwards) and returns its three splits as arrays.

  Each split has 'image' uint8 [N,48,48,1], 'label' int32 (original emotion codes) and
  'file_name' str. The prepare report is available as `prepare_report(data_dir)`.
  """
  builder = Fer2013(data_dir=tfds_io.resolve_data_dir(data_dir),
                    file_format=tfds_io.FILE_FORMAT, num_workers=num_workers)
  if not builder.data_path.exists():
    find_source(manual_dir)
  tfds_io.prepare(builder, manual_dir)
  splits = {split: tfds_io.read_split(builder, split) for split in SPLITS}
  for arrays in splits.values():
    arrays['label'] = arrays['label'].astype(np.int32)
  return splits


def prepare_report(data_dir: str | None = None) -> dict:
  """What the prepare step read and skipped, from a prepared dataset's metadata."""
  builder = Fer2013(data_dir=tfds_io.resolve_data_dir(data_dir), file_format=tfds_io.FILE_FORMAT)
  return dict(builder.info.metadata)


def copies_in_train(splits: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, int]]:
  """Validation and test faces whose pixels equal a train face's, per split.

  ``rows`` counts them, ``other_label`` those with a train copy under another emotion.
  FER2013's official splits share such copies (docs/DATA.md); they stay, as in the study,
  and runs record how many, since validation picks the checkpoint.
  """
  train = collections.defaultdict(set)
  for image, label in zip(splits['train']['image'], splits['train']['label']):
    train[hashlib.md5(image.tobytes()).digest()].add(int(label))
  counts = {}
  for split in ('validation', 'test'):
    rows = other_label = 0
    for image, label in zip(splits[split]['image'], splits[split]['label']):
      labels = train.get(hashlib.md5(image.tobytes()).digest())
      if labels:
        rows += 1
        other_label += bool(labels - {int(label)})
    counts[split] = {'rows': rows, 'other_label': other_label}
  return counts
