"""Prepare a TFDS builder from a manual_dir and read its splits back as numpy arrays.

Datasets are written as array_record and read through the random-access data source
(`tfds.data_source` path), which needs no TensorFlow. TFDS writes into an `incomplete.*`
folder and renames it only on success, so an interrupted prepare is never reused.
"""

import os

import numpy as np
import tensorflow_datasets as tfds

DEFAULT_DATA_DIR = os.path.join('~', 'tensorflow_datasets')
FILE_FORMAT = 'array_record'
_READ_CHUNK = 4096


def resolve_data_dir(data_dir: str | None) -> str:
  """The TFDS data_dir to use: `data_dir`, else `~/tensorflow_datasets`."""
  return os.path.expanduser(data_dir if data_dir is not None else DEFAULT_DATA_DIR)


def prepare(builder: tfds.core.DatasetBuilder, manual_dir: str) -> None:
  """Generates the dataset from `manual_dir` once; a no-op when it is already prepared."""
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
      file_format=FILE_FORMAT,
  )


def _column(values: list, feature: tfds.features.FeatureConnector) -> np.ndarray:
  if isinstance(feature, tfds.features.Text):
    return np.array([v.decode('utf-8') for v in values])
  return np.stack(values).astype(feature.np_dtype, copy=False)


def _empty_columns(builder: tfds.core.DatasetBuilder) -> dict[str, np.ndarray]:
  columns = {}
  for key, feature in builder.info.features.items():
    if isinstance(feature, tfds.features.Text):
      columns[key] = np.array([], dtype=str)
    else:
      columns[key] = np.zeros((0, *feature.shape), dtype=feature.np_dtype)
  return columns


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, np.ndarray]:
  """Reads every example of a prepared split into one array per feature, in stored order."""
  source = builder.as_data_source(split=split)
  n = len(source)
  if n == 0:
    return _empty_columns(builder)
  columns: dict[str, list] = {}
  for start in range(0, n, _READ_CHUNK):
    for example in source.__getitems__(range(start, min(n, start + _READ_CHUNK))):
      for key, value in example.items():
        columns.setdefault(key, []).append(value)
  features = builder.info.features
  return {key: _column(values, features[key]) for key, values in columns.items()}
