"""Embedding spaces and the frozen decoder of the latent-shift model.

An embedding space is fitted on a split's training cells only and maps log1p expression to
``k`` coordinates (``encode(X) -> Z``), standardised by the training cells' centre and one overall
scale (so that every space has an average variance of 1 per coordinate and distances keep their
geometry). Three spaces:

* :class:`PCAEmbedding`: principal components of the training cells (the evaluator's PCA is
  the same kind of projection, so ``knn_purity_pca`` is KNN purity in this space);
* :class:`ScGPTEmbedding`: cell embeddings of a frozen scGPT (a public model's folder, or one
  of ``pertflow pretrain``).

* :class:`~pertflow.models.latent_shift.vae_embedding.CountVAEEmbedding`: the intrinsic latent of
  CFM-VC's count VAE, trained on the training cells' counts (SPEC 2.5's third space).

Each also gives the model what it needs besides ``encode``: the embedding of shifted cells (the
prior's shift carried into the space) and gene vectors for the ``gene`` descriptor. The
:class:`LatentDecoder` maps embeddings back to expression (non-negative output); it is trained
once on the training cells and then frozen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pertflow.data.view import SplitView
from pertflow.eval import metrics as M
from pertflow.models.latent_shift.config import LatentShiftConfig
from pertflow.models.latent_shift.vae_embedding import ENCODE_CHUNK, CountVAEEmbedding
from pertflow.nn.loss import LossOutput
from pertflow.nn.mlp import mlp
from pertflow.errors import InputError
from pertflow.train.config import TrainConfig, stage_config


def _standardisation(raw: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre (per coordinate) and scale (one number: the root mean variance) of embeddings."""
    center = raw.mean(0)
    scale = float(np.sqrt(np.mean(raw.var(0)))) or 1.0
    return center.astype(np.float64), scale


class PCAEmbedding:
    """Principal components of the training cells: ``z = (x - mean) @ components.T / scale``.

    Attributes
    ----------
    mean
        (G,) gene means of the fitting cells.
    components
        (k, G) orthonormal axes.
    scale
        The root mean variance of the training cells' coordinates.
    gene_symbols
        The symbols of the G genes (for the ``gene`` descriptor).
    """

    kind = "pca"

    def __init__(self, mean: np.ndarray, components: np.ndarray, scale: float, gene_symbols: list[str]):
        self.mean = np.asarray(mean, dtype=np.float64)
        self.components = np.asarray(components, dtype=np.float64)
        self.scale = float(scale)
        self.gene_symbols = list(gene_symbols)

    @classmethod
    def fit(cls, expression: np.ndarray, n_components: int, gene_symbols: list[str], seed: int = 0) -> PCAEmbedding:
        """Fit on (n, G) training cells (at most 20,000 of them, seeded, as the evaluator's PCA)."""
        pca = M.fit_pca(expression, n_components, max_cells=20_000, seed=seed)
        scale = float(np.sqrt(np.mean(pca.explained_variance))) or 1.0
        return cls(pca.mean, pca.components, scale, gene_symbols)

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def encode(self, expression: np.ndarray) -> np.ndarray:
        """(n, G) log1p expression -> (n, k) float32 coordinates."""
        centred = np.asarray(expression, dtype=np.float64) - self.mean
        return (centred @ self.components.T / self.scale).astype(np.float32)

    def shifted(self, expression: np.ndarray, latent: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Embeddings of the cells moved by a (G,) shift: exactly ``latent + delta @ components.T / scale``."""
        return (latent + (np.asarray(delta, np.float64) @ self.components.T / self.scale)[None, :]).astype(np.float32)

    def gene_vectors(self, names: list[str]) -> tuple[list[str], np.ndarray]:
        """The PCA loadings (a column of the components) of each measured gene among ``names``."""
        position = {g: i for i, g in enumerate(self.gene_symbols)}
        found = [n for n in dict.fromkeys(names) if n in position]
        return found, self.components[:, [position[n] for n in found]].T.astype(np.float32)

    # ------------------------------------------------------------------ persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": torch.from_numpy(self.mean),
                "components": torch.from_numpy(np.ascontiguousarray(self.components))}

    def extra_state(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self.scale, "gene_symbols": self.gene_symbols}

    @classmethod
    def from_state(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PCAEmbedding:
        return cls(tensors["mean"].numpy(), tensors["components"].numpy(), state["scale"], state["gene_symbols"])


class ScGPTEmbedding:
    """Cell embeddings of a frozen scGPT (a folder on disk), standardised on the training cells.

    The weights are not copied into the run: the run records the folder (``checkpoint``) and
    reads it again when loaded, so a run of a 50M-parameter model stays small.

    Parameters
    ----------
    checkpoint
        The scGPT folder (``args.json``, ``vocab.json``, ``best_model.pt``).
    gene_symbols
        The symbols of the G genes of the expression it encodes.
    max_seq_len
        Longest sequence, ``<cls>`` included.
    seed
        Seeds the gene sampling of cells with more genes than fit, anew for every call, so that
        encoding is a function of the cells.
    center, scale
        The standardisation (per-coordinate centre, one overall scale) of the training cells.
    """

    kind = "scgpt"

    def __init__(self, checkpoint: str, gene_symbols: list[str], max_seq_len: int, seed: int = 0,
                 center: np.ndarray | None = None, scale: float = 1.0):
        from pertflow.foundation.scgpt import FrozenScGPTExtractor, load_pretrained

        if not (Path(checkpoint) / "args.json").is_file():
            raise InputError(f"{checkpoint} is not a scGPT folder (args.json is missing). Give the folder of a public "
                             "scGPT model or of `pertflow pretrain` as model.scgpt_checkpoint.")
        loaded = load_pretrained(checkpoint)
        self.checkpoint = str(checkpoint)
        self.transformer = loaded.model
        self.vocab = dict(loaded.vocab)
        self.gene_symbols = list(gene_symbols)
        if not any(g in self.vocab for g in self.gene_symbols):
            raise InputError(f"the scGPT model in {checkpoint} knows none of the data's genes (e.g. "
                             f"{self.gene_symbols[:3]}); give a model whose vocabulary holds the data's gene symbols.")
        self.max_seq_len, self.seed = int(max_seq_len), int(seed)
        self.extractor = FrozenScGPTExtractor(self.transformer.to("cpu"), self.vocab, max_seq_len=self.max_seq_len,
                                              n_bins=loaded.args.get("n_bins", 51), seed=self.seed)
        self.center = np.zeros(self.dim) if center is None else np.asarray(center, np.float64)
        self.scale = float(scale)

    @classmethod
    def fit(cls, checkpoint: str, expression: np.ndarray, gene_symbols: list[str], max_seq_len: int,
            seed: int = 0) -> ScGPTEmbedding:
        """The scGPT of ``checkpoint``, standardised on the (n, G) training cells."""
        embedding = cls(checkpoint, gene_symbols, max_seq_len, seed)
        embedding.center, embedding.scale = _standardisation(embedding.raw(expression))
        return embedding

    @property
    def dim(self) -> int:
        return int(self.transformer.config.d_model)

    def raw(self, expression: np.ndarray) -> np.ndarray:
        """(n, G) -> (n, d) scGPT cell embeddings (L2-normalised, as scGPT's ``embed_data``)."""
        out = []
        for start in range(0, len(expression), ENCODE_CHUNK):
            self.extractor.generator.manual_seed(self.seed + start)
            block = torch.from_numpy(np.ascontiguousarray(expression[start:start + ENCODE_CHUNK], dtype=np.float32))
            out.append(self.extractor.cell_embeddings(block, self.gene_symbols).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode(self, expression: np.ndarray) -> np.ndarray:
        return ((self.raw(expression) - self.center) / self.scale).astype(np.float32)

    def shifted(self, expression: np.ndarray, latent: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Embeddings of the cells moved by a (G,) shift (clipped at 0): the encoder is not linear."""
        return self.encode(np.clip(expression + np.asarray(delta, np.float32)[None, :], 0, None))

    def gene_vectors(self, names: list[str]) -> tuple[list[str], np.ndarray]:
        """scGPT's gene embeddings (its gene encoder: embedding, then LayerNorm) of the genes it knows."""
        found = [n for n in dict.fromkeys(names) if n in self.vocab]
        if not found:
            return [], np.zeros((0, self.dim), np.float32)
        with torch.no_grad():
            ids = torch.tensor([self.vocab[n] for n in found])
            return found, self.transformer.encoder(ids).float().numpy()

    # ------------------------------------------------------------------ persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"center": torch.from_numpy(self.center)}

    def extra_state(self) -> dict[str, Any]:
        return {"kind": self.kind, "checkpoint": self.checkpoint, "gene_symbols": self.gene_symbols,
                "max_seq_len": self.max_seq_len, "seed": self.seed, "scale": self.scale}

    @classmethod
    def from_state(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ScGPTEmbedding:
        return cls(state["checkpoint"], state["gene_symbols"], state["max_seq_len"], state["seed"],
                   tensors["center"].numpy(), state["scale"])


EMBEDDINGS = {"pca": PCAEmbedding, "scgpt": ScGPTEmbedding, "cfm-vc": CountVAEEmbedding}
Embedding = PCAEmbedding | ScGPTEmbedding | CountVAEEmbedding


def fit_embedding(config: LatentShiftConfig, view: SplitView, seed: int = 0) -> Embedding:
    """The embedding space named by ``config``, fitted on the training cells of ``view``."""
    train = view.expression.get(view.rows.train)
    if config.embedding == "pca":
        return PCAEmbedding.fit(train, config.n_components, view.vocab.expression_genes, seed=seed)
    if config.embedding == "cfm-vc":
        embedding = CountVAEEmbedding.fit(view, config.n_components, config.vae_steps, config.counts_layer, seed)
        embedding.center, embedding.scale = _standardisation(embedding.raw(train))
        return embedding
    return ScGPTEmbedding.fit(config.scgpt_checkpoint, train, view.vocab.expression_genes, config.scgpt_max_seq_len,
                              seed)


def embedding_from_state(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Embedding:
    return EMBEDDINGS[state["kind"]].from_state(state, tensors)


# ============================================================================ the decoder


class LatentDecoder(nn.Module):
    """Embedding -> expression: ``relu(b + z W + MLP(z))``, non-negative log1p expression.

    The linear part starts at the least-squares reconstruction of the training cells from their
    embeddings (:meth:`init_linear`; for a PCA that is the PCA's own inverse) and the MLP's last
    layer at zero, so the decoder starts as the best linear decoder and learns only what is not
    linear; a plain MLP fitted from scratch reconstructed held-out cells worse than the linear
    inverse (it learnt the training cells' noise). Trained once on the training cells
    (:meth:`loss`: squared error), then :meth:`freeze` stops every parameter from requiring a
    gradient and puts it in eval mode; the predictor never changes it.
    """

    def __init__(self, latent_dim: int, n_genes: int, hidden: int = 512, n_layers: int = 2):
        super().__init__()
        self.net = mlp(latent_dim, hidden, n_layers, n_genes)  # its last layer starts at zero
        self.linear = nn.Linear(latent_dim, n_genes)

    @torch.no_grad()
    def init_linear(self, latent: np.ndarray, expression: np.ndarray, ridge: float = 1e-3) -> None:
        """Set the linear part to the ridge least-squares fit of ``expression`` on ``latent``."""
        z = np.asarray(latent, np.float64)
        x = np.asarray(expression, np.float64)
        z_mean, x_mean = z.mean(0), x.mean(0)
        zc = z - z_mean
        weight = np.linalg.solve(zc.T @ zc + ridge * len(z) * np.eye(z.shape[1]), zc.T @ (x - x_mean))  # (k, G)
        self.linear.weight.copy_(torch.from_numpy(weight.T))
        self.linear.bias.copy_(torch.from_numpy(x_mean - z_mean @ weight))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """(n, k) -> (n, G) expression >= 0."""
        return F.relu(self.linear(latent) + self.net(latent))

    def loss(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        mse = F.mse_loss(self(batch["latent"]), batch["expression"])
        return LossOutput(loss=mse, metrics={"mse": float(mse.detach())})

    def freeze(self) -> LatentDecoder:
        """Stop training: no parameter requires a gradient any more; eval mode."""
        self.requires_grad_(False)
        return self.eval()

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    @torch.no_grad()
    def decode(self, latent: np.ndarray) -> np.ndarray:
        """(n, k) numpy -> (n, G) float32 expression."""
        out = [self(torch.from_numpy(np.ascontiguousarray(latent[i:i + ENCODE_CHUNK], dtype=np.float32))).numpy()
               for i in range(0, len(latent), ENCODE_CHUNK)]
        return np.concatenate(out) if out else np.zeros((0, self.net[-1].linear.out_features), np.float32)


def decoder_train_config(config: LatentShiftConfig, train_config: TrainConfig) -> TrainConfig:
    """The decoder's training settings: the ``decoder_*`` fields over the run's engine settings
    (:func:`~pertflow.train.config.stage_config`); validation on the validation cells every tenth
    of the steps (the best step's weights are kept)."""
    steps = config.decoder_steps
    return stage_config(
        train_config, max_steps=steps, batch_size=config.decoder_batch_size, lr=config.decoder_lr,
        warmup_steps=min(100, steps // 10), min_lr_ratio=0.05, val_every=max(1, steps // 10),
        checkpoint_every=min(steps, max(1, train_config.checkpoint_every)),
        log_every=max(1, min(train_config.log_every, steps)),
    )
