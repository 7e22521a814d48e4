#!/usr/bin/env bash
# Start LocalStack's S3 emulator as a plain background process (no Docker),
# listening on 127.0.0.1 only, and wait until S3 answers.
#
# Usage: eval "$(localstack/start.sh [PORT] | tail -n 3)"
#   PORT defaults to a free port. The last three stdout lines are
#   LOCALSTACK_PID=..., LOCALSTACK_ENDPOINT=... and LOCALSTACK_STATE=...;
#   progress goes to stderr. Stop it with: localstack/stop.sh "$LOCALSTACK_PID"
#
# Env:
#   SIMPLEQUEUE_LOCALSTACK_STATE    state dir (pid file, log, data);
#                                   default <SIMPLEQUEUE_LOCALSTACK_HOME>/run-<port>
#   SIMPLEQUEUE_LOCALSTACK_TIMEOUT  seconds to wait for S3 (default 90)
#   plus those of install.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
home="${SIMPLEQUEUE_LOCALSTACK_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/simplequeue/localstack}"
timeout="${SIMPLEQUEUE_LOCALSTACK_TIMEOUT:-90}"

log() { printf 'localstack/start: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# install.sh is a no-op (well under a second) when the venv is up to date.
py="$("$here/install.sh" | tail -n 1)"
[[ -x "$py" ]] || die "install.sh did not report a python"

# Fails if the port is taken; with port 0 the OS picks a free one. There is a
# small window before LocalStack binds it; if lost, the early-death check fires.
bind_port() {
    "$py" -c '
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError as e:
    sys.exit("port %s: %s" % (sys.argv[1], e.strerror))
print(s.getsockname()[1])
s.close()
' "$1"
}

port="${1:-0}"
[[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
port="$(bind_port "$port")" || die "127.0.0.1:${1:-0} is not available"

state="${SIMPLEQUEUE_LOCALSTACK_STATE:-$home/run-$port}"
mkdir -p "$state/fs"
state="$(cd "$state" && pwd)"
pid_file="$state/localstack.pid"
log_file="$state/localstack.log"

# Refuse to start a second server on the same state dir.
if [[ -s "$pid_file" ]]; then
    old_pid="$(cat "$pid_file")"
    if [[ "$old_pid" =~ ^[0-9]+$ ]] && kill -0 "$old_pid" 2>/dev/null &&
        [[ "$(ps -o args= -p "$old_pid" 2>/dev/null)" == *localstack* ]]; then
        die "LocalStack already running from $state (PID $old_pid); stop it with localstack/stop.sh $old_pid"
    fi
    rm -f -- "$pid_file"
fi
rm -f -- "$state/localstack.env"

pid=""
ready=0
# If we fail or are interrupted before S3 is ready, don't leave a server behind.
cleanup() {
    if [[ -n "$pid" && "$ready" != 1 ]]; then
        "$here/stop.sh" "$state" >&2 || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "starting LocalStack S3 on 127.0.0.1:$port (state: $state)"
started=$SECONDS
(
    cd "$state"
    # GATEWAY_SERVER=hypercorn: the default server ignores the bind address
    #   and listens on 0.0.0.0.
    # OVERRIDE_IN_DOCKER=0: /.dockerenv may exist (CI containers) and would
    #   make LocalStack behave as if it ran in its own image.
    # DNS_ADDRESS=0: no DNS server (it would want port 53).
    # DISABLE_EVENTS / SKIP_SSL_CERT_DOWNLOAD: no outbound traffic.
    export GATEWAY_LISTEN="127.0.0.1:$port" LOCALSTACK_HOST="127.0.0.1:$port" \
        GATEWAY_SERVER=hypercorn SERVICES=s3 EAGER_SERVICE_LOADING=1 PERSISTENCE=0 \
        OVERRIDE_IN_DOCKER=0 DNS_ADDRESS=0 DISABLE_EVENTS=1 SKIP_SSL_CERT_DOWNLOAD=1 \
        LS_LOG="${LS_LOG:-warn}" FILESYSTEM_ROOT="$state/fs"
    # Like `setsid nohup`, but exec'd in place so that $! is LocalStack's own
    # PID: new session and process group (stop.sh kills that group, and
    # nothing else), SIGHUP ignored, SIGINT back to default (`&` ignores it).
    exec "$py" -c '
import os, signal, sys
try:
    os.setsid()
except OSError:
    pass  # already a group leader (job control): its group is still its own
signal.signal(signal.SIGHUP, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execv(sys.executable, [sys.executable, "-m", "localstack.runtime.main"])
'
) </dev/null >"$log_file" 2>&1 &
pid=$!
# Drop it from the job table: no "Killed ..." job notice if it dies.
disown "$pid" 2>/dev/null || true
printf '%s\n' "$pid" >"$pid_file"

# Ready = the health endpoint reports s3 up and an (unsigned) ListBuckets
# answers. Proxies are bypassed: http_proxy must not see 127.0.0.1 traffic.
s3_ready() {
    "$py" -c '
import json, sys, urllib.request
base = "http://127.0.0.1:%s" % sys.argv[1]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(base + "/_localstack/health", timeout=2) as r:
        if json.load(r).get("services", {}).get("s3") not in ("running", "available"):
            sys.exit(1)
    with opener.open(base + "/", timeout=2) as r:
        r.read()
except Exception:
    sys.exit(1)
' "$port" 2>/dev/null
}

# A dead child may linger as a zombie until reaped; that counts as dead
# (same test as in stop.sh).
alive() {
    local stat nlwp
    kill -0 "$1" 2>/dev/null || return 1
    read -r stat nlwp < <(ps -o stat=,nlwp= -p "$1" 2>/dev/null) || return 0
    [[ "$stat" != Z* || "${nlwp:-1}" -gt 1 ]]
}

while ! s3_ready; do
    if ! alive "$pid"; then
        log "LocalStack exited during startup; last lines of $log_file:"
        tail -n 30 "$log_file" >&2 || true
        pid=""
        rm -f -- "$pid_file"
        exit 1
    fi
    if ((SECONDS - started >= timeout)); then
        log "S3 not ready after ${timeout} s; last lines of $log_file:"
        tail -n 30 "$log_file" >&2 || true
        exit 1
    fi
    sleep 0.25
done
ready=1
log "ready in $((SECONDS - started)) s (PID $pid)"

assignments="$(
    printf 'LOCALSTACK_PID=%s\n' "$pid"
    printf 'LOCALSTACK_ENDPOINT=%s\n' "http://127.0.0.1:$port"
    printf 'LOCALSTACK_STATE=%q\n' "$state"
)"
# Also kept in the state dir, for `. "$state/localstack.env"`.
printf '%s\n' "$assignments" >"$state/localstack.env"
printf '%s\n' "$assignments"
