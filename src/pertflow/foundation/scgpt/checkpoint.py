"""Read and write the public scGPT checkpoint folders (``args.json``, ``vocab.json``, ``best_model.pt``).

The public layout
-----------------
A released scGPT model (e.g. the whole-human model, ``scGPT_human``) is a folder with

* ``args.json``  -- the pretraining script's argparse namespace (``embsize``, ``nheads``, ``d_hid``,
  ``nlayers``, ``n_layers_cls``, ``dropout``, ``pad_token``, ``pad_value``, ``mask_value``,
  ``n_bins``, ``input_emb_style``, ``fast_transformer``, ``max_seq_len``, ``training_tasks``, ...);
* ``vocab.json`` -- token -> id, special tokens ``<pad>``, ``<cls>``, ``<eoc>`` included (scGPT's
  loaders append any that are missing, in that order);
* ``best_model.pt`` -- a ``state_dict`` saved with ``torch.save`` (plain tensors, so it opens with
  ``torch.load(..., weights_only=True)``).

The parameter names and how they map onto ours: :mod:`pertflow.foundation.scgpt.state_layout`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pertflow.errors import InputError
from pertflow.io import atomic_path, read_json, write_json
from pertflow.foundation.scgpt.config import (
    ScGPTConfig,
    check_fields,
    fields_from_scgpt_args,
    with_special_tokens,
)
from pertflow.foundation.scgpt.generation_model import TransformerGenerator
from pertflow.foundation.scgpt.state_layout import (
    HEAD_PREFIXES,
    LAYOUTS,
    from_public_state_dict,
    infer_architecture,
    prefix_of,
    to_public_state_dict,
)
from pertflow.foundation.scgpt.transformer import MultiOmicTransformerModel, TransformerModel

ARGS_FILE = "args.json"
VOCAB_FILE = "vocab.json"
TORCH_WEIGHTS_FILE = "best_model.pt"
SAFETENSORS_WEIGHTS_FILE = "best_model.safetensors"


# ============================================================================ key conversion


# ============================================================================ files


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.pt``/``.pth`` (no arbitrary unpickling) or ``.safetensors``.

    Parameters
    ----------
    path
        File path. ``.pt`` files are opened with ``torch.load(map_location="cpu",
        weights_only=True)``, which refuses anything but tensors and plain containers. A wrapper
        dict with ``model_state_dict`` or ``state_dict`` is unwrapped.

    Returns
    -------
    dict[str, Tensor]
        On CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file. Check the path.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError depending on version
        raise InputError(
            f"{path} could not be read as a tensor-only checkpoint ({err}). Only plain state dicts are "
            "accepted (no pickled objects); re-save it with torch.save(model.state_dict(), path) or "
            "as .safetensors."
        ) from err
    if isinstance(obj, Mapping):
        for wrapper in ("model_state_dict", "state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise InputError(f"{path} does not hold a state dict of tensors.")
    return dict(obj)


def _find_weights(folder: Path) -> Path:
    for name in (SAFETENSORS_WEIGHTS_FILE, TORCH_WEIGHTS_FILE):
        if (folder / name).is_file():
            return folder / name
    raise InputError(
        f"{folder} has no model weights: expected {TORCH_WEIGHTS_FILE} (or {SAFETENSORS_WEIGHTS_FILE}). "
        "Point to a scGPT model folder holding args.json, vocab.json and best_model.pt, as downloaded "
        "from the scGPT model zoo."
    )


def _read_required_json(folder: Path, name: str, what: str) -> Any:
    path = folder / name
    if not path.is_file():
        raise InputError(
            f"{path}: missing {what}. A scGPT model folder holds args.json, vocab.json and "
            "best_model.pt; download the complete folder (or export one with export_pretrained)."
        )
    return read_json(path)


def read_vocab(path: str | Path) -> dict[str, int]:
    """Read ``vocab.json`` (token -> id) and append missing special tokens as scGPT does."""
    data = read_json(path)
    if not isinstance(data, Mapping) or not all(isinstance(v, int) for v in data.values()):
        raise InputError(f"{path} should map tokens to integer ids.")
    vocab = with_special_tokens(data)
    if len(set(vocab.values())) != len(vocab):
        raise InputError(f"{path} maps several tokens to the same id. Fix the vocabulary file.")
    return vocab


# ============================================================================ head inference


# ============================================================================ load / export


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did beyond a one-to-one copy.

    Attributes
    ----------
    layout
        Layout found in the file: ``"flash"`` (``Wqkv``) or ``"torch"`` (``in_proj_*``).
    weights_file
        The file the tensors came from.
    dropped
        Checkpoint keys not loaded (heads switched off, or a 1-class ``cls_decoder``).
    initialized
        Model keys initialised fresh (new heads, with ``allow_missing_heads``; keys outside
        ``prefixes``).
    notes
        Human-readable remarks (appended special tokens, args.json values the tensors overrode).
    """

    layout: str
    weights_file: str
    dropped: list[str] = field(default_factory=list)
    initialized: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class PretrainedScGPT:
    """A loaded public scGPT model.

    Attributes
    ----------
    model
        TransformerModel (or the requested kind), on the requested device, in eval mode.
    vocab
        Token -> id, special tokens included.
    config
        The architecture actually built.
    report
        What the loader renamed, dropped or initialised.
    args
        The raw ``args.json``.
    """

    model: nn.Module
    vocab: dict[str, int]
    config: ScGPTConfig
    report: LoadReport
    args: dict[str, Any] = field(default_factory=dict)


_SIZE_FIELDS = ("ntoken", "d_model", "nlayers", "d_hid")


def _format_keys(keys: Sequence[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_pretrained(
    folder: str | Path,
    device: str | torch.device = "cpu",
    *,
    kind: str = "transformer",
    prefixes: Sequence[str] | None = None,
    allow_missing_heads: bool = False,
    **overrides: Any,
) -> PretrainedScGPT:
    """Load a public scGPT model folder into our modules.

    Parameters
    ----------
    folder
        Folder with ``args.json``, ``vocab.json`` and ``best_model.pt`` (or ``best_model.safetensors``).
    device
        Where to put the model.
    kind
        ``"transformer"`` (TransformerModel), ``"generator"`` or ``"multiomic"``.
    prefixes
        Load only these top-level modules (e.g. ``("encoder", "value_encoder",
        "transformer_encoder")``, scGPT's recipe for starting a TransformerGenerator from a
        foundation model); every other model parameter is initialised fresh and reported.
    allow_missing_heads
        Initialise optional heads that the file lacks, or holds with other shapes, instead of failing.
    **overrides
        Config fields to change (validated; an unknown name fails and lists the valid ones), e.g.
        ``n_cls=12`` for a new classifier, ``dropout=0.0``, ``do_mvc=False`` to drop a head.

    Returns
    -------
    PretrainedScGPT
        ``model`` in eval mode, ``vocab``, ``config``, ``report``, ``args``.

    Raises
    ------
    InputError
        A missing file (naming it and the fix), sizes in ``args.json`` that contradict the tensors,
        or keys that do not match (listed).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder. Pass the scGPT model folder (args.json, vocab.json, "
                         "best_model.pt).")
    check_fields(overrides)
    args = _read_required_json(folder, ARGS_FILE, "the model's hyper-parameters (args.json)")
    if not isinstance(args, Mapping):
        raise InputError(f"{folder / ARGS_FILE} should hold a JSON object.")
    raw_vocab = _read_required_json(folder, VOCAB_FILE, "the gene vocabulary (vocab.json)")
    vocab = read_vocab(folder / VOCAB_FILE)
    weights_path = _find_weights(folder)
    public = load_state_dict_file(weights_path)
    state, layout = from_public_state_dict(public)
    report = LoadReport(layout=layout, weights_file=str(weights_path))
    appended = sorted(set(vocab) - set(raw_vocab))
    if appended:
        report.notes.append(f"appended special tokens {appended} to the vocabulary, as scGPT does")

    if prefixes is not None:
        wanted = tuple(prefixes)
        ignored = [k for k in state if not any(k == p or k.startswith(p + ".") for p in wanted)]
        report.dropped.extend(ignored)
        state = {k: v for k, v in state.items() if k not in set(ignored)}

    # What args.json says (without validating yet: the tensors may complete it, e.g. a batch count).
    defaults = {f.name: f.default for f in dataclasses.fields(ScGPTConfig)}
    said = dict(args["pertflow_config"]) if "pertflow_config" in args else fields_from_scgpt_args(args)
    inferred = infer_architecture(state)
    # Sizes come from args.json but must agree with the tensors.
    mismatched = [
        f"{name}: args.json says {said[name]}, {weights_path.name} has {inferred[name]}"
        for name in _SIZE_FIELDS
        if name in inferred and name in said and name != "ntoken" and said[name] != inferred[name]
    ]
    if mismatched:
        raise InputError("The checkpoint contradicts its args.json: " + "; ".join(mismatched) +
                         ". Use the args.json that belongs to these weights.")
    values = dict(inferred)
    if "ntoken" in values and max(vocab.values()) >= values["ntoken"]:
        raise InputError(
            f"vocab.json has ids up to {max(vocab.values())} but the gene embedding has only "
            f"{values['ntoken']} rows. Use the vocab.json that belongs to these weights."
        )
    # A 1-class classifier is what old scGPT versions built unconditionally: drop it.
    if values.get("n_cls") == 1:
        one_class = [k for k in state if k.startswith("cls_decoder.")]
        report.dropped.extend(one_class)
        state = {k: v for k, v in state.items() if not k.startswith("cls_decoder.")}
        values.pop("n_cls")
        values.pop("nlayers_cls", None)
        report.notes.append("dropped a 1-class cls_decoder (scGPT built it even without a classifier)")
    if prefixes is not None:
        # Keep args.json's view of heads that were not loaded; only what is loaded must match.
        values = {k: v for k, v in values.items() if k in _SIZE_FIELDS or k in ("input_emb_style", "n_input_bins")}
    for name, value in values.items():
        before = said.get(name, defaults.get(name))
        if name not in _SIZE_FIELDS and before != value:
            report.notes.append(f"{name}={value!r} read from the tensors (args.json: {before!r})")
    config = ScGPTConfig.from_scgpt_args(args, vocab, **{**values, **overrides})

    model = build_model(config, kind)
    own = model.state_dict()
    overridden_heads = {p for p, fields_ in HEAD_PREFIXES.items() if any(f in overrides for f in fields_)}

    unexpected = [k for k in state if k not in own]
    droppable = [k for k in unexpected if prefix_of(k) in overridden_heads]
    errors: list[str] = []
    hard_unexpected = sorted(set(unexpected) - set(droppable))
    if hard_unexpected:
        errors.append(f"unexpected keys (in the file, not in the model): {_format_keys(hard_unexpected)}")
    report.dropped.extend(droppable)

    missing = [k for k in own if k not in state]
    mismatched_shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    fresh: list[str] = []
    for key in missing + mismatched_shapes:
        outside_prefixes = prefixes is not None and not any(
            key == p or key.startswith(p + ".") for p in prefixes
        )
        if outside_prefixes or (allow_missing_heads and prefix_of(key) is not None):
            fresh.append(key)
    hard_missing = sorted(set(missing) - set(fresh))
    hard_shapes = sorted(set(mismatched_shapes) - set(fresh))
    if hard_missing:
        errors.append(f"missing keys (in the model, not in the file): {_format_keys(hard_missing)}")
    if hard_shapes:
        errors.append("shape mismatches: " + ", ".join(
            f"{k} file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in hard_shapes[:20]))
    if errors:
        hint = (" Optional heads can be initialised fresh with allow_missing_heads=True, or switched off "
                "with an override (e.g. do_mvc=False).")
        raise InputError(f"{weights_path} does not match the {kind} model built from {folder / ARGS_FILE}: "
                         + "; ".join(errors) + "." + hint)

    to_load = {k: v for k, v in state.items() if k in own and k not in set(fresh)}
    own.update(to_load)
    model.load_state_dict(own, strict=True)
    report.initialized.extend(sorted(fresh))
    model.to(device)
    model.eval()
    return PretrainedScGPT(model=model, vocab=vocab, config=config, report=report, args=dict(args))


def export_pretrained(
    model: nn.Module,
    vocab: Mapping[str, int],
    config: ScGPTConfig,
    folder: str | Path,
    layout: str = "flash",
    weights_format: str = "pt",
) -> Path:
    """Write a model as a public scGPT folder: ``args.json``, ``vocab.json``, ``best_model.pt``.

    Parameters
    ----------
    model
        A model of the scGPT family (its ``config`` must equal ``config``).
    vocab
        Token -> id; must contain the pad token, ids below ``config.ntoken``.
    config
        The model's architecture; written to ``args.json`` with scGPT's keys plus
        ``"pertflow_config"``.
    folder
        Output folder (created; existing files are replaced atomically, one by one).
    layout
        ``"flash"`` (``Wqkv``, as the released checkpoints; ``fast_transformer: true``) or ``"torch"``
        (``in_proj_*``; ``fast_transformer: false``). scGPT's PyTorch path is always post-norm, so a
        pre-norm model exported in the torch layout computes differently inside scGPT itself.
    weights_format
        ``"pt"`` (``best_model.pt`` via ``torch.save``) or ``"safetensors"``.

    Returns
    -------
    Path
        The folder.
    """
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    if weights_format not in ("pt", "safetensors"):
        raise InputError(f"weights_format must be 'pt' or 'safetensors', got {weights_format!r}.")
    model_config = getattr(model, "config", None)
    if model_config is not None and model_config.to_dict() != config.to_dict():
        raise InputError("export_pretrained: config differs from model.config; pass the model's own config.")
    if config.pad_token not in vocab:
        raise InputError(f"The vocabulary lacks the pad token {config.pad_token!r}.")
    if max(vocab.values()) >= config.ntoken:
        raise InputError(f"The vocabulary has ids up to {max(vocab.values())}, beyond ntoken={config.ntoken}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    public = to_public_state_dict(state, layout)
    if weights_format == "pt":
        with atomic_path(folder / TORCH_WEIGHTS_FILE) as tmp:
            torch.save(public, tmp)
    else:
        from safetensors.torch import save_file

        with atomic_path(folder / SAFETENSORS_WEIGHTS_FILE) as tmp:
            save_file(public, str(tmp))
    write_json(folder / VOCAB_FILE, {str(k): int(v) for k, v in sorted(vocab.items(), key=lambda kv: kv[1])})
    args = config.replace(use_fast_transformer=layout == "flash").to_scgpt_args()
    args["fast_transformer"] = layout == "flash"
    write_json(folder / ARGS_FILE, json.loads(json.dumps(args, default=str)))
    return folder


def build_model(config: ScGPTConfig, kind: str = "transformer") -> nn.Module:
    """Construct a model of the scGPT family by name.

    Parameters
    ----------
    config
        Architecture.
    kind
        ``"transformer"``, ``"generator"`` or ``"multiomic"``.

    Returns
    -------
    nn.Module
    """
    kinds = {
        "transformer": TransformerModel,
        "generator": TransformerGenerator,
        "multiomic": MultiOmicTransformerModel,
    }
    if kind not in kinds:
        raise ValueError(f"Unknown scGPT model kind {kind!r}; choose one of {sorted(kinds)}")
    return kinds[kind](config)
