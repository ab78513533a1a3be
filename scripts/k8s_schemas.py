"""`python scripts/k8s_schemas.py WHEEL VERSION DIR`: one Kubernetes version's strict JSON schemas
from the kubernetes-validate wheel (PyPI), written to DIR/vVERSION-local-strict as files
kubeconform reads offline: without `$id`, each `$ref` relative to the file (the wheel's point at
`/api/_definitions.json`, an id only its own library resolves)."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path
from typing import Any

DEFINITIONS_ID = "/api/_definitions.json"


def localised(node: Any) -> Any:
    """`node` without `$id`s, its `$ref`s to the definitions made relative."""
    if isinstance(node, dict):
        return {
            key: (
                value.replace(DEFINITIONS_ID, "_definitions.json", 1)
                if key == "$ref" and isinstance(value, str)
                else localised(value)
            )
            for key, value in node.items()
            if key != "$id"
        }
    if isinstance(node, list):
        return [localised(item) for item in node]
    return node


def extract(wheel: Path, version: str, target: Path) -> int:
    """Writes the schemas; returns how many."""
    prefix = f"kubernetes_validate/kubernetes-json-schema/v{version}-local-strict/"
    out = target / f"v{version}-local-strict"
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith(prefix) and name.endswith(".json"):
                schema = localised(json.loads(archive.read(name)))
                (out / name.removeprefix(prefix)).write_text(json.dumps(schema))
                count += 1
    return count


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python scripts/k8s_schemas.py WHEEL VERSION DIR")
    count = extract(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
    if count == 0:
        sys.exit(f"no schemas for Kubernetes {sys.argv[2]} in {sys.argv[1]}")
    print(f"k8s_schemas.py: {count} schemas for Kubernetes {sys.argv[2]}", file=sys.stderr)
