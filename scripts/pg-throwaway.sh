#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the shared-store contract tests (auditor/tests/store_contract.rs).
#
#   eval "$(scripts/pg-throwaway.sh)"          # start; sets TIEBREAK_PG_URL and TIEBREAK_PG_DIR
#   cargo test -p tiebreak-auditor --test store_contract
#   scripts/pg-throwaway.sh stop "$TIEBREAK_PG_DIR"
#
# The cluster lives in a fresh temporary directory (data, log, unix socket), listens on 127.0.0.1
# only, on a free port, and trusts every local connection: it is for tests, never for data anyone
# keeps. Run as root, the server runs as an unprivileged user (`postgres` when the package created
# one, else `nobody`), which owns the directory: PostgreSQL refuses to run as root.
#
# Needs the server binaries (Debian: `apt-get install postgresql`); found through `pg_config
# --bindir`, /usr/lib/postgresql/*/bin or $PATH. Only the `export` lines go to stdout.
set -euo pipefail

die() {
  echo "pg-throwaway: $*" >&2
  exit 1
}

bindir() {
  local d
  for d in "$(pg_config --bindir 2>/dev/null || true)" $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV); do
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
      echo "$d"
      return
    fi
  done
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
    return
  fi
  die "no PostgreSQL server binaries (initdb, pg_ctl) found; install the 'postgresql' package"
}

# Runs "$@" as the cluster's user: ourselves, or an unprivileged one when we are root.
as_owner() {
  if [ "$(id -u)" -ne 0 ]; then
    "$@"
  elif command -v runuser >/dev/null 2>&1; then
    runuser -u "$owner" -- "$@"
  else
    su -s /bin/sh "$owner" -c "$(printf '%q ' "$@")"
  fi
}

free_port() {
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    return
  fi
  local p
  for p in $(seq 55432 55532); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return
    fi
  done
  die "no free port in 55432..55532"
}

start() {
  local bin port dir
  bin="$(bindir)"
  owner="$(id -un)"
  if [ "$(id -u)" -eq 0 ]; then
    if id postgres >/dev/null 2>&1; then owner=postgres; else owner=nobody; fi
  fi
  dir="$(mktemp -d "${TMPDIR:-/tmp}/tiebreak-pg.XXXXXX")"
  mkdir -p "$dir/sock"
  [ "$(id -u)" -ne 0 ] || chown -R "$owner" "$dir"
  chmod 0700 "$dir"
  # A temporary directory under a private parent must still be reachable by the server's user.
  as_owner test -w "$dir" || die "$owner cannot write $dir (set TMPDIR to a directory it can reach)"

  as_owner "$bin/initdb" -D "$dir/data" -U tiebreak -A trust --no-sync -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 ||
    die "initdb failed (log: $dir/initdb.log): $(tail -n 5 "$dir/initdb.log")"
  # Trust on the loopback address and the private socket only.
  cat >"$dir/data/pg_hba.conf" <<'EOF'
local all all trust
host  all all 127.0.0.1/32 trust
EOF
  [ "$(id -u)" -ne 0 ] || chown "$owner" "$dir/data/pg_hba.conf"

  local tries
  for tries in 1 2 3; do
    port="$(free_port)"
    # Durability is pointless in a cluster that is deleted after the tests.
    if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir/sock \
          -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
      start >/dev/null 2>&1; then
      echo "$port" >"$dir/port"
      echo "export TIEBREAK_PG_URL=postgres://tiebreak@127.0.0.1:$port/postgres"
      echo "export TIEBREAK_PG_DIR=$dir"
      return
    fi
    echo "pg-throwaway: start on port $port failed (try $tries): $(tail -n 3 "$dir/server.log" 2>/dev/null)" >&2
  done
  die "could not start the server (log: $dir/server.log)"
}

stop() {
  local dir="${1:-${TIEBREAK_PG_DIR:-}}"
  [ -n "$dir" ] || die "stop: which cluster? give its directory or set TIEBREAK_PG_DIR"
  [ -d "$dir/data" ] || die "stop: $dir holds no cluster"
  local bin owner
  bin="$(bindir)"
  owner="$(stat -c %U "$dir/data")"
  as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}

case "${1:-start}" in
  start) start ;;
  stop) stop "${2:-}" ;;
  *) die "usage: $0 [start | stop [DIR]]" ;;
esac
