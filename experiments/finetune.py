"""Fine-tunes the CNN for age on UTKFace (or synthetic faces), in stages.

  python -m experiments.finetune --flagfile=experiments/configs/quickstart/age.cfg

With ``--init_from`` the backbone starts from a FER checkpoint (transfer; the
report of what was loaded is printed and saved); without it, from scratch.
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
    data, data_report = common.age_data()
    num_classes = common.num_age_classes()
    weights = (
        balance.class_weights(data['train']['label'], num_classes)
        if FLAGS.class_weights
        else None
    )
    config = common.train_config('age', num_classes=num_classes, class_weights=weights)
    common.check_before_training(config, FLAGS.workdir)
    common.write_data_report(FLAGS.workdir, data_report)
    results = train.train_and_evaluate(
        config, data, FLAGS.workdir, show_progress=FLAGS.progress,
        stop_after_epoch=FLAGS.stop_after_epoch,
    )
    print(common.format_results(results))


if __name__ == '__main__':
  host_malloc.reexec()
  flags.mark_flag_as_required('workdir')
  app.run(main)
