"""nemo-lpo: listwise preference optimisation (LPO, LPO-abs and baselines) on megatron-core."""

__version__ = "0.1.0"
