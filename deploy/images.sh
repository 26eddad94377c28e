#!/usr/bin/env bash
# Builds every image the compose stack and the tests use, from Debian packages and PyPI only (no image registry):
#   relais-base:bookworm     debootstrap --variant=minbase of Debian 12 from the mirror apt already uses, imported
#   relais-python:bookworm   + Debian's python3 and venv: the Dockerfile's BASE_IMAGE here
#   relais-redis:bookworm    + Debian's redis-server, non-root
#   relais-postgres:bookworm + Debian's postgresql (15), non-root, takes the postgres image's POSTGRES_* variables
#   relais-smtp:bookworm     + Debian's python3-aiosmtpd: an SMTP catcher answering a subset of Mailpit's API
#   relais:local             the Dockerfile, Python packages from a wheelhouse built on this host (pip wheel)
# Idempotent and cached: the base is made only when missing, the wheelhouse only when requirements.lock or
# pyproject.toml changed, and `docker build` reuses its layers; a second run takes seconds.
# Usage: deploy/images.sh [--python PYTHON]   (./dev images passes the project's venv python, 3.11 like bookworm's)
# Environment: RELAIS_DEBIAN_MIRROR (default: the one in /etc/apt/sources.list*), RELAIS_IMAGES_REBUILD=1 (remake
# the base image and the wheelhouse too).
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
cd "$(dirname "$SELF")/.."

PYTHON=python3
[ "${1:-}" = "--python" ] && PYTHON=$2
SUITE=bookworm
WHEELHOUSE=deploy/wheelhouse
log() { echo "images: [${SECONDS}s] $*" >&2; }
die() { echo "images: $*" >&2; exit 1; }

command -v docker >/dev/null || die "no docker command: apt-get install docker.io"
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed): start one, e.g. ./dev docker"

# The Debian mirror (and security mirror) apt already uses on this host, in either sources format.
apt_uri() {  # apt_uri SUITE: the first URI serving SUITE in /etc/apt/sources.list*
    python3 - "$1" <<'PY'
import glob, re, sys
suite = sys.argv[1]
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*")):
    try:
        text = open(path).read()
    except OSError:
        continue
    for line in text.splitlines():  # one-line format: deb [opts] URI SUITE COMPONENTS
        m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
        if m and m.group(2) == suite:
            print(m.group(1)); sys.exit()
    for stanza in re.split(r"\n\s*\n", text):  # deb822 format
        fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
        if "deb" in fields.get("Types", "").split() and suite in fields.get("Suites", "").split():
            print(fields["URIs"].split()[0]); sys.exit()
PY
}
MIRROR=${RELAIS_DEBIAN_MIRROR:-$(apt_uri "$SUITE")}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=$(apt_uri "$SUITE-security")

has_image() { docker image inspect "$1" >/dev/null 2>&1; }

# --- relais-base: Debian minbase from the mirror ---
if [ "${RELAIS_IMAGES_REBUILD:-}" = 1 ] || ! has_image relais-base:$SUITE; then
    command -v debootstrap >/dev/null || die "no debootstrap: apt-get install debootstrap"
    [ "$(id -u)" = 0 ] || die "debootstrap needs root to make the base image"
    root=$(mktemp -d "${TMPDIR:-/tmp}/relais-base.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    log "debootstrap --variant=minbase $SUITE from $MIRROR (about a minute)"
    debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
        || { cat "$root.log" >&2; die "debootstrap failed (log above)"; }
    rm -f "$root.log"
    {
        echo "deb $MIRROR $SUITE main"
        echo "deb $MIRROR $SUITE-updates main"
        [ -n "$SECURITY" ] && echo "deb $SECURITY $SUITE-security main"
    } >"$root/etc/apt/sources.list"
    # Images install packages without recommends and keep no apt lists or caches.
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$root/etc/apt/apt.conf.d/90relais"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/tmp/*
    chmod 755 "$root"  # mktemp's 700 would be the image's /, closed to its non-root users
    tar -C "$root" -c . | docker import -c 'CMD ["/bin/bash"]' -m "debootstrap --variant=minbase $SUITE $MIRROR" \
        - relais-base:$SUITE >/dev/null
    rm -rf "$root"; trap - EXIT
    log "relais-base:$SUITE imported"
fi

build() {  # build TAG DIR [docker build args...]: quiet unless it fails
    local tag=$1 dir=$2 build_log; shift 2
    log "building $tag"
    build_log=$(mktemp)
    if ! docker build -t "$tag" "$@" "$dir" >"$build_log" 2>&1; then
        tail -n 40 "$build_log" >&2; rm -f "$build_log"
        die "docker build of $tag failed (end of its output above; command: docker build -t $tag $* $dir)"
    fi
    rm -f "$build_log"
}
build relais-python:$SUITE deploy/images/python --build-arg BASE_IMAGE=relais-base:$SUITE
build relais-redis:$SUITE deploy/images/redis --build-arg BASE_IMAGE=relais-base:$SUITE
build relais-postgres:$SUITE deploy/images/postgres --build-arg BASE_IMAGE=relais-base:$SUITE
build relais-smtp:$SUITE deploy/images/smtp --build-arg BASE_IMAGE=relais-base:$SUITE

# --- the wheelhouse: Relais's runtime dependencies (not the test extras) at the lock's versions, for bookworm's
# Python (3.11), built on this host where PyPI is reachable, so the image build needs no index ---
stamp="$WHEELHOUSE/.inputs"
inputs=$(cat requirements.lock pyproject.toml requirements.txt "$SELF" | sha256sum | cut -d" " -f1)
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || die "$PYTHON is not Python 3.11, the Python of Debian $SUITE the image runs: wheels would not fit"
if [ "${RELAIS_IMAGES_REBUILD:-}" = 1 ] || [ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ]; then
    log "pip wheel -r requirements.txt -w $WHEELHOUSE"
    rm -f "$WHEELHOUSE"/*.whl "$stamp"
    wheel_log=$(mktemp)
    # setuptools: the build backend of `pip install .` in the image, which has no index to fetch it from.
    # async-timeout: redis needs it on Python < 3.11.3 (bookworm's is 3.11.2), so this host's pip may not fetch it.
    if ! "$PYTHON" -m pip wheel -q -r requirements.txt -c requirements.lock "setuptools>=69" async-timeout \
            -w "$WHEELHOUSE" >"$wheel_log" 2>&1; then
        cat "$wheel_log" >&2; die "pip wheel failed (output above)"
    fi
    rm -f "$wheel_log" "$WHEELHOUSE"/relais-*.whl  # the project itself is built inside the image, from its source
    echo "$inputs" >"$stamp"
fi

build relais:local . --build-arg BASE_IMAGE=relais-python:$SUITE --build-arg "PIP_INSTALL_FLAGS=--no-index"
log "ready: relais:local relais-redis:$SUITE relais-postgres:$SUITE relais-smtp:$SUITE (from relais-base:$SUITE)"
