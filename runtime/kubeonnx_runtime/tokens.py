"""The quota unit `tokens`: what a request's tokens are, and whether the model has them.

A QuotaPolicy's `tokens` names one integer input of the model and how its elements count:
`elements` (every element: the length of `input_ids` times the batch) or `nonzero` (the
non-zero elements: an `attention_mask` without its padding). The input is checked against the
model at start-up (and a reloaded configuration before it is taken); a request without it, or
with it in another datatype (the gateway, which has no model to check against), is a 400.

A request's inputs must agree on each dimension the model names alike (the decoder refuses
an `attention_mask` of [1,1] beside `input_ids` of [1,1000], which a broadcasting model would
run over 1000 positions for 1 token); a token input with a dynamic dimension that the model
ties to no other input's is allowed, with a warning in the log at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from .datatypes import NUMPY_TO_OIP, TensorSpec
from .errors import FatalStartupError, InvalidRequest
from .quota import QuotaConfig, TokenCount

log = logging.getLogger(__name__)

INTEGER_TYPES = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")


def _what(spec: TokenCount) -> str:
    return "non-zero elements" if spec.count == "nonzero" else "elements"


def check_token_input(config: QuotaConfig, inputs: Sequence[TensorSpec]) -> None:
    """FatalStartupError, in one line, unless the input the policy counts tokens in is an
    integer input of the model (nothing to check without `tokens`)."""
    spec = config.tokens
    if spec is None:
        return
    found = next((t for t in inputs if t.name == spec.input), None)
    if found is None:
        names = ", ".join(t.name for t in inputs) or "none"
        raise FatalStartupError(
            f"quota policy {config.policy!r} counts tokens in input {spec.input!r}, which the "
            f"model does not have (its inputs: {names})"
        )
    if found.datatype not in INTEGER_TYPES:
        raise FatalStartupError(
            f"quota policy {config.policy!r} counts tokens in input {spec.input!r}, which is "
            f"{found.datatype}: tokens are counted in an integer input "
            f"({', '.join(INTEGER_TYPES)})"
        )
    loose = untied_dimensions(found, inputs)
    if loose:
        log.warning(
            "quota policy %r counts tokens in input %r, whose dynamic dimension(s) %s the "
            "model names alike in no other input: a request may send that input smaller than "
            "the others (an attention_mask of [1,1] beside input_ids of [1,1000]) and, where "
            "the model broadcasts it, be charged fewer tokens than the model runs over; name "
            "the dimensions in the model (dim_param), or count the elements of the input "
            "that sets the length",
            config.policy,
            spec.input,
            ", ".join(str(axis) for axis in loose),
        )


def untied_dimensions(token_input: TensorSpec, inputs: Sequence[TensorSpec]) -> list[int]:
    """The dynamic dimensions (axes) of the token input that no other input shares by name,
    so that a request's sizes for them are not held equal to another input's; none when the
    model has no other input (nothing to broadcast against)."""
    others = [t for t in inputs if t.name != token_input.name]
    if not others:
        return []
    shared = {name for t in others for _, name in t.named_dims}
    names = dict(token_input.named_dims)
    return [
        axis
        for axis, size in enumerate(token_input.shape)
        if size == -1 and names.get(axis) not in shared
    ]


def count_tokens(spec: TokenCount, inputs: Mapping[str, np.ndarray] | None) -> int:
    """The request's tokens; InvalidRequest (400) naming the input when it is missing or not
    an integer tensor. `inputs` None: the request carries no named inputs (an image)."""
    array = inputs.get(spec.input) if inputs is not None else None
    if array is None:
        raise InvalidRequest(
            f"input {spec.input!r} is missing: the quota policy counts its {_what(spec)} as "
            "the request's tokens"
        )
    if array.dtype.kind not in "iu":
        datatype = NUMPY_TO_OIP.get(array.dtype, str(array.dtype))
        raise InvalidRequest(
            f"input {spec.input!r} is {datatype}: the quota policy counts its {_what(spec)} as "
            "the request's tokens, and takes an integer datatype"
        )
    return int(np.count_nonzero(array)) if spec.count == "nonzero" else int(array.size)
