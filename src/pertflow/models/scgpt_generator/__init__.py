"""scgpt-generator: scGPT's ``TransformerGenerator`` (from :mod:`pertflow.foundation.scgpt`) as a perturbation model."""
