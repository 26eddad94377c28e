#!/usr/bin/env bash
# Makes sure a Docker engine answers: if none does, starts Debian's dockerd (package docker.io) as root in the
# background, logging to $RELAIS_DOCKERD_LOG, with the overlay2 storage driver where the kernel has overlayfs (layers
# shared, a container made in a moment), else vfs (works on any filesystem, but copies the whole image for each layer
# and each container: builds and the compose stack are several times slower). RELAIS_DOCKERD_STORAGE_DRIVER chooses.
# Exit status 0 once `docker info` answers, 1 (saying why) if it cannot.
set -euo pipefail

LOG=${RELAIS_DOCKERD_LOG:-/var/log/relais-dockerd.log}
say() { echo "docker-engine: $*" >&2; }

answers() { docker info >/dev/null 2>&1; }

command -v docker >/dev/null 2>&1 || { say "no docker command (apt-get install docker.io)"; exit 1; }
answers && exit 0
command -v dockerd >/dev/null 2>&1 || { say "no Docker engine answers and dockerd is not installed (apt-get install docker.io)"; exit 1; }
[ "$(id -u)" = 0 ] || { say "no Docker engine answers; starting dockerd needs root"; exit 1; }

if [ -n "${RELAIS_DOCKERD_STORAGE_DRIVER:-}" ]; then
    drivers=("$RELAIS_DOCKERD_STORAGE_DRIVER")
elif grep -qw overlay /proc/filesystems 2>/dev/null; then
    drivers=(overlay2 vfs)
else
    drivers=(vfs)
fi
mkdir -p "$(dirname "$LOG")"
for driver in "${drivers[@]}"; do
    say "no Docker engine answers: starting dockerd --storage-driver $driver (log: $LOG)"
    nohup dockerd --storage-driver "$driver" >>"$LOG" 2>&1 </dev/null &
    pid=$!
    for _ in $(seq 60); do
        answers && { say "dockerd answers (pid $pid, storage driver $driver)"; exit 0; }
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    say "dockerd with $driver did not answer; the end of its log ($LOG):"
    tail -n 20 "$LOG" >&2 || true
done
exit 1
