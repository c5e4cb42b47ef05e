"""Callbacks that record a covshift trace from a training framework's own loop.

Each submodule imports its framework, so nothing here is imported by ``import covshift``:

- :mod:`covshift.integrations.lightning`: ``CovshiftCallback`` for the Lightning ``Trainer``
  (``pip install "covshift[lightning]"``);
- :mod:`covshift.integrations.transformers`: ``CovshiftCallback`` for the Hugging Face
  ``Trainer`` (``pip install "covshift[transformers]"``).
"""
