#!/usr/bin/env bash
# The Kubernetes manifests (deploy/k8s):
#   k8s.sh secrets          copy `make certs`' keys, certificates and passwords into each overlay's
#                           secrets/ (git ignores it), which its secretGenerator reads
#   k8s.sh validate [ROOT]  kustomize build the base and every overlay of ROOT (default deploy/k8s)
#                           and check each object against the Kubernetes schemas with kubeconform
#                           -strict (unknown or misspelt fields fail), offline; placeholder files
#                           stand in for the secrets, so no key is read
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
bin="$repo/.local/bin"
schemas="$repo/.local/k8s-schemas"

copy_secrets() {
  local overlay file source
  for overlay in "$repo"/deploy/k8s/overlays/*/; do
    mkdir -p "$overlay/secrets"
    chmod 700 "$overlay/secrets"
    for file in $(secret_files "$overlay"); do
      case $file in
        postgres-*.password) source="${SECRETS_DIR:-$repo/.local/secrets}/$file" ;;
        *) source="${CERTS_DIR:-$repo/.local/certs}/$file" ;;
      esac
      [ -s "$source" ] || { echo "k8s.sh: $source missing: run \`make certs\`" >&2; exit 1; }
      install -m 600 "$source" "$overlay/secrets/$file"
    done
    echo "k8s.sh: secrets for ${overlay%/} copied" >&2
  done
}

secret_files() { # overlay: the file names its secretGenerator reads from secrets/
  grep -oE 'secrets/[A-Za-z0-9_.-]+' "$1/kustomization.yaml" | sed 's#^secrets/##' | sort -u
}

validate() { # root
  local root=$1 work version dir overlay file
  [ -x "$bin/kustomize" ] && [ -x "$bin/kubeconform" ] && [ -s "$schemas/.version" ] ||
    { echo "k8s.sh: kustomize, kubeconform or the schemas missing: run \`make tools\`" >&2; exit 1; }
  version=$(cut -d' ' -f2 "$schemas/.version")
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  cp -r "$root" "$work/k8s"
  rm -rf "$work"/k8s/overlays/*/secrets
  for dir in "$work/k8s/base" "$work"/k8s/overlays/*; do
    [ -d "$dir" ] || continue
    if [ "$(basename "$(dirname "$dir")")" = overlays ]; then
      mkdir -p "$dir/secrets"
      for file in $(secret_files "$dir"); do echo "placeholder" >"$dir/secrets/$file"; done
    fi
    overlay=${dir#"$work/k8s/"}
    echo "k8s.sh: $overlay (Kubernetes $version)" >&2
    "$bin/kustomize" build "$dir" | "$bin/kubeconform" -strict -summary \
      -kubernetes-version "$version" \
      -schema-location "$schemas/{{ .NormalizedKubernetesVersion }}-local{{ .StrictSuffix }}/{{ .ResourceKind }}{{ .KindSuffix }}.json"
  done
}

case "${1:-}" in
  secrets) copy_secrets ;;
  validate) validate "${2:-$repo/deploy/k8s}" ;;
  *) echo "usage: k8s.sh secrets | validate [ROOT]" >&2; exit 2 ;;
esac
