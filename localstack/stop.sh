#!/usr/bin/env bash
# Stop a LocalStack started by start.sh: SIGTERM, wait up to 10 s, then
# SIGKILL (its shutdown sometimes hangs). Idempotent: succeeds if it is
# already gone.
#
# Usage: localstack/stop.sh <PID | state dir>
# Env: SIMPLEQUEUE_LOCALSTACK_STOP_TIMEOUT  grace period before SIGKILL (default 10 s)
set -euo pipefail

grace="${SIMPLEQUEUE_LOCALSTACK_STOP_TIMEOUT:-10}"

log() { printf 'localstack/stop: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $# -eq 1 && -n "$1" ]] || die "usage: $0 <PID | state dir>"

pid_file=""
if [[ "$1" =~ ^[0-9]+$ ]]; then
    pid="$1"
else
    pid_file="$1/localstack.pid"
    if [[ ! -s "$pid_file" ]]; then
        log "no PID file in $1: nothing to stop"
        exit 0
    fi
    pid="$(cat "$pid_file")"
    [[ "$pid" =~ ^[0-9]+$ ]] || die "bad PID file $pid_file"
fi

# Drop start.sh's PID file and env file (stop by state dir only).
forget() { [[ -z "$pid_file" ]] || rm -f -- "$pid_file" "${pid_file%/*}/localstack.env"; }

# kill -0 also succeeds on a zombie (dead, not yet reaped, which can take a
# while when PID 1 is not an init): that counts as gone, but only once no
# thread is left (after SIGKILL the leader turns Z before the others exit,
# and the port is still bound until they do).
alive() {
    local stat nlwp
    kill -0 "$1" 2>/dev/null || return 1
    read -r stat nlwp < <(ps -o stat=,nlwp= -p "$1" 2>/dev/null) || return 0
    [[ "$stat" != Z* || "${nlwp:-1}" -gt 1 ]]
}

# Wait up to $2 seconds for PID $1 to go away.
wait_gone() {
    local deadline=$((SECONDS + $2))
    while alive "$1"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

if ! alive "$pid"; then
    log "PID $pid is not running"
    forget
    exit 0
fi

# Never signal a process that is not LocalStack (e.g. a PID reused after a
# stale PID file).
if [[ "$(ps -o args= -p "$pid" 2>/dev/null)" != *localstack* ]]; then
    if [[ -n "$pid_file" ]]; then
        log "PID $pid from $pid_file is no longer LocalStack: stale PID file, removed"
        forget
        exit 0
    fi
    die "PID $pid is not a LocalStack process; not touching it"
fi

# start.sh puts LocalStack in a process group of its own (PGID == PID); then
# signal that whole group so no child outlives it. Any other group (e.g. the
# caller's) is never signalled, only the PID itself.
target="$pid"
pgid="$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" || pgid=""
if [[ "$pgid" == "$pid" ]]; then
    target="-$pid"
fi

log "sending SIGTERM to ${target/#-/process group }"
kill -TERM -- "$target" 2>/dev/null || true
if ! wait_gone "$pid" "$grace"; then
    log "still running after $grace s: sending SIGKILL"
    kill -KILL -- "$target" 2>/dev/null || true
    wait_gone "$pid" 5 || die "PID $pid survived SIGKILL"
fi
# The leader is gone; take down any group member it left behind.
if [[ "$target" == -* ]] && kill -0 -- "$target" 2>/dev/null; then
    kill -KILL -- "$target" 2>/dev/null || true
fi
forget
log "stopped PID $pid"
