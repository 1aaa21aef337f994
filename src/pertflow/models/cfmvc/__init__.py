"""CFM-VC: a count VAE with a covariate-aware flow in its latent space (SPEC 2.4)."""
