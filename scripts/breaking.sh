#!/usr/bin/env bash
# `make breaking`: fails when the contract in the working tree (protos/, buf.yaml's FILE rules)
# breaks the contract of a baseline commit, so that a change clients would trip over is caught
# before it merges. The baseline:
#   - BREAKING_AGAINST, when set (any commit, e.g. the commit a CI push starts from);
#   - else, on a branch, where it left main (`git merge-base HEAD main`): the branch is judged on
#     its own changes, not on what main gained meanwhile;
#   - on main itself (the merge base is HEAD), HEAD's parent: CI, which runs on a clean clone of
#     main, checks the latest commit; locally, the latest commit plus uncommitted changes.
# The baseline's protos/ and buf.yaml are taken from git into .local/contract-baseline, next to
# a copy of the googleapis imports (`make proto-deps`), which git does not hold.
set -euo pipefail
cd "$(dirname "$0")/.."

main=${BREAKING_BASE_BRANCH:-main}
against=${BREAKING_AGAINST:-}
if [ -z "$against" ]; then
  git rev-parse --verify -q "$main^{commit}" >/dev/null || main="origin/$main"
  against=$(git merge-base HEAD "$main")
  if [ "$against" = "$(git rev-parse HEAD)" ]; then
    against=$(git rev-parse --verify -q "HEAD~1^{commit}") || {
      echo "breaking.sh: HEAD has no parent here (a shallow clone?): fetch more history" \
        "(git fetch --deepen=1) or set BREAKING_AGAINST" >&2
      exit 1
    }
  fi
fi
against=$(git rev-parse --verify "$against^{commit}")

baseline=.local/contract-baseline
rm -rf "$baseline"
mkdir -p "$baseline/.local"
git archive "$against" -- buf.yaml protos | tar -x -C "$baseline"
cp -R .local/proto-deps "$baseline/.local/"
echo "breaking.sh: protos/ against $(git log -1 --format='%h %s' "$against" | cut -c1-90)" >&2
.local/bin/buf breaking --against "$baseline"
