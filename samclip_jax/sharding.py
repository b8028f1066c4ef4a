"""Logical axis names used by the modules; the config maps them to mesh axes."""
import flax.linen as nn

# Every parameter names its axes with these; configs map them to ("data", "fsdp", "model").
EMBED = "embed"      # model width (d_model) of a transformer
MLP = "mlp"          # hidden width of an MLP
HEADS = "heads"      # fused q/k/v or per-head feature output of attention projections
CONV_IN = "conv_in"  # input channels of a conv kernel
CONV_OUT = "conv_out"
VOCAB = "vocab"
NORM = "norm"        # LayerNorm scale/bias
POS = "pos"          # position tables (absolute / relative)
NONE = None


def param_with_axes(init, *names):
  """Wraps an initializer so the parameter carries logical axis names."""
  return nn.with_logical_partitioning(init, names)
