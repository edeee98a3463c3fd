#!/usr/bin/env bash
# Sluice's one entry point for people and CI. Each command installs what it
# needs into ./.venv (once per pyproject.toml change), then runs.
#
#   ./dev.sh serve [sluice serve flags]   run the gateway (embedded simulator unless an upstream is set)
#   ./dev.sh test  [pytest args]          run the test suite
#   ./dev.sh bench [benchmark args]       run the benchmark suite (see benchmarks/README.md)
#   ./dev.sh simulate [--port P]          run the simulated upstream alone
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv

ensure_env() {  # $1: the pyproject extras to install, e.g. "test" or "test,bench"
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "dev.sh: Python 3.11 or newer is needed (found: $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
        exit 2
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)-${1//,/-}"
    if [ ! -f "$stamp" ]; then
        echo "dev.sh: installing sluice[$1] into $VENV ..." >&2
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e ".[$1]"
        touch "$stamp"
    fi
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
    serve)
        ensure_env test
        exec "$VENV/bin/sluice" serve "$@"
        ;;
    simulate)
        ensure_env test
        exec "$VENV/bin/sluice" simulate "$@"
        ;;
    test)
        ensure_env test
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    bench)
        ensure_env test,bench
        exec "$VENV/bin/python" -m benchmarks.run "$@"
        ;;
    *)
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
