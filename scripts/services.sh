#!/usr/bin/env bash
# The production counterparts, run for real on this machine: a throwaway PostgreSQL cluster
# under $EVENTML_HOME/services/postgres on 127.0.0.1:$EVENTML_PG_PORT (trust auth, loopback only)
# and a Redis server under $EVENTML_HOME/services/redis on 127.0.0.1:$EVENTML_REDIS_PORT.
#   scripts/services.sh start | stop | status | url | redis-url
# `make services` starts both; point eventml at them with EVENTML_POSTGRES_URL=$(scripts/services.sh url)
# and EVENTML_REDIS_URL=$(scripts/services.sh redis-url). Redis is optional: without
# redis-server (apt-get install redis-server) only Postgres starts.
set -euo pipefail
: "${EVENTML_HOME:=$PWD/.state}"
PORT="${EVENTML_PG_PORT:-55432}"
DATA="$EVENTML_HOME/services/postgres"
BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)}"
URL="postgresql://postgres@127.0.0.1:$PORT/eventml"
REDIS_PORT="${EVENTML_REDIS_PORT:-56379}"
REDIS_DATA="$EVENTML_HOME/services/redis"
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"

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

# Redis keeps an append-only file (fsync every second) beside its log: the online store and, later,
# the event stream survive a restart.
start_redis() {
    command -v redis-server >/dev/null || { echo "redis-server not found: apt-get install redis-server (Redis tests skip)" >&2; return 0; }
    if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
        echo "redis already running: $REDIS_URL"; return
    fi
    mkdir -p "$REDIS_DATA"
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$REDIS_DATA" --daemonize yes \
        --pidfile "$REDIS_DATA/redis.pid" --logfile "$REDIS_DATA/server.log" \
        --appendonly yes --appendfsync everysec --save "" \
        || { echo "redis did not start: see $REDIS_DATA/server.log" >&2; exit 1; }
    for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
    echo "redis running: $REDIS_URL"
}

stop_redis() {
    command -v redis-cli >/dev/null && redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    echo "redis stopped"
}

stop() {
    [ -d "$DATA" ] && [ -n "$BIN" ] && as_pg "$BIN/pg_ctl" -D "$DATA" -m fast stop >/dev/null 2>&1 || true
    echo "postgres stopped"
}

case "${1:-start}" in
    start) start; start_redis ;;
    stop) stop; stop_redis ;;
    status) as_pg "$BIN/pg_ctl" -D "$DATA" status; redis-cli -p "$REDIS_PORT" ping ;;
    url) echo "$URL" ;;
    redis-url) echo "$REDIS_URL" ;;
    *) echo "usage: $0 start|stop|status|url|redis-url" >&2; exit 2 ;;
esac
