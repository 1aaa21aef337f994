"""Latent-shift reconstruction (SPEC 2.5): a perturbation predictor in an embedding space and a frozen decoder."""
