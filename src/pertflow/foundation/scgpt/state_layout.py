"""How scGPT's parameter names map onto ours, in both directions, and what a state dict says
about the architecture that made it.

Parameter names of the whole-human model (d = 512, d_hid = 512, 12 layers, 60697 tokens), with
``N`` the layer index; see :func:`scgpt_human_reference_shapes`::

    encoder.embedding.weight                         (ntoken, d)
    encoder.enc_norm.{weight,bias}                   (d,)
    flag_encoder.weight                              (2, d)      generative pretraining only
    value_encoder.linear1.{weight,bias}              (d, 1), (d,)
    value_encoder.linear2.{weight,bias}              (d, d), (d,)
    value_encoder.norm.{weight,bias}                 (d,)
    transformer_encoder.layers.N.self_attn.Wqkv.weight   (3d, d)   flash-attn fused q|k|v
    transformer_encoder.layers.N.self_attn.Wqkv.bias     (3d,)
    transformer_encoder.layers.N.self_attn.out_proj.{weight,bias}  (d, d), (d,)
    transformer_encoder.layers.N.linear1.{weight,bias}   (d_hid, d), (d_hid,)
    transformer_encoder.layers.N.linear2.{weight,bias}   (d, d_hid), (d,)
    transformer_encoder.layers.N.norm1.{weight,bias}     (d,)
    transformer_encoder.layers.N.norm2.{weight,bias}     (d,)
    decoder.fc.0.{weight,bias}  (d, d)    decoder.fc.2.{weight,bias}  (d, d)
    decoder.fc.4.{weight,bias}  (1, d), (1,)
    mvc_decoder.gene2query.{weight,bias}  (d, d), (d,)
    mvc_decoder.W.weight                  (d, d)      no bias

Mapping to our modules (:mod:`pertflow.foundation.scgpt.transformer`)
--------------------------------------------------------------
Every name is the same except the fused attention projection::

    public (flash-attn FlashMHA / MHA)      ours (= torch.nn.MultiheadAttention)
    self_attn.Wqkv.weight        (3d, d) -> self_attn.in_proj_weight
    self_attn.Wqkv.bias          (3d,)   -> self_attn.in_proj_bias
    self_attn.out_proj.*                 -> self_attn.out_proj.*

The tensors are identical: flash-attn splits ``Wqkv(x)`` as ``b s (three h d)``, i.e. rows
``[0, d)`` are q, ``[d, 2d)`` k, ``[2d, 3d)`` v, and inside each block head ``h`` owns rows
``h*d/H .. (h+1)*d/H``; that is torch's ``in_proj_weight`` layout, which is why scGPT's own
``load_pretrained`` only renames ``Wqkv.`` -> ``in_proj_``. Models saved without flash-attn
(``fast_transformer`` false, torch's ``nn.TransformerEncoderLayer``) already use ``in_proj_*``.

Also handled when reading: a leading ``module.`` (DistributedDataParallel), ``self_attn._impl.``
(scGPT's newer flash-attn-compat wrapper), and heads that older or other checkpoints carry:

* ``cls_decoder.*`` with a 1-row ``out_layer`` -- scGPT used to build the classifier even for
  ``n_cls=1``; it is useless and dropped (reported);
* ``cls_decoder.*`` with K rows -- a fine-tuned classifier: ``n_cls=K`` (and its depth) is read from
  the tensors;
* ``mvc_decoder.*``, ``decoder.zero_logit.*``, ``flag_encoder.*``, ``batch_encoder.*``, ``dsbn.*``,
  ``bn.*``, ``grad_reverse_discriminator.*`` -- their presence switches the matching config option
  on, so the load is exact. Switching one off by an override drops its tensors (reported);
  asking for a head the file lacks (or with other shapes) needs ``allow_missing_heads=True`` and
  gives a freshly initialised head (reported).

Anything else that does not match is an error that lists the keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from pertflow.errors import InputError

LAYOUTS = ("flash", "torch")


# Optional heads: top-level module prefix -> config fields that create it.
HEAD_PREFIXES: dict[str, tuple[str, ...]] = {
    "cls_decoder": ("n_cls", "nlayers_cls"),
    "mvc_decoder": ("do_mvc", "mvc_decoder_style", "explicit_zero_prob"),
    "decoder.zero_logit": ("explicit_zero_prob",),
    "flag_encoder": ("use_generative_training",),
    "batch_encoder": ("use_batch_labels", "num_batch_labels"),
    "dsbn": ("domain_spec_batchnorm", "num_batch_labels"),
    "bn": ("domain_spec_batchnorm", "generator_batchnorm"),
    "grad_reverse_discriminator": ("do_dab", "num_batch_labels"),
}


_ATTN_KEY = re.compile(r"^(transformer_encoder\.layers\.\d+\.self_attn\.)(.+)$")


def scgpt_human_reference_shapes(
    ntoken: int = 60697, d_model: int = 512, d_hid: int = 512, nlayers: int = 12
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the released whole-human scGPT ``best_model.pt`` (flash layout).

    Written out from the public sources rather than derived from our modules, so that tests can
    check our export against it. Defaults are the released sizes; smaller values give the same
    names at test size.

    Sources: the load log of ``scGPT_human`` printed by scGPT's fine-tuning code (encoder, value
    encoder, 12 flash layers with ``Wqkv`` (1536, 512), decoder ``fc``); bowang-lab/scGPT
    ``scgpt/model/model.py`` (``flag_encoder = nn.Embedding(2, d_model)`` and ``MVCDecoder``
    "inner product": ``gene2query`` Linear(d, d), ``W`` Linear(d, d, bias=False)) with
    ``examples/pretrain.py`` (``do_mvc=True``, ``n_cls=1`` so no ``cls_decoder``,
    generative training).

    Returns
    -------
    dict[str, tuple[int, ...]]
    """
    d = d_model
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.embedding.weight": (ntoken, d),
        "encoder.enc_norm.weight": (d,),
        "encoder.enc_norm.bias": (d,),
        "flag_encoder.weight": (2, d),
        "value_encoder.linear1.weight": (d, 1),
        "value_encoder.linear1.bias": (d,),
        "value_encoder.linear2.weight": (d, d),
        "value_encoder.linear2.bias": (d,),
        "value_encoder.norm.weight": (d,),
        "value_encoder.norm.bias": (d,),
    }
    for n in range(nlayers):
        p = f"transformer_encoder.layers.{n}."
        shapes.update({
            p + "self_attn.Wqkv.weight": (3 * d, d),
            p + "self_attn.Wqkv.bias": (3 * d,),
            p + "self_attn.out_proj.weight": (d, d),
            p + "self_attn.out_proj.bias": (d,),
            p + "linear1.weight": (d_hid, d),
            p + "linear1.bias": (d_hid,),
            p + "linear2.weight": (d, d_hid),
            p + "linear2.bias": (d,),
            p + "norm1.weight": (d,),
            p + "norm1.bias": (d,),
            p + "norm2.weight": (d,),
            p + "norm2.bias": (d,),
        })
    shapes.update({
        "decoder.fc.0.weight": (d, d),
        "decoder.fc.0.bias": (d,),
        "decoder.fc.2.weight": (d, d),
        "decoder.fc.2.bias": (d,),
        "decoder.fc.4.weight": (1, d),
        "decoder.fc.4.bias": (1,),
        "mvc_decoder.gene2query.weight": (d, d),
        "mvc_decoder.gene2query.bias": (d,),
        "mvc_decoder.W.weight": (d, d),
    })
    return shapes


def to_public_state_dict(state: Mapping[str, Tensor], layout: str = "flash") -> dict[str, Tensor]:
    """Our parameter names -> a public scGPT layout.

    Parameters
    ----------
    state
        Our ``state_dict()``.
    layout
        ``"flash"``: ``self_attn.in_proj_{weight,bias}`` -> ``self_attn.Wqkv.{weight,bias}`` (the
        released checkpoints); ``"torch"``: names unchanged (scGPT without flash-attn).

    Returns
    -------
    dict[str, Tensor]
        Same tensors, new names.
    """
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = _ATTN_KEY.match(key)
        if layout == "flash" and m and m.group(2) in ("in_proj_weight", "in_proj_bias"):
            key = m.group(1) + ("Wqkv.weight" if m.group(2) == "in_proj_weight" else "Wqkv.bias")
        out[key] = value
    return out


def from_public_state_dict(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """A public scGPT state dict -> our parameter names.

    Parameters
    ----------
    state
        As loaded from ``best_model.pt``.

    Returns
    -------
    tuple[dict[str, Tensor], str]
        Renamed tensors and the detected layout (``"flash"`` or ``"torch"``).
    """
    if any(".fast_transformer_encoder." in k or k.startswith("transformer_encoder.fast_transformer_encoder")
           for k in state):
        raise InputError(
            "This checkpoint uses scGPT's 'linear' fast-transformer backend (fast_transformers), whose "
            "parameters have no counterpart here. Use a flash-attention or PyTorch-layout checkpoint."
        )
    out: dict[str, Tensor] = {}
    layout = "torch"
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        key = key.replace(".self_attn._impl.", ".self_attn.")
        m = _ATTN_KEY.match(key)
        if m and m.group(2) in ("Wqkv.weight", "Wqkv.bias"):
            layout = "flash"
            key = m.group(1) + ("in_proj_weight" if m.group(2) == "Wqkv.weight" else "in_proj_bias")
        out[key] = value
    return out, layout


def prefix_of(key: str) -> str | None:
    for prefix in sorted(HEAD_PREFIXES, key=len, reverse=True):
        if key == prefix or key.startswith(prefix + "."):
            return prefix
    return None


def infer_architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Read sizes and head options off a state dict in our names.

    Parameters
    ----------
    state
        State dict with our parameter names (see :func:`from_public_state_dict`).

    Returns
    -------
    dict[str, Any]
        Config fields: sizes (``ntoken``, ``d_model``, ``nlayers``, ``d_hid``) and the options whose
        tensors are present (``do_mvc``, ``mvc_decoder_style``, ``explicit_zero_prob``, ``n_cls``,
        ``nlayers_cls``, ``use_generative_training``, ``use_batch_labels``, ``num_batch_labels``,
        ``domain_spec_batchnorm``, ``do_dab``, ``input_emb_style``, ``n_input_bins``).
    """
    found: dict[str, Any] = {}
    if "encoder.embedding.weight" in state:
        found["ntoken"], found["d_model"] = (int(s) for s in state["encoder.embedding.weight"].shape)
    layers = {int(m.group(1)) for k in state if (m := re.match(r"transformer_encoder\.layers\.(\d+)\.", k))}
    if layers:
        found["nlayers"] = max(layers) + 1
    if "transformer_encoder.layers.0.linear1.weight" in state:
        found["d_hid"] = int(state["transformer_encoder.layers.0.linear1.weight"].shape[0])
    if "value_encoder.linear1.weight" in state:
        found["input_emb_style"] = "continuous"
    elif "value_encoder.embedding.weight" in state:
        found["input_emb_style"] = "category"
        found["n_input_bins"] = int(state["value_encoder.embedding.weight"].shape[0])
    if "flag_encoder.weight" in state:
        found["use_generative_training"] = True
    if "decoder.zero_logit.0.weight" in state:
        found["explicit_zero_prob"] = True
    if "mvc_decoder.gene2query.weight" in state:
        found["do_mvc"] = True
        if "mvc_decoder.W.weight" in state:
            found["mvc_decoder_style"] = "inner product"
            if "mvc_decoder.W_zero_logit.weight" in state:
                found["explicit_zero_prob"] = True
        elif state["mvc_decoder.gene2query.weight"].shape[0] == 64 and "mvc_decoder.fc1.weight" in state and (
            state["mvc_decoder.fc1.weight"].shape[1] != 64
        ):
            found["mvc_decoder_style"] = "concat query"
        else:
            found["mvc_decoder_style"] = "sum query"
    if "cls_decoder.out_layer.weight" in state:
        found["n_cls"] = int(state["cls_decoder.out_layer.weight"].shape[0])
        linear = [k for k in state if re.fullmatch(r"cls_decoder\._decoder\.\d+\.weight", k)
                  and state[k].dim() == 2]
        found["nlayers_cls"] = len(linear) + 1
    if "batch_encoder.embedding.weight" in state:
        found["use_batch_labels"] = True
        found["num_batch_labels"] = int(state["batch_encoder.embedding.weight"].shape[0])
    dsbn = {int(m.group(1)) for k in state if (m := re.match(r"dsbn\.bns\.(\d+)\.", k))}
    if dsbn:
        found["domain_spec_batchnorm"] = "do_affine" if "dsbn.bns.0.weight" in state else "dsbn"
        found["num_batch_labels"] = max(dsbn) + 1
    elif "bn.running_mean" in state:
        found["domain_spec_batchnorm"] = "batchnorm"
    if "grad_reverse_discriminator.out_layer.weight" in state:
        found["do_dab"] = True
        found["num_batch_labels"] = int(state["grad_reverse_discriminator.out_layer.weight"].shape[0])
    return found
