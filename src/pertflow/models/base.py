"""What every perturbation model is: a config, its genes, a vocabulary and a data spec; fit,
generate, save and load.

A model (baseline or network) is built from a :class:`~pertflow.data.view.SplitView`, fitted on
its training cells, and generates cells of a perturbation from control cells. A run folder
holds ``model.json`` (format version, name, the three config sections, genes, vocabulary, spec,
extra state) and ``model.safetensors``; no pickles. Defining a subclass with a ``name``
registers it (see :mod:`pertflow.models.registry`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pertflow.configs import build, to_dict
from pertflow.data.spec import DataSpec, split_components
from pertflow.data.view import SplitView
from pertflow.data.vocab import Vocabulary
from pertflow.errors import InputError
from pertflow.io import read_json, write_json
from pertflow.models import registry
from pertflow.models.config import PredictConfig
from pertflow.train.checkpoint import load_tensors, save_tensors
from pertflow.train.config import TrainConfig

RUN_FORMAT_VERSION = 2


class PerturbationModel:
    """Base of every model: config, genes, vocabulary, spec; fit, generate, save, load.

    Subclasses set ``name`` (the registry key) and ``config_class`` (a frozen dataclass, the
    ``model`` section) and implement :meth:`fit`, :meth:`generate`, and, when they hold tensors,
    :meth:`state_tensors`, :meth:`extra_state` and the one load hook :meth:`load_state`.

    Attributes
    ----------
    config
        The ``model`` section.
    predict_config
        The default ``predict`` section (saved with the run; a call of :meth:`generate` may
        pass other settings).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    default_predict_config: ClassVar[PredictConfig] = PredictConfig()
    #: whether the model tells a perturbation's doses apart (data with a dose column, whose
    #: conditions are ``drugA@1``); a model that does not refuses such data instead of reading
    #: ``drugA@1`` as a perturbation of its own or mixing its doses
    reads_dose: ClassVar[bool] = False
    #: Whether a perturbation never seen in training (a label absent from the training file's
    #: perturbations and genes) gets a prediction of its own kind (a flow's unknown-perturbation
    #: token, the mean response); False for a model that can only predict no change for it.
    predicts_unknown_labels: ClassVar[bool] = True

    def __init_subclass__(cls, variant: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name") and not variant:
            registry.register(cls)

    @classmethod
    def variant_for(cls, config: Mapping[str, Any]) -> type[PerturbationModel]:
        """The class that fits a ``model`` section (a mapping): this one, unless the model has
        variants that a config field selects (declared ``class X(..., variant=True)``)."""
        return cls

    def __init__(self, config: Any, genes: list[str], vocab: Vocabulary, spec: DataSpec,
                 predict_config: PredictConfig | None = None):
        if spec.dose_col is not None and not self.reads_dose:
            raise InputError(
                f"model '{self.name}' does not condition on dose, but the data has a dose column "
                f"('{spec.dose_col}'), so its conditions are perturbation@dose. Train cfm or a baseline, which read "
                "dose, or remove or rename the dose column in the data to model every dose of a perturbation alike."
            )
        self.config = config
        self.genes = list(genes)
        self.vocab = vocab
        self.spec = spec
        self.predict_config = predict_config or self.default_predict_config
        self.fit_report: dict[str, Any] = {}

    @classmethod
    def from_view(cls, view: SplitView, config: Any = None,
                  predict_config: PredictConfig | None = None) -> PerturbationModel:
        """A model on the genes and vocabulary of a split view (default config when None)."""
        config = config if config is not None else build(cls.config_class, {})
        return cls(config, view.genes, view.vocab, view.data.spec, predict_config)

    # ------------------------------------------------------------------ to implement
    def fit(self, view: SplitView, train_config: TrainConfig, run_dir: Path, resume: bool = False) -> None:
        """Fit on the training cells of ``view`` (validation cells for model selection only)."""
        raise NotImplementedError

    def generate(
        self,
        controls: np.ndarray,
        perturbation: str,
        context: str,
        rng: np.random.Generator,
        settings: PredictConfig | None = None,
    ) -> np.ndarray:
        """Cells of ``perturbation`` in ``context``, one per control cell given.

        Parameters
        ----------
        controls
            (n, G) log1p expression of control cells of the context, on :attr:`genes`.
        perturbation
            Canonical perturbation name (``A`` or ``A+B``).
        context
            Context label (as in :attr:`PerturbationData.contexts`).
        rng
            Generator for any randomness (noise seeds).
        settings
            Prediction settings; :attr:`predict_config` when None.

        Returns
        -------
        np.ndarray
            (n, G) non-negative log1p expression.
        """
        raise NotImplementedError

    def predict(self, controls: Any, conditions: str | list[str], *, context: str | None = None,
                n_cells: int | None = None, seed: int = 0, settings: PredictConfig | None = None) -> Any:
        """Cells of each condition from the control cells of an AnnData (log1p), no split file:
        ``model.predict(adata_controls, ["KLF1", "CEBPE+KLF1"])``. See
        :func:`pertflow.models.predict.predict_cells`."""
        from pertflow.models.predict import predict_cells

        return predict_cells(self, controls, conditions, context=context, n_cells=n_cells, seed=seed, settings=settings)

    def __repr__(self) -> str:
        steps = self.fit_report.get("steps")
        return (f"{type(self).__name__}('{self.name}': {len(self.genes)} genes"
                + (f", trained {steps} steps" if steps else "") + ")")

    def control_embedding(self, controls: torch.Tensor) -> torch.Tensor:
        """Per-gene embedding of control cells, as the model's encoder of control cells reads them
        (what the MMD domain adapter, :mod:`pertflow.adapt`, aligns across datasets).

        Parameters
        ----------
        controls
            (n, G) log1p expression of control cells on :attr:`genes` (never test cells), on the
            device the embedding should be computed on.

        Returns
        -------
        torch.Tensor
            (n, G, d): one d-vector per cell and gene (per-gene identity kept, so that a per-gene
            shift of ``controls`` is judged gene by gene), differentiable with respect to
            ``controls``; the model's weights stay frozen (no gradient reaches them).
        """
        raise InputError(
            f"model '{self.name}' exposes no control embedding, so it cannot be adapted to new data. "
            "Adapt a gene-space flow model (e.g. cfm), or predict without an adapter."
        )

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def trained_with_dose(cls, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether a saved run of this model whose spec names a dose column was trained on
        conditions (perturbation@dose); False for a run of a pertflow that did not model doses."""
        return cls.reads_dose

    def extra_state(self) -> dict[str, Any]:
        """JSON-ready state besides tensors (e.g. the keys of a table of deltas)."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        """Restore what :meth:`state_tensors` and :meth:`extra_state` saved (the one load hook: a
        subclass takes its own part of both and hands the rest to its parent)."""
        if tensors:
            raise InputError(f"model '{self.name}' holds no tensors but the run folder has {len(tensors)}.")

    # ------------------------------------------------------------------ helpers
    def components(self, perturbation: str) -> tuple[str, ...]:
        return split_components(perturbation, self.spec)

    def unread_components(self, perturbation: str) -> list[str]:
        """The components of ``perturbation`` the model knows nothing of: in no training
        perturbation, without a descriptor vector, not a gene it learnt through expression. It
        predicts them as "some perturbation" (what its ``<unk>`` token or zero descriptor learnt),
        which a prediction file says per perturbation (``uns["pertflow_unread"]``). None by
        default: a model that reads no component's identity (a baseline) has none to miss."""
        return []

    # ------------------------------------------------------------------ persistence
    def describe(self) -> dict[str, Any]:
        """What a run folder and every checkpoint record about the model (JSON-ready)."""
        return {
            "format_version": RUN_FORMAT_VERSION,
            "model": self.name,
            "config": to_dict(self.config),
            "predict_config": to_dict(self.predict_config),
            "genes": self.genes,
            "vocab": self.vocab.to_dict(),
            "spec": self.spec.to_dict(),
        }

    def save(self, run_dir: str | Path) -> None:
        """Write ``model.json`` and ``model.safetensors`` into ``run_dir`` (atomically)."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_tensors(run_dir / "model.safetensors", self.state_tensors())
        write_json(run_dir / "model.json",
                   {**self.describe(), "extra_state": self.extra_state(), "fit_report": self.fit_report})

    @staticmethod
    def load(run_dir: str | Path) -> PerturbationModel:
        """Load any model from a run folder written by :meth:`save`."""
        run_dir = Path(run_dir)
        if not (run_dir / "model.json").is_file():
            raise InputError(
                f"{run_dir} holds no trained model (model.json is missing). Train one with `pertflow train`, "
                "or resume an interrupted run with `pertflow train --resume`."
            )
        meta = read_json(run_dir / "model.json")
        version = meta.get("format_version", 0)
        if version > RUN_FORMAT_VERSION:
            raise InputError(f"{run_dir} was written by a newer pertflow; upgrade pertflow to load it.")
        if version < RUN_FORMAT_VERSION:
            raise InputError(
                f"{run_dir} was written by an older pertflow (run format {version}, this one reads "
                f"{RUN_FORMAT_VERSION}); train the model again."
            )
        cls = registry.model_class(meta["model"], meta["config"])
        spec = DataSpec.from_dict(meta["spec"])
        tensors = load_tensors(run_dir / "model.safetensors")
        if spec.dose_col is not None and not cls.trained_with_dose(tensors):
            # pertflow recorded a dose column (any column named dose) before it modelled doses:
            # such a run was trained on plain perturbations
            spec = spec.replace(dose_col=None)
        model = cls(
            build(cls.config_class, meta["config"], "model"),
            meta["genes"],
            Vocabulary.from_dict(meta["vocab"]),
            spec,
            build(PredictConfig, meta["predict_config"], "predict"),
        )
        model.load_state(tensors, meta.get("extra_state", {}))
        model.fit_report = meta.get("fit_report", {})
        return model
