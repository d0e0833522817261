#!/usr/bin/env bash
# The production counterparts, run for real on this machine: a throwaway PostgreSQL cluster
# under $EVENTML_HOME/services/postgres on 127.0.0.1:$EVENTML_PG_PORT (trust auth, loopback only).
#   scripts/services.sh start | stop | status | url
# `make services` starts it; point eventml at it with EVENTML_POSTGRES_URL=$(scripts/services.sh url).
set -euo pipefail
: "${EVENTML_HOME:=$PWD/.state}"
PORT="${EVENTML_PG_PORT:-55432}"
DATA="$EVENTML_HOME/services/postgres"
BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)}"
URL="postgresql://postgres@127.0.0.1:$PORT/eventml"

# The server refuses to run as root: as root, run its tools as the `postgres` user.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
# As root, the `postgres` user must reach the data folder; under a private home (/root is 0700)
# it cannot, and the cluster lives in /tmp instead, named after the state folder.
if [ "$(id -u)" -eq 0 ] && id postgres >/dev/null 2>&1 && ! runuser -u postgres -- test -x "$EVENTML_HOME" 2>/dev/null \
   && ! runuser -u postgres -- test -x "$(dirname "$EVENTML_HOME")" 2>/dev/null; then
    DATA="/tmp/eventml-postgres-$(printf '%s' "$EVENTML_HOME" | md5sum | cut -c1-12)"
fi

start() {
    [ -n "$BIN" ] && [ -x "$BIN/pg_ctl" ] || { echo "PostgreSQL server binaries not found (set PG_BIN): apt-get install postgresql" >&2; exit 1; }
    if as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
        echo "postgres already running: $URL"; return
    fi
    if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" >/dev/null 2>&1; then
        echo "port $PORT is taken by another server: set EVENTML_PG_PORT to a free port" >&2; exit 1
    fi
    if [ ! -s "$DATA/PG_VERSION" ]; then
        mkdir -p "$DATA"
        [ "$(id -u)" -eq 0 ] && chown postgres "$DATA"
        as_pg "$BIN/initdb" -D "$DATA" -U postgres -A trust -E UTF8 >"$DATA.initdb.log" 2>&1 \
            || { echo "initdb failed: see $DATA.initdb.log" >&2; exit 1; }
    fi
    as_pg "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -c unix_socket_directories='' -c max_connections=200 -c fsync=off" start >/dev/null \
        || { echo "postgres did not start: see $DATA/server.log" >&2; exit 1; }
    echo "postgres running: $URL"
}

stop() {
    [ -d "$DATA" ] && [ -n "$BIN" ] && as_pg "$BIN/pg_ctl" -D "$DATA" -m fast stop >/dev/null 2>&1 || true
    echo "postgres stopped"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) as_pg "$BIN/pg_ctl" -D "$DATA" status ;;
    url) echo "$URL" ;;
    *) echo "usage: $0 start|stop|status|url" >&2; exit 2 ;;
esac
