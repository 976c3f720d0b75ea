"""robust-enc: adversarial-robustness evaluation of weight-decay-style regularizers (ENC, GBR)."""

__version__ = "0.1.0"
