"""Argument handling of `kubeonnx serve`."""

from __future__ import annotations

import os
import sys

from pydantic import ValidationError

from .errors import write_termination_message
from .settings import ServeSettings


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def main(argv: list[str]) -> int:
    try:
        settings = ServeSettings(_cli_parse_args=argv)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_flag(str(e['loc'][0]))} (KUBEONNX_{str(e['loc'][0]).upper()}): {e['msg']}"
            for e in exc.errors()
        )
        message = f"invalid settings: {problems}"
        print(f"kubeonnx serve: {message}", file=sys.stderr)
        write_termination_message(
            os.environ.get("KUBEONNX_TERMINATION_LOG", "/dev/termination-log"), message
        )
        return 2
    from .server import serve  # onnxruntime is imported only once settings are valid

    return serve(settings)
