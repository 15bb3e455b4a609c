"""A replica's async worker on SIGTERM with the default drain: it takes no new entries from
the signal on, while the HTTP drain goes on, and answers those in hand (real redis-server)."""

from __future__ import annotations

import concurrent.futures
import signal
from pathlib import Path

import httpx
import numpy as np
from kubeonnx_runtime.asyncinfer import GROUP
from kubeonnx_runtime.settings import ServeSettings

from tests.runtime.model_runs import (
    hooked_env,
    metric,
    release,
    row_digest,
    runs,
    wait_for,
    wait_held,
)
from tests.runtime.test_async import (
    KEYS,
    body,
    consumer_of,
    holding,
    redis_client,
    redis_url,  # noqa: F401 (the fixture)
    start,
    start_gateway,
    wait_done,
)

DEFAULT_DRAIN = str(ServeSettings.model_fields["drain_seconds"].default)


def test_sigterm_stops_taking_entries_at_once_while_the_http_drain_goes_on(
    serve,
    models: dict[str, Path],
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The replica holds 4 requests (its concurrency) in a held model run, and a synchronous
    request waits behind that run, so the HTTP drain cannot end before the run is released.
    It gets SIGTERM; 4 more requests are queued while it drains; then the run is released.
    It answers and acknowledges the 4 in hand, takes none of the rest, and exits 0; a new
    replica answers the rest."""
    assert float(DEFAULT_DRAIN) > 0
    values = [[float(i + 1)] * 4 for i in range(12)]  # not zeros: the warm-up runs those
    gateway = start_gateway(serve, redis_url)
    http = httpx.Client(base_url=gateway.url, timeout=30)
    before = [
        http.post("/v2/models/mlp/async-infer", json=body(v)).json()["id"] for v in values[:8]
    ]
    client = redis_client(redis_url)
    hooks = tmp_path / "hooks"
    served = start(
        serve,
        models,
        redis_url,
        KUBEONNX_ASYNC_CONCURRENCY="4",
        KUBEONNX_DRAIN_SECONDS=DEFAULT_DRAIN,
        **hooked_env(hooks, hold_run=0),
    )
    wait_held(hooks, served)
    name = consumer_of(client, served)
    held = wait_for(lambda: holding(client, name, 4), "the replica holding 4 requests")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    sync = pool.submit(
        httpx.post, f"{served.url}/v2/models/mlp/infer", json=body([100.0] * 4), timeout=300
    )

    wait_for(
        lambda: metric(served, "kubeonnx_inflight_requests") >= 1,
        "the synchronous request in flight",
    )

    served.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "signal SIGTERM: not ready" in served.logs(), "the replica draining")
    after = [http.post("/v2/models/mlp/async-infer", json=body(v)).json()["id"] for v in values[8:]]
    release(hooks)
    assert served.proc.wait(120) == 0, served.logs()[-3000:]
    assert sync.result().status_code == 200
    pool.shutdown()

    # What the stopping replica ran: the 4 in hand (and the synchronous request), no more.
    ran = {row for run in runs(hooks) if run.pid == served.proc.pid for row in run.rows}
    digests = {
        i: row_digest(np.array(v, dtype=np.float32))
        for i, v in zip(before + after, values, strict=True)
    }
    assert not [i for i in after if digests[i] in ran], "it took entries queued after SIGTERM"
    assert {i for i in before + after if digests[i] in ran} == set(held)
    statuses = {i: client.hget(KEYS.record(i), "status").decode() for i in before + after}
    assert {i for i, s in statuses.items() if s != "pending"} == set(held)
    assert client.xpending(KEYS.stream, GROUP)["pending"] == 0  # the 4 acknowledged
    (group,) = client.xinfo_groups(KEYS.stream)
    assert group["lag"] == 8  # never delivered, those queued after SIGTERM included
    queued = {f[b"id"].decode() for _, f in client.xrange(KEYS.stream)}
    assert queued == set(before + after) - set(held)

    replica = start(serve, models, redis_url)
    with httpx.Client(base_url=replica.url, timeout=30) as replica_http:
        for request_id in before + after:
            done = wait_done(replica_http, f"/v2/models/mlp/requests/{request_id}", 120)
            assert done.status_code == 200, done.text
    http.close()
