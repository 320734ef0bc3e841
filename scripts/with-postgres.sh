#!/usr/bin/env bash
# Runs a command with a throwaway PostgreSQL server on a free loopback port.
#
#   scripts/with-postgres.sh cargo test --release
#
# Installs the distribution's PostgreSQL server when it is missing (as root,
# through apt-get), creates a cluster in a temporary directory, starts it on
# 127.0.0.1 with a port nobody listens on, exports VPPD_TEST_POSTGRES_URL
# (postgres://vppd:...@127.0.0.1:PORT/vppd) for the command, and stops the
# server and removes the directory afterwards, whatever the command's outcome.
# VPPD_PG_FSYNC=on keeps fsync on (the default off suits a throwaway cluster).
# Also installs strace when missing (tests/durability.rs traces the daemon).
set -euo pipefail

find_bin() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

if ! PGBIN=$(find_bin); then
    if [ "$(id -u)" != 0 ]; then
        echo "with-postgres: PostgreSQL is not installed; run as root or: apt-get install postgresql" >&2
        exit 2
    fi
    echo "with-postgres: installing PostgreSQL from the distribution's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q postgresql >/dev/null 2>&1 || {
        apt-get update -q >/dev/null
        apt-get install -y -q postgresql >/dev/null
    }
    PGBIN=$(find_bin)
fi

# strace, for the test that checks each answer follows a sync of the store.
if ! command -v strace >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "with-postgres: installing strace from the distribution's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q strace >/dev/null 2>&1 || {
        apt-get update -q >/dev/null
        apt-get install -y -q strace >/dev/null
    }
fi

# The server refuses to run as root: run it as the packaged postgres user.
as_pg=()
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin postgres
    as_pg=(runuser -u postgres --)
fi

free_port() {
    python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

DIR=$(mktemp -d /tmp/vppd-pg.XXXXXX)
chmod 0755 "$DIR"
[ ${#as_pg[@]} -gt 0 ] && chown postgres: "$DIR"
PORT=$(free_port)
PASSWORD=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')

cleanup() {
    "${as_pg[@]}" "$PGBIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap cleanup EXIT

"${as_pg[@]}" "$PGBIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 >"$DIR/initdb.log" 2>&1 || {
    cat "$DIR/initdb.log" >&2
    exit 1
}
# fsync off: a throwaway test cluster; the tests kill vppd, never the server.
# Benchmarks that compare stores set VPPD_PG_FSYNC=on, so that PostgreSQL
# pays for durability as sled does.
"${as_pg[@]}" "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -o \
    "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c fsync=${VPPD_PG_FSYNC:-off} -c max_connections=300" start >/dev/null || {
    cat "$DIR/server.log" >&2
    exit 1
}
"${as_pg[@]}" "$PGBIN/psql" -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 \
    -c "CREATE ROLE vppd LOGIN PASSWORD '$PASSWORD' CREATEDB" \
    -c "CREATE DATABASE vppd OWNER vppd" >/dev/null

export VPPD_TEST_POSTGRES_URL="postgres://vppd:$PASSWORD@127.0.0.1:$PORT/vppd"
echo "with-postgres: PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT" >&2
"$@"
