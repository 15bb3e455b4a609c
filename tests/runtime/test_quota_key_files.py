"""The tenants' keys as the kubelet mounts them (a file of keys per tenant, one a line): hashed
when read, a tenant without a key refused at start-up by name, and a rotation followed
without a restart."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from kubeonnx_runtime.errors import FatalStartupError
from kubeonnx_runtime.quota import Quota, Unauthorized, key_hash, load_quota_config


def write_config(tmp_path: Path, **extra: object) -> Path:
    path = tmp_path / "config.json"
    config = {
        "policy": "team",
        "namespace": "tests",
        "tenants": [
            {"name": "acme", "keyFile": "keys/acme-key/token"},  # beside this file
            {"name": "globex", "keyFile": "keys/globex-key/token"},
        ],
        **extra,
    }
    path.write_text(json.dumps(config))
    return path


def write_key(tmp_path: Path, secret: str, text: str) -> None:
    """As the kubelet's atomic writer does: the new content appears whole (a rename)."""
    target = tmp_path / "keys" / secret / "token"
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_suffix(".new")
    scratch.write_text(text)
    os.replace(scratch, target)


def test_keys_are_read_from_the_mounted_files_and_hashed(tmp_path: Path) -> None:
    write_key(tmp_path, "acme-key", "acme-1\n  acme-2  \n\n")  # two keys while rotating
    write_key(tmp_path, "globex-key", "globex-1")
    config = load_quota_config(write_config(tmp_path))
    hashes = {t.name: t.key_sha256 for t in config.tenants}
    assert hashes == {
        "acme": sorted([key_hash("acme-1"), key_hash("acme-2")]),
        "globex": [key_hash("globex-1")],
    }
    quota = Quota(config)
    assert quota.identify({"x-api-key": "acme-2"}) == "acme"
    assert quota.identify({"x-api-key": "globex-1"}) == "globex"


@pytest.mark.parametrize("content", [None, "", "\n  \n"], ids=["missing", "empty", "blank"])
def test_a_tenant_without_a_key_stops_the_start_naming_tenant_and_file(
    tmp_path: Path, content: str | None
) -> None:
    write_key(tmp_path, "acme-key", "acme-1")
    if content is not None:
        write_key(tmp_path, "globex-key", content)
    with pytest.raises(FatalStartupError) as err:
        load_quota_config(write_config(tmp_path))
    key_file = tmp_path / "keys" / "globex-key" / "token"
    assert str(err.value) == (
        f"quota: tenant 'globex' has no API key: {key_file} is missing or empty "
        "(its Secret, or the key in it, does not exist)"
    )


async def test_a_rotated_key_file_is_followed_and_a_vanished_one_keeps_the_last_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_key(tmp_path, "acme-key", "acme-1")
    write_key(tmp_path, "globex-key", "globex-1")
    path = write_config(tmp_path)
    quota = Quota(load_quota_config(path))
    follower = asyncio.create_task(quota.follow(path, 0.01))

    async def until(check: object, what: str) -> None:
        for _ in range(3000):  # 30 s at most, on a loaded machine
            try:
                if check():  # type: ignore[operator]
                    return
            except Unauthorized:
                pass
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    try:
        # The Secret's key rotated (only the key file changed; the config file did not).
        write_key(tmp_path, "acme-key", "acme-1\nacme-2")
        await until(lambda: quota.identify({"x-api-key": "acme-2"}) == "acme", "acme-2")
        write_key(tmp_path, "acme-key", "acme-2")
        await until(
            lambda: (
                quota.identify({"x-api-key": "acme-2"}) == "acme"
                and not quota._by_hash.get(key_hash("acme-1"))
            ),
            "acme-1 revoked",
        )
        with pytest.raises(Unauthorized):
            quota.identify({"x-api-key": "acme-1"})
        # The Secret deleted: the file goes; the last keys stay in force (and it is logged).
        (tmp_path / "keys" / "globex-key" / "token").unlink()
        write_key(tmp_path, "acme-key", "acme-3")  # a later change that cannot load either
        globex_file = str(tmp_path / "keys" / "globex-key" / "token")
        await until(
            lambda: any(
                "not reloaded, the last one stays" in r.getMessage()
                and globex_file in r.getMessage()
                for r in caplog.records
            ),
            "the follower's failed reload logged",
        )
        assert quota.identify({"x-api-key": "globex-1"}) == "globex"
        assert quota.identify({"x-api-key": "acme-2"}) == "acme"
    finally:
        follower.cancel()
