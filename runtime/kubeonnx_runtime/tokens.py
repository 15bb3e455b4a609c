"""The quota unit `tokens`: what a request's tokens are, and whether the model has them.

A QuotaPolicy's `tokens` names one integer input of the model and how its elements count:
`elements` (every element: the length of `input_ids` times the batch) or `nonzero` (the
non-zero elements: an `attention_mask` without its padding). The input is checked against the
model at start-up (and a reloaded configuration before it is taken); a request without it, or
with it in another datatype (the gateway, which has no model to check against), is a 400.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .datatypes import NUMPY_TO_OIP, TensorSpec
from .errors import FatalStartupError, InvalidRequest
from .quota import QuotaConfig, TokenCount

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
