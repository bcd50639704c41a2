"""moba-train: long-context continual pretraining with MoBA."""

__version__ = "0.1.0"
