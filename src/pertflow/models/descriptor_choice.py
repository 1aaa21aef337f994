"""The perturbation descriptor of a trained model, chosen on validation (``descriptor: auto``).

Every model that learns perturbations has a ``descriptor`` field with the same values:

* ``onehot``: the component's own learnt vector (a one-hot coordinate for latent-shift, a token
  embedding for the gene-space flows): it names a trained component and says nothing of an
  unseen one;
* ``gene``: the target gene's vector in a PCA of the training cells (its loadings: the genes it
  co-varies with), for targets that are measured genes, so that an unseen target measured as a
  gene has a vector of its own;
* ``file``: vectors read from a file or the data's ``descriptors_key`` (latent-shift; the
  gene-space flows always add the data's descriptors to their tokens);
* ``auto``: where the test asks for components no training cell has (unseen perturbations,
  :func:`~pertflow.models.inner_split.kind_of_test`), the model is trained once per descriptor at
  hand on the inner split and the one whose cells score best on validation's held-out training
  perturbations is kept (:func:`choose`); elsewhere ``onehot``, which already names every
  component the test asks for. One inner split holds out few perturbations (tapseq: 2 of 8
  targets); latent-shift's ``descriptor_rotations`` scores each descriptor on more inner splits
  (:func:`rotations`), at one more predictor training per split and descriptor.

The choice, each candidate's score and why are saved in the fit report's ``descriptor`` (with
``refit``, in its ``inner_fit``); a refit on every training cell uses the chosen descriptor.
``gene`` is a candidate only where an unseen test component is a measured gene.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from pertflow.data.view import SplitView
from pertflow.eval import metrics as M
from pertflow.models.inner_split import inner_split, kind_of_test
from pertflow.models.validation import ValidationScore, ValidationSet
from pertflow.train.checkpoint import STAGES_DIR
from pertflow.train.config import TrainConfig

AUTO = "auto"
#: validation scores closer than this are a tie (see :func:`choose`)
TIE = 0.01
#: principal components of the gene descriptor of the gene-space flows
GENE_COMPONENTS = 50


def candidates(asked: str, view: SplitView, validation: ValidationSet | None, chosen: str | None,
               at_hand: list[str]) -> list[str]:
    """The descriptors to train with: the config's (``asked``) one; with ``auto``, ``at_hand``
    (``onehot`` first) where the test asks for unseen components and validation has groups, else
    ``onehot``; on a refit (no ``validation``), the one ``chosen``."""
    if asked != AUTO:
        return [asked]
    if validation is None:
        return [chosen or "onehot"]
    if not len(validation) or kind_of_test(view)[0] != "perturbations":
        return ["onehot"]
    if not unseen_measured(view):  # no unseen target has loadings: 'gene' would name none of them
        at_hand = [k for k in at_hand if k != "gene"]
    return at_hand if len(at_hand) > 1 else ["onehot"]


def unseen_measured(view: SplitView) -> list[str]:
    """The test's components that no training perturbation has and that are measured genes."""
    test = {c for p in view.split.test_perturbations for c in view.data.components(p)}
    return sorted((test - set(view.training_components)) & set(view.vocab.expression_genes))


def descriptor_dir(run_dir: Path, kind: str) -> Path:
    """Where a network model trained with descriptor ``kind`` keeps its checkpoints."""
    return Path(run_dir) / STAGES_DIR / f"descriptor-{kind}"


def rotations(view: SplitView, validation: ValidationSet, n: int) -> list[tuple[SplitView, ValidationSet]]:
    """The inner split a model is fitted on (``view``, ``validation``) and ``n - 1`` more, each
    holding out as many other training singles of ``view`` (seeds 1, 2, ...; nested: the first
    split's held-out perturbations stay out), so that a choice is judged on more held-out
    perturbations than one split has. A rotation that holds nothing out is left out.

    latent-shift keeps the first split's embedding and decoder for every rotation, which have
    read the later rotations' held-out cells: with a PCA embedding the ``gene`` descriptor of such
    a target was fitted with its own cells, so the later rotations favour ``gene`` (on tapseq
    validation still kept ``onehot`` on every fold)."""
    out = [(view, validation)]
    data = view.data
    held = len({g.perturbation for g in validation.groups if len(data.components(g.perturbation)) == 1})
    for seed in range(1, n):
        inner = inner_split(view, "perturbations", held, seed)
        if inner.held_out:
            scored = ValidationSet(inner.view, seed=seed, reference=validation.reference)
            if len(scored):
                out.append((inner.view, scored))
    return out


def choose(kinds: list[str], fit_and_score: Callable[[str], tuple[ValidationScore, Any]],
           what: str) -> tuple[str, Any, dict[str, Any]]:
    """Fit one model per descriptor (``fit_and_score(kind)`` -> its validation score and what to
    keep of it) and return the best kind, what was kept of it, and the report. A kind within
    :data:`TIE` of the best score counts as a tie, which the first (``onehot``) wins: CFM-VC's
    two descriptors scored within 1e-4 of each other, and such a choice is noise."""
    kept, scores = {}, {}
    for kind in kinds:
        score, kept[kind] = fit_and_score(kind)
        scores[kind] = {k: round(v, 4) for k, v in score.as_dict("").items()}
    top = max(scores[k]["score"] for k in kinds)
    best = next(k for k in kinds if scores[k]["score"] >= top - TIE)
    how = "best" if scores[best]["score"] == top else f"within {TIE} of the best (a tie, which the first wins)"
    return best, kept[best], {
        "chosen": best, "candidates": kinds, "scores": scores,
        "reason": f"{what}'s cells of the validation's held-out perturbations scored {how} with the '{best}' "
                  "descriptor"}


def gene_loadings(view: SplitView, tokens: list[str], n_components: int = GENE_COMPONENTS,
                  seed: int = 0) -> np.ndarray:
    """(len(tokens), k) each token's loadings in a PCA of the training cells' log1p expression
    (rows of zeros for a token that is not an expression gene), scaled so that a typical measured
    gene's vector has norm 1."""
    train = view.rows.train
    pca = M.fit_pca(view.expression.get(train), n_components, max_cells=20_000, seed=seed)
    loadings = np.asarray(pca.components, dtype=np.float32).T  # (G, k)
    position = {g: i for i, g in enumerate(view.vocab.expression_genes)}
    out = np.zeros((len(tokens), loadings.shape[1]), np.float32)
    for row, token in enumerate(tokens):
        if token in position:
            out[row] = loadings[position[token]]
    norms = np.linalg.norm(out, axis=1)
    scale = float(np.sqrt(np.mean(norms[norms > 0] ** 2))) if np.any(norms > 0) else 1.0
    return out / scale


class ChoosesDescriptor:
    """The descriptor of an anchored network model (:class:`~pertflow.models.anchored.AnchoredNetwork`)
    whose ``build_module`` reads :meth:`descriptor_matrix`: the gene-space flows' perturbation
    encoder, CFM-VC's condition. ``descriptor_buffer`` names the network's buffer that holds the
    matrix (how a saved run's gene loadings are found again); the config has ``descriptor``.
    """

    descriptor_buffer: ClassVar[str] = "perturbation_encoder.descriptors"

    def __init__(self, *args: Any, **kwargs: Any):
        self.descriptor_kind: str | None = None  # the descriptor the network was trained with
        self.gene_descriptors: np.ndarray | None = None  # (V, k) with 'gene': each token's PCA loadings
        self.reads_data_descriptors = True  # False: a run saved before its network read the data's
        super().__init__(*args, **kwargs)

    def descriptor_matrix(self) -> np.ndarray | None:
        """(V, D) the vector of every token the network reads beside its own: the data's
        descriptors, then with ``gene`` the loadings; None when there are neither."""
        data = self.vocab.descriptor_matrix() if self.reads_data_descriptors else None
        parts = [m for m in (data, self.gene_descriptors) if m is not None]
        return np.concatenate(parts, axis=1) if parts else None

    def described_components(self) -> set[str]:
        """Components with a descriptor vector (the data's; with ``gene`` every expression gene)."""
        data = self.vocab.descriptors if self.reads_data_descriptors else None
        described = set() if data is None else set(map(str, data.index))
        return described | (set(self.vocab.expression_genes) if self.gene_descriptors is not None else set())

    def fit_anchored(self, view: SplitView, train_config: TrainConfig, run_dir: Path, resume: bool,
                     validation: ValidationSet | None) -> None:
        """The network trained with the config's descriptor; with ``auto`` and a test of unseen
        perturbations, once per descriptor (each in ``stages/descriptor-<kind>``, which resume and
        overwrite find), the one whose own cells score best on validation kept (see the module
        docstring)."""
        kinds = candidates(self.config.descriptor, view, validation, self.descriptor_kind, ["onehot", "gene"])
        if len(kinds) == 1:
            self.use_descriptor(kinds[0], view)
            super().fit_anchored(view, train_config, run_dir, resume, validation)
            return

        def fit_and_score(kind: str) -> tuple[ValidationScore, Any]:
            self.use_descriptor(kind, view)
            super(ChoosesDescriptor, self).fit_anchored(view, train_config, descriptor_dir(run_dir, kind),
                                                        resume, validation)
            return self.validation_score(validation), (self.module, self.gene_descriptors, self.fit_report)

        self.descriptor_kind, kept, report = choose(kinds, fit_and_score, self.what)
        self.module, self.gene_descriptors, self.fit_report = kept
        self.fit_report["descriptor"] = report

    def use_descriptor(self, kind: str, view: SplitView) -> None:
        """Read perturbations with descriptor ``kind`` (``gene``: loadings fitted on ``view``'s
        training cells); the network built next reads them."""
        self.descriptor_kind = kind
        self.gene_descriptors = gene_loadings(view, self.vocab.tokens) if kind == "gene" else None

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "descriptor_kind": self.descriptor_kind}

    def load_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.descriptor_kind = extra.get("descriptor_kind")  # None: saved before descriptors were chosen
        if self.descriptor_kind == "gene":  # the loadings are the network's descriptors after the data's
            data_width = 0 if self.vocab.descriptors is None else self.vocab.descriptors.shape[1]
            self.gene_descriptors = tensors[self.descriptor_buffer].numpy()[:, data_width:].copy()
            self.module = self.build_module()
        elif self.descriptor_buffer not in tensors and self.descriptor_matrix() is not None:
            self.reads_data_descriptors = False  # CFM-VC saved before its condition read descriptors
            self.module = self.build_module()
        super().load_state(tensors, extra)
