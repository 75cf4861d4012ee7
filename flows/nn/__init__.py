"""Vector-field backbones: ``forward(x, t)``, t of shape (B,) or () (one time for the batch), output like x."""

from collections.abc import Sequence

from torch import nn

from flows.config import ModelConfig
from flows.errors import ConfigError
from flows.nn.embedding import TimeFeatures
from flows.nn.mlp import TimeMLP
from flows.nn.potential import Potential
from flows.nn.unet import TimeUNet

__all__ = ["TimeMLP", "TimeUNet", "Potential", "TimeFeatures", "build_field"]


def build_field(cfg: ModelConfig, shape: int | Sequence[int]) -> nn.Module:
    """The field for data of per-sample ``shape``: (D,) vectors → TimeMLP or Potential, (C, H, W) images → TimeUNet."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if cfg.name in ("mlp", "potential"):
        if len(shape) != 1:
            raise ConfigError(
                f"model.name={cfg.name} takes vectors, but the data are {shape} images: use model.name=unet "
                "(or, for digits, data.image=false)."
            )
        if cfg.name == "potential":
            return Potential(shape[0], cfg.hidden[0], len(cfg.hidden), cfg.rank or None)
        return TimeMLP(shape[0], cfg.hidden, cfg.activation, cfg.time_features, cfg.conditioning)
    if len(shape) != 3:
        raise ConfigError(
            f"model.name=unet takes images (C, H, W), but the data are {shape}: use model.name=mlp "
            "(or, for digits, data.image=true)."
        )
    return TimeUNet(shape, cfg.channels, cfg.channel_mult, cfg.num_res_blocks, cfg.attention_resolutions, cfg.groups)
