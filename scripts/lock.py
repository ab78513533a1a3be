"""`make lock`: write, under each `name==version` of requirements*.lock, the sha256 of every file
PyPI serves for that exact version (all platforms' wheels and the sdist), so that
`pip install --require-hashes` installs it anywhere and nothing else. The versions are kept as
written: to move one, edit its `==` and run this again. Standard library only, so that it runs
before the virtualenv can be made from the locks it rewrites."""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK_FILES = ("requirements.lock", "requirements-dev.lock")
# PEP 691: the simple index as JSON, what pip itself reads; every file with its hashes.
INDEX = "https://pypi.org/simple/{name}/"
ACCEPT = "application/vnd.pypi.simple.v1+json"
PINNED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*\\?\s*$")


def normalized(name: str) -> str:
    """PEP 503's form of a project name, as the index's URLs use it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def file_version(filename: str) -> str | None:
    """The version a wheel or an sdist is of (from its name), or None for another format."""
    if filename.endswith(".whl"):
        parts = filename[: -len(".whl")].split("-")
        return parts[1] if len(parts) in (5, 6) else None
    for suffix in (".tar.gz", ".zip"):
        if filename.endswith(suffix):
            return filename[: -len(suffix)].rsplit("-", 1)[-1]
    return None


def hashes_of(name: str, version: str) -> list[str]:
    """The sha256 of every file PyPI lists for `name==version`, sorted."""
    request = urllib.request.Request(INDEX.format(name=normalized(name)))
    request.add_header("Accept", ACCEPT)
    with urllib.request.urlopen(request, timeout=60) as response:
        index = json.load(response)
    found = sorted(
        {
            entry["hashes"]["sha256"]
            for entry in index["files"]
            if "sha256" in entry["hashes"]
            and (file_version(entry["filename"]) or "").lower() == version.lower()
        }
    )
    if not found:
        raise SystemExit(f"PyPI lists no file of {name}=={version}")
    return found


def locked(text: str) -> str:
    """The lock file's text with each pin followed by its hashes (old hash lines dropped)."""
    out: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("--hash="):
            continue
        pin = PINNED.match(stripped)
        if pin is None:
            out.append(line)
            continue
        name, version = pin.groups()
        digests = hashes_of(name, version)
        out.append(f"{name}=={version} \\")
        out.extend(
            f"    --hash=sha256:{digest}" + (" \\" if i < len(digests) - 1 else "")
            for i, digest in enumerate(digests)
        )
        print(f"{name}=={version}: {len(digests)} files", file=sys.stderr)
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="Hash every pinned file of requirements*.lock.")
    parser.add_argument("--check", action="store_true", help="fail if a lock file would change")
    args = parser.parse_args()
    stale = []
    for name in LOCK_FILES:
        path = REPO / name
        text = path.read_text()
        new = locked(text)
        if new == text:
            continue
        if args.check:
            stale.append(name)
        else:
            path.write_text(new)
    if stale:
        raise SystemExit(f"out of date: {', '.join(stale)} (run `make lock`)")


if __name__ == "__main__":
    main()
