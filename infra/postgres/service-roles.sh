#!/usr/bin/env bash
# The services' login roles, with the passwords `make certs` wrote (what each may do is granted by
# migration 0004). The postgres image runs it once, on an empty data directory (docker-compose.yml);
# run it again after changing a password file:
#   docker compose exec postgres /docker-entrypoint-initdb.d/service-roles.sh
# psql reads the passwords itself (backquotes): they appear in no argument list or environment,
# and the server keeps only their SCRAM verifiers.
# (No `set -u`: the image sources, into its own shell, a script that is not executable.)
set -eo pipefail

if [ -z "${PGPASSWORD:-}" ]; then # set by the image while it initialises; run again, read it
  PGPASSWORD=$(cat "$POSTGRES_PASSWORD_FILE")
  export PGPASSWORD
fi

psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
\set user_service_password `cat /run/secrets/postgres-user_service.password`
\set order_service_password `cat /run/secrets/postgres-order_service.password`
SELECT format('CREATE ROLE %I', role) FROM unnest(ARRAY['user_service', 'order_service']) AS role
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = role) \gexec
ALTER ROLE user_service LOGIN PASSWORD :'user_service_password';
ALTER ROLE order_service LOGIN PASSWORD :'order_service_password';
SQL
