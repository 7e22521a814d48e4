#!/usr/bin/env bash
# Stop a moto_server started by start.sh: SIGTERM, wait up to 10 s, then
# SIGKILL. Succeeds if it is already gone.
#
# Usage: moto/stop.sh PID
# Env: SIMPLEQUEUE_MOTO_STOP_TIMEOUT  grace period before SIGKILL (default 10 s)
set -euo pipefail

grace="${SIMPLEQUEUE_MOTO_STOP_TIMEOUT:-10}"

log() { printf 'moto/stop: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $# -eq 1 && "$1" =~ ^[0-9]+$ ]] || die "usage: $0 PID"
pid="$1"

# A zombie (dead, not yet reaped) counts as gone once no thread is left.
alive() {
    local stat nlwp
    kill -0 "$1" 2>/dev/null || return 1
    read -r stat nlwp < <(ps -o stat=,nlwp= -p "$1" 2>/dev/null) || return 0
    [[ "$stat" != Z* || "${nlwp:-1}" -gt 1 ]]
}

wait_gone() {
    local deadline=$((SECONDS + $2))
    while alive "$1"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

if ! alive "$pid"; then
    log "PID $pid is not running"
    exit 0
fi
# Never signal a process that is not moto's server (e.g. a reused PID).
[[ "$(ps -o args= -p "$pid" 2>/dev/null)" == *moto_server* ]] ||
    die "PID $pid is not a moto_server process; not touching it"

log "sending SIGTERM to PID $pid"
kill -TERM "$pid" 2>/dev/null || true
if ! wait_gone "$pid" "$grace"; then
    log "still running after $grace s: sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 5 || die "PID $pid survived SIGKILL"
fi
log "stopped PID $pid"
