#!/usr/bin/env bash
# Services of the SPO pipeline. Everything binds 127.0.0.1 unless an address is named, and a
# non-loopback address is refused (exit 2) without authentication.
# One machine:
#   bash scripts/services.sh start      Prefect server (:4200, background, waits until healthy)
#                                       + the process serving the flows (flows/serve.py)
#   bash scripts/services.sh mlflow     MLflow UI (:5000) on sqlite:///mlruns/mlflow.db
# Several hosts (one server host, one worker per host):
#   bash scripts/services.sh server     Prefect server alone: SPO_PREFECT_HOST (127.0.0.1),
#                                       SPO_PREFECT_PORT (4200); non-loopback needs
#                                       PREFECT_SERVER_API_AUTH_STRING=user:password
#   bash scripts/services.sh tracking   MLflow tracking server with one shared artifact store
#                                       (--serve-artifacts): SPO_MLFLOW_HOST (127.0.0.1), MLFLOW_PORT,
#                                       SPO_MLFLOW_BACKEND, SPO_MLFLOW_ARTIFACTS; non-loopback needs
#                                       SPO_MLFLOW_ADMIN_PASSWORD (MLflow basic auth, mlflow[auth])
#   bash scripts/services.sh worker     Prefect process worker for pool SPO_WORK_POOL (spo), name
#                                       SPO_WORKER_NAME, SPO_WORKER_LIMIT; passes SPO_GPUS through
#   bash scripts/services.sh status     what is running
#   bash scripts/services.sh stop       stop everything this script started
# Logs, pid files and url files: tmp/services/ of this checkout (git-ignored; SPO_SERVICES_RUN overrides).
# Settings come from prefect.toml in the repo root; PREFECT_* environment variables override it.
# Environment: PREFECT_HOME (server database, default ~/.prefect), MLFLOW_PORT (5000),
# SPO_SERVICES_TIMEOUT (seconds to wait for a server, 90).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUN="${SPO_SERVICES_RUN:-$ROOT/tmp/services}"
mkdir -p "$RUN"
TIMEOUT="${SPO_SERVICES_TIMEOUT:-90}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
export SPO_REPO_ROOT="$ROOT"
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1

log() { echo "[services] $*"; }
alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# start NAME CMD...: run CMD detached in its own session (pid = process group id) with its log.
start_bg() {
  local name="$1"; shift
  if alive "$RUN/$name.pid"; then log "$name already running (pid $(cat "$RUN/$name.pid"))"; return; fi
  # A non-interactive bash starts background jobs with SIGINT ignored; Prefect's worker turns SIGTERM
  # into SIGINT, so without the reset `stop` could only KILL it. (env --default-signal: coreutils 8.31+)
  local reset=(env --default-signal=INT)
  env --default-signal=INT true 2>/dev/null || reset=()
  setsid nohup "${reset[@]}" "$@" >"$RUN/$name.log" 2>&1 < /dev/null &
  echo $! >"$RUN/$name.pid"
  log "$name started (pid $!, log $RUN/$name.log)"
}

# stop NAME: TERM the process group this script started, KILL it after 20 s.
stop_bg() {
  local name="$1" pid
  if ! alive "$RUN/$name.pid"; then rm -f "$RUN/$name.pid"; return; fi
  pid="$(cat "$RUN/$name.pid")"
  local t0=$SECONDS
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  local how=stopped
  if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; how="killed (no exit 20 s after TERM)"; fi
  rm -f "$RUN/$name.pid"
  log "$name $how (pid $pid, $((SECONDS - t0)) s)"
}

# is_loopback HOST: only these addresses may run without authentication.
is_loopback() { [[ "$1" == 127.* || "$1" == localhost || "$1" == ::1 || "$1" == "[::1]" ]]; }

# refuse MESSAGE: bad settings are one line on stderr and exit 2, before anything starts.
refuse() { echo "services.sh: $*" >&2; exit 2; }

# client_host HOST: the address clients use; a wildcard bind is advertised as this host's first IP.
client_host() {
  case "$1" in
    0.0.0.0|::|"[::]") local ip; ip="$(hostname -I 2>/dev/null | awk '{print $1}')"; echo "${ip:-$(hostname)}" ;;
    ::1) echo "[::1]" ;;
    *) echo "$1" ;;
  esac
}

# probe_host HOST: where this script itself checks health (a wildcard bind answers on loopback).
probe_host() { case "$1" in 0.0.0.0|::|"[::]") echo 127.0.0.1 ;; ::1) echo "[::1]" ;; *) echo "$1" ;; esac; }

# wait_http NAME URL: poll URL until it answers 200; fail early, with the log, if NAME's process died.
wait_http() {
  local name="$1" url="$2" t0=$SECONDS
  while (( SECONDS - t0 < TIMEOUT )); do
    if ! alive "$RUN/$name.pid"; then
      tail -n 20 "$RUN/$name.log" >&2 || true
      log "$name exited before answering at $url (log above, full: $RUN/$name.log)"; rm -f "$RUN/$name.pid"; exit 1
    fi
    if python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$url" 2>/dev/null; then
      log "$name healthy after $((SECONDS - t0)) s ($url)"; return
    fi
    sleep 1
  done
  log "$name not healthy after ${TIMEOUT}s: see $RUN/$name.log"; exit 1
}

start() {
  if prefect server status >/dev/null 2>&1; then
    log "Prefect server already answering at $(prefect config view 2>/dev/null | sed -n "s/^PREFECT_API_URL='\(.*\)'.*/\1/p")"
  else
    prefect server start --background >"$RUN/prefect-server.log" 2>&1 \
      || { cat "$RUN/prefect-server.log"; log "Prefect server did not start (see above; a stale pid file? run: prefect server stop)"; exit 1; }
    local t0=$SECONDS
    if ! prefect server status --wait --timeout "$TIMEOUT" >>"$RUN/prefect-server.log" 2>&1; then
      log "Prefect server not healthy after ${TIMEOUT}s: see $RUN/prefect-server.log"; exit 1
    fi
    log "Prefect server healthy after $((SECONDS - t0)) s (UI http://127.0.0.1:4200)"
  fi
  start_bg serve python flows/serve.py
  log "deployments: prefect deployment run spo/full --watch  (also stage/single, ablation/table)"
}

mlflow_ui() {
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start_bg mlflow \
    mlflow ui --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 --backend-store-uri sqlite:///mlruns/mlflow.db
  log "MLflow UI: http://127.0.0.1:$MLFLOW_PORT"
}

# server: the Prefect server alone (the work pool's workers run the flows), in its own process group
# so `stop` works for any host/port/PREFECT_HOME. --host/--port and the PREFECT_SERVER_API_* variables
# both override prefect.toml.
server() {
  local host="${SPO_PREFECT_HOST:-127.0.0.1}" port="${SPO_PREFECT_PORT:-4200}"
  [[ "$port" =~ ^[0-9]+$ ]] || refuse "SPO_PREFECT_PORT must be a port number, got '$port'"
  if [[ -n "${PREFECT_SERVER_API_AUTH_STRING:-}" && ! "$PREFECT_SERVER_API_AUTH_STRING" =~ ^[^:]+:.+$ ]]; then
    refuse "PREFECT_SERVER_API_AUTH_STRING must have the form user:password"
  fi
  if ! is_loopback "$host" && [[ -z "${PREFECT_SERVER_API_AUTH_STRING:-}" ]]; then
    refuse "refusing to bind the Prefect server to $host without authentication: set PREFECT_SERVER_API_AUTH_STRING=user:password (and PREFECT_API_AUTH_STRING on the clients)"
  fi
  if alive "$RUN/prefect-server.pid"; then
    log "prefect-server already running (pid $(cat "$RUN/prefect-server.pid"), $(cat "$RUN/prefect-server.url" 2>/dev/null))"; return
  fi
  export PREFECT_SERVER_API_HOST="$host" PREFECT_SERVER_API_PORT="$port"
  start_bg prefect-server prefect server start --host "$host" --port "$port"
  local url="http://$(client_host "$host"):$port/api"
  echo "$url" >"$RUN/prefect-server.url"
  # /api/health is served without credentials even when the auth string is set.
  wait_http prefect-server "http://$(probe_host "$host"):$port/api/health"
  log "clients: export PREFECT_API_URL=$url"
  if [[ -n "${PREFECT_SERVER_API_AUTH_STRING:-}" ]]; then
    log "clients: export PREFECT_API_AUTH_STRING=<the same user:password as PREFECT_SERVER_API_AUTH_STRING>"
  fi
}

# tracking: an MLflow tracking server; clients upload artifacts through it (mlflow-artifacts:/ URIs)
# into one store instead of each host's folder. Non-loopback uses MLflow's basic-auth app.
tracking() {
  local host="${SPO_MLFLOW_HOST:-127.0.0.1}" port="$MLFLOW_PORT"
  local backend="${SPO_MLFLOW_BACKEND:-sqlite:///$ROOT/mlruns/mlflow.db}"
  local artifacts="${SPO_MLFLOW_ARTIFACTS:-$ROOT/mlruns/artifacts}"
  local user="${SPO_MLFLOW_ADMIN_USER:-admin}" password="${SPO_MLFLOW_ADMIN_PASSWORD:-}"
  local args=()
  [[ "$port" =~ ^[0-9]+$ ]] || refuse "MLFLOW_PORT must be a port number, got '$port'"
  if ! is_loopback "$host" && [[ -z "$password" ]]; then
    refuse "refusing to bind the MLflow tracking server to $host without authentication: set SPO_MLFLOW_ADMIN_PASSWORD (12+ characters; clients set MLFLOW_TRACKING_USERNAME=${user} and MLFLOW_TRACKING_PASSWORD)"
  fi
  if [[ -n "$password" ]]; then
    # MLflow's own password rule, checked here so the refusal names the variable to fix.
    (( ${#password} >= 12 )) || refuse "SPO_MLFLOW_ADMIN_PASSWORD is too short: MLflow needs at least 12 characters"
    python -c 'import flask_wtf' 2>/dev/null \
      || refuse "MLflow basic auth needs Flask-WTF: pip install -e '$ROOT[services]' (or pip install 'mlflow[auth]')"
    if [[ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]]; then
      # The users database sits next to the tracking data, not in the working directory
      # (MLflow's default sqlite:///basic_auth.db). No password in the file: it comes from the environment.
      export MLFLOW_AUTH_CONFIG_PATH="$RUN/mlflow-auth.ini"
      printf '[mlflow]\ndefault_permission = %s\ndatabase_uri = %s\nadmin_username = %s\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n' \
        "${SPO_MLFLOW_DEFAULT_PERMISSION:-READ}" "${SPO_MLFLOW_AUTH_DB:-sqlite:///$ROOT/mlruns/basic_auth.db}" "$user" \
        >"$MLFLOW_AUTH_CONFIG_PATH"
    fi
    # Used only when the admin user is first created; afterwards change it through MLflow's API.
    export MLFLOW_AUTH_ADMIN_USERNAME="$user" MLFLOW_AUTH_ADMIN_PASSWORD="$password"
    # A static key for the auth app's CSRF protection, shared by the workers of this start.
    export MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(python -c 'import secrets; print(secrets.token_hex(32))')}"
    args+=(--app-name basic-auth)
  fi
  if [[ -n "${SPO_MLFLOW_ALLOWED_HOSTS:-}" ]]; then
    args+=(--allowed-hosts "$SPO_MLFLOW_ALLOWED_HOSTS")
  elif ! is_loopback "$host"; then
    # MLflow's Host-header check (DNS rebinding) accepts localhost and private IPs only; add the
    # names clients of this host use, so a public address or a hostname is not refused with 403.
    args+=(--allowed-hosts "$(python -c 'import sys; from mlflow.server.security_utils import get_default_allowed_hosts as d; print(",".join(d() + sys.argv[1:]))' \
      "$(client_host "$host"):$port" "$(hostname):$port" "$(hostname -f 2>/dev/null || hostname):$port")")
  fi
  if alive "$RUN/tracking.pid"; then
    log "tracking already running (pid $(cat "$RUN/tracking.pid"), $(cat "$RUN/tracking.url" 2>/dev/null))"; return
  fi
  [[ "$backend" == sqlite:///* ]] && mkdir -p "$(dirname "${backend#sqlite:///}")"
  [[ "$artifacts" == *://* ]] || mkdir -p "$artifacts"
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false start_bg tracking \
    mlflow server --host "$host" --port "$port" --workers "${SPO_MLFLOW_WORKERS:-2}" \
      --backend-store-uri "$backend" --artifacts-destination "$artifacts" --serve-artifacts "${args[@]}"
  local url="http://$(client_host "$host"):$port"
  echo "$url" >"$RUN/tracking.url"
  wait_http tracking "http://$(probe_host "$host"):$port/health"
  log "artifacts: $artifacts (backend $backend)"
  log "clients: export MLFLOW_TRACKING_URI=$url"
  if [[ -n "$password" ]]; then
    log "clients: export MLFLOW_TRACKING_USERNAME=$user MLFLOW_TRACKING_PASSWORD=<SPO_MLFLOW_ADMIN_PASSWORD, or a user the admin created>"
  fi
}

# worker: one Prefect process worker per host; its flow runs are child processes in its process
# group, so `stop` ends them too. Reaches the server through PREFECT_API_URL (+ PREFECT_API_AUTH_STRING).
worker() {
  local pool="${SPO_WORK_POOL:-spo}" name="${SPO_WORKER_NAME:-$(hostname)-$(basename "$ROOT")}"
  local args=(--pool "$pool" --type process --name "$name")
  if [[ -n "${SPO_WORKER_LIMIT:-}" ]]; then
    [[ "$SPO_WORKER_LIMIT" =~ ^[1-9][0-9]*$ ]] || refuse "SPO_WORKER_LIMIT must be a positive integer, got '$SPO_WORKER_LIMIT'"
    args+=(--limit "$SPO_WORKER_LIMIT")
  fi
  # SPO_REPO_ROOT (exported above) and SPO_GPUS reach the flow runs through the environment.
  if alive "$RUN/worker.pid"; then log "worker already running (pid $(cat "$RUN/worker.pid"))"; return; fi
  start_bg worker prefect worker start "${args[@]}"
  # Wait for Prefect's own "started" line: a wrong URL or auth string ends the worker right away.
  local t0=$SECONDS
  until grep -q "Worker '$name' started" "$RUN/worker.log" 2>/dev/null; do
    if ! alive "$RUN/worker.pid"; then
      tail -n 20 "$RUN/worker.log" >&2 || true
      log "worker exited at start (log above, full: $RUN/worker.log)"; rm -f "$RUN/worker.pid"; exit 1
    fi
    (( SECONDS - t0 < TIMEOUT )) || { log "worker did not report started after ${TIMEOUT}s: see $RUN/worker.log"; exit 1; }
    sleep 0.5
  done
  log "worker $name on pool $pool (SPO_REPO_ROOT=$ROOT, SPO_GPUS=${SPO_GPUS:-unset}, API ${PREFECT_API_URL:-from prefect.toml})"
}

stop() {
  stop_bg worker
  stop_bg serve
  stop_bg mlflow
  stop_bg tracking
  stop_bg prefect-server
  rm -f "$RUN/prefect-server.url" "$RUN/tracking.url"
  # The server of `start` runs under prefect's own --background pid file in PREFECT_HOME.
  if [[ -f "${PREFECT_HOME:-$HOME/.prefect}/server.pid" ]]; then
    prefect server stop 2>&1 | sed 's/^/[services] prefect: /'
  fi
}

status() {
  local name
  for name in serve worker mlflow tracking prefect-server; do
    if alive "$RUN/$name.pid"; then
      log "$name: running (pid $(cat "$RUN/$name.pid")$( [[ -f "$RUN/$name.url" ]] && echo ", $(cat "$RUN/$name.url")"))"
    else
      log "$name: stopped"
    fi
  done
  if prefect server status >/dev/null 2>&1; then log "prefect server at PREFECT_API_URL (prefect.toml unless set): healthy"; else log "prefect server at PREFECT_API_URL (prefect.toml unless set): not answering"; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  mlflow) mlflow_ui ;;
  server) server ;;
  tracking) tracking ;;
  worker) worker ;;
  *) echo "usage: $0 start|stop|status|mlflow|server|tracking|worker" >&2; exit 2 ;;
esac
