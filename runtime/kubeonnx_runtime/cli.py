"""Argument handling of `kubeonnx serve`."""

from __future__ import annotations

import os
import sys

from pydantic import ValidationError

from .errors import write_termination_message
from .settings import SECRET_FLAGS, ServeSettings


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def main(argv: list[str]) -> int:
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in SECRET_FLAGS:
            variable = "KUBEONNX_" + flag[2:].replace("-", "_").upper()
            print(
                f"kubeonnx serve: {flag} is not taken on the command line (other users of the "
                f"machine can read it): set {variable}, or {variable}_FILE to a file holding it",
                file=sys.stderr,
            )
            return 2
    try:
        settings = ServeSettings(_cli_parse_args=argv)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_flag(str(e['loc'][0]))} (KUBEONNX_{str(e['loc'][0]).upper()}): {e['msg']}"
            for e in exc.errors()
        )
        message = f"invalid settings: {problems}"
        print(f"kubeonnx serve: {message}", file=sys.stderr)
        write_termination_message(os.environ.get("KUBEONNX_TERMINATION_LOG") or None, message)
        return 2
    from .server import serve  # onnxruntime is imported only once settings are valid

    return serve(settings)
