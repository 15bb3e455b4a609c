"""The `kubeonnx` command: dispatches to the operator or the runtime without importing the other.

It lives beside the runtime only because the layout has no neutral folder; it imports neither
package until a subcommand is chosen, so the operator image needs no onnxruntime and the
runtime image no kopf.
"""

from __future__ import annotations

import os
import signal
import sys

USAGE = """usage: kubeonnx [--version] COMMAND [ARGS]

commands:
  serve      run the inference runtime (Open Inference Protocol v2 over HTTP)
  infer      send a JSON request, a .npy array or an image to a model and print the answer
  operator   run the Kubernetes operator
  render     print the manifests the operator would apply for InferenceModels in a file
  usage      print requests and rows per day, tenant and model from the usage ledger

`kubeonnx COMMAND --help` says more.
"""


def version() -> str:
    """The installed distribution's version (the images install it too)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("kubeonnx")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """The command; a closed standard output (`kubeonnx infer ... | head -2`) ends it quietly,
    with the status of a command the closed pipe stopped, as other command-line tools do."""
    try:
        code = dispatch(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # a pipe closed meanwhile shows here, not as a warning at exit
    except BrokenPipeError:
        # What is left in the buffer goes nowhere: the interpreter's flush at exit writes it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return code


def dispatch(args: list[str]) -> int:
    if not args or args[0] in {"-h", "--help", "help"}:
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] in {"--version", "-V", "version"}:
        print(f"kubeonnx {version()}")
        return 0
    command, rest = args[0], args[1:]
    if command == "serve":
        from kubeonnx_runtime.cli import main as serve

        return serve(rest)
    if command == "infer":
        from kubeonnx_runtime.client import infer_command

        return infer_command(rest)
    if command == "operator":
        from kubeonnx_operator.cli import run_operator

        return run_operator(rest)
    if command == "usage":
        from kubeonnx_runtime.ledger import usage_report

        return usage_report(rest)
    if command == "render":
        from kubeonnx_operator.cli import render

        return render(rest)
    print(f"kubeonnx: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2
