#!/usr/bin/env bash
# `make certs`: a local certificate authority and, signed by it, one certificate per identity;
# the key pair of bearer tokens; the database roles' passwords.
# Each identity's certificate names it twice: a SAN URI spiffe://ecommerce.local/<identity> (what
# the gRPC services authorize) and CN=<identity> (the principal Kafka's ACLs name). The SANs also
# cover the host names clients dial (localhost, 127.0.0.1, the compose service names), so one
# certificate serves both ends of mutual TLS. Also the Ed25519 key pair that signs and checks
# bearer tokens (`make token`).
#
# Idempotent: files that exist are kept (a certificate lacking a name added since is reported). Certificates and keys go to CERTS_DIR (default
# .local/certs), passwords to SECRETS_DIR (default .local/secrets): postgres-<role>.password for
# the owner role `ecommerce` and the services' roles. `bash scripts/certs.sh renew` replaces the
# certificates and keys (not the passwords). Keys and passwords are readable by their owner only.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${CERTS_DIR:-$repo/.local/certs}
secrets=${SECRETS_DIR:-$repo/.local/secrets}
days=${CERT_DAYS:-825}
trust_domain=ecommerce.local
# The services, the processor, the dead-letter replay tool, the Kafka brokers, an operator
# (Kafka super user: topics and ACLs) and a client for people (grpcurl, scripts).
identities=(user_service order_service processor dlq_replay kafka admin client)
# More names an identity's certificate holds: the brokers' host names in docker-compose.yml.
declare -A extra_names=([kafka]="kafka-1 kafka-2 kafka-3")

if ! command -v openssl >/dev/null; then
  echo "certs.sh: installing openssl from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq openssl >/dev/null
fi

if [ "${1:-}" = "renew" ]; then
  rm -rf "$dir"
fi
mkdir -p "$dir"
chmod 700 "$dir"
umask 077
made=()  # what this run created, for its one line of output

if [ ! -s "$dir/ca.crt" ]; then
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/ca.key"
  openssl req -x509 -new -key "$dir/ca.key" -sha256 -days "$days" \
    -subj "/O=ecommerce/CN=ecommerce local CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$dir/ca.crt"
  made+=(CA)
fi

# A certificate made before its identity got a name is kept (other clients trust it as it is):
# say which names it lacks, and that `renew` reissues it.
warn_missing_names() { # identity
  local name=$1 sans missing="" extra
  sans=$(openssl x509 -in "$dir/$name.crt" -noout -ext subjectAltName 2>/dev/null || true)
  for extra in ${extra_names[$name]:-}; do
    grep -qE "DNS:$extra(,|\s|$)" <<<"$sans" || missing+=" $extra"
  done
  if [ -n "$missing" ]; then
    echo "certs.sh: $name.crt lacks the names$missing (docker-compose.yml dials them): delete" \
      "it and run \`make certs\` to reissue it, or \`bash scripts/certs.sh renew\` for all" >&2
  fi
}

issue() { # identity
  local name=$1 host=${1//_/-} alias="" extra
  [ "$host" != "$name" ] && alias=",DNS:$host"
  for extra in ${extra_names[$name]:-}; do alias+=",DNS:$extra"; done
  if [ -s "$dir/$name.crt" ]; then
    warn_missing_names "$name"
    return
  fi
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/$name.key"
  openssl req -new -key "$dir/$name.key" -subj "/O=ecommerce/CN=$name" -out "$dir/$name.csr"
  cat >"$dir/$name.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=URI:spiffe://$trust_domain/$name,DNS:$name${alias},DNS:localhost,IP:127.0.0.1,IP:::1
EXT
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -sha256 -days "$days" -extfile "$dir/$name.ext" -out "$dir/$name.crt" 2>/dev/null
  rm -f "$dir/$name.csr" "$dir/$name.ext"
  # Kafka reads a PEM key store: the private key (PKCS#8) followed by its certificate.
  cat "$dir/$name.key" "$dir/$name.crt" >"$dir/$name.pem"
  made+=("$name")
}

for identity in "${identities[@]}"; do
  issue "$identity"
done

if [ ! -s "$dir/token-signing.key" ]; then
  openssl genpkey -algorithm ED25519 -out "$dir/token-signing.key"
  openssl pkey -in "$dir/token-signing.key" -pubout -out "$dir/token-signing.pub"
  made+=("token signing key")
fi
mkdir -p "$secrets"
chmod 700 "$secrets"
for role in ecommerce user_service order_service; do
  [ -s "$secrets/postgres-$role.password" ] && continue
  openssl rand -hex 24 | tr -d '\n' >"$secrets/postgres-$role.password"
  made+=("$role's database password")
done
# Certificates and public keys are not secret; the containers' non-root user reads them.
chmod 644 "$dir"/*.crt "$dir/token-signing.pub"
if [ ${#made[@]} -gt 0 ]; then
  echo "certs.sh: made ${made[*]} (certificates and keys in $dir, passwords in $secrets)" >&2
fi
