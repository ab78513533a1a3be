#!/usr/bin/env bash
# Local PostgreSQL for development and tests: `up` installs it (Debian package) if missing, creates a
# cluster in a git-ignored folder, starts it on loopback and waits until it answers; `down` stops the
# server this script started (by its PID file) and nothing else. Both are idempotent.
# Password authentication only (scram-sha-256) over TCP; the `postgres` superuser only through the
# cluster's private socket, as the OS user postgres (peer). The roles — `ecommerce` owns the
# databases and runs the migrations, `user_service` and `order_service` get what migration 0004
# grants — take their passwords from SECRETS_DIR (`make certs` writes them).
# The server loads pg_stat_statements (tracking statements inside triggers too), for `make bench`'s
# statement counts; the extension's view lives in database `postgres`, which no test drops.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
port=${PGPORT:-55432}
db_user=${PGUSER_APP:-ecommerce}
service_roles=(user_service order_service)
secrets=${SECRETS_DIR:-$repo/.local/secrets}
databases=(ecommerce ecommerce_test ecommerce_chaos ecommerce_bench ecommerce_pgbench)

# PostgreSQL refuses to run as root, so the cluster belongs to the `postgres` user. It lives in the
# repo's .local/ folder when that user can reach it, otherwise in a folder of its own under /var/tmp.
pick_data_dir() {
  local in_repo="$repo/.local/postgres"
  mkdir -p "$repo/.local"
  if runuser -u postgres -- test -x "$repo/.local" 2>/dev/null; then
    echo "$in_repo"
  else
    echo "/var/tmp/ecommerce-postgres-$(printf '%s' "$repo" | sha1sum | cut -c1-12)"
  fi
}

pg_bin() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] && echo "$dir"
}

install_postgres() {
  [ -n "$(pg_bin)" ] && return
  echo "postgres.sh: installing PostgreSQL from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
  # The package starts a system cluster; leave it alone, ours runs on its own port.
}

as_postgres() { runuser -u postgres -- "$@"; }

up() {
  install_postgres
  local bin data
  bin=$(pg_bin)
  data=$(pick_data_dir)
  if [ ! -s "$data/PG_VERSION" ]; then
    mkdir -p "$data"
    chown postgres:postgres "$data"
    chmod 700 "$data"
    as_postgres "$bin/initdb" -D "$data" -U postgres --auth-local=peer --auth-host=scram-sha-256 \
      --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  fi
  write_hba "$data"
  local options="-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories='$data'"
  options+=" -c max_connections=200 -c shared_preload_libraries=pg_stat_statements"
  options+=" -c pg_stat_statements.track=all"
  if as_postgres "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    echo "postgres.sh: already running on 127.0.0.1:$port ($data)"
    if ! loads_pg_stat_statements; then
      # Ours (its data directory is this script's), so ours to restart, once.
      echo "postgres.sh: it was started without pg_stat_statements; restarting it to load it" \
        "(open connections are closed)"
      as_postgres "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 -m fast restart \
        -o "$options" >/dev/null
    fi
  elif "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then
    echo "postgres.sh: 127.0.0.1:$port answers, but not from $data: using that server as it is"
    loads_pg_stat_statements || echo "postgres.sh: it runs without pg_stat_statements, and" \
      "this script did not start it, so does not restart it: make bench reports no statement counts"
  else
    as_postgres "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start -o "$options" >/dev/null
    echo "postgres.sh: started on 127.0.0.1:$port ($data)"
  fi
  if [ -s "$data/postmaster.pid" ]; then
    ln -sfn "$data/postmaster.pid" "$repo/.local/postgres.pid"
    as_postgres "$bin/pg_ctl" -D "$data" reload >/dev/null  # pg_hba.conf as written above
  fi
  create_role_and_databases
  if [ -z "$(psql_admin -d postgres -c "SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'")" ]; then
    psql_admin -d postgres -c "CREATE EXTENSION pg_stat_statements"
  fi
  # Statements recorded before passwords were kept out of it (see set_password) are dropped.
  psql_admin -d postgres -c "SELECT count(pg_stat_statements_reset(userid, dbid, queryid))
    FROM pg_stat_statements WHERE query ILIKE '%password%'" >/dev/null
}

loads_pg_stat_statements() {
  psql_admin -d postgres -c "SHOW shared_preload_libraries" | grep -qw pg_stat_statements
}

# No trust anywhere: a clusters made before this rule had it, so the file is rewritten each time.
write_hba() { # data dir
  cat >"$1/pg_hba.conf" <<'HBA'
# TYPE  DATABASE  USER      ADDRESS        METHOD
local   all       postgres                 peer
host    all       all       127.0.0.1/32   scram-sha-256
host    all       all       ::1/128        scram-sha-256
HBA
  chown postgres:postgres "$1/pg_hba.conf"
}

psql_admin() {
  as_postgres psql -h "$(pick_data_dir)" -p "$port" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"
}

# Sets a role's password from its file, through stdin: it never shows in a process list.
set_password() { # role
  local file="$secrets/postgres-$1.password"
  if [ ! -s "$file" ]; then
    echo "postgres.sh: no password for role $1 in $secrets; run \`make certs\` first" >&2
    exit 1
  fi
  # Not in pg_stat_statements either: a utility statement is recorded with its text.
  printf "SET pg_stat_statements.track_utility = off;\nALTER ROLE %s PASSWORD '%s';\n" \
    "$1" "$(cat "$file")" | psql_admin -d postgres
}

create_role_and_databases() {
  local role
  for role in "$db_user" "${service_roles[@]}"; do
    if [ -z "$(psql_admin -d postgres -c "SELECT 1 FROM pg_roles WHERE rolname = '$role'")" ]; then
      psql_admin -d postgres -c "CREATE ROLE $role LOGIN"
    fi
    psql_admin -d postgres -c "ALTER ROLE $role LOGIN"
    set_password "$role"
  done
  # make bench counts every role's statements (pg_stat_statements) as the owner role.
  psql_admin -d postgres -c "SET client_min_messages = warning" \
    -c "GRANT pg_read_all_stats TO $db_user"
  local name
  for name in "${databases[@]}"; do
    if [ -z "$(psql_admin -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$name'")" ]; then
      psql_admin -d postgres -c "CREATE DATABASE $name OWNER $db_user"
    fi
  done
}

down() {
  local bin data
  bin=$(pg_bin) || true
  data=$(pick_data_dir)
  if [ -n "$bin" ] && [ -s "$data/postmaster.pid" ]; then
    as_postgres "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null
    echo "postgres.sh: stopped"
  else
    echo "postgres.sh: not running"
  fi
  rm -f "$repo/.local/postgres.pid"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
