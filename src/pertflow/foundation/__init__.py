"""Foundation models whose weights pertflow loads, freezes or pretrains (one sub-package each,
``pertflow.foundation.scgpt``, ...).

A foundation library is not a perturbation model: it holds a pretrained network, its layers,
tokens, checkpoint format, frozen feature extraction and pretraining. The model families under
:mod:`pertflow.models` build on it (CCFM's frozen features, latent-shift's cell embeddings,
the ``scgpt-generator`` family); nothing here imports :mod:`pertflow.models`.
"""
