#!/usr/bin/env bash
# Installs the pinned command-line tools (grpcurl, buf, kustomize, kubeconform; ghz with
# --with-ghz) into .local/bin with `go install`, the Kubernetes JSON schemas kubeconform checks
# against into .local/k8s-schemas, and Prometheus with promtool and iptables from Debian's packages
# when missing. Skips a tool whose pinned version is already there.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
bin="$repo/.local/bin"
mkdir -p "$bin"

GRPCURL_VERSION=v1.9.3
BUF_VERSION=v1.75.0

install() { # name module version
  local name=$1 module=$2 version=$3 stamp="$bin/.$1.version"
  if [ -x "$bin/$name" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$version" ]; then
    return
  fi
  echo "tools.sh: go install $module@$version" >&2
  GOBIN="$bin" go install "$module@$version"
  echo "$version" >"$stamp"
}

GHZ_VERSION=v0.120.0
KUSTOMIZE_VERSION=v5.8.0 # later ones need a newer Go than this machine's
KUBECONFORM_VERSION=v0.8.0
# kubeconform fetches its schemas from GitHub, which CI cannot reach: they come from PyPI's
# kubernetes-validate wheel instead (pinned by hash), made readable offline by k8s_schemas.py.
K8S_SCHEMAS_WHEEL=kubernetes-validate==1.37.0
K8S_SCHEMAS_SHA256=85136d018a27b50ec7fc049d902bfa5193f5976807e6c0f408e3ab6fe078cad9
K8S_VERSION=1.35.0 # the Kubernetes version `make k8s-validate` checks the manifests against

install grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl "$GRPCURL_VERSION"
install buf github.com/bufbuild/buf/cmd/buf "$BUF_VERSION"
install kustomize sigs.k8s.io/kustomize/kustomize/v5 "$KUSTOMIZE_VERSION"
install kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION"
schemas="$repo/.local/k8s-schemas"
if [ "$(cat "$schemas/.version" 2>/dev/null)" != "$K8S_SCHEMAS_WHEEL $K8S_VERSION" ]; then
  echo "tools.sh: Kubernetes $K8S_VERSION schemas from $K8S_SCHEMAS_WHEEL" >&2
  python=python3
  [ -x "$repo/.venv/bin/python" ] && python="$repo/.venv/bin/python"
  wheels=$(mktemp -d)
  "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --dest "$wheels" "$K8S_SCHEMAS_WHEEL"
  echo "$K8S_SCHEMAS_SHA256  $(ls "$wheels"/*.whl)" | sha256sum --check --quiet
  rm -rf "$schemas"
  "$python" "$repo/scripts/k8s_schemas.py" "$wheels"/*.whl "$K8S_VERSION" "$schemas"
  rm -rf "$wheels"
  echo "$K8S_SCHEMAS_WHEEL $K8S_VERSION" >"$schemas/.version"
fi
# Prometheus and promtool (Debian's package): the scrape test and `promtool check rules`.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "tools.sh: apt-get install prometheus" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
# iptables (Debian's package): the fault suite's network partitions (chaos/netns.py).
if ! command -v iptables >/dev/null; then
  echo "tools.sh: apt-get install iptables" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends iptables >/dev/null
fi
# The RPC load generator, for `make bench` only.
if [ "${1:-}" = "--with-ghz" ]; then
  install ghz github.com/bojand/ghz/cmd/ghz "$GHZ_VERSION"
fi
