"""flows: continuous normalizing flows trained by maximum likelihood (FFJORD) or flow matching."""

__version__ = "0.1.0"
