"""The CFM-VC latent as latent-shift's embedding space (``embedding: cfm-vc``, SPEC 2.5's third space).

CFM-VC's count VAE (:class:`~pertflow.models.cfmvc.vae.CountVAE`: a negative-binomial likelihood
on the raw counts, an intrinsic latent ``z_int`` and a technical one ``z_tech``) trained on the
split's training cells, perturbed and control; a cell's coordinates are the posterior mean of its
``z_int``, standardised as every space is. Two choices differ from
CFM-VC's own VAE, both because latent-shift reads the embedding of control cells of a context it
may never have seen perturbed:

* the encoder reads expression only (one batch, one context category): CFM-VC's encoder also
  reads the cell type, so its ``z_int`` need not hold it, and a held-out cell type has no
  category; latent-shift's predictor reads the context from its control cells' mean embedding,
  so the cell type must be in the coordinates;
* ``z_tech`` (depth, capture) is left out of the coordinates: the shift is learnt on the
  intrinsic state, and latent-shift's own decoder maps the coordinates back to expression.

``n_components`` is the latent's width (CFM-VC's CPU config uses 16); ``vae_steps`` its training.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pertflow.data.view import SplitView
from pertflow.errors import InputError
from pertflow.models.cfmvc.vae import CountVAE

#: the VAE's shape and training, as CFM-VC's CPU config (its ``n_tech``, ``hidden``, ``n_layers``)
N_TECH, HIDDEN, N_LAYERS, DROPOUT = 4, 128, 2, 0.1
BATCH_SIZE, LR, BETA = 256, 1e-3, 1.0
#: the most cells encoded at once (bounds the memory an encoding takes; every embedding uses it)
ENCODE_CHUNK = 4096


class CountVAEEmbedding:
    """Posterior means of CFM-VC's intrinsic latent (see the module docstring).

    Attributes
    ----------
    vae
        The trained count VAE (eval mode, frozen).
    center, scale
        The standardisation of the training cells' coordinates.
    gene_symbols
        The symbols of the G genes.
    """

    kind = "cfm-vc"

    def __init__(self, vae: CountVAE, center: np.ndarray, scale: float, gene_symbols: list[str]):
        self.vae = vae.eval().requires_grad_(False)
        self.center = np.asarray(center, dtype=np.float64)
        self.scale = float(scale)
        self.gene_symbols = list(gene_symbols)

    @classmethod
    def fit(cls, view: SplitView, n_latent: int, steps: int, counts_layer: str | None, seed: int = 0
            ) -> CountVAEEmbedding:
        """Train the VAE on ``view``'s training cells (``steps`` Adam steps of ``BATCH_SIZE`` cells); the
        standardisation is left to the caller (``center``, ``scale``: 0 and 1 here)."""
        rows = view.rows.train
        counts = view.counts(counts_layer).get(rows)
        expression = view.expression.get(rows)
        torch.manual_seed(seed)
        vae = CountVAE(expression.shape[1], 1, 1, n_latent, N_TECH, HIDDEN, N_LAYERS, DROPOUT)
        optimiser = torch.optim.Adam(vae.parameters(), lr=LR)
        generator = torch.Generator().manual_seed(seed)
        x_all, c_all = torch.from_numpy(expression), torch.from_numpy(counts)
        vae.train()
        for _ in range(steps):
            pick = torch.randint(len(rows), (min(BATCH_SIZE, len(rows)),), generator=generator)
            zeros = torch.zeros(len(pick), dtype=torch.long)
            rec, kl = vae.elbo_terms(x_all[pick], c_all[pick], zeros, zeros)
            loss = -(rec - BETA * kl).mean() / c_all.shape[1]  # per cell and modelled entry, as CFM-VC's
            if not torch.isfinite(loss):
                raise RuntimeError("the CFM-VC embedding's VAE diverged (non-finite ELBO); check that the data "
                                   "holds raw counts (model.counts_layer) or lower model.vae_steps")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        return cls(vae, np.zeros(n_latent), 1.0, view.vocab.expression_genes)

    @property
    def dim(self) -> int:
        return self.vae.n_latent

    def raw(self, expression: np.ndarray) -> np.ndarray:
        """(n, G) log1p expression -> (n, k) posterior means of ``z_int``, before standardisation."""
        out = []
        with torch.no_grad():
            for i in range(0, len(expression), ENCODE_CHUNK):
                x = torch.from_numpy(np.asarray(expression[i:i + ENCODE_CHUNK], dtype=np.float32))
                zeros = torch.zeros(len(x), dtype=torch.long)
                out.append(self.vae.encode(x, zeros, zeros).int_mu.double().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim))

    def encode(self, expression: np.ndarray) -> np.ndarray:
        return ((self.raw(expression) - self.center) / self.scale).astype(np.float32)

    def shifted(self, expression: np.ndarray, latent: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Embeddings of the cells moved by a (G,) shift (clipped at 0): the encoder is not linear."""
        return self.encode(np.clip(expression + np.asarray(delta, np.float32)[None, :], 0, None))

    def gene_vectors(self, names: list[str]) -> tuple[list[str], np.ndarray]:
        raise InputError("the CFM-VC latent has no gene vectors: descriptor 'gene' needs embedding 'pca' or "
                         "'scgpt'. Use model.descriptor=onehot (or file) with embedding 'cfm-vc'.")

    # ------------------------------------------------------------------ persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"center": torch.from_numpy(self.center),
                **{f"vae.{k}": v.detach().clone() for k, v in self.vae.state_dict().items()}}

    def extra_state(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self.scale, "gene_symbols": self.gene_symbols,
                "n_genes": self.vae.n_genes, "n_latent": self.vae.n_latent}

    @classmethod
    def from_state(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> CountVAEEmbedding:
        vae = CountVAE(state["n_genes"], 1, 1, state["n_latent"], N_TECH, HIDDEN, N_LAYERS, DROPOUT)
        vae.load_state_dict({k.removeprefix("vae."): v for k, v in tensors.items() if k.startswith("vae.")})
        return cls(vae, tensors["center"].numpy(), state["scale"], state["gene_symbols"])
