#!/usr/bin/env bash
# Install LocalStack's S3 emulator (localstack-core) into a venv of its own.
#
# LocalStack pins botocore 1.42.x, which conflicts with the botocore that
# aiobotocore needs, so it never shares the project's venv.
#
# Usage: PY=$(localstack/install.sh | tail -n 1)
#   The last stdout line is the venv's python; progress goes to stderr.
#
# Env:
#   SIMPLEQUEUE_LOCALSTACK_HOME    where venvs live
#                                  (default ${XDG_CACHE_HOME:-~/.cache}/simplequeue/localstack)
#   SIMPLEQUEUE_LOCALSTACK_PYTHON  interpreter to build the venv from (3.11-3.13);
#                                  default: pyenv's or PATH's python3.13, 3.12, then 3.11
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
home="${SIMPLEQUEUE_LOCALSTACK_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/simplequeue/localstack}"

log() { printf 'localstack/install: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Print "MAJOR.MINOR" of an interpreter, or fail. pyenv shims for versions that
# are installed but not selected exist on PATH and fail when run, so every
# candidate is actually executed rather than trusted by name.
py_minor() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

# Find an interpreter for MINOR (e.g. 3.13): pyenv's install dirs first (they
# work even when another version is selected), then pythonMINOR on PATH.
find_python() {
    local minor=$1 cand root
    if command -v pyenv >/dev/null 2>&1 && root="$(pyenv root 2>/dev/null)"; then
        # Newest patch release first; a 3.13 glob must not match 3.130, hence "3.13.*".
        while IFS= read -r cand; do
            if [[ -x "$cand" && "$(py_minor "$cand")" == "$minor" ]]; then
                printf '%s\n' "$cand"
                return 0
            fi
        done < <(compgen -G "$root/versions/$minor.*/bin/python3" | sort -rV)
    fi
    if cand="$(command -v "python$minor" 2>/dev/null)" && [[ "$(py_minor "$cand")" == "$minor" ]]; then
        printf '%s\n' "$cand"
        return 0
    fi
    return 1
}

if [[ -n "${SIMPLEQUEUE_LOCALSTACK_PYTHON:-}" ]]; then
    python="$SIMPLEQUEUE_LOCALSTACK_PYTHON"
    pyver="$(py_minor "$python")" || die "SIMPLEQUEUE_LOCALSTACK_PYTHON=$python does not run"
else
    python=""
    for pyver in 3.13 3.12 3.11; do
        if python="$(find_python "$pyver")"; then
            break
        fi
        python=""
    done
    [[ -n "$python" ]] || die "need Python 3.13, 3.12 or 3.11 (pyenv or on PATH)"
fi

# localstack-core 2026.x uses 3.12 syntax (though it declares >=3.10), so 3.11
# gets 4.13.1, the newest release that runs there.
case "$pyver" in
    3.12 | 3.13)
        ls_version=2026.3.0
        constraints="$here/constraints-2026.3.0-py313.txt"
        ;;
    3.11)
        ls_version=4.13.1
        constraints="$here/constraints-4.13.1-py311.txt"
        ;;
    *) die "Python $pyver is not supported (need 3.11, 3.12 or 3.13)" ;;
esac
[[ -r "$constraints" ]] || die "missing $constraints"

# The three extra pins fix packages that [base-runtime] resolves wrongly.
requirements=("localstack-core[base-runtime]==$ls_version" "cbor2<6" "pyopenssl<26" "service_identity")

venv="$home/venv-$ls_version-py$pyver"
venv_python="$venv/bin/python"
stamp_file="$venv/.simplequeue-install-stamp"

# The stamp changes whenever the version, the pins or the constraints change,
# so editing any of them forces a clean reinstall.
stamp="$(
    {
        printf '%s\n' "$ls_version" "${requirements[@]}"
        cat "$constraints"
    } | "$python" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
)"

is_installed() {
    [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]] && "$venv_python" -c '' 2>/dev/null
}

# Fast path: nothing to do (no lock needed, the stamp is written last).
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
if is_installed; then # another process finished it while we waited
    printf '%s\n' "$venv_python"
    exit 0
fi

# No matching stamp: a half-finished or outdated venv, so start from scratch.
if [[ -e "$venv" ]]; then
    log "removing incomplete or outdated $venv"
    rm -rf -- "${venv:?}"
fi

log "creating $venv with $python (Python $pyver, localstack-core $ls_version)"
start=$SECONDS
"$python" -m venv "$venv" >&2
"$venv_python" -m pip install --disable-pip-version-check --quiet \
    "${requirements[@]}" -c "$constraints" >&2
"$venv_python" -c 'import localstack.runtime.main' >&2 ||
    die "localstack does not import in $venv"

# Write the stamp atomically, last: its presence means the install completed.
printf '%s\n' "$stamp" >"$stamp_file.tmp"
mv -f -- "$stamp_file.tmp" "$stamp_file"
log "installed in $((SECONDS - start)) s"
printf '%s\n' "$venv_python"
