"""Test hooks, loaded as `sitecustomize` into a `kubeonnx serve` that a test starts with this
folder first on PYTHONPATH (`hooked_env`): nothing of this is in the product.

The model run that the batcher is given is wrapped. With TEST_HOOK_DIR set:
- every model run that returns is appended to TEST_HOOK_DIR/runs, one line per run:
  `<pid> <run number> <digest of each row of the first input, comma-separated>`, so a test
  counts what the model really ran, per process, independently of what the server reports;
- TEST_HOOK_RUN_SECONDS: each run takes at least that long (a slow model);
- TEST_HOOK_HOLD_RUN=<n>: run number n (0 is the first run after start-up) writes
  TEST_HOOK_DIR/held-<pid> and waits, before the model runs, until TEST_HOOK_DIR/release
  exists (at most 300 s), so a test holds a model run while it does something else;
- TEST_HOOK_FAIL_EVERY=<n>: every n-th run (run numbers n-1, 2n-1, ...) raises instead of
  running, so that requests answered one run each get a 500 one time in n (a faulty
  version of a model).
"""

from __future__ import annotations

import os


def _install(directory: str) -> None:
    import hashlib
    import itertools
    import threading
    import time
    from pathlib import Path

    from kubeonnx_runtime import batching

    folder = Path(directory)
    hold = int(os.environ.get("TEST_HOOK_HOLD_RUN", "-1"))
    seconds = float(os.environ.get("TEST_HOOK_RUN_SECONDS", "0"))
    fail_every = int(os.environ.get("TEST_HOOK_FAIL_EVERY", "0"))
    log = os.open(folder / "runs", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    numbers = itertools.count()
    lock = threading.Lock()
    original = batching.Batcher.__init__

    def digest(data: bytes) -> str:
        return hashlib.blake2b(data, digest_size=8).hexdigest()

    def wrap(run):  # type: ignore[no-untyped-def]
        def hooked(inputs):  # type: ignore[no-untyped-def]
            with lock:
                n = next(numbers)
            started = time.monotonic()
            if n == hold:
                (folder / f"held-{os.getpid()}").write_text(str(n))
                deadline = time.monotonic() + 300
                while not (folder / "release").exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
            if fail_every and n % fail_every == fail_every - 1:
                raise RuntimeError(f"test hook: run {n} fails (TEST_HOOK_FAIL_EVERY)")
            outputs = run(inputs)
            left = seconds - (time.monotonic() - started)
            if left > 0:
                time.sleep(left)
            first = next(iter(inputs.values()))
            digests = ",".join(digest(r.tobytes()) for r in first)
            os.write(log, f"{os.getpid()} {n} {digests}\n".encode())
            return outputs

        return hooked

    def init(self, run, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, wrap(run), *args, **kwargs)

    batching.Batcher.__init__ = init  # type: ignore[method-assign]


if os.environ.get("TEST_HOOK_DIR"):
    _install(os.environ["TEST_HOOK_DIR"])
