"""The contract guardrail bites: `buf breaking` (buf.yaml's rules, as `make breaking` runs it)
fails on a copy of protos/ with a field removed or renumbered, naming the change, and passes on an
unchanged copy."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import google.type
import pytest

from tests.conftest import REPO

BUF = REPO / ".local/bin/buf"
ORDERS = Path("protos/ecommerce/v1/orders.proto")
GOOGLEAPIS = Path(next(iter(google.type.__path__))).parent.parent  # googleapis-common-protos


def contract_copy(destination: Path) -> Path:
    """protos/ and buf.yaml copied to `destination`, with the googleapis protos they import where
    buf.yaml expects them (what `make proto-deps` does)."""
    shutil.copytree(REPO / "protos", destination / "protos")
    shutil.copy(REPO / "buf.yaml", destination / "buf.yaml")
    for proto in (REPO / "protos").rglob("*.proto"):
        for imported in re.findall(
            r'^import "(google/(?:api|rpc|type)/[^"]+)";', proto.read_text(), re.M
        ):
            target = destination / ".local/proto-deps" / imported
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(GOOGLEAPIS / imported, target)
    return destination


def buf_breaking(workspace: Path, against: Path) -> subprocess.CompletedProcess[str]:
    assert BUF.exists(), "buf is not installed: run `make tools`"
    return subprocess.run(
        [str(BUF), "breaking", str(workspace), "--against", str(against)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def edit_message(path: Path, message: str, old: str, new: str) -> None:
    """Replaces `old` by `new` in the body of `message` in the proto file at `path`."""
    text = path.read_text()
    start = text.index(f"message {message} {{")
    end = text.index("\n}\n", start)
    body = text[start:end]
    assert body.count(old) == 1, f"{old!r} is not in {message} once"
    path.write_text(text[:start] + body.replace(old, new) + text[end:])


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return contract_copy(tmp_path_factory.mktemp("original"))


def test_an_unchanged_contract_passes(original: Path, tmp_path: Path) -> None:
    result = buf_breaking(contract_copy(tmp_path), original)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("message", "old", "new", "named"),
    [
        pytest.param(
            "CreateOrderRequest",
            "string request_id = 3;",
            "",
            'Previously present field "3" with name "request_id" on message "CreateOrderRequest"'
            " was deleted.",
            id="field removed",
        ),
        pytest.param(
            "UpdateOrderStatusRequest",
            "string reason = 3;",
            "string reason = 4;",
            'Previously present field "3" with name "reason" on message'
            ' "UpdateOrderStatusRequest" was deleted.',
            id="field renumbered",
        ),
    ],
)
def test_a_breaking_change_fails_naming_it(
    original: Path, tmp_path: Path, message: str, old: str, new: str, named: str
) -> None:
    changed = contract_copy(tmp_path)
    edit_message(changed / ORDERS, message, old, new)
    result = buf_breaking(changed, original)
    assert result.returncode != 0
    assert named in result.stdout, result.stdout + result.stderr
    assert str(ORDERS) in result.stdout
