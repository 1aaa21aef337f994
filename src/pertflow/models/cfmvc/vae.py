"""Stage 1 of CFM-VC (SPEC 2.4): a VAE of counts with a negative-binomial decoder. Tensors only.

* Encoder: log1p expression (the data's own, ``log1p(c / L * target_sum)``), batch and cell type
  -> the intrinsic latent ``z_int`` and the technical latent ``z_tech`` (Gaussian posteriors,
  log-variances clamped to [-10, 10]).
* Decoder: ``z_int``, ``z_tech`` and batch -> the cell's fractions ``rho`` of its library over the
  G genes and one more entry, the rest of the library (genes not modelled), a softmax; the NB mean
  of a cell with library ``L`` is ``L * rho``; one inverse dispersion ``theta`` per entry.
* :func:`nb_log_likelihood`: the NB log-likelihood, finite for zero counts, huge counts and tiny
  dispersions (no ``log(0)``, no ``lgamma(0)``).

The decoder's fractions are of the library the data's expression was normalised with (see
:class:`~pertflow.data.view.CountsCache`), so ``log1p(rho * target_sum)`` is a cell on the data's
own scale, and a count sample ``c`` is written as the data writes its cells, ``log1p(c / L * target_sum)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pertflow.nn.mlp import mlp

LOGVAR_MIN, LOGVAR_MAX = -10.0, 10.0
NB_EPS = 1e-8


def nb_log_likelihood(x: Tensor, mu: Tensor, theta: Tensor, eps: float = NB_EPS) -> Tensor:
    """Elementwise log NB(x; mean ``mu``, inverse dispersion ``theta``) (scVI's parametrisation,
    variance ``mu + mu^2 / theta``)::

        lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
            + theta * (log theta - log(theta + mu)) + x * (log mu - log(theta + mu))

    ``mu`` and ``theta`` are clamped at ``eps`` first, so no ``log(0)`` and no ``lgamma(0)``
    occur: zero counts, a zero mean, huge counts and tiny dispersions all give finite values.
    Equal to ``torch.distributions.NegativeBinomial(total_count=theta, logits=log mu - log theta)``
    where that is defined.
    """
    mu = mu.clamp(min=eps)
    theta = theta.clamp(min=eps)
    log_theta_mu = torch.log(theta + mu)
    return (
        torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
        + theta * (torch.log(theta) - log_theta_mu)
        + x * (torch.log(mu) - log_theta_mu)
    )


def sample_nb(mu: Tensor, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Counts from NB(``mu``, ``theta``) as a gamma-Poisson mixture; seeded by ``generator``
    (its next draw seeds a forked torch RNG, so torch's own stream is untouched)."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    devices = [mu.device] if mu.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        rate = torch.distributions.Gamma(theta.clamp(min=NB_EPS),
                                         (theta / mu.clamp(min=NB_EPS)).clamp(min=NB_EPS)).sample()
        return torch.poisson(rate)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """(B,) KL(N(mu, exp(logvar)) || N(0, I)) summed over the latent dimensions."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


@dataclass
class Posterior:
    """The encoder's Gaussian posteriors: means and (clamped) log-variances, (B, n_latent) and (B, n_tech)."""

    int_mu: Tensor
    int_logvar: Tensor
    tech_mu: Tensor
    tech_logvar: Tensor

    def sample(self) -> tuple[Tensor, Tensor]:
        """Reparameterised draws of ``z_int`` and ``z_tech``."""
        return (self.int_mu + torch.randn_like(self.int_mu) * (0.5 * self.int_logvar).exp(),
                self.tech_mu + torch.randn_like(self.tech_mu) * (0.5 * self.tech_logvar).exp())

    def kl(self) -> Tensor:
        """(B,) KL of both posteriors from the standard normal prior."""
        return gaussian_kl(self.int_mu, self.int_logvar) + gaussian_kl(self.tech_mu, self.tech_logvar)


class CountVAE(nn.Module):
    """The stage-1 VAE (see the module docstring).

    Parameters
    ----------
    n_genes
        G, the modelled genes (the decoder has G + 1 outputs: the genes and the rest of the library).
    n_batch, n_context
        Categories of the batch and cell-type (context) covariates (one-hot inputs).
    n_latent, n_tech, hidden, n_layers, dropout
        See :class:`~pertflow.models.cfmvc.config.CFMVCConfig`.
    """

    def __init__(self, n_genes: int, n_batch: int, n_context: int, n_latent: int, n_tech: int, hidden: int,
                 n_layers: int, dropout: float):
        super().__init__()
        self.n_genes, self.n_batch, self.n_context = n_genes, n_batch, n_context
        self.n_latent, self.n_tech = n_latent, n_tech
        self.encoder = mlp(n_genes + n_batch + n_context, hidden, n_layers, layer_norm=True, dropout=dropout,
                           xavier=True)
        self.int_head = nn.Linear(hidden, 2 * n_latent)
        self.tech_head = nn.Linear(hidden, 2 * n_tech)
        self.decoder = mlp(n_latent + n_tech + n_batch, hidden, n_layers, layer_norm=True, dropout=0.0, xavier=True)
        self.fractions = nn.Linear(hidden, n_genes + 1)
        self.log_theta = nn.Parameter(torch.full((n_genes + 1,), 2.0))

    def one_hot(self, batch_idx: Tensor, context_idx: Tensor) -> tuple[Tensor, Tensor]:
        return (nn.functional.one_hot(batch_idx.long(), self.n_batch).float(),
                nn.functional.one_hot(context_idx.long(), self.n_context).float())

    def encode(self, x: Tensor, batch_idx: Tensor, context_idx: Tensor) -> Posterior:
        """(B, G) log1p expression, (B,) batch and context indices -> the posteriors."""
        b, c = self.one_hot(batch_idx, context_idx)
        h = self.encoder(torch.cat([x.float(), b, c], dim=-1))
        int_mu, int_logvar = self.int_head(h).chunk(2, dim=-1)
        tech_mu, tech_logvar = self.tech_head(h).chunk(2, dim=-1)
        return Posterior(int_mu, int_logvar.clamp(LOGVAR_MIN, LOGVAR_MAX), tech_mu,
                         tech_logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))

    def decode(self, z_int: Tensor, z_tech: Tensor, batch_idx: Tensor) -> Tensor:
        """(B, G + 1) fractions of the library (genes, then the rest), rows summing to 1."""
        b = nn.functional.one_hot(batch_idx.long(), self.n_batch).float()
        return torch.softmax(self.fractions(self.decoder(torch.cat([z_int, z_tech, b], dim=-1))), dim=-1)

    @property
    def theta(self) -> Tensor:
        """(G + 1,) inverse dispersions."""
        return self.log_theta.clamp(-15.0, 15.0).exp()

    def elbo_terms(self, x: Tensor, counts: Tensor, batch_idx: Tensor, context_idx: Tensor) -> tuple[Tensor, Tensor]:
        """(B,) reconstruction log-likelihood and (B,) KL of cells with log1p expression ``x`` (B, G)
        and counts ``counts`` (B, G + 1: genes, then the rest of the library)."""
        post = self.encode(x, batch_idx, context_idx)
        z_int, z_tech = post.sample() if self.training else (post.int_mu, post.tech_mu)
        library = counts.sum(-1, keepdim=True)
        mu = library * self.decode(z_int, z_tech, batch_idx)
        return nb_log_likelihood(counts, mu, self.theta).sum(-1), post.kl()

    def to_expression(self, rho: Tensor, target_sum: float, library: Tensor | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
        """(B, G) cells on the data's scale from fractions ``rho`` (B, G + 1): ``log1p(rho * target_sum)``
        (the NB mean), or with ``library`` (B, 1) a count sample ``c`` written ``log1p(c / L * target_sum)``."""
        if library is None:
            return torch.log1p(rho[:, :-1] * target_sum)
        counts = sample_nb(library * rho[:, :-1], self.theta[:-1].expand_as(rho[:, :-1]), generator)
        return torch.log1p(counts / library * target_sum)
