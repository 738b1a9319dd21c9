"""Cresset's TorchServe compatibility package: what a TorchServe 0.12 handler imports from
`ts`, implemented over Cresset's `python` plugin. See the plugin's README section for what it
covers and what it does not."""

__version__ = "0.12.0"
