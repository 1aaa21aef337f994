"""A frozen scGPT as a feature extractor: per-gene contextual features and cell embeddings.

Used by CCFM (SPEC 2.2) as the auxiliary generation target: for a batch of cells over G genes it
returns ``(B, G, d_model)`` features, zero for genes outside the scGPT vocabulary, normalised per
dimension by running statistics that freeze after a warm-up. :class:`FeatureCache` stores raw
features on disk so that training need not run the encoder at every step.

Tensors only; mapping an AnnData's genes to symbols is the caller's business.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pertflow.errors import InputError
from pertflow.foundation.scgpt.checkpoint import load_pretrained
from pertflow.foundation.scgpt.feature_cache import GeneFeatures, GeneSpec
from pertflow.foundation.scgpt.tokens import CLS, SPECIAL_TOKENS
from pertflow.foundation.scgpt.transformer import TransformerModel


# ============================================================================ normalisation


class RunningFeatureNorm(nn.Module):
    """Per-dimension standardisation by running mean/variance that freeze after a warm-up.

    For the first ``warmup_batches`` calls with ``update=True`` the statistics absorb the batch
    (exact pooled mean and variance over every valid gene position seen, Chan et al.'s merge in
    float64); afterwards they are fixed. Output: ``(x - mean) / sqrt(var + eps) * target_std``, and
    zero at invalid positions.

    Parameters
    ----------
    dim
        Feature width ``d``.
    warmup_batches
        Number of batches that update the statistics (SPEC default 200).
    target_std
        Scale of the standardised features.
    eps
        Added to the variance.

    Notes
    -----
    Buffers (saved by ``state_dict``): ``count``, ``mean``, ``m2`` (float64), ``n_batches``.
    """

    def __init__(self, dim: int, warmup_batches: int = 200, target_std: float = 1.0, eps: float = 1e-6) -> None:
        super().__init__()
        if warmup_batches < 0:
            raise ValueError("warmup_batches must be >= 0")
        self.dim = dim
        self.warmup_batches = warmup_batches
        self.target_std = target_std
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("n_batches", torch.zeros((), dtype=torch.long))

    @property
    def frozen(self) -> bool:
        """True once ``warmup_batches`` batches have been absorbed."""
        return int(self.n_batches) >= self.warmup_batches

    @property
    def var(self) -> Tensor:
        """``(d,)`` population variance (float64)."""
        return self.m2 / self.count.clamp(min=1.0)

    @torch.no_grad()
    def update(self, rows: Tensor) -> None:
        """Absorb ``(N, d)`` feature rows (one per valid gene position) and count one batch."""
        if self.frozen:
            return
        rows = rows.detach().to(torch.float64)
        n = rows.shape[0]
        if n:
            batch_mean = rows.mean(0)
            batch_m2 = ((rows - batch_mean) ** 2).sum(0)
            total = self.count + n
            delta = batch_mean - self.mean
            self.mean += delta * (n / total)
            self.m2 += batch_m2 + delta**2 * (self.count * n / total)
            self.count.copy_(total)
        self.n_batches += 1

    def forward(self, features: Tensor, mask: Tensor, update: bool = True) -> Tensor:
        """Standardise.

        Parameters
        ----------
        features
            ``(B, G, d)``.
        mask
            ``(G,)`` or ``(B, G)`` bool; only True positions update the statistics or get values.
        update
            Absorb this batch while warming up.

        Returns
        -------
        Tensor
            ``(B, G, d)`` in the dtype of ``features``.
        """
        full_mask = mask.to(features.device).bool().expand(features.shape[:2])
        if update and not self.frozen:
            self.update(features[full_mask])
        if float(self.count) == 0:
            raise RuntimeError("RunningFeatureNorm has no statistics yet: run warm-up batches or load a state.")
        mean = self.mean.to(features.device, features.dtype)
        scale = (self.target_std / torch.sqrt(self.var + self.eps)).to(features.device, features.dtype)
        return ((features - mean) * scale) * full_mask.unsqueeze(-1).to(features.dtype)


# ============================================================================ binning


def bin_expression(expr: Tensor, n_bins: int = 51, generator: torch.Generator | None = None) -> Tensor:
    """scGPT's per-cell value binning: non-zero values -> quantile bins 1..n_bins-1, zeros stay 0.

    Each cell's non-zero values are cut at ``n_bins - 1`` quantiles of themselves; a value lying on a
    run of equal bin edges gets a random bin within the run (scGPT's ``_digitize``).

    Parameters
    ----------
    expr
        ``(B, G)`` non-negative expression.
    n_bins
        scGPT's ``n_bins`` (51 for the released models).
    generator
        For the tie-breaking draws; pass a freshly seeded one for a deterministic result.

    Returns
    -------
    Tensor
        ``(B, G)`` float bins.
    """
    out = torch.zeros_like(expr, dtype=torch.float32)
    probs = torch.linspace(0, 1, n_bins - 1, dtype=torch.float64)
    for i in range(expr.shape[0]):
        row = expr[i].detach().to("cpu", torch.float64)
        nz = row > 0
        if not bool(nz.any()):
            continue
        # scGPT bins all values when none is <= 0, else only the non-zero ones; for non-negative
        # input both reduce to binning the positive values.
        values = row[nz]
        edges = torch.quantile(values, probs)
        left = torch.bucketize(values, edges, right=True)  # np.digitize(x, bins)
        right = torch.bucketize(values, edges, right=False)  # np.digitize(x, bins, right=True)
        rand = torch.rand(values.shape, generator=generator, dtype=torch.float64)
        digits = torch.ceil(rand * (right - left) + left)
        out[i, nz.to(out.device)] = digits.to(out.device, torch.float32)
    return out


# ============================================================================ extractor


class FrozenScGPTExtractor:
    """Runs a frozen scGPT encoder over cells and returns per-gene features or cell embeddings.

    Parameters
    ----------
    model
        A :class:`~pertflow.foundation.scgpt.transformer.TransformerModel` (e.g. from ``load_pretrained``).
        It is put in eval mode and its parameters stop requiring gradients.
    vocab
        Token -> id of the model, ``<cls>`` and the pad token included.
    max_seq_len
        Longest sequence, ``<cls>`` included; default ``model.config.max_seq_len`` (1200).
    cls_value
        Expression value at the ``<cls>`` position; default the model's ``pad_value``, which is what
        scGPT's pretraining and its ``embed_data`` use (-2 for the whole-human model). Pass 0 to
        mimic scGPT's tokenizer tutorials.
    warmup_batches, target_std
        Settings of the :class:`RunningFeatureNorm` applied by :meth:`extract`.
    n_bins
        If set, expression is binned per cell with :func:`bin_expression` before encoding, which is
        the input representation of the released models (51); ``None`` feeds ``expr`` as given.
    seed
        Seeds the gene sampling (when a cell has more genes than fit) and the binning tie-breaks.
    chunk_size
        Cells per encoder call, to bound attention memory.
    autocast_dtype
        Run the encoder under ``torch.autocast`` with this dtype (e.g. ``torch.float16`` on a GPU,
        as scGPT's ``embed_data`` does); ``None`` runs in float32.
    """

    def __init__(
        self,
        model: TransformerModel,
        vocab: Mapping[str, int],
        *,
        max_seq_len: int | None = None,
        cls_value: float | None = None,
        warmup_batches: int = 200,
        target_std: float = 1.0,
        n_bins: int | None = None,
        seed: int = 0,
        chunk_size: int = 64,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.config = model.config
        self.vocab = dict(vocab)
        if CLS not in self.vocab:
            raise InputError(f"The vocabulary has no {CLS} token; scGPT features need it.")
        self.cls_id = int(self.vocab[CLS])
        self.pad_id = int(self.config.pad_token_id)
        self.max_seq_len = int(max_seq_len or self.config.max_seq_len)
        if self.max_seq_len < 2:
            raise InputError("max_seq_len must be at least 2 (<cls> plus one gene).")
        self.cls_value = float(self.config.pad_value if cls_value is None else cls_value)
        self.n_bins = n_bins
        self.seed = seed
        self.chunk_size = chunk_size
        self.autocast_dtype = autocast_dtype
        self.generator = torch.Generator().manual_seed(seed)
        self.normalizer = RunningFeatureNorm(self.config.d_model, warmup_batches, target_std)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu", **kwargs: Any
                        ) -> FrozenScGPTExtractor:
        """Load a public scGPT folder with ``load_pretrained`` and wrap it; ``kwargs`` go to ``__init__``."""
        loaded = load_pretrained(folder, device=device)
        return cls(loaded.model, loaded.vocab, **kwargs)

    @property
    def device(self) -> torch.device:
        """Device of the model."""
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> FrozenScGPTExtractor:
        """Move the model and the normaliser's statistics (kept in float64) to ``device``."""
        self.model.to(device)
        self.normalizer.to(device)
        return self

    # ---------------------------------------------------------------- tokens
    def gene_ids(self, genes: GeneSpec) -> Tensor:
        """Vocabulary id of each gene, -1 when absent.

        Parameters
        ----------
        genes
            ``G`` gene symbols, or a ``(G,)`` integer tensor of vocabulary ids (negative or out of
            range means absent).

        Returns
        -------
        Tensor
            ``(G,)`` long, on CPU.
        """
        if isinstance(genes, Tensor):
            ids = genes.detach().to("cpu", torch.long).clone()
            ids[(ids < 0) | (ids >= self.config.ntoken)] = -1
        else:
            ids = torch.tensor([self.vocab.get(str(g), -1) for g in genes], dtype=torch.long)
        specials = torch.tensor([self.vocab[t] for t in SPECIAL_TOKENS if t in self.vocab])
        ids[torch.isin(ids, specials)] = -1  # a special token is never a gene
        return ids

    def _values(self, expr: Tensor, valid: Tensor) -> Tensor:
        """``(B, G)`` model input values; with ``n_bins``, binned per cell over the in-vocabulary genes.

        scGPT bins each cell after dropping genes outside its vocabulary and before sampling, so the
        same is done here. Quantile bins are invariant to monotone per-cell transforms, so counts and
        log-normalised expression give the same bins (up to ties).
        """
        expr = expr.detach().float()
        if self.n_bins is None:
            return expr
        tie_breaks = torch.Generator().manual_seed(self.seed)  # deterministic, so cached == live
        cols = valid.nonzero().flatten().to(expr.device)
        out = torch.zeros_like(expr)
        out[:, cols] = bin_expression(expr[:, cols].cpu(), self.n_bins, tie_breaks).to(expr.device)
        return out

    def _sample(self, positions: Tensor) -> Tensor:
        keep = self.max_seq_len - 1
        if positions.numel() <= keep:
            return positions
        chosen = torch.randperm(positions.numel(), generator=self.generator)[:keep]
        return positions[chosen.sort().values]

    @torch.no_grad()
    def _encode_chunks(self, ids: Tensor, values: Tensor, padding: Tensor | None) -> Tensor:
        outs = []
        device_type = ids.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            for start in range(0, ids.shape[0], self.chunk_size):
                sl = slice(start, start + self.chunk_size)
                out = self.model.encode(ids[sl], values[sl], None if padding is None else padding[sl])
                outs.append(out.float())
        return torch.cat(outs, 0)

    # ---------------------------------------------------------------- per-gene features
    @torch.no_grad()
    def extract(self, expr: Tensor, genes: GeneSpec, *, normalize: bool = True, update_stats: bool = True
                ) -> GeneFeatures:
        """Per-gene contextual features of each cell.

        The ``<cls>`` token is prepended (value :attr:`cls_value`), every in-vocabulary gene is
        fed (zeros included), the encoder output at ``<cls>`` is dropped and the rest scattered back
        to the genes' columns. When more than ``max_seq_len - 1`` genes are valid, that many are
        sampled (one draw shared by the batch) and the others stay zero and unmasked.

        Parameters
        ----------
        expr
            ``(B, G)`` expression of the ``G`` genes (binned or not, see ``n_bins``).
        genes
            ``G`` symbols or a ``(G,)`` tensor of vocabulary ids.
        normalize
            Apply the running normalisation (and, while warming up, update it).
        update_stats
            Let this call update the statistics during warm-up.

        Returns
        -------
        GeneFeatures
            ``features`` ``(B, G, d_model)`` (float32, on the model's device), ``mask`` ``(G,)``.
        """
        raw = self._extract_raw(expr, genes)
        if not normalize:
            return raw
        return GeneFeatures(self.normalizer(raw.features, raw.mask, update=update_stats), raw.mask)

    @torch.no_grad()
    def extract_in_blocks(self, expr: Tensor, genes: GeneSpec, block: int) -> GeneFeatures:
        """Unnormalised per-gene features, the genes cut into consecutive blocks of ``block``,
        each encoded as a sequence of its own (``<cls>`` + the block's genes): a gene attends to
        its block only, and the attention costs ``G x block`` per cell instead of ``G x G``
        (kang's 2000 genes in blocks of 512: 4 x 513^2 attention scores instead of 2001^2, 3.8x
        fewer; its full-length extraction took 185 s for 1863 cells on one CPU thread). Features
        ``(B, G, d)``, mask ``(G,)``."""
        symbols = genes if isinstance(genes, Tensor) else list(genes)
        parts = [self._extract_raw(expr[:, start:start + block], symbols[start:start + block])
                 for start in range(0, expr.shape[1], block)]
        return GeneFeatures(torch.cat([p.features for p in parts], 1), torch.cat([p.mask for p in parts], 0))

    def _extract_raw(self, expr: Tensor, genes: GeneSpec) -> GeneFeatures:
        if expr.dim() != 2:
            raise InputError(f"expr must be (cells, genes), got shape {tuple(expr.shape)}.")
        ids = self.gene_ids(genes)
        if ids.numel() != expr.shape[1]:
            raise InputError(f"expr has {expr.shape[1]} genes but {ids.numel()} gene names/ids were given.")
        device = self.device
        positions = self._sample((ids >= 0).nonzero().flatten())
        mask = torch.zeros(ids.numel(), dtype=torch.bool)
        mask[positions] = True
        batch = expr.shape[0]
        features = torch.zeros(batch, ids.numel(), self.config.d_model, device=device)
        if positions.numel() == 0 or batch == 0:
            return GeneFeatures(features, mask.to(device))
        values = self._values(expr.to(device), ids >= 0)
        tok = torch.cat([torch.tensor([self.cls_id]), ids[positions]]).to(device)
        tok = tok.unsqueeze(0).expand(batch, -1)
        val = torch.cat([torch.full((batch, 1), self.cls_value, device=device), values[:, positions.to(device)]], 1)
        out = self._encode_chunks(tok, val, None)
        features[:, positions.to(device)] = out[:, 1:].float()
        return GeneFeatures(features, mask.to(device))

    def normalize(self, raw: GeneFeatures, update_stats: bool = True) -> Tensor:
        """Apply the running normalisation to raw features (e.g. read from a :class:`FeatureCache`).

        Parameters
        ----------
        raw
            Unnormalised features and mask (``(G,)`` or ``(B, G)``).
        update_stats
            Let this call update the statistics during warm-up.

        Returns
        -------
        Tensor
            ``(B, G, d)``.
        """
        return self.normalizer(raw.features, raw.mask, update=update_stats)

    # ---------------------------------------------------------------- cell embeddings
    @torch.no_grad()
    def cell_embeddings(self, expr: Tensor, genes: GeneSpec, *, include_zero_genes: bool = False,
                        l2_normalize: bool = True) -> Tensor:
        """One embedding per cell, pooled per the model's ``cell_emb_style``.

        As scGPT's ``embed_data``: each cell is tokenised over its own non-zero in-vocabulary genes
        (``include_zero_genes`` adds the zeros), sampled down to ``max_seq_len - 1`` genes when
        needed, with ``<cls>`` first; sequences are padded to the longest in the batch.

        Parameters
        ----------
        expr
            ``(B, G)``.
        genes
            ``G`` symbols or ``(G,)`` vocabulary ids.
        include_zero_genes
            Feed zero-valued genes too.
        l2_normalize
            Divide each embedding by its L2 norm (scGPT's ``embed_data`` does).

        Returns
        -------
        Tensor
            ``(B, d_model)`` float32 on the model's device.
        """
        ids = self.gene_ids(genes)
        if ids.numel() != expr.shape[1]:
            raise InputError(f"expr has {expr.shape[1]} genes but {ids.numel()} gene names/ids were given.")
        device = self.device
        valid = ids >= 0
        values = self._values(expr.to(device), valid).cpu()
        rows: list[Tensor] = []
        for i in range(expr.shape[0]):
            eligible = valid if include_zero_genes else valid & values[i].ne(0)
            rows.append(self._sample(eligible.nonzero().flatten()))
        length = 1 + max((r.numel() for r in rows), default=0)
        tok = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        val = torch.full((len(rows), length), float(self.config.pad_value))
        tok[:, 0] = self.cls_id
        val[:, 0] = self.cls_value
        for i, pos in enumerate(rows):
            tok[i, 1:1 + pos.numel()] = ids[pos]
            val[i, 1:1 + pos.numel()] = values[i, pos]
        padding = tok.eq(self.pad_id)
        tok, val, padding = tok.to(device), val.to(device), padding.to(device)
        out = self._encode_chunks(tok, val, padding)
        emb = self.model.cell_embedding(out, padding, val).float()
        return nn.functional.normalize(emb, p=2, dim=1) if l2_normalize else emb


# ============================================================================ on-disk cache
