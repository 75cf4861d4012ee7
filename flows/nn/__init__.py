"""Vector-field backbones: ``forward(x, t)`` with t of shape (B,), output shaped like x."""

from flows.config import ModelConfig
from flows.nn.embedding import TimeFeatures
from flows.nn.mlp import TimeMLP

__all__ = ["TimeMLP", "TimeFeatures", "build_field"]


def build_field(cfg: ModelConfig, dim: int) -> TimeMLP:
    return TimeMLP(dim, cfg.hidden, cfg.activation, cfg.time_features)
