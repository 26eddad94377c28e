#!/bin/sh
# First start on an empty PGDATA: initdb with POSTGRES_USER/POSTGRES_PASSWORD, create POSTGRES_DB, run the init
# scripts on a server reachable by its socket only (so a TCP healthcheck waits for them), as the official image does.
# Then PostgreSQL listens on every interface of the container, password (SCRAM) required over TCP.
set -eu
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
[ "${1:-postgres}" = postgres ] && [ $# -gt 0 ] && shift

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "relais-postgres: set POSTGRES_PASSWORD (the password of $POSTGRES_USER over TCP)" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    if [ "$POSTGRES_DB" != postgres ]; then
        psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres -qc "CREATE DATABASE \"$POSTGRES_DB\""
    fi
    for script in /docker-entrypoint-initdb.d/*; do
        case "$script" in
            *.sql) echo "relais-postgres: running $script"
                   psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" -q -f "$script" ;;
            *.sh) echo "relais-postgres: running $script"; . "$script" ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "relais-postgres: database cluster ready in $PGDATA"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
