"""Entry point: python -m samclip_jax.main --config=configs/merge.py[:local] --workdir=DIR."""
from absl import app, flags, logging
from ml_collections import config_flags

from samclip_jax import sharding, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/merge.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and the export go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO
  sharding.maybe_initialize_distributed(FLAGS.config.distributed)  # before any device use
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
