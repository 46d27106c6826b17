#!/usr/bin/env bash
# Run docker-compose.yml's federation for real: build the image, `up`, check that the server
# exited 0 and every client finished, print the server's round table, `up` again on the
# finished run (everyone exits 0 at once), check that running the `certs` service again keeps
# every certificate, then remove the containers and volumes.
#
#   scripts/compose-smoke.sh                  # Docker (compose plugin or docker-compose)
#   ENGINE=podman scripts/compose-smoke.sh    # podman, driven by docker-compose over its API socket
#   BUILD=0 scripts/compose-smoke.sh          # use the fedlink:latest image already built
#
# Offline builds: TORCH_WHEELS="path/torch-*.whl path/torchvision-*.whl" copies those wheels
# into the build context (wheels/), and the Dockerfile installs them instead of asking PyTorch's
# index. Without a registry the base image the Dockerfile names (python:3.11-slim) must already
# be in the engine's store; a stand-in can be built from Debian with debootstrap:
#   debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
#       bookworm rootfs http://deb.debian.org/debian
#   tar -C rootfs -c . | podman import --change 'CMD ["python3"]' - docker.io/library/python:3.11-slim
# and the build then runs with PULL=never.
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE=${ENGINE:-docker}
PULL=${PULL:-missing}
PROJECT=${PROJECT:-fedlink-smoke}
IMAGE=fedlink:latest

for wheel in ${TORCH_WHEELS:-}; do cp "$wheel" wheels/; done

if [ "${BUILD:-1}" = 1 ]; then
  echo "== building $IMAGE with $ENGINE"
  build=("$ENGINE" build --pull="$PULL" -t "$IMAGE" .)
  # podman: RUN steps reach PyPI the way the host does, and the docker format keeps HEALTHCHECK.
  [ "$ENGINE" = podman ] && build+=(--network host --format docker)
  started=$(date +%s)
  "${build[@]}"
  echo "build took $(( $(date +%s) - started )) s"
fi
echo "$IMAGE: $(( $("$ENGINE" image inspect -f '{{.Size}}' "$IMAGE") / 1000000 )) MB"

service_pid=
cleanup() {
  "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  [ -z "$service_pid" ] || kill "$service_pid" 2>/dev/null || true
}
if [ "$ENGINE" = podman ]; then
  # docker-compose speaks the Docker API; podman serves it on a socket of its own.
  socket=$(mktemp -d)/podman.sock
  podman system service --time=0 "unix://$socket" &
  service_pid=$!
  export DOCKER_HOST=unix://$socket
  for _ in $(seq 50); do [ -S "$socket" ] && break; sleep 0.2; done
  compose=(docker-compose -p "$PROJECT")
elif docker compose version >/dev/null 2>&1; then
  compose=(docker compose -p "$PROJECT")
else
  compose=(docker-compose -p "$PROJECT")
fi
trap cleanup EXIT

# Nothing waits for a healthcheck (podman without systemd never runs one): clients start with
# the server and retry until it listens.
up() {
  local log started
  log=$(mktemp)
  started=$(date +%s)
  timeout "${1}" "${compose[@]}" up --no-build >"$log" 2>&1 || { tail -50 "$log"; exit 1; }
  echo "up took $(( $(date +%s) - started )) s"
}
exit_codes() {
  for service in certs server client-1 client-2 client-3; do
    id=$("${compose[@]}" ps -q "$service")
    code=$("$ENGINE" inspect -f '{{.State.ExitCode}}' "$id")
    echo "$service exited $code"
    [ "$code" = 0 ] || status=1
  done
}

status=0
echo "== ${compose[*]} up"
up 1800
exit_codes
echo "== ${compose[*]} logs server"
"${compose[@]}" logs --no-color server

# A second `up` on the finished run: the coordinator tells the clients it is over and everyone
# exits 0 within seconds (not after the clients' 5-minute reconnect timeout).
echo "== ${compose[*]} up, again"
up 240
exit_codes
"${compose[@]}" logs --no-color server client-1 | grep -E "finished|told" || true

# Restarts keep identities: running `certs` again must leave every certificate as it was.
fingerprints() {
  "${compose[@]}" run --rm --entrypoint sha256sum certs /pki/ca/ca.pem /pki/coordinator/coordinator.pem \
    /pki/client-1/client-1.pem /pki/client-2/client-2.pem /pki/client-3/client-3.pem 2>/dev/null
}
before=$(fingerprints)
"${compose[@]}" up --no-build certs >/dev/null 2>&1
if [ "$(fingerprints)" = "$before" ]; then
  echo "certs run again: every certificate kept"
else
  echo "certs run again: certificates changed"; status=1
fi
exit $status
