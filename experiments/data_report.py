"""Data report for UTKFace: the study's Figure 1 and Figure A2, split counts, cleaning report.

  python -m experiments.data_report --manual_dir=../shared/data --out_dir=outputs/data_report

Writes figure1_images_per_age.png (images per age, all read images, ages above max_age
shaded), figure_a2_age_boxplot.png (age distribution per split) and data_report.json
(``load``: the prepare report, ``split``: cleaning and split report, as in a run's
data_report.json; near-duplicate leaks; per-split counts per age).
"""

import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
from absl import app
from absl import flags

from agejax import run_logging
from agejax.data import splits as splits_lib
from agejax.data import utk_face
# Defines --manual_dir, --tfds_data_dir, --protocol, --near_duplicates and --split_seed, as for
# training.
from experiments import common

_OUT_DIR = flags.DEFINE_string('out_dir', 'outputs/data_report', 'Where to write PNG and JSON.')
_MAX_AGE = flags.DEFINE_integer('max_age', 99, 'Largest age kept (classes 0..max_age).')
for _name in ('manual_dir', 'tfds_data_dir', 'protocol', 'near_duplicates', 'split_seed'):
  flags.declare_key_flag(_name)
FLAGS = flags.FLAGS


def plot_images_per_age(ages: np.ndarray, max_age: int, path: str) -> None:
  """Figure 1: a bar per age; bars above max_age (excluded from the task) are grey."""
  counts = np.bincount(ages)
  colors = ['tab:blue' if age <= max_age else 'tab:gray' for age in range(len(counts))]
  fig, ax = plt.subplots(figsize=(12, 4))
  ax.bar(np.arange(len(counts)), counts, color=colors, width=0.9)
  ax.set(xlabel='age', ylabel='images', title=f'UTKFace images per age (n={len(ages)})')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_age_boxplot(split_ages: dict[str, np.ndarray], path: str) -> None:
  """Figure A2: box plot of ages, one box per split."""
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.boxplot(list(split_ages.values()), tick_labels=list(split_ages))
  ax.set(ylabel='age', title='UTKFace age distribution per split')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  with common.user_errors():
    arrays, prepare_report = utk_face.load(FLAGS.manual_dir, data_dir=FLAGS.tfds_data_dir)
  common.warn_other_source('UTKFace', prepare_report, FLAGS.manual_dir)
  splits, split_report = splits_lib.make_splits(
      arrays, protocol=FLAGS.protocol, seed=FLAGS.split_seed, max_age=_MAX_AGE.value,
      near_duplicates=FLAGS.near_duplicates)
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  plot_images_per_age(arrays['age'], _MAX_AGE.value,
                      os.path.join(_OUT_DIR.value, 'figure1_images_per_age.png'))
  plot_age_boxplot({name: s['age'] for name, s in splits.items()},
                   os.path.join(_OUT_DIR.value, 'figure_a2_age_boxplot.png'))
  report = {
      'load': prepare_report,
      'split': split_report,
      'near_duplicate_leaks_from_train': splits_lib.near_duplicate_leaks(splits),
      'per_split_age_counts': {
          name: np.bincount(s['label'], minlength=_MAX_AGE.value + 1).tolist()
          for name, s in splits.items()},
  }
  run_logging.write_json(os.path.join(_OUT_DIR.value, 'data_report.json'), report)
  print(f'Wrote {_OUT_DIR.value}: figures and data_report.json.')
  print(f'Split ({FLAGS.protocol}, seed {FLAGS.split_seed}):', split_report.get('split_counts'))
  print('Validation/test faces with a near-duplicate in train:',
        report['near_duplicate_leaks_from_train'])


if __name__ == '__main__':
  app.run(main)
