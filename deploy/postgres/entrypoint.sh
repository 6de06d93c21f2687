#!/bin/sh
# First start on an empty volume: a cluster whose superuser $POSTGRES_USER has $POSTGRES_PASSWORD
# (password login over the network only), and the database $POSTGRES_DB. Then run postgres.
set -eu
bin=/usr/lib/postgresql/15/bin
: "${POSTGRES_USER:?set POSTGRES_USER}" "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    # UTF-8: with initdb's default here (SQL_ASCII) psycopg 3 returns text as bytes.
    "$bin/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    "$bin/pg_ctl" -D "$PGDATA" -o "-c listen_addresses=''" -w start
    "$bin/createdb" -U "$POSTGRES_USER" "${POSTGRES_DB:-$POSTGRES_USER}"
    "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop
fi
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*'
