"""Instructions a JSON request's decode costs, counted by callgrind, for this tree's runtime and a
baseline's: the tensor data to an array (`_decode_json_data`) and the whole body
(`decode_request`, orjson's parse in it), on the benchmarks' bodies.

    PYTHONPATH=benchmarks .venv/bin/python benchmarks/json_decode_instructions.py --baseline BEFORE
    # BEFORE: `git archive <commit> runtime | tar -x -C BEFORE`

Each figure is a run of --calls decodes less a run of as many empty calls, each in a fresh
interpreter under `valgrind --tool=callgrind` (PYTHONHASHSEED=0, OPENBLAS_NUM_THREADS=1): the
start-up and the imports cancel out, and the count does not move with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runtime_bench import PLAN, bodies

REPO = Path(__file__).resolve().parent.parent

# Run in the child: argv is the runtime's folder, the body, what to call, how many times.
CHILD = """
import sys
from pathlib import Path

import orjson

sys.path.insert(0, sys.argv[1])
from kubeonnx_runtime import codec

body = Path(sys.argv[2]).read_bytes()
tensor = orjson.loads(body)["inputs"][0]
data, count = tensor["data"], len(tensor["data"])
call = {
    "data": lambda: codec._decode_json_data(data, tensor["datatype"], count, "input 'input'"),
    "body": lambda: codec.decode_request(body, None),
    "nothing": lambda: None,
}[sys.argv[3]]
for _ in range(int(sys.argv[4])):
    call()
"""


def instructions(runtime: Path, body: Path, what: str, calls: int, work: Path) -> int:
    out = Path(tempfile.mkstemp(dir=work, suffix=".callgrind")[1])
    env = {**os.environ, "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1"}
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
    subprocess.run(
        [*cmd, "-c", CHILD, str(runtime), str(body), what, str(calls)],
        env=env,
        check=True,
        capture_output=True,
    )
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"callgrind wrote no totals to {out}")


def zeros_body(work: Path, src: Path) -> Path:
    """The convnet body with four values in five 0.0, as an image with a black background
    sends: the most work for the search for booleans among floats (0.0 is what false becomes)."""
    request = json.loads(src.read_text())
    data = request["inputs"][0]["data"]
    request["inputs"][0]["data"] = [v if i % 5 == 0 else 0.0 for i, v in enumerate(data)]
    path = work / "convnet-zeros.json"
    path.write_text(json.dumps(request))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", required=True, help="a folder holding a runtime/ tree")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2, help="valgrind runs at once")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubeonnx-decode-instructions-"))
    bodies(work, "convnet", PLAN["convnet"])
    bodies(work, "mlp", PLAN["mlp"])
    cases = {
        "convnet, 3,072 floats": work / "convnet.json",
        "convnet, 80% of them 0.0": zeros_body(work, work / "convnet.json"),
        "mlp, 4 floats": work / "mlp.json",
    }
    trees = {"baseline": Path(args.baseline) / "runtime", "this tree": REPO / "runtime"}
    runs = [
        (tree, case, what)
        for tree in trees
        for case in cases
        for what in ("nothing", "data", "body")
    ]
    with ThreadPoolExecutor(args.jobs) as pool:
        counts = dict(
            zip(
                runs,
                pool.map(
                    lambda run: instructions(
                        trees[run[0]], cases[run[1]], run[2], args.calls, work
                    ),
                    runs,
                ),
                strict=True,
            )
        )
    print("| instructions a call | baseline | this tree | this tree / baseline |")
    print("|---|---|---|---|")
    for case in cases:
        for what, label in (("data", "`_decode_json_data`"), ("body", "`decode_request`")):
            per_call = [
                (counts[tree, case, what] - counts[tree, case, "nothing"]) / args.calls
                for tree in trees
            ]
            print(
                f"| {case}: {label} | {per_call[0]:,.0f} | {per_call[1]:,.0f} | "
                f"{per_call[1] / per_call[0]:.3f} |"
            )


if __name__ == "__main__":
    main()
