#!/usr/bin/env bash
# Make a local PostgreSQL available for the test suite and print its URL.
#
# - If PostgreSQL is not installed and we are root on Debian, install it.
# - Start the Debian cluster (pg_ctlcluster) if it is down.
# - Create the role and database `phylax_test` (password `phylax_test`: a
#   throwaway local test credential, loopback only) if missing.
# Prints the URL on stdout; everything else goes to stderr.
set -euo pipefail

log() { echo "test-postgres: $*" >&2; }

if ! command -v pg_lsclusters >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing PostgreSQL"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
  else
    log "PostgreSQL is not installed; install it (apt-get install postgresql) or set PHYLAX_TEST_DATABASE_URL"
    exit 1
  fi
fi

cluster=$(pg_lsclusters -h | head -n1)
[ -n "$cluster" ] || { log "no PostgreSQL cluster found"; exit 1; }
ver=$(echo "$cluster" | awk '{print $1}')
name=$(echo "$cluster" | awk '{print $2}')
port=$(echo "$cluster" | awk '{print $3}')
status=$(echo "$cluster" | awk '{print $4}')
if [ "$status" != "online" ]; then
  log "starting cluster $ver/$name"
  pg_ctlcluster "$ver" "$name" start >&2
fi

as_pg() {
  if [ "$(id -u)" = 0 ]; then su postgres -c "$1"; else sudo -u postgres sh -c "$1"; fi
}
for _ in $(seq 1 30); do
  as_pg "psql -p $port -Atqc 'select 1'" >/dev/null 2>&1 && break
  sleep 1
done
# The TLS test needs the server to offer TLS. Debian's cluster does, with the
# machine's snake-oil certificate for localhost; if this one does not, give it
# a self-signed certificate for localhost (a throwaway, for tests only). It
# must not say CA:TRUE (openssl's default for -x509): rustls refuses a CA
# certificate as a server's own.
if [ "$(as_pg "psql -p $port -Atqc 'SHOW ssl'")" != on ]; then
  dir=$(as_pg "psql -p $port -Atqc 'SHOW data_directory'")
  log "enabling TLS on $ver/$name with a self-signed certificate for localhost"
  as_pg "openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=localhost -addext subjectAltName=DNS:localhost -addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth -keyout '$dir/phylax-test.key' -out '$dir/phylax-test.crt'" >/dev/null 2>&1
  as_pg "psql -p $port -qc \"ALTER SYSTEM SET ssl_cert_file = '$dir/phylax-test.crt'\" -c \"ALTER SYSTEM SET ssl_key_file = '$dir/phylax-test.key'\" -c 'ALTER SYSTEM SET ssl = on' -c 'SELECT pg_reload_conf()'" >&2
fi
as_pg "psql -p $port -Atqc \"SELECT 1 FROM pg_roles WHERE rolname='phylax_test'\"" | grep -q 1 ||
  as_pg "psql -p $port -qc \"CREATE ROLE phylax_test LOGIN PASSWORD 'phylax_test'\"" >&2
# Restore tests put a backup into a database of their own (a dump restores
# into a schema of the same name, which the source's database already has).
as_pg "psql -p $port -qc 'ALTER ROLE phylax_test CREATEDB'" >&2
# A fresh database each run: test schemas from earlier runs are dropped,
# and so are the restore tests' databases (phylax_r_…).
for db in $(as_pg "psql -p $port -Atqc \"SELECT datname FROM pg_database WHERE datname LIKE 'phylax\\_r\\_%'\""); do
  as_pg "psql -p $port -qc 'DROP DATABASE IF EXISTS $db WITH (FORCE)'" >&2
done
as_pg "psql -p $port -qc \"DROP DATABASE IF EXISTS phylax_test WITH (FORCE)\"" >&2

  as_pg "psql -p $port -qc \"CREATE DATABASE phylax_test OWNER phylax_test\"" >&2

echo "postgres://phylax_test:phylax_test@127.0.0.1:$port/phylax_test"
