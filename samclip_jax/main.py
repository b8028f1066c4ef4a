"""Entry point of every training task: python -m samclip_jax.main --config=FILE[:ARG] --workdir=DIR.

  python -m samclip_jax.main --config=configs/merge.py:local --workdir=/tmp/samclip_local
  python -m samclip_jax.main --config=configs/teachers.py:sam --workdir=/tmp/teachers/sam
  python -m samclip_jax.main --config=configs/merge.py:local --help    # the config's fields
"""
from absl import flags
from ml_collections import config_flags

from samclip_jax import cli, sharding, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/merge.py, configs/teachers.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and the export go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  sharding.initialize_from_config(FLAGS.config)  # before any device use
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main, __doc__, "samclip_jax.main")
