#!/usr/bin/env bash
# Shared services for a lab (or CI): one PostgreSQL cluster holding the Optuna study database
# ("optuna") and the MLflow backend store ("mlflow"), plus an `mlflow server` in front of it that
# also proxies artifacts. Everything lives in DIR; PIDs go to DIR/*.pid and `stop` kills by PID.
#
#   scripts/lab_services.sh install           # Debian's postgresql, if missing (root)
#   scripts/lab_services.sh start  DIR        # create (first time) or reuse the cluster, start both
#   scripts/lab_services.sh stop   DIR        # stop both (by PID), data stay in DIR
#   scripts/lab_services.sh status DIR
#   scripts/lab_services.sh restart DIR [postgres|mlflow]   # one service (or both), same settings
#   source DIR/lab.env                        # what a worker needs: URLs and the password file
#
# Settings (environment, read by `start`):
#   LAB_HOST=127.0.0.1      interface both servers bind to (0.0.0.0 for other machines)
#   LAB_ADVERTISE=...       host name workers use in the URLs (default LAB_HOST, or `hostname -f`)
#   LAB_PG_PORT=5432  LAB_MLFLOW_PORT=5000  LAB_MLFLOW_WORKERS=2
#   LAB_ARTIFACTS=DIR/artifacts   a shared filesystem path, or s3://bucket/prefix (needs boto3
#                                 and AWS credentials / MLFLOW_S3_ENDPOINT_URL for the server)
#   LAB_PG_ALLOW=10.0.0.0/16      extra client network allowed into PostgreSQL (password auth)
#   LAB_EXPERIMENTS=socseg        MLflow experiments created up front (comma-separated), so that
#                                 workers starting together never race on creating one
#   LAB_PYTHON=.venv/bin/python   the Python with mlflow, optuna, psycopg2 and socseg
#   LAB_TIMEOUT=120               seconds to wait for each server to come up
#   LAB_AUTH=basic                users and permissions: the server runs `--app-name socseg-lab`
#                                 (MLflow's basic-auth, plus: only MANAGE on a registered model moves
#                                 its champion; src/socseg/training/registry_server.py). Needs
#                                 MLFLOW_AUTH_ADMIN_PASSWORD in the environment of `start` (never
#                                 written to a file or log); MLFLOW_AUTH_ADMIN_USERNAME (admin).
#                                 LAB_AUTH=none: no authentication (a private machine only).
#   LAB_RESTART_DOWN=0            `restart`: seconds the service stays down (fault drills, tests)
#   LAB_MODELS=socseg-ni,socseg-phases   registered models the admin creates up front (with auth,
#                                 whoever creates a registered model gets MANAGE on it)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PG_USER=socseg   # database role of the lab; its password is in DIR/pgpass

die() { echo "lab_services: $*" >&2; exit 1; }

pg_bindir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

install_postgres() {
  if pg_bindir >/dev/null; then
    echo "PostgreSQL found in $(pg_bindir)"
    return
  fi
  [ "$(id -u)" = 0 ] || die "PostgreSQL is missing: install Debian's postgresql package (needs root)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # No default "main" cluster on port 5432: the lab runs only the cluster this script creates.
  apt-get install -y -qq --no-install-recommends postgresql-common >/dev/null
  sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  pg_bindir >/dev/null || die "postgresql installed but no /usr/lib/postgresql/*/bin/initdb"
  echo "installed PostgreSQL in $(pg_bindir)"
}

# PostgreSQL refuses to run as root: run its programs as the `postgres` system user then.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# Alive and still the program we started (a stale PID file may name a reused PID).
pid_alive() {  # pid_alive PIDFILE PATTERN
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q -- "$2"
}

pg_own() { if [ "$(id -u)" = 0 ]; then chown postgres: "$@"; fi; }

wait_until() {  # wait_until SECONDS COMMAND...: retry COMMAND every second until it succeeds
  local limit=$1 deadline
  shift
  deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 1
  done
}

psql_lab() {  # psql_lab DB SQL
  PGPASSFILE="$DIR/pgpass" "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d "$1" -tAc "$2"
}

start() {
  install_postgres
  BIN=$(pg_bindir)
  local host=${LAB_HOST:-127.0.0.1}
  PG_PORT=${LAB_PG_PORT:-5432}
  local mlflow_port=${LAB_MLFLOW_PORT:-5000} workers=${LAB_MLFLOW_WORKERS:-2} limit=${LAB_TIMEOUT:-120}
  local artifacts=${LAB_ARTIFACTS:-$DIR/artifacts} python=${LAB_PYTHON:-$REPO/.venv/bin/python}
  local advertise=${LAB_ADVERTISE:-$host}
  [ "$advertise" = 0.0.0.0 ] && advertise=$(hostname -f)
  [ -x "$python" ] || python=$(command -v python3)
  "$python" -c "import mlflow, optuna, psycopg2" 2>/dev/null \
    || die "$python lacks mlflow, optuna or psycopg2 (pip install psycopg2-binary; or set LAB_PYTHON)"

  mkdir -p "$DIR/logs"
  local pgdata=$DIR/pgdata
  if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$DIR"; then
    die "user postgres cannot enter $DIR: use a directory whose parents are world-executable (chmod o+x)"
  fi

  if [ ! -f "$pgdata/PG_VERSION" ]; then
    # First start: a new cluster whose only role is $PG_USER with a random password (scram).
    umask 077
    od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > "$DIR/pgpass.raw"
    printf '*:*:*:%s:%s\n' "$PG_USER" "$(cat "$DIR/pgpass.raw")" > "$DIR/pgpass"
    mkdir -p "$pgdata"
    pg_own "$pgdata" "$DIR/pgpass.raw"
    as_pg "$BIN/initdb" -D "$pgdata" -U "$PG_USER" --pwfile="$DIR/pgpass.raw" --auth=scram-sha-256 \
      -E UTF8 --locale=C >"$DIR/logs/initdb.log" 2>&1 || { cat "$DIR/logs/initdb.log" >&2; die "initdb failed"; }
    rm -f "$DIR/pgpass.raw"
    echo "include_if_exists = 'lab.conf'" >> "$pgdata/postgresql.conf"
    umask 022
  fi
  # Where to listen is rewritten on every start; no Unix socket (TCP only, no shared /run path).
  local listen=$host
  case $host in 127.0.0.1|0.0.0.0|'*') ;; *) listen="127.0.0.1,$host" ;; esac
  printf "listen_addresses = '%s'\nport = %s\nunix_socket_directories = ''\n" "$listen" "$PG_PORT" > "$pgdata/lab.conf"
  if [ -n "${LAB_PG_ALLOW:-}" ] && ! grep -q "^host all $PG_USER $LAB_PG_ALLOW " "$pgdata/pg_hba.conf"; then
    echo "host all $PG_USER $LAB_PG_ALLOW scram-sha-256" >> "$pgdata/pg_hba.conf"
  fi
  pg_own "$pgdata/lab.conf" "$pgdata/pg_hba.conf"

  if pid_alive "$DIR/postgres.pid" postgres; then
    echo "PostgreSQL already running (pid $(cat "$DIR/postgres.pid"))"
  else
    touch "$DIR/logs/postgres.log"
    pg_own "$DIR/logs/postgres.log"
    as_pg "$BIN/pg_ctl" -D "$pgdata" -l "$DIR/logs/postgres.log" -w -t "$limit" start >/dev/null \
      || { tail -n 20 "$DIR/logs/postgres.log" >&2; die "PostgreSQL did not start"; }
    head -n 1 "$pgdata/postmaster.pid" > "$DIR/postgres.pid"
  fi
  wait_until "$limit" psql_lab postgres "SELECT 1" || die "PostgreSQL does not answer on port $PG_PORT"
  local db
  for db in optuna mlflow; do
    [ "$(psql_lab postgres "SELECT 1 FROM pg_database WHERE datname = '$db'")" = 1 ] || psql_lab postgres "CREATE DATABASE $db"
  done
  local optuna_url="postgresql+psycopg2://$PG_USER@$advertise:$PG_PORT/optuna"
  local backend_url="postgresql+psycopg2://$PG_USER@127.0.0.1:$PG_PORT/mlflow"
  # Create Optuna's tables once here, so that N workers starting together do not race on it.
  PGPASSFILE="$DIR/pgpass" "$python" -c "import sys, optuna; optuna.storages.RDBStorage(sys.argv[1])" \
    "postgresql+psycopg2://$PG_USER@127.0.0.1:$PG_PORT/optuna"

  local tracking="http://$advertise:$mlflow_port"
  local auth=${LAB_AUTH:-basic} app_args=()
  case $auth in
    basic)
      [ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] \
        || die "LAB_AUTH=basic needs the admin password in MLFLOW_AUTH_ADMIN_PASSWORD (or LAB_AUTH=none)"
      "$python" -c "import flask_wtf, socseg.training.registry_server" 2>/dev/null \
        || die "$python lacks Flask-WTF or socseg (pip install -e . in that environment)"
      umask 077
      # Users, passwords and grants live in DIR/basic_auth.db; the admin's password only in the environment.
      printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///%s/basic_auth.db\nadmin_username = %s\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n' \
        "$DIR" "${MLFLOW_AUTH_ADMIN_USERNAME:-admin}" > "$DIR/auth.ini"
      [ -s "$DIR/flask_secret" ] || od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$DIR/flask_secret"
      umask 022
      # The admin user once, before the server's workers start (they would race to create it).
      MLFLOW_AUTH_CONFIG_PATH="$DIR/auth.ini" "$python" -c \
        "from mlflow.server.auth import bootstrap_admin_user; bootstrap_admin_user()" >"$DIR/logs/auth-bootstrap.log" 2>&1 \
        || { tail -n 5 "$DIR/logs/auth-bootstrap.log" >&2; die "could not create the admin user"; }
      app_args=(--app-name socseg-lab)
      ;;
    none) ;;
    *) die "LAB_AUTH must be basic or none, got '$auth'" ;;
  esac
  if pid_alive "$DIR/mlflow.pid" mlflow; then
    echo "mlflow server already running (pid $(cat "$DIR/mlflow.pid"))"
  else
    case $artifacts in *://*) ;; *) mkdir -p "$artifacts"; artifacts=$(cd "$artifacts" && pwd) ;; esac
    # setsid: the server and its uvicorn workers form one process group, led by the recorded PID.
    # Job execution (GenAI scorer jobs, a pool of huey processes, ~1.5 GiB) is unused by socseg.
    # Only with auth: the server imports mlflow.server.auth for some requests (search_runs), which
    # reads MLFLOW_AUTH_CONFIG_PATH and fails on a file that does not exist.
    local auth_env=()
    [ "$auth" = basic ] && auth_env=(MLFLOW_AUTH_CONFIG_PATH="$DIR/auth.ini"
                                     MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$DIR/flask_secret")")
    env "${auth_env[@]}" PGPASSFILE="$DIR/pgpass" MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
      setsid "$python" -m mlflow server \
      --backend-store-uri "$backend_url" --artifacts-destination "$artifacts" --serve-artifacts \
      --host "$host" --port "$mlflow_port" --workers "$workers" "${app_args[@]}" \
      >"$DIR/logs/mlflow.log" 2>&1 </dev/null &
    echo $! > "$DIR/mlflow.pid"
    local health="http://127.0.0.1:$mlflow_port/health"
    [ "$host" = 127.0.0.1 ] || [ "$host" = 0.0.0.0 ] || health="http://$host:$mlflow_port/health"
    if ! wait_until "$limit" "$python" -c \
        "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$health"; then
      tail -n 30 "$DIR/logs/mlflow.log" >&2
      die "mlflow server did not answer $health within ${limit}s (log: $DIR/logs/mlflow.log)"
    fi
  fi
  # Created up front: MLflow's set_experiment, when two processes create one name at once, leaves
  # the loser without an active experiment (its runs land in "Default").
  # With auth, as the admin (credentials from the environment, not the command line); the
  # registered models too, so that no member becomes their MANAGE-holding creator.
  local admin_env=()
  [ "$auth" = basic ] && admin_env=(MLFLOW_TRACKING_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
                                    MLFLOW_TRACKING_PASSWORD="$MLFLOW_AUTH_ADMIN_PASSWORD")
  env "${admin_env[@]}" MLFLOW_TRACKING_URI=$tracking "$python" - "${LAB_EXPERIMENTS-socseg}" \
      "${LAB_MODELS-socseg-ni,socseg-phases}" <<'EOF'
import sys
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
client = MlflowClient()
for name in filter(None, sys.argv[1].split(",")):
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name)
for name in filter(None, sys.argv[2].split(",")):
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="socseg segmentation models (PXCT Ni/YSZ)")
EOF

  cat > "$DIR/lab.env" <<EOF
# Source this on a worker (copy pgpass along, mode 0600): socseg search --storage "\$SOCSEG_STORAGE" ...
export MLFLOW_TRACKING_URI='$tracking'
export SOCSEG_STORAGE='$optuna_url'
export PGPASSFILE='$DIR/pgpass'
EOF
  echo "PostgreSQL pid $(cat "$DIR/postgres.pid") on $listen:$PG_PORT (databases optuna, mlflow)"
  echo "mlflow server pid $(cat "$DIR/mlflow.pid") on $tracking, artifacts in $artifacts"
  echo "workers: source $DIR/lab.env"
  if [ "$auth" = basic ]; then
    echo "authentication on: users log in with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials)"
  fi
}

stop_pid() {  # stop_pid PIDFILE PATTERN NAME SIGNAL GROUP(0|1)
  local file=$1 pattern=$2 name=$3 signal=$4 group=$5 pid target
  if ! pid_alive "$file" "$pattern"; then
    rm -f "$file"
    echo "$name not running"
    return 0
  fi
  pid=$(cat "$file")
  target=$pid
  if [ "$group" = 1 ]; then target=-$pid; fi   # the process group this PID leads (set up by setsid)
  kill "-$signal" -- "$target" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while kill -0 -- "$target" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
  if kill -0 -- "$target" 2>/dev/null; then
    echo "$name (pid $pid) still running after 30 s: SIGKILL" >&2
    kill -KILL -- "$target" 2>/dev/null || true
  fi
  rm -f "$file"
  echo "stopped $name (pid $pid)"
}

stop() {
  # mlflow first (it holds database connections); SIGINT is PostgreSQL's "fast" shutdown.
  stop_pid "$DIR/mlflow.pid" mlflow "mlflow server" TERM 1
  stop_pid "$DIR/postgres.pid" postgres PostgreSQL INT 0
}

restart() {  # restart one service (postgres | mlflow) or both; the other keeps running
  case ${SERVICE:-all} in
    postgres) stop_pid "$DIR/postgres.pid" postgres PostgreSQL INT 0 ;;
    mlflow) stop_pid "$DIR/mlflow.pid" mlflow "mlflow server" TERM 1 ;;
    all) stop ;;
    *) die "restart: the service is postgres, mlflow or all, got '$SERVICE'" ;;
  esac
  sleep "${LAB_RESTART_DOWN:-0}"
  start
}

status() {
  local rc=0 name
  for name in postgres mlflow; do
    if pid_alive "$DIR/$name.pid" "$name"; then
      echo "$name: running (pid $(cat "$DIR/$name.pid"))"
    else
      echo "$name: stopped"
      rc=3
    fi
  done
  return $rc
}

command=${1:-}
case $command in
  install) install_postgres ;;
  start|stop|status|restart)
    [ $# -eq 2 ] || { [ "$command" = restart ] && [ $# -eq 3 ]; } || die "usage: $0 $command DIR"
    mkdir -p "$2"
    DIR=$(cd "$2" && pwd)
    SERVICE=${3:-all}
    "$command" ;;
  *) die "usage: $0 install | start DIR | stop DIR | status DIR | restart DIR [postgres|mlflow]" ;;
esac
