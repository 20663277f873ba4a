#!/usr/bin/env bash
# Local services of the SPO pipeline, all bound to 127.0.0.1:
#   bash scripts/services.sh start      Prefect server (:4200, background, waits until healthy)
#                                       + the process serving the flows (flows/serve.py)
#   bash scripts/services.sh mlflow     MLflow UI (:5000) on sqlite:///mlruns/mlflow.db
#   bash scripts/services.sh status     what is running
#   bash scripts/services.sh stop       stop everything this script started
# Logs and pid files: tmp/services/ (git-ignored). Settings come from prefect.toml in the repo root.
# Environment: PREFECT_HOME (server database, default ~/.prefect), MLFLOW_PORT (5000),
# SPO_SERVICES_TIMEOUT (seconds to wait for the Prefect server, 90).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUN="$ROOT/tmp/services"
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
  setsid nohup "$@" >"$RUN/$name.log" 2>&1 < /dev/null &
  echo $! >"$RUN/$name.pid"
  log "$name started (pid $!, log $RUN/$name.log)"
}

# stop NAME: TERM the process group this script started, KILL it after 20 s.
stop_bg() {
  local name="$1" pid
  if ! alive "$RUN/$name.pid"; then rm -f "$RUN/$name.pid"; return; fi
  pid="$(cat "$RUN/$name.pid")"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; fi
  rm -f "$RUN/$name.pid"
  log "$name stopped (pid $pid)"
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

stop() {
  stop_bg serve
  stop_bg mlflow
  prefect server stop 2>&1 | sed 's/^/[services] prefect: /'
}

status() {
  for name in serve mlflow; do
    if alive "$RUN/$name.pid"; then log "$name: running (pid $(cat "$RUN/$name.pid"))"; else log "$name: stopped"; fi
  done
  if prefect server status >/dev/null 2>&1; then log "prefect server: healthy"; else log "prefect server: not answering"; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  mlflow) mlflow_ui ;;
  *) echo "usage: $0 start|stop|status|mlflow" >&2; exit 2 ;;
esac
