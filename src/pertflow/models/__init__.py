"""Model families, one sub-package each (``pertflow.models.cfm``, ``pertflow.models.scgpt_generator``,
...); import them directly. The foundation models they build on live in :mod:`pertflow.foundation`."""
