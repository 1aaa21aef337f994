"""Every architecture option of the scGPT family, in one frozen dataclass.

The public scGPT checkpoints describe their architecture in ``args.json``, the argparse namespace of
the script that trained them (``examples/pretrain.py`` in bowang-lab/scGPT writes ``vars(args)``).
:meth:`ScGPTConfig.from_scgpt_args` maps those keys onto our fields; :meth:`ScGPTConfig.to_scgpt_args`
writes them back, plus the full config under ``"pertflow_config"`` so a round trip loses nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pertflow.errors import InputError
from pertflow.foundation.scgpt.tokens import CLS, PAD, SPECIAL_TOKENS

INPUT_EMB_STYLES = ("continuous", "category", "scaling")
CELL_EMB_STYLES = ("cls", "avg-pool", "w-pool")
MVC_DECODER_STYLES = ("inner product", "inner product, detach", "concat query", "sum query")
# scGPT accepts True/"dsbn" (one BatchNorm per batch label, no affine), "do_affine" (the same with
# affine parameters) and "batchnorm" (one shared BatchNorm1d named ``bn``).
DSBN_CHOICES = (False, True, "dsbn", "do_affine", "batchnorm")
GENERATOR_DECODERS = ("affine", "expr")


# args.json key -> ScGPTConfig field. Several spellings exist because scGPT's pretraining script,
# its fine-tuning tutorials and its hyper-parameter dicts each name the same setting differently.
_ARGS_KEY_TO_FIELD: dict[str, str] = {
    "embsize": "d_model",
    "d_model": "d_model",
    "layer_size": "d_model",
    "nheads": "nhead",
    "nhead": "nhead",
    "d_hid": "d_hid",
    "nlayers": "nlayers",
    "n_layers_cls": "nlayers_cls",
    "nlayers_cls": "nlayers_cls",
    "n_cls": "n_cls",
    "dropout": "dropout",
    "pad_token": "pad_token",
    "pad_value": "pad_value",
    "mask_value": "mask_value",
    "input_emb_style": "input_emb_style",
    "n_input_bins": "n_input_bins",
    "cell_emb_style": "cell_emb_style",
    "mvc_decoder_style": "mvc_decoder_style",
    "ecs_thres": "ecs_threshold",
    "ecs_threshold": "ecs_threshold",
    "explicit_zero_prob": "explicit_zero_prob",
    "fast_transformer": "use_fast_transformer",
    "use_fast_transformer": "use_fast_transformer",
    "fast_transformer_backend": "fast_transformer_backend",
    "pre_norm": "pre_norm",
    "max_seq_len": "max_seq_len",
    "DSBN": "domain_spec_batchnorm",
    "domain_spec_batchnorm": "domain_spec_batchnorm",
    "MVC": "do_mvc",
    "GEPC": "do_mvc",
    "do_mvc": "do_mvc",
    "DAB": "do_dab",
    "do_dab": "do_dab",
    "INPUT_BATCH_LABELS": "use_batch_labels",
    "use_batch_labels": "use_batch_labels",
    "num_batch_labels": "num_batch_labels",
    "num_batch_types": "num_batch_labels",
    "USE_GENERATIVE_TRAINING": "use_generative_training",
    "use_generative_training": "use_generative_training",
    "pert_pad_id": "pert_pad_id",
    "use_mod": "use_mod",
    "ntokens_mod": "ntokens_mod",
}

_BOOL_FIELDS = {
    "do_mvc",
    "do_dab",
    "use_batch_labels",
    "explicit_zero_prob",
    "use_fast_transformer",
    "pre_norm",
    "use_generative_training",
    "decoder_adaptive_bias",
    "generator_batchnorm",
    "use_mod",
}


def _as_bool(value: Any, key: str) -> bool:
    # argparse's ``type=bool`` stores strings in some scGPT runs ("True"/"False"); bool("False") is True.
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise InputError(f"args.json key {key!r} should be a boolean, got {value!r}. Fix the value in args.json.")


@dataclass(frozen=True)
class ScGPTConfig:
    """Architecture of a scGPT-compatible model (TransformerModel, TransformerGenerator, MultiOmic).

    Attributes
    ----------
    ntoken
        Gene vocabulary size, including the special tokens (whole-human model: 60697). 0 in a
        config written before the vocabulary is known (a ``model`` section of a run); the
        network is built from :meth:`architecture` with the vocabulary's size.
    pad_token_id
        Id of ``<pad>`` in the vocabulary; the gene embedding's ``padding_idx``.
    cls_token_id
        Id of ``<cls>``, prepended to every cell when embedding cells (``None`` if unknown).
    d_model, nhead, d_hid, nlayers
        Width, attention heads, feed-forward width, encoder layers (whole-human: 512, 8, 512, 12).
    nlayers_cls, n_cls
        Depth (including the output layer) and classes of the cell-type head; the head exists only
        when ``n_cls > 1``.
    dropout
        Dropout everywhere (attention weights, residual branches, value encoder).
    pad_token, pad_value, mask_value
        Padding token; expression value used for padding (and, as in scGPT's pretraining, for the
        ``<cls>`` position); value that marks masked positions for MLM (whole-human: -2 and -1).
    do_mvc, mvc_decoder_style
        Build the masked-value-from-cell-embedding head (``mvc_decoder``) and its style.
    do_dab
        Build the adversarial batch discriminator (``grad_reverse_discriminator``).
    use_batch_labels, num_batch_labels
        Concatenate a batch-label embedding to the decoder inputs (``batch_encoder``).
    domain_spec_batchnorm
        False, True/"dsbn", "do_affine" (domain-specific BatchNorm, ``dsbn.bns.N``) or "batchnorm"
        (one BatchNorm1d, ``bn``) on the summed input embeddings.
    input_emb_style, n_input_bins
        ``continuous`` (MLP on the value), ``category`` (embedding of the bin; needs ``n_input_bins``,
        scGPT uses ``n_bins + 2``) or ``scaling`` (gene embedding times the value).
    cell_emb_style
        ``cls`` (the ``<cls>`` position), ``avg-pool`` (mean over non-padding positions) or
        ``w-pool`` (value-weighted sum, L2-normalised).
    ecs_threshold
        Cosine threshold of the elastic cell similarity objective.
    explicit_zero_prob
        Decoders also predict, per gene, the probability that the value is non-zero (scGPT calls
        this ``zero_probs``; see :mod:`pertflow.foundation.scgpt.losses`).
    use_fast_transformer, fast_transformer_backend
        Recorded for checkpoint compatibility: scGPT used flash-attn when true. Here attention always
        runs through ``torch.nn.functional.scaled_dot_product_attention`` (which picks a fused kernel
        by itself); the flag only chooses the default export layout. The ``linear`` backend
        (fast_transformers) has other parameters and is not supported.
    pre_norm
        scGPT's pre-norm scheme (see :class:`~pertflow.foundation.scgpt.layers.ScGPTEncoderLayer`);
        post-norm otherwise (all public checkpoints are post-norm).
    use_generative_training
        Keep scGPT's ``flag_encoder`` (Embedding(2, d)), created by its generative pretraining
        (``training_tasks`` "gen"/"both"). The generative forward is not implemented; the table is
        carried so that checkpoints round-trip exactly.
    max_seq_len
        Longest token sequence fed to the encoder, ``<cls>`` included (whole-human: 1200).
    cce_temperature
        Temperature of the contrastive cell-embedding objective (scGPT: 0.5).
    pert_pad_id, n_pert_flags
        TransformerGenerator's perturbation-flag embedding: ``n_pert_flags`` rows, row
        ``pert_pad_id`` is padding. scGPT: 3 rows, 0 = not perturbed, 1 = perturbed, 2 = padding.
        For separate up/down flags use ``n_pert_flags=4, pert_pad_id=3`` (0 none, 1 up, 2 down).
    generator_decoder, decoder_activation, decoder_adaptive_bias, generator_batchnorm
        TransformerGenerator's head: ``affine`` (``A * x + b``, two ExprDecoders) or ``expr``; an
        optional ``torch.nn`` activation name applied to A and b; scaling b by each cell's mean
        non-zero input; a BatchNorm1d (``bn``) on the input embeddings as in one scGPT version.
    use_mod, ntokens_mod, mod_pad_id
        MultiOmicTransformerModel: modality-type embedding (``mod_encoder``) of ``ntokens_mod`` types.
    """

    ntoken: int = 0
    pad_token_id: int = 0
    cls_token_id: int | None = None
    d_model: int = 512
    nhead: int = 8
    d_hid: int = 512
    nlayers: int = 12
    nlayers_cls: int = 3
    n_cls: int = 1
    dropout: float = 0.2
    pad_token: str = PAD
    pad_value: float = -2.0
    mask_value: float = -1.0
    do_mvc: bool = False
    do_dab: bool = False
    use_batch_labels: bool = False
    num_batch_labels: int | None = None
    domain_spec_batchnorm: bool | str = False
    input_emb_style: str = "continuous"
    n_input_bins: int | None = None
    cell_emb_style: str = "cls"
    mvc_decoder_style: str = "inner product"
    ecs_threshold: float = 0.3
    explicit_zero_prob: bool = False
    use_fast_transformer: bool = True
    fast_transformer_backend: str = "flash"
    pre_norm: bool = False
    use_generative_training: bool = False
    max_seq_len: int = 1200
    cce_temperature: float = 0.5
    pert_pad_id: int = 2
    n_pert_flags: int = 3
    generator_decoder: str = "affine"
    decoder_activation: str | None = None
    decoder_adaptive_bias: bool = False
    generator_batchnorm: bool = False
    use_mod: bool = False
    ntokens_mod: int | None = None
    mod_pad_id: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise InputError("Invalid scGPT config: " + "; ".join(problems) + ".")

    def _problems(self) -> list[str]:
        p: list[str] = []
        for name in ("d_model", "nhead", "d_hid", "nlayers", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                p.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.ntoken < 0:
            p.append(f"ntoken must be positive (or 0 until the vocabulary is known), got {self.ntoken}")
        if self.nhead > 0 and self.d_model % self.nhead:
            p.append(f"d_model ({self.d_model}) must be divisible by nhead ({self.nhead})")
        if self.ntoken and not 0 <= self.pad_token_id < self.ntoken:
            p.append(f"pad_token_id {self.pad_token_id} outside the vocabulary [0, {self.ntoken})")
        if self.ntoken and self.cls_token_id is not None and not 0 <= self.cls_token_id < self.ntoken:
            p.append(f"cls_token_id {self.cls_token_id} outside the vocabulary [0, {self.ntoken})")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.nlayers_cls < 1:
            p.append(f"nlayers_cls must be >= 1, got {self.nlayers_cls}")
        if self.input_emb_style not in INPUT_EMB_STYLES:
            p.append(f"input_emb_style must be one of {INPUT_EMB_STYLES}, got {self.input_emb_style!r}")
        if self.input_emb_style == "category" and not (self.n_input_bins and self.n_input_bins > 0):
            p.append("input_emb_style 'category' needs n_input_bins > 0 (scGPT uses n_bins + 2)")
        if self.cell_emb_style not in CELL_EMB_STYLES:
            p.append(f"cell_emb_style must be one of {CELL_EMB_STYLES}, got {self.cell_emb_style!r}")
        if self.mvc_decoder_style not in MVC_DECODER_STYLES:
            p.append(f"mvc_decoder_style must be one of {MVC_DECODER_STYLES}, got {self.mvc_decoder_style!r}")
        if self.do_mvc and self.explicit_zero_prob and not self.mvc_decoder_style.startswith("inner product"):
            p.append("explicit_zero_prob with do_mvc needs an 'inner product' mvc_decoder_style "
                     "(scGPT has no zero head for the query styles)")
        if self.do_mvc and self.mvc_decoder_style == "sum query" and (self.use_batch_labels or self.use_mod):
            p.append("mvc_decoder_style 'sum query' cannot take the concatenated batch/modality "
                     "embedding; use 'inner product' or 'concat query'")
        if self.domain_spec_batchnorm not in DSBN_CHOICES:
            p.append(f"domain_spec_batchnorm must be one of {DSBN_CHOICES}, got {self.domain_spec_batchnorm!r}")
        needs_labels = self.use_batch_labels or self.do_dab or self.uses_dsbn
        if needs_labels and not (self.num_batch_labels and self.num_batch_labels > 0):
            p.append("use_batch_labels, do_dab and domain-specific batch norm need num_batch_labels > 0")
        if self.fast_transformer_backend != "flash":
            p.append(f"fast_transformer_backend {self.fast_transformer_backend!r} is not supported "
                     "(only the flash-attention parameter layout is); retrain or convert the checkpoint")
        if not 0 <= self.pert_pad_id < self.n_pert_flags:
            p.append(f"pert_pad_id {self.pert_pad_id} must index one of n_pert_flags={self.n_pert_flags} rows")
        if self.generator_decoder not in GENERATOR_DECODERS:
            p.append(f"generator_decoder must be one of {GENERATOR_DECODERS}, got {self.generator_decoder!r}")
        if self.use_mod and not (self.ntokens_mod and self.ntokens_mod > 0):
            p.append("use_mod needs ntokens_mod > 0")
        if self.cce_temperature <= 0:
            p.append(f"cce_temperature must be positive, got {self.cce_temperature}")
        return p

    # ------------------------------------------------------------------ derived settings
    @property
    def norm_scheme(self) -> str:
        """``"pre"`` or ``"post"``, scGPT's name for :attr:`pre_norm`."""
        return "pre" if self.pre_norm else "post"

    @property
    def uses_dsbn(self) -> bool:
        """Whether a domain-specific batch norm (one BatchNorm per batch label) is built."""
        return self.domain_spec_batchnorm in (True, "dsbn", "do_affine")

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``d_model // nhead``."""
        return self.d_model // self.nhead

    # ------------------------------------------------------------------ construction
    def architecture(self, **overrides: Any) -> ScGPTConfig:
        """This config's scGPT fields as a plain :class:`ScGPTConfig`, with ``overrides``.

        A run's ``model`` section (the generator's, the pretraining's) is an ScGPTConfig plus
        training settings of its own; the network is built from this, with the vocabulary's
        size and token ids filled in.
        """
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ScGPTConfig)}
        values.update(overrides)
        config = ScGPTConfig(**values)
        if config.ntoken < 1:
            raise InputError("the scGPT network needs ntoken > 0: build it with the vocabulary's size.")
        return config

    def replace(self, **overrides: Any) -> ScGPTConfig:
        """Return a copy with some fields changed; an unknown field fails and lists the valid ones."""
        check_fields(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict (``extra`` left out)."""
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScGPTConfig:
        """Inverse of :meth:`to_dict`; an unknown key fails and lists the valid ones."""
        data = dict(data)
        check_fields(data)
        return cls(**data)

    @classmethod
    def from_scgpt_args(
        cls, args: Mapping[str, Any], vocab: Mapping[str, int], **overrides: Any
    ) -> ScGPTConfig:
        """Build a config from a public scGPT ``args.json`` and its ``vocab.json``.

        Parameters
        ----------
        args
            The parsed ``args.json``. Keys that describe training rather than architecture (lr,
            batch_size, data paths, ...) are kept in :attr:`extra` and otherwise ignored. A
            ``"pertflow_config"`` entry (written by our export) is used as is.
        vocab
            Token -> id, special tokens included (see :func:`with_special_tokens`).
        **overrides
            Fields to set explicitly; they win over ``args``.

        Returns
        -------
        ScGPTConfig
        """
        check_fields(overrides)
        if "pertflow_config" in args:
            values = dict(args["pertflow_config"])
            check_fields(values)
        else:
            values = fields_from_scgpt_args(args)
        pad_token = str(overrides.get("pad_token", values.get("pad_token", PAD)))
        if pad_token not in vocab:
            raise InputError(
                f"The vocabulary has no padding token {pad_token!r}. Add it to vocab.json or set "
                "pad_token to the token the model was trained with."
            )
        values.setdefault("ntoken", max(vocab.values()) + 1)
        values["pad_token_id"] = int(vocab[pad_token])
        if CLS in vocab:
            values.setdefault("cls_token_id", int(vocab[CLS]))
        values.update(overrides)
        extra = {k: v for k, v in args.items() if k not in _ARGS_KEY_TO_FIELD and k != "pertflow_config"}
        return cls(**values, extra=extra)

    def to_scgpt_args(self) -> dict[str, Any]:
        """The ``args.json`` content scGPT's own loaders read, plus our full config.

        Returns
        -------
        dict
            scGPT keys (``embsize``, ``nheads``, ``d_hid``, ``nlayers``, ``n_layers_cls``, ``dropout``,
            ``pad_token``, ``pad_value``, ``mask_value``, ``input_emb_style``, ``n_bins``,
            ``fast_transformer``, ``pre_norm``, ``max_seq_len``, ...) and ``"pertflow_config"``.
        """
        args: dict[str, Any] = dict(self.extra)
        n_bins = self.n_input_bins
        if self.input_emb_style == "category" and n_bins is not None:
            n_bins = n_bins - 2  # scGPT stores n_bins and derives n_input_bins = n_bins + 2
        args.update(
            embsize=self.d_model,
            nheads=self.nhead,
            d_hid=self.d_hid,
            nlayers=self.nlayers,
            n_layers_cls=self.nlayers_cls,
            dropout=self.dropout,
            pad_token=self.pad_token,
            pad_value=self.pad_value,
            mask_value=self.mask_value,
            input_emb_style=self.input_emb_style,
            fast_transformer=self.use_fast_transformer,
            pre_norm=self.pre_norm,
            max_seq_len=self.max_seq_len,
            MVC=self.do_mvc,
            USE_GENERATIVE_TRAINING=self.use_generative_training,
        )
        if n_bins is not None:
            args["n_bins"] = n_bins
        args["pertflow_config"] = self.to_dict()
        return args


def check_fields(values: Mapping[str, Any]) -> None:
    """Raise an :class:`InputError` naming any key that is not a :class:`ScGPTConfig` field."""
    valid = {f.name for f in dataclasses.fields(ScGPTConfig)} - {"extra"}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise InputError(
            f"Unknown scGPT config option(s) {unknown}. Valid options: {', '.join(sorted(valid))}."
        )


def fields_from_scgpt_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`ScGPTConfig` fields that a scGPT ``args.json`` sets (unvalidated).

    Parameters
    ----------
    args
        Parsed ``args.json``.

    Returns
    -------
    dict[str, Any]
        Field -> value, for the keys present (see ``_ARGS_KEY_TO_FIELD`` for the spellings).
    """
    values: dict[str, Any] = {}
    for key, name in _ARGS_KEY_TO_FIELD.items():
        if key not in args or args[key] is None:
            continue
        value = args[key]
        if name in _BOOL_FIELDS:
            value = _as_bool(value, key)
        values[name] = value
    # Keep scGPT's bool-or-string DSBN setting, but read "True"/"False" strings as bools.
    dsbn = values.get("domain_spec_batchnorm")
    if isinstance(dsbn, str) and dsbn.strip().lower() in ("true", "false"):
        values["domain_spec_batchnorm"] = dsbn.strip().lower() == "true"
    # scGPT's pretraining derives the bin count from n_bins: category style adds a pad and a mask bin.
    if "n_input_bins" not in values and args.get("n_bins") is not None:
        n_bins = int(args["n_bins"])
        values["n_input_bins"] = n_bins + 2 if values.get("input_emb_style") == "category" else n_bins
    # Generative pretraining ("gen" or "both") is what created the flag_encoder table.
    if "use_generative_training" not in values and args.get("training_tasks") in ("gen", "both"):
        values["use_generative_training"] = True
    return values


def with_special_tokens(vocab: Mapping[str, int]) -> dict[str, int]:
    """Return the vocabulary with ``<pad>``, ``<cls>``, ``<eoc>`` appended where missing.

    scGPT's loaders do the same (``GeneVocab.append_token``): a missing special token gets the next
    free id, in the order ``<pad>``, ``<cls>``, ``<eoc>``.

    Parameters
    ----------
    vocab
        Token -> id.

    Returns
    -------
    dict[str, int]
    """
    out = {str(k): int(v) for k, v in vocab.items()}
    for token in SPECIAL_TOKENS:
        if token not in out:
            out[token] = (max(out.values()) + 1) if out else 0
    return out
