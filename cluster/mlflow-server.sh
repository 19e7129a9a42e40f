#!/usr/bin/env bash
# The sweep's MLflow tracking server: runs on the cluster head (aws.yaml / gcp.yaml start it),
# every trial on every node logs to it over HTTP.
#
#   cluster/mlflow-server.sh [--auth] [--host HOST] [--port PORT] [--check-db] [--help]
#
# Where things live (environment, never command-line arguments, so nothing shows in `ps`):
#   DIFFSCALE_MLFLOW_DB_URI     PostgreSQL backend store, e.g. postgresql://mlflow@db.internal:5432/mlflow
#                               (required). Put NO password in it: give it as PGPASSWORD (read
#                               from your secret manager at start time) or in ~/.pgpass.
#   DIFFSCALE_MLFLOW_ARTIFACTS  where artifacts go, e.g. s3://YOUR-BUCKET/mlflow (required). The
#                               server proxies them (--artifacts-destination): clients need no
#                               bucket credentials, the head's instance role / service account does.
#   DIFFSCALE_MLFLOW_HOST       interface to listen on (default 0.0.0.0; --host overrides)
#   DIFFSCALE_MLFLOW_PORT       port (default 5000; --port overrides)
#   DIFFSCALE_MLFLOW_WORKERS    server processes (default 4; 1 is plenty for a small cluster)
#   DIFFSCALE_MLFLOW_ALLOWED_HOSTS  Host headers accepted (default: localhost + private IPs); add
#                               the head's public name if workers reach it by that name
#   DIFFSCALE_MLFLOW_HOME       state dir for the auth config and user db (default ~/.diffscale-mlflow)
#   DIFFSCALE_MLFLOW_AUTH_DB_URI  user/permission store for --auth (default sqlite in the state dir)
#
# --auth (or DIFFSCALE_MLFLOW_AUTH=1) turns on MLflow's basic auth (--app-name basic-auth). It
# needs MLFLOW_AUTH_ADMIN_PASSWORD (and optionally MLFLOW_AUTH_ADMIN_USERNAME, default admin) in
# the environment the first time; the script refuses to start without it. Clients then set
# MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
#
# Before starting, the script connects to the database once (5 s timeout) and stops with a clear
# message naming the host if it cannot; --check-db does only that check.
#
# Health check, once it runs:   curl -fsS http://HOST:PORT/health    (prints OK)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -x "$HERE/../.venv/bin/python" ]]; then PY="$HERE/../.venv/bin/python"
else PY="$(command -v python3)"; fi
MLFLOW="$(dirname "$PY")/mlflow"
[[ -x "$MLFLOW" ]] || MLFLOW="$(command -v mlflow || true)"

usage() { sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "mlflow-server.sh: $*" >&2; exit 2; }

HOST="${DIFFSCALE_MLFLOW_HOST:-0.0.0.0}"
PORT="${DIFFSCALE_MLFLOW_PORT:-5000}"
AUTH="${DIFFSCALE_MLFLOW_AUTH:-0}"
CHECK_ONLY=0
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --auth) AUTH=1 ;;
    --no-auth) AUTH=0 ;;
    --check-db) CHECK_ONLY=1 ;;
    --host) (($# >= 2)) || die "--host needs a value"; HOST="$2"; shift ;;
    --port) (($# >= 2)) || die "--port needs a value"; PORT="$2"; shift ;;
    *) die "unknown argument '$1' (allowed: --auth, --no-auth, --host, --port, --check-db, --help)" ;;
  esac
  shift
done

[[ "$PORT" =~ ^[0-9]+$ ]] && ((PORT > 0 && PORT < 65536)) \
  || die "port must be a number in 1..65535, got '$PORT'"
[[ "$AUTH" == 0 || "$AUTH" == 1 ]] || die "DIFFSCALE_MLFLOW_AUTH must be 0 or 1, got '$AUTH'"
if [[ "$AUTH" == 1 && -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]]; then
  die "basic auth was requested (--auth / DIFFSCALE_MLFLOW_AUTH=1) but MLFLOW_AUTH_ADMIN_PASSWORD" \
      "is not set; export it from your secret manager (never write it into a file). Not starting."
fi
DB_URI="${DIFFSCALE_MLFLOW_DB_URI:-}"
[[ -n "$DB_URI" ]] || die "DIFFSCALE_MLFLOW_DB_URI is not set (allowed: postgresql://USER@HOST:PORT/DB)"
case "$DB_URI" in
  postgresql://*|postgres://*|postgresql+psycopg://*) ;;
  *) die "DIFFSCALE_MLFLOW_DB_URI must start with postgresql:// (a server database; got scheme '${DB_URI%%://*}')" ;;
esac

# One short connection, so an unreachable or misconfigured database is a clear message rather
# than a gunicorn traceback. Prints host/port/db/user, never the password.
DIFFSCALE_MLFLOW_DB_URI="$DB_URI" "$PY" - <<'PYEOF' || exit 2
import os, sys
import psycopg
from psycopg.conninfo import conninfo_to_dict

uri = os.environ["DIFFSCALE_MLFLOW_DB_URI"].replace("postgresql+psycopg://", "postgresql://", 1)
try:
    info = conninfo_to_dict(uri)
except psycopg.ProgrammingError as e:
    sys.exit(f"mlflow-server.sh: DIFFSCALE_MLFLOW_DB_URI is not a valid PostgreSQL URI: {type(e).__name__}")
where = f"{info.get('host', 'localhost')}:{info.get('port', 5432)} (database {info.get('dbname', '?')}, user {info.get('user', '?')})"
pw = info.get("password") or os.environ.get("PGPASSWORD") or ""
try:
    psycopg.connect(uri, connect_timeout=5).close()
except psycopg.Error as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if pw:
        reason = reason.replace(pw, "***")
    sys.exit(f"mlflow-server.sh: cannot reach the MLflow database at {where}: {reason}")
print(f"mlflow-server.sh: database reachable at {where}", file=sys.stderr)
PYEOF
((CHECK_ONLY)) && exit 0

ARTIFACTS="${DIFFSCALE_MLFLOW_ARTIFACTS:-}"
case "$ARTIFACTS" in
  s3://?*|gs://?*) ;;
  "") die "DIFFSCALE_MLFLOW_ARTIFACTS is not set (allowed: s3://BUCKET/PREFIX or gs://BUCKET/PREFIX)" ;;
  *) die "DIFFSCALE_MLFLOW_ARTIFACTS must be s3://BUCKET/PREFIX or gs://BUCKET/PREFIX, got '$ARTIFACTS'" ;;
esac

# SQLAlchemy needs the psycopg (3) driver named explicitly; plain postgresql:// means psycopg2.
BACKEND="$DB_URI"
case "$BACKEND" in
  postgresql://*) BACKEND="postgresql+psycopg://${BACKEND#postgresql://}" ;;
  postgres://*) BACKEND="postgresql+psycopg://${BACKEND#postgres://}" ;;
esac
# Passed through the environment (MLFLOW_BACKEND_STORE_URI), so the URI never shows in `ps`.
export MLFLOW_BACKEND_STORE_URI="$BACKEND"
ARGS=(server --artifacts-destination "$ARTIFACTS" --serve-artifacts --host "$HOST" --port "$PORT")
WORKERS="${DIFFSCALE_MLFLOW_WORKERS:-4}"
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "DIFFSCALE_MLFLOW_WORKERS must be a whole number >= 1, got '$WORKERS'"
ARGS+=(--workers "$WORKERS")
[[ -z "${DIFFSCALE_MLFLOW_ALLOWED_HOSTS:-}" ]] || ARGS+=(--allowed-hosts "$DIFFSCALE_MLFLOW_ALLOWED_HOSTS")
if [[ "$AUTH" == 1 ]]; then
  HOME_DIR="${DIFFSCALE_MLFLOW_HOME:-$HOME/.diffscale-mlflow}"
  mkdir -p "$HOME_DIR"; chmod 700 "$HOME_DIR"
  AUTH_DB="${DIFFSCALE_MLFLOW_AUTH_DB_URI:-sqlite:///$HOME_DIR/basic_auth.db}"
  (umask 077; cat > "$HOME_DIR/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = $AUTH_DB
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
  )
  export MLFLOW_AUTH_CONFIG_PATH="$HOME_DIR/basic_auth.ini"  # the password stays in the env only
  ARGS+=(--app-name basic-auth)
fi
echo "mlflow-server.sh: serving on http://$HOST:$PORT (artifacts -> $ARTIFACTS, auth=$AUTH);" \
     "health: curl -fsS http://$HOST:$PORT/health" >&2
exec "$MLFLOW" "${ARGS[@]}"
