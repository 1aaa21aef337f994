"""``latent-shift``: predict a perturbation in an embedding space, decode with a frozen decoder (SPEC 2.5).

Fitting runs four stages on the split's training cells (validation cells only score the result;
test cells are never reachable):

1. **embedding**: a PCA of the training cells, or the cell embeddings of a frozen scGPT
   (:mod:`~pertflow.models.latent_shift.embeddings`);
2. **decoder**: an MLP from embedding to expression (non-negative output), trained once to
   reconstruct the training cells, then frozen: nothing after this stage changes it;
3. **prior** (optional): a baseline's predicted shift (:mod:`pertflow.models.prior`), carried
   into the embedding (``delta @ components.T`` for the PCA; ``encode(x + delta)`` otherwise),
   moves the control cells before the predictor sees them; in training each perturbation's own
   response is left out of it;
4. **predictor** (:mod:`~pertflow.models.latent_shift.predictors`): trained on pairs of (shifted)
   control embeddings and perturbed embeddings of every training (perturbation, context), with
   a covariate per pair: the perturbation's descriptor and the context's mean control embedding.

A prediction encodes the context's control cells, shifts them by the prior, lets the predictor
move them and decodes the result. The model is anchored on its prior as the flow models are
(:class:`~pertflow.models.anchored.AnchoredModel`: the same validation chooses the prior and the
prediction mode, ``flow`` being the predictor's own cells); ``predict.mode`` forces one. Any
object with ``train(ctrl_emb, pert_emb, pert_cov)`` and ``predict(ctrl_emb, pert_cov)`` can stand
in for the built-in predictors (:meth:`LatentShift.use_predictor`); only the built-in ones are
saved with a run.

The networks train with the shared engine, each in a folder of its own under the run's
``checkpoints/`` (``checkpoints/decoder``, ``checkpoints/predictor``); a stage whose folder holds
checkpoints is continued (``pertflow train`` refuses or clears a run folder unless it resumes).
:meth:`LatentShift.embed` is the model's latent space for the evaluator's ``knn_purity_latent``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pertflow.data.view import SplitView
from pertflow.errors import InputError
from pertflow.eval import metrics as M
from pertflow.flows import ot_permutation
from pertflow.models.anchored import PRIOR_PREFIX, VALIDATION_SEED, AnchoredModel
from pertflow.models.capabilities import ReadsControlExpression
from pertflow.models import descriptor_choice
from pertflow.models.config import PredictConfig
from pertflow.models.latent_shift.config import LatentShiftConfig
from pertflow.models.latent_shift.descriptors import DescriptorTable, build_descriptors
from pertflow.models.latent_shift.embeddings import (
    ENCODE_CHUNK,
    Embedding,
    LatentDecoder,
    decoder_train_config,
    embedding_from_state,
    fit_embedding,
)
from pertflow.models.latent_shift.predictors import PREDICTORS, LatentPredictor, NetworkPredictor
from pertflow.models.latent_shift.training import CellBatches, stage_dir, train_network
from pertflow.models.prior import Prior
from pertflow.models.validation import ValidationSet, mean_score
from pertflow.train.config import TrainConfig

MAX_PAIRS = 256  # control cells paired with a group: at least its own size, up to this many when there are
OT_BLOCK = 1024  # larger groups are matched by optimal transport in random blocks of this size
KNN_K = 10


class LatentCells:
    """Embeddings of some rows of a dataset (the visible cells), looked up by row."""

    def __init__(self, rows: np.ndarray, latent: np.ndarray):
        self.position = pd.Series(np.arange(len(rows)), index=rows)
        self.latent = latent

    def get(self, rows: np.ndarray) -> np.ndarray:
        return self.latent[self.position.loc[np.asarray(rows)].to_numpy()]


class LatentShift(ReadsControlExpression, AnchoredModel):
    """A predictor in an embedding space and a frozen decoder (see the module docstring)."""

    name = "latent-shift"
    config_class = LatentShiftConfig
    default_predict_config = PredictConfig(ode_steps=10)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.embedding: Embedding | None = None
        self.decoder: LatentDecoder | None = None
        self.predictor: LatentPredictor | None = None
        self.descriptors: DescriptorTable | None = None
        self.descriptor_kind: str | None = None  # the descriptor the predictor was trained with
        self.context_means: dict[str, np.ndarray] = {}
        self.trained_components: list[str] = []
        self._own_predictor = False

    def use_predictor(self, predictor: LatentPredictor) -> LatentShift:
        """Fit and predict with ``predictor`` instead of the config's (any object with
        ``train(ctrl_emb, pert_emb, pert_cov)`` and ``predict(ctrl_emb, pert_cov)``)."""
        if not isinstance(predictor, LatentPredictor):
            raise TypeError(f"{type(predictor).__name__} is not a latent predictor: it needs the methods "
                            "train(ctrl_emb, pert_emb, pert_cov) and predict(ctrl_emb, pert_cov).")
        self.predictor, self._own_predictor = predictor, True
        return self

    @property
    def latent_dim(self) -> int:
        return self.embedding.dim

    @property
    def cov_dim(self) -> int:
        return self.descriptors.dim + (self.latent_dim if self.config.context_summary else 0)

    # ------------------------------------------------------------------ fitting
    @property
    def what(self) -> str:
        return f"the {self.config.predictor} predictor"

    def fit_anchored(self, view: SplitView, train_config: TrainConfig, run_dir: Path, resume: bool,
                     validation: ValidationSet | None) -> None:
        """Fit the embedding, the decoder and the predictor, the prior fitted (see the module
        docstring); ``resume`` is implied by the stages' checkpoint folders."""
        torch.manual_seed(train_config.seed)
        self.fit_embedding(view, train_config)
        self.fit_networks(view, self.embed_visible(view), train_config, run_dir, validation)
        if validation is not None and len(validation):
            self.fit_report["val_knn_purity_latent"] = self.validation_knn_purity(validation)

    def fit_networks(self, view: SplitView, latent: LatentCells, train_config: TrainConfig, run_dir: Path,
                     validation: ValidationSet | None = None) -> None:
        """The networks on the embedding of the visible cells: the decoder, then the predictor
        (one per candidate descriptor with ``descriptor: auto``, the best on validation kept)."""
        self.fit_decoder(view, latent, train_config, run_dir)
        kinds = self.descriptor_candidates(view, validation)
        if len(kinds) == 1:
            self.descriptor_kind = kinds[0]
            self.fit_predictor(view, latent, train_config, run_dir)
        else:
            self.choose_descriptor(kinds, view, latent, train_config, run_dir, validation)

    def fit_embedding(self, view: SplitView, train_config: TrainConfig) -> None:
        """Stage 1: the embedding space, on the training cells."""
        start = time.perf_counter()
        self.embedding = fit_embedding(self.config, view, train_config.seed)
        self.fit_report["embedding"] = {"kind": self.embedding.kind, "dim": self.embedding.dim,
                                        "seconds": round(time.perf_counter() - start, 1)}

    def embed(self, expression: np.ndarray) -> np.ndarray:
        """(n, G) log1p expression on :attr:`genes` -> (n, k) the model's embedding: its latent
        space, where the evaluator measures ``knn_purity_latent``."""
        if self.embedding is None:
            raise InputError("the model is not fitted yet: fit it before embedding cells.")
        expression = np.asarray(expression, dtype=np.float32)
        chunks = [self.embedding.encode(expression[i:i + ENCODE_CHUNK])
                  for i in range(0, len(expression), ENCODE_CHUNK)]
        return np.concatenate(chunks or [np.zeros((0, self.latent_dim), np.float32)])

    def embed_visible(self, view: SplitView) -> LatentCells:
        """Embeddings of every visible (training and validation) cell."""
        rows = np.sort(view.visible)
        latent = np.concatenate([self.embedding.encode(view.expression.get(rows[i:i + ENCODE_CHUNK]))
                                 for i in range(0, len(rows), ENCODE_CHUNK)])
        return LatentCells(rows, latent)

    def fit_decoder(self, view: SplitView, latent: LatentCells, train_config: TrainConfig, run_dir: Path) -> None:
        """Stage 2: the decoder, trained to reconstruct the training cells, then frozen."""
        rows = view.rows.train
        expression, z = view.expression.get(rows), latent.get(rows)
        config = decoder_train_config(self.config, train_config)
        start = time.perf_counter()
        torch.manual_seed(config.seed)
        decoder = LatentDecoder(self.embedding.dim, len(self.genes), self.config.decoder_hidden,
                                self.config.decoder_layers)
        decoder.init_linear(z, expression)
        val = view.rows.val
        val_batches = CellBatches(latent.get(val), view.expression.get(val), 1, 0).all_cells() if len(val) else None
        result = train_network(decoder, CellBatches(z, expression, config.batch_size, config.seed), config,
                               stage_dir(run_dir, "decoder"), {"stage": "decoder", "genes": self.genes}, val_batches)
        self.decoder = decoder.freeze()
        report = {"steps": result.steps, "best_step": result.best_step,
                  "train_mse": self._reconstruction_error(expression, z),
                  "seconds": round(time.perf_counter() - start, 1)}
        if len(val):
            report["val_mse"] = self._reconstruction_error(view.expression.get(val), latent.get(val))
        self.fit_report["decoder"] = report

    def _reconstruction_error(self, expression: np.ndarray, latent: np.ndarray) -> float:
        return float(np.mean((self.decoder.decode(latent) - expression) ** 2))

    def descriptor_candidates(self, view: SplitView, validation: ValidationSet | None) -> list[str]:
        """The descriptors to train a predictor with (:func:`pertflow.models.descriptor_choice.candidates`):
        at hand are ``onehot``, ``gene`` where the embedding has gene vectors, ``file`` where a file
        or the data's descriptors are given (only the config's with a predictor of one's own). Vectors
        that name no training component stop the run here, before any predictor trains."""
        at_hand = ["onehot"]
        if not self._own_predictor and self.embedding.kind != "cfm-vc":
            at_hand.append("gene")
        if not self._own_predictor and (self.config.descriptor_file is not None or view.vocab.descriptors is not None):
            at_hand.append("file")
        kinds = descriptor_choice.candidates(self.config.descriptor, view, validation, self.descriptor_kind, at_hand)
        if "file" in kinds and len(kinds) > 1:  # the file's error before the other candidates train
            build_descriptors("file", view, view.training_components, self.embedding, self.config.descriptor_file)
        return kinds

    def choose_descriptor(self, kinds: list[str], view: SplitView, latent: LatentCells, train_config: TrainConfig,
                          run_dir: Path, validation: ValidationSet) -> None:
        """One predictor per descriptor (each in ``checkpoints/predictor-<kind>``), scored on the
        validation's held-out perturbations by its decoded cells (the prior's shift left out, as
        for the prediction mode), and with ``descriptor_rotations`` on that many inner splits
        (the others' predictors in ``predictor-<kind>-rotation<i>``; the embedding and decoder are
        the first split's), the mean kept; the best is kept. A predictor seeds itself (the train
        config's seed), so the one kept is the predictor a run with that descriptor alone trains."""
        splits = descriptor_choice.rotations(view, validation, self.config.descriptor_rotations)

        def fit_and_score(kind: str) -> tuple[Any, Any]:
            self.descriptor_kind = kind
            scores = []
            for i, (split_view, scored) in reversed(list(enumerate(splits))):  # the first split's, kept, last
                self.fit_predictor(split_view, latent, train_config, run_dir,
                                   stage=f"predictor-{kind}" + (f"-rotation{i}" if i else ""))
                rng = np.random.default_rng(VALIDATION_SEED)
                with torch.no_grad():
                    scores.append(scored.score(lambda p, c, controls: self.predicted_cells(
                        controls, p, c, self.prior.held_out_delta(p, c), rng, self.predict_config)[1]))
            kept = (self.predictor, self.descriptors, self.fit_report["predictor"])
            return mean_score(scores), kept

        self.descriptor_kind, kept, report = descriptor_choice.choose(kinds, fit_and_score, self.what)
        self.predictor, self.descriptors, self.fit_report["predictor"] = kept
        self.fit_report["descriptor"] = {**report, "inner_splits": len(splits)}

    def fit_predictor(self, view: SplitView, latent: LatentCells, train_config: TrainConfig, run_dir: Path,
                      stage: str = "predictor") -> None:
        """Stage 4: descriptors (:attr:`descriptor_kind`), context summaries, training pairs, and
        the predictor on them (trained in ``checkpoints/<stage>``)."""
        data = view.data
        if self.prior is None:
            self.prior = Prior.fit("none", view)
        self.trained_components = view.training_components
        kind = self.descriptor_kind or ("onehot" if self.config.descriptor == "auto" else self.config.descriptor)
        self.descriptors = build_descriptors(kind, view, self.trained_components, self.embedding,
                                             self.config.descriptor_file)
        visible_controls = view.visible[data.is_control[view.visible]]
        self.context_means = {ctx: latent.get(view.control_rows(ctx)).mean(0)
                              for ctx in sorted(set(data.contexts[visible_controls]))}
        source, target, cov, groups = self.training_pairs(view, latent, np.random.default_rng(train_config.seed))
        if not self._own_predictor:
            self.predictor = self.build_predictor(train_config)
        if isinstance(self.predictor, NetworkPredictor):
            self.predictor.train(source, target, cov, groups=groups, run_dir=stage_dir(run_dir, stage),
                                 metadata={"model": self.name, "stage": stage, "genes": self.genes})
            self.fit_report["predictor"] = dict(self.predictor.fit_report)
        else:
            self.predictor.train(source, target, cov)
            self.fit_report["predictor"] = {"pairs": len(source), "class": type(self.predictor).__name__}

    def build_predictor(self, train_config: TrainConfig | None = None) -> NetworkPredictor:
        """The config's predictor, for this model's embedding and covariate widths."""
        cfg = self.config
        options: dict[str, Any] = {"hidden": cfg.hidden, "n_layers": cfg.n_layers,
                                   "groups_per_step": cfg.groups_per_step, "train_config": train_config}
        if cfg.predictor == "mlp":
            options["mmd_weight"] = cfg.mmd_weight
        else:
            options.update(source_noise=cfg.source_noise, coupling=cfg.coupling, time_sampler=cfg.time_sampler,
                           mean_weight=cfg.mean_weight, reads_start=cfg.flow_reads_start)
        return PREDICTORS[cfg.predictor](self.latent_dim, self.cov_dim, **options)

    def training_pairs(self, view: SplitView, latent: LatentCells, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(control embedding shifted by the prior, perturbed embedding, covariate, group) of every
        pair, in the predictor's coordinates (see ``center``); the group numbers the (perturbation, context).

        Every training (perturbation, context) gives as many pairs as it has cells, or up to
        :data:`MAX_PAIRS` when the context has more control cells (its cells then repeat). With
        ``train_unknown``, every context adds a group with a zero descriptor whose perturbed cells
        are all of the context's (at most ``MAX_PAIRS``), shifted by the mean of its prior shifts.
        """
        control = self.spec.control
        groups = view.groups(view.rows.train)
        pools = {ctx: rows for (pert, ctx), rows in groups.items() if pert == control}
        keys = [k for k in sorted(groups) if k[0] != control and k[1] in pools]
        if not keys:
            raise InputError("the training cells hold no perturbed cells with control cells of their context; check "
                             "the split.")
        blocks = [self._pairs(view, latent, groups[k], pools[k[1]], self.prior.training_delta(*k),
                              self.covariate(k[0], k[1]), k[1], rng) for k in keys]
        if self.config.train_unknown:
            zero = np.zeros(self.descriptors.dim, np.float32)
            for ctx in sorted({c for _, c in keys}):
                in_ctx = [k for k in keys if k[1] == ctx]
                rows = np.concatenate([groups[k] for k in in_ctx])
                if len(rows) > MAX_PAIRS:
                    rows = rng.choice(rows, size=MAX_PAIRS, replace=False)
                delta = np.mean([self.prior.training_delta(*k) for k in in_ctx], axis=0)
                blocks.append(self._pairs(view, latent, rows, pools[ctx], delta, self._covariate(zero, ctx), ctx, rng))
        source, target, cov = (np.concatenate(parts) for parts in zip(*blocks))
        groups = np.repeat(np.arange(len(blocks)), [len(b[0]) for b in blocks])
        return source, target, cov, groups

    def _pairs(self, view: SplitView, latent: LatentCells, targets: np.ndarray, pool: np.ndarray, delta: np.ndarray,
               cov: np.ndarray, context: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = max(len(targets), min(len(pool), MAX_PAIRS))
        if n > len(targets):
            targets = np.concatenate([targets, rng.choice(targets, size=n - len(targets), replace=True)])
        controls = rng.choice(pool, size=n, replace=len(pool) < n)
        z_ctrl = latent.get(controls)
        anchor = self.embedding.shifted(view.expression.get(controls), z_ctrl, delta) if np.any(delta) else z_ctrl
        z_pert = latent.get(targets)
        if self.config.pairing == "ot":
            z_pert = z_pert[self._ot_order(anchor, z_pert, rng)]
        origin = self.origin(context)
        return anchor - origin, z_pert - origin, np.repeat(cov[None, :], n, axis=0)

    def origin(self, context: str, latent_controls: np.ndarray | None = None) -> np.ndarray:
        """Where the predictor's coordinates start in a context: its mean control embedding with
        ``center`` (the controls given, for a context the model never saw), else 0."""
        if not self.config.center:
            return np.zeros(self.latent_dim, np.float32)
        mean = self.context_means.get(context)
        if mean is None:
            if latent_controls is None:
                raise InputError(f"context '{context}' is new to the model; give its control cells.")
            mean = latent_controls.mean(0)
        return np.asarray(mean, np.float32)

    @staticmethod
    def _ot_order(source: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Order of ``target`` paired with ``source`` by optimal transport (in blocks when large)."""
        order = np.arange(len(target))
        perm = rng.permutation(len(target))
        for start in range(0, len(target), OT_BLOCK):
            block = perm[start:start + OT_BLOCK]
            matched = ot_permutation(torch.from_numpy(source[block]), torch.from_numpy(target[block])).numpy()
            order[block] = block[matched]
        return order

    # ------------------------------------------------------------------ covariates
    def covariate(self, perturbation: str, context: str, latent_controls: np.ndarray | None = None) -> np.ndarray:
        """(c,) the descriptor of a perturbation, and the context's mean control embedding."""
        return self._covariate(self.descriptors.vector(self.components(perturbation)), context, latent_controls)

    def _covariate(self, descriptor: np.ndarray, context: str, latent_controls: np.ndarray | None = None) -> np.ndarray:
        if not self.config.context_summary:
            return descriptor
        summary = self.context_means.get(context)
        if summary is None:  # a context the model never saw: the controls it is given
            if latent_controls is None:
                raise InputError(f"context '{context}' is new to the model; give its control cells.")
            summary = latent_controls.mean(0)
        return np.concatenate([descriptor, summary]).astype(np.float32)

    def known_components(self, perturbation: str) -> list[str]:
        """Components the descriptor has a vector for (the others count as zeros)."""
        return [c for c in self.components(perturbation) if self.descriptors.knows(c)]

    def unread_components(self, perturbation: str) -> list[str]:
        return [c for c in self.components(perturbation) if not self.descriptors.knows(c)]

    # ------------------------------------------------------------------ prediction
    def own_cells(self, controls: np.ndarray, perturbation: str, context: str, shift: np.ndarray,
                  rng: np.random.Generator, settings: PredictConfig) -> np.ndarray:
        """Decoded cells of a perturbation from control cells and the prior's (G,) shift."""
        return self.predicted_cells(controls, perturbation, context, shift, rng, settings)[1]

    def predicted_cells(self, controls: np.ndarray, perturbation: str, context: str, shift: np.ndarray,
                        rng: np.random.Generator, settings: PredictConfig) -> tuple[np.ndarray, np.ndarray]:
        """(the predicted embeddings, their decoded cells) of a perturbation from control cells."""
        latent = self.embedding.encode(controls)
        start = self.embedding.shifted(controls, latent, shift) if np.any(shift) else latent
        predicted = self.predict_latent(controls, latent, perturbation, context, shift, rng, settings, start)
        return predicted, self.decode(predicted, controls, latent, shift, start)

    def predict_latent(self, controls: np.ndarray, latent: np.ndarray, perturbation: str, context: str,
                       delta: np.ndarray, rng: np.random.Generator,
                       settings: PredictConfig | None = None, anchor: np.ndarray | None = None) -> np.ndarray:
        """(n, k) predicted embeddings of a perturbation from control cells and their embeddings
        (``anchor``: their embeddings moved by the prior's shift ``delta``, where already computed)."""
        if anchor is None:
            anchor = self.embedding.shifted(controls, latent, delta) if np.any(delta) else latent
        cov = np.repeat(self.covariate(perturbation, context, latent)[None, :], len(latent), axis=0)
        origin = self.origin(context, latent)
        if isinstance(self.predictor, NetworkPredictor):
            generator = torch.Generator().manual_seed(int(rng.integers(2**31 - 1)))
            moved = self.predictor.predict(anchor - origin, cov, generator=generator,
                                           settings=settings or self.predict_config)
        else:
            moved = np.asarray(self.predictor.predict(anchor - origin, cov), dtype=np.float32)
        return moved + origin

    def decode(self, predicted: np.ndarray, controls: np.ndarray, latent: np.ndarray,
               shift: np.ndarray | None = None, start: np.ndarray | None = None) -> np.ndarray:
        """Expression of predicted embeddings with the frozen decoder (see ``decode`` in the config):
        ``controls`` the cells whose embeddings are ``latent``, ``shift`` the prior's (G,) shift and
        ``start`` the embeddings it moves them to (computed here when not given)."""
        cells = self.decoder.decode(predicted)
        if self.config.decode == "prior-residual" and shift is not None and np.any(shift):
            if start is None:
                start = self.embedding.shifted(controls, latent, shift)
            cells = controls + np.asarray(shift, np.float32)[None, :] + cells - self.decoder.decode(start)
        elif self.config.decode in ("residual", "prior-residual"):
            cells = controls + cells - self.decoder.decode(latent)
        return np.clip(cells, 0, None)

    # ------------------------------------------------------------------ scoring itself
    def latent_knn_purity(self, controls: np.ndarray, perturbation: str, context: str, real: np.ndarray,
                          rng: np.random.Generator | None = None, k: int = KNN_K,
                          delta: np.ndarray | None = None) -> float:
        """KNN purity in the model's own embedding (SPEC 2.5): the cells predicted from ``controls``
        among the embedded real perturbed cells ``real`` and the embedded ``controls``.

        Pass as many control as real cells (0.5 then means "cannot tell"); ``delta``: the prior's
        shift (default: the one used for prediction).
        """
        rng = rng or np.random.default_rng(0)
        latent = self.embedding.encode(controls)
        delta = self.prior.delta(perturbation, context) if delta is None else delta
        predicted = self.predict_latent(controls, latent, perturbation, context, delta, rng)
        return M.knn_purity(predicted, self.embedding.encode(real), latent, k)

    def validation_knn_purity(self, validation: ValidationSet) -> float:
        """Mean KNN purity in the embedding over the validation groups (the prior's shift left out)."""
        rng = np.random.default_rng(VALIDATION_SEED)
        return float(np.mean([
            self.latent_knn_purity(
                g.controls, g.perturbation, g.context,
                g.real[rng.choice(len(g.real), size=min(len(g.real), len(g.controls)), replace=False)],
                rng, delta=self.prior.held_out_delta(g.perturbation, g.context))
            for g in validation.groups]))

    # ------------------------------------------------------------------ persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.decoder is None or self.predictor is None:
            raise InputError("the model is not fitted yet: fit it before saving.")
        if not isinstance(self.predictor, NetworkPredictor):
            raise InputError(f"a predictor of your own ({type(self.predictor).__name__}) is not saved with the run; "
                             "save it yourself, or use model.predictor=mlp or flow.")
        out = {f"embedding.{k}": v for k, v in self.embedding.state_tensors().items()}
        out.update({f"decoder.{k}": v.detach().cpu() for k, v in self.decoder.state_dict().items()})
        out.update({f"predictor.{k}": v for k, v in self.predictor.state_tensors().items()})
        out.update(self.descriptors.state_tensors())
        means = np.stack([self.context_means[c] for c in sorted(self.context_means)])
        out["context_means"] = torch.from_numpy(means.astype(np.float32))
        return {**out, **super().state_tensors()}

    def extra_state(self) -> dict[str, Any]:
        return {
            **super().extra_state(),
            "embedding": self.embedding.extra_state(),
            "descriptors": self.descriptors.extra_state(),
            "descriptor_kind": self.descriptor_kind,
            "contexts": sorted(self.context_means),
            "trained_components": self.trained_components,
        }

    def load_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        super().load_state({k: v for k, v in tensors.items() if k.startswith(PRIOR_PREFIX)}, extra)  # prior and mode

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

        self.embedding = embedding_from_state(extra["embedding"], part("embedding."))
        self.decoder = LatentDecoder(self.embedding.dim, len(self.genes), self.config.decoder_hidden,
                                     self.config.decoder_layers)
        self.decoder.load_state_dict(part("decoder."))
        self.decoder.freeze()
        self.descriptors = DescriptorTable.from_state(extra["descriptors"], tensors)
        self.descriptor_kind = extra.get("descriptor_kind", self.config.descriptor)  # not saved before 'auto'
        self.context_means = dict(zip(extra["contexts"], tensors["context_means"].numpy()))
        self.trained_components = list(extra["trained_components"])
        self.predictor = self.build_predictor()
        self.predictor.load_state_tensors(part("predictor."))
