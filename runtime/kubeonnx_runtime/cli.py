"""Argument handling of `kubeonnx serve`."""

from __future__ import annotations

import os
import sys
from urllib.parse import urlsplit

from pydantic import ValidationError

from .errors import write_termination_message
from .settings import SECRET_FLAGS, URL_FLAGS, ServeSettings


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _variable(flag: str) -> str:
    return "KUBEONNX_" + flag[2:].replace("-", "_").upper()


def _has_credentials(url: str) -> bool:
    """Whether URL carries a user or password (scheme://USER:PASSWORD@host)."""
    try:
        return "@" in urlsplit(url).netloc
    except ValueError:
        return "@" in url


def _url_with_credentials(argv: list[str]) -> str | None:
    """The one-line refusal of a URL flag whose value carries credentials, if any."""
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        flag, eq, value = arg.partition("=")
        flag = flag.replace("_", "-")
        if flag not in URL_FLAGS:
            continue
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if _has_credentials(value):
            return (
                f"kubeonnx serve: {flag} must not carry credentials (other users of the machine "
                f"can read the command line): give them as {URL_FLAGS[flag]}, or the whole URL "
                f"as the variable {_variable(flag)}"
            )
    return None


def main(argv: list[str]) -> int:
    refusal = _url_with_credentials(argv)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in SECRET_FLAGS:
            variable = _variable(flag)
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
