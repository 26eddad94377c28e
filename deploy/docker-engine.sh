#!/usr/bin/env bash
# Makes sure a Docker engine answers: if none does, starts Debian's dockerd (package docker.io) as root in the
# background, with the vfs storage driver (works on any filesystem, overlay needs kernel support a VM may lack),
# logging to $RELAIS_DOCKERD_LOG. Exit status 0 once `docker info` answers, 1 (saying why) if it cannot.
set -euo pipefail

LOG=${RELAIS_DOCKERD_LOG:-/var/log/relais-dockerd.log}
say() { echo "docker-engine: $*" >&2; }

answers() { docker info >/dev/null 2>&1; }

command -v docker >/dev/null 2>&1 || { say "no docker command (apt-get install docker.io)"; exit 1; }
answers && exit 0
command -v dockerd >/dev/null 2>&1 || { say "no Docker engine answers and dockerd is not installed (apt-get install docker.io)"; exit 1; }
[ "$(id -u)" = 0 ] || { say "no Docker engine answers; starting dockerd needs root"; exit 1; }

say "no Docker engine answers: starting dockerd --storage-driver ${RELAIS_DOCKERD_STORAGE_DRIVER:-vfs} (log: $LOG)"
mkdir -p "$(dirname "$LOG")"
nohup dockerd --storage-driver "${RELAIS_DOCKERD_STORAGE_DRIVER:-vfs}" >>"$LOG" 2>&1 </dev/null &
pid=$!
for _ in $(seq 60); do
    answers && { say "dockerd answers (pid $pid)"; exit 0; }
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
done
say "dockerd did not answer; the end of its log ($LOG):"
tail -n 20 "$LOG" >&2 || true
exit 1
