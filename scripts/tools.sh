#!/usr/bin/env bash
# Installs the pinned command-line tools (grpcurl, buf; ghz with --with-ghz) into .local/bin with
# `go install`, and Prometheus with promtool and iptables from Debian's packages when missing.
# Skips a tool whose pinned version is already there.
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

install grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl "$GRPCURL_VERSION"
install buf github.com/bufbuild/buf/cmd/buf "$BUF_VERSION"
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
