"""Pretrains the study's emotion CNN on FER2013 (or synthetic faces).

  python -m experiments.pretrain_fer --flagfile=experiments/configs/quickstart/fer.cfg

The best checkpoint (by PublicTest accuracy) in ``--workdir`` is what
``experiments.finetune --init_from`` transfers from. ``--class_weights``
weighs the 7 emotions; the age task's data flags (``--protocol``,
``--labels``, ``--undersample_age`` ...) are ignored, with a warning.
"""

from absl import app
from absl import flags

from agejax import host_malloc
from agejax import train
from agejax.data import balance
from experiments import common

flags.adopt_module_key_flags(common)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  with common.user_errors():
    common.setup()
    common.warn_unused(common.AGE_DATA_FLAGS, 'pretrain_fer')
    data, data_report = common.fer_data()
    weights = balance.class_weights(data['train']['label'], 7) if FLAGS.class_weights else None
    config = common.train_config('fer', num_classes=7, class_weights=weights)
    common.check_before_training(config, FLAGS.workdir)
    common.write_data_report(FLAGS.workdir, data_report)
    results = train.train_and_evaluate(
        config, data, FLAGS.workdir, show_progress=FLAGS.progress,
        stop_after_epoch=FLAGS.stop_after_epoch,
    )
    print(common.format_results(results, keys=('accuracy', 'macro_f1', 'weighted_f1', 'loss')))


if __name__ == '__main__':
  host_malloc.reexec()
  flags.mark_flag_as_required('workdir')
  app.run(main)
