#!/usr/bin/env bash
# Install moto's S3 server (moto_server) into a venv of its own.
#
# moto is a second S3 implementation that enforces If-Match / If-None-Match on
# PutObject; it pins its own boto3/botocore, so it never shares the project's
# venv. Only S3's dependencies and the server's (flask, flask-cors) are
# installed: `moto[server]` would add every other service's (cfn-lint, sympy,
# docker, ...), twice the size and time.
#
# Usage: PY=$(moto/install.sh | tail -n 1)
#   The last stdout line is the venv's python; progress goes to stderr.
#
# Env:
#   SIMPLEQUEUE_MOTO_HOME    where venvs live
#                            (default ${XDG_CACHE_HOME:-~/.cache}/simplequeue/moto)
#   SIMPLEQUEUE_MOTO_PYTHON  interpreter to build the venv from (3.9 or newer;
#                            default python3)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
home="${SIMPLEQUEUE_MOTO_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/simplequeue/moto}"
python="${SIMPLEQUEUE_MOTO_PYTHON:-python3}"

log() { printf 'moto/install: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

moto_version=5.2.5
constraints="$here/constraints-$moto_version.txt"
requirements=("moto[s3]==$moto_version" flask flask-cors)
[[ -r "$constraints" ]] || die "missing $constraints"

pyver="$("$python" -c 'import sys; assert sys.version_info >= (3, 9); print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" ||
    die "$python does not run or is older than 3.9 (set SIMPLEQUEUE_MOTO_PYTHON)"

venv="$home/venv-$moto_version-py$pyver"
venv_python="$venv/bin/python"
stamp_file="$venv/.simplequeue-install-stamp"
# Editing the version, the requirements or the pins forces a clean reinstall.
stamp="$(printf '%s\n' "${requirements[@]}" | cat - "$constraints" | sha256sum | cut -d' ' -f1)"

is_installed() {
    [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]] && "$venv_python" -c '' 2>/dev/null
}

if is_installed; then
    log "up to date: $venv"
    printf '%s\n' "$venv_python"
    exit 0
fi

mkdir -p "$home"
# Serialise concurrent installs (e.g. parallel test runs); flock is optional.
exec 9>"$home/.install.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi
if ! is_installed; then
    [[ ! -e "$venv" ]] || { log "removing incomplete or outdated $venv"; rm -rf -- "${venv:?}"; }
    log "creating $venv with $python (Python $pyver, moto $moto_version)"
    start=$SECONDS
    "$python" -m venv "$venv" >&2
    "$venv_python" -m pip install --disable-pip-version-check --quiet \
        "${requirements[@]}" -c "$constraints" >&2
    "$venv_python" -c 'import moto.server, moto.s3' >&2 || die "moto's S3 server does not import in $venv"
    # The stamp is written last, atomically: its presence means the install completed.
    printf '%s\n' "$stamp" >"$stamp_file.tmp"
    mv -f -- "$stamp_file.tmp" "$stamp_file"
    log "installed in $((SECONDS - start)) s"
fi
printf '%s\n' "$venv_python"
