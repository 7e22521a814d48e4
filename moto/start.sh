#!/usr/bin/env bash
# Start moto's S3 server as a background process listening on 127.0.0.1 only,
# and wait until S3 answers.
#
# Usage: eval "$(moto/start.sh [PORT] | tail -n 2)"
#   PORT defaults to a free port. The last two stdout lines are MOTO_PID=...
#   and MOTO_ENDPOINT=...; progress goes to stderr. Stop it with:
#   moto/stop.sh "$MOTO_PID"
#
# Env:
#   SIMPLEQUEUE_MOTO_LOG      its log (default <SIMPLEQUEUE_MOTO_HOME>/moto-<port>.log)
#   SIMPLEQUEUE_MOTO_TIMEOUT  seconds to wait for S3 (default 30)
#   plus those of install.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
home="${SIMPLEQUEUE_MOTO_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/simplequeue/moto}"
timeout="${SIMPLEQUEUE_MOTO_TIMEOUT:-30}"

log() { printf 'moto/start: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# install.sh is a no-op (well under a second) when the venv is up to date.
py="$("$here/install.sh" | tail -n 1)"
[[ -x "$py" ]] || die "install.sh did not report a python"

# With port 0 the OS picks a free one. There is a small window before moto
# binds it; if lost, the early-death check fires.
port="${1:-0}"
[[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
port="$("$py" -c '
import socket, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", int(sys.argv[1])))
    print(s.getsockname()[1])
' "$port" 2>/dev/null)" || die "127.0.0.1:${1:-0} is not available"
log_file="${SIMPLEQUEUE_MOTO_LOG:-$home/moto-$port.log}"
mkdir -p "$(dirname "$log_file")"

pid=""
ready=0
# If we fail or are interrupted before S3 is ready, don't leave a server behind.
cleanup() { [[ -z "$pid" || "$ready" == 1 ]] || "$here/stop.sh" "$pid" >&2 || true; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "starting moto's S3 on 127.0.0.1:$port (log: $log_file)"
started=$SECONDS
# moto's server in this process (so that $! is its PID), in a session and
# process group of its own (as localstack/start.sh does), SIGHUP ignored.
# Its requests are served one at a time: moto's conditional PUT checks the
# ETag, then writes, with no lock between, and its threaded server let two
# If-Match PUTs of one ETag both land (a lost update: a job claimed twice in
# test_three_committers_complete_every_job_exactly_once[moto]). S3's own
# conditional writes are atomic; this makes moto's so.
"$py" -c '
import os, signal, sys, threading
try:
    os.setsid()
except OSError:
    pass  # already a group leader (job control): its group is still its own
signal.signal(signal.SIGHUP, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_DFL)
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication, MotoRequestHandler, create_backend_app,
)
app = DomainDispatcherApplication(create_backend_app)
one_at_a_time = threading.Lock()
def serialised(environ, start_response):
    with one_at_a_time:
        return list(app(environ, start_response))
os.environ.setdefault("MOTO_PORT", sys.argv[1])
run_simple("127.0.0.1", int(sys.argv[1]), serialised, threaded=True,
           request_handler=MotoRequestHandler)
' "$port" </dev/null >"$log_file" 2>&1 &
pid=$!
disown "$pid" 2>/dev/null || true

# Ready = an unsigned ListBuckets answers. Proxies are bypassed: http_proxy
# must not see 127.0.0.1 traffic.
s3_ready() {
    "$py" -c '
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open("http://127.0.0.1:%s/" % sys.argv[1], timeout=2) as r:
    r.read()
' "$port" 2>/dev/null
}

# A zombie (dead, not yet reaped) counts as dead.
alive() { kill -0 "$1" 2>/dev/null && [[ "$(ps -o stat= -p "$1" 2>/dev/null)" != Z* ]]; }

while ! s3_ready; do
    if ! alive "$pid"; then
        pid=""
        log "moto exited during startup; last lines of $log_file:"
        tail -n 30 "$log_file" >&2 || true
        exit 1
    fi
    if ((SECONDS - started >= timeout)); then
        log "S3 not ready after ${timeout} s; last lines of $log_file:"
        tail -n 30 "$log_file" >&2 || true
        exit 1
    fi
    sleep 0.1
done
ready=1
log "ready in $((SECONDS - started)) s (PID $pid)"
printf 'MOTO_PID=%s\n' "$pid"
printf 'MOTO_ENDPOINT=%s\n' "http://127.0.0.1:$port"
