"""Model families, one sub-package each (``pertflow.models.scgpt``, ...); import them directly."""
