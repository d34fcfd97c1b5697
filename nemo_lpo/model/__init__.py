"""The megatron model: CPU compatibility, parallel state, presets, layer specs, per-token positions and masks.

Submodules import megatron lazily or at their own top; import them directly
(``from nemo_lpo.model.presets import PRESETS``), this package imports nothing heavy.
"""
