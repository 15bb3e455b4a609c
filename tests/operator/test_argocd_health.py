"""The Argo CD health checks (examples/argocd/resource_customizations), run as Argo CD runs
them: Lua 5.1 with only the base, table and a safe os library open, `obj` a global, and
every case of each health_test.yaml."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubeonnx_operator.rollout import PHASES
from kubeonnx_operator.status import (
    MIRROR_REASONS,
    MODEL_REASONS,
    POLICY_REASONS,
    READY_REASONS,
)
from lupa import lua51

ROOT = Path(__file__).resolve().parents[2]
CUSTOMIZATIONS = ROOT / "examples" / "argocd" / "resource_customizations"
CHECKS = sorted(CUSTOMIZATIONS.glob("*/*/health.lua"))
VALID = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}

# The Lua environment Argo CD gives a health script (argo-cd util/lua: package, base, table
# and its safe os); strings have no methods there, since the string library is not open.
SANDBOX = """
local script = ...
local safe_os = {time = os.time, date = os.date, clock = os.clock, difftime = os.difftime}
local env = {
  ipairs = ipairs, pairs = pairs, next = next, type = type, tostring = tostring,
  tonumber = tonumber, select = select, error = error, assert = assert, pcall = pcall,
  unpack = unpack, print = print, rawget = rawget, rawset = rawset, rawequal = rawequal,
  setmetatable = setmetatable, getmetatable = getmetatable, table = table, os = safe_os,
}
getmetatable("").__index = nil
local chunk, err = loadstring(script, "health.lua")
if chunk == nil then error(err) end
setfenv(chunk, env)
return function(obj) env.obj = obj; return chunk() end
"""


def health(script: Path, obj: dict[str, Any]) -> dict[str, Any]:
    lua = lua51.LuaRuntime()
    run = lua.execute(SANDBOX, script.read_text())
    result = run(lua.table_from(obj, recursive=True))
    return dict(result.items())


def cases() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for check in CHECKS:
        for case in yaml.safe_load((check.parent / "health_test.yaml").read_text())["tests"]:
            out.append((check, case))
    return out


def test_argo_cd_layout() -> None:
    kinds = {p.parent.relative_to(CUSTOMIZATIONS).as_posix() for p in CHECKS}
    assert kinds == {"kubeonnx.io/InferenceModel", "kubeonnx.io/QuotaPolicy"}


@pytest.mark.parametrize(
    ("check", "case"),
    cases(),
    ids=lambda v: v.parent.name if isinstance(v, Path) else Path(v["inputPath"]).stem,
)
def test_health_test_cases(check: Path, case: dict[str, Any]) -> None:
    obj = yaml.safe_load((check.parent / case["inputPath"]).read_text())
    assert health(check, obj) == case["healthStatus"]


def status_with(reason: str) -> dict[str, Any]:
    ready = "True" if reason in READY_REASONS else "False"
    condition = {"type": "Ready", "status": ready, "reason": reason, "message": "m"}
    return {
        "metadata": {"generation": 1},
        "status": {"observedGeneration": 1, "conditions": [condition]},
    }


@pytest.mark.parametrize("reason", MODEL_REASONS)
def test_every_reason_of_an_inference_model_maps_to_a_health(reason: str) -> None:
    check = CUSTOMIZATIONS / "kubeonnx.io" / "InferenceModel" / "health.lua"
    got = health(check, status_with(reason))
    if reason in READY_REASONS:
        want = "Healthy"
    elif reason == "Progressing":
        want = "Progressing"
    else:
        want = "Degraded"
    assert got == {"status": want, "message": f"{reason}: m"}


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("reason", ["Ready", "Progressing", "CrashLoop"])
def test_every_rollout_phase_maps_to_a_health(phase: str, reason: str) -> None:
    """A rollout rolled back is Degraded, one paused for a person Suspended, whatever the
    stable's Ready; any other phase leaves the health to Ready. A stable that fails (Degraded)
    says so first."""
    check = CUSTOMIZATIONS / "kubeonnx.io" / "InferenceModel" / "health.lua"
    obj = status_with(reason)
    obj["status"]["rollout"] = {"phase": phase, "message": "r"}
    got = health(check, obj)
    if reason == "CrashLoop":
        want = {"status": "Degraded", "message": "CrashLoop: m"}
    elif phase == "RolledBack":
        want = {"status": "Degraded", "message": "RolledBack: r"}
    elif phase == "Paused":
        want = {"status": "Suspended", "message": "Paused: r"}
    else:
        want = health(check, status_with(reason))
    assert got == want


@pytest.mark.parametrize("reason", POLICY_REASONS)
def test_every_reason_of_a_quota_policy_maps_to_a_health(reason: str) -> None:
    check = CUSTOMIZATIONS / "kubeonnx.io" / "QuotaPolicy" / "health.lua"
    got = health(check, status_with(reason))
    assert got == {
        "status": "Healthy" if reason == "Ready" else "Degraded",
        "message": f"{reason}: m",
    }


def test_the_registry_holds_every_reason_the_code_names() -> None:
    # mypy holds each Verdict to the registry; this catches a reason given another way.
    sources = "\n".join(p.read_text() for p in (ROOT / "operator").rglob("*.py"))
    named = set(re.findall(r'(?<!Mirror)Verdict\(\s*(?:True|False),\s*"([A-Za-z]+)"', sources))
    # The GatewayMirror condition's reasons: a registry of their own (not the Ready's).
    mirror = set(re.findall(r'MirrorVerdict\(\s*(?:True|False),\s*"([A-Za-z]+)"', sources))
    assert mirror == set(MIRROR_REASONS)
    named |= set(re.findall(r'QuotaProblem\(\s*"([A-Za-z]+)"', sources))
    named |= set(re.findall(r'reason(?:, message)? = (?:True|False), "([A-Za-z]+)"', sources))
    assert {"QuotaPolicyNotFound", "QuotaSecretNotFound", "QuotaPolicyInvalid"} <= named
    assert "SecretNotFound" in named
    assert named <= set(MODEL_REASONS) | set(POLICY_REASONS)
    # Every reason in README's table is one the operator can give, and the reverse.
    readme = (ROOT / "README.md").read_text()
    table = set(re.findall(r"^\| `([A-Za-z]+)` \|", readme, re.M))
    assert table == set(MODEL_REASONS) - {"Ready"}


def test_the_sandbox_has_no_string_library_as_in_argo_cd(tmp_path: Path) -> None:
    script = tmp_path / "health.lua"
    script.write_text('return {status = string.upper("healthy")}')
    with pytest.raises(lua51.LuaError):
        health(script, {})
    script.write_text('local s = "healthy"; return {status = s:upper()}')
    with pytest.raises(lua51.LuaError):
        health(script, {})
