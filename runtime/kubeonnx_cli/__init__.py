"""The `kubeonnx` command: dispatches to the operator or the runtime without importing the other.

It lives beside the runtime only because the layout has no neutral folder; it imports neither
package until a subcommand is chosen, so the operator image needs no onnxruntime and the
runtime image no kopf.
"""

from __future__ import annotations

import sys

USAGE = """usage: kubeonnx COMMAND [ARGS]

commands:
  serve      run the inference runtime (Open Inference Protocol v2 over HTTP)
  operator   run the Kubernetes operator
  render     print the manifests the operator would apply for InferenceModels in a file
  usage      print requests and rows per day, tenant and model from the usage ledger
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help", "help"}:
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "serve":
        from kubeonnx_runtime.cli import main as serve

        return serve(rest)
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
