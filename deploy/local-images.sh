#!/usr/bin/env bash
# Builds the images with podman where no image registry can be reached (deploy/README.md,
# "Local images"): a Debian 12 base made with debootstrap from the Debian mirror apt uses, a
# Python image on it that stands in for python:3.11-slim-bookworm, the project's `cpu` and
# `train` targets on that, and Prometheus from Debian's package for docker-compose.local.yml.
#
#   deploy/local-images.sh                    # all of them
#   deploy/local-images.sh cpu prometheus     # some (base images are made first if missing)
#
# The base images are made once and kept in podman's storage; the project's images are
# rebuilt every time, from podman's layer cache (only what changed is rebuilt). Runs as
# root. Settings (environment): CONTAINERS_CONF (default deploy/podman/containers.conf),
# DEBIAN_MIRROR (default: apt's), PIP_CERT (a CA bundle pip needs in the builds; default the
# one pip uses here, if any), TORCH_WHEELS (a folder with the CPU torch wheel; default one
# that pip finds through its own configuration, else PyTorch's CPU index).
set -euo pipefail
cd "$(dirname "$0")/.."

export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}"
DEBIAN_IMAGE=localhost/fer-base/debian:bookworm
PYTHON_IMAGE=localhost/fer-base/python:3.11-bookworm
PROMETHEUS_IMAGE=localhost/fer-base/prometheus:debian
CACHE="${FER_IMAGES_CACHE:-$PWD/.cache/images}"

log() { printf '[local-images %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

debian_mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null \
        | awk '$2 == "bookworm" { print $1; found = 1; exit } END { if (!found) print "http://deb.debian.org/debian" }'
}

debian_base() {
    podman image exists "$DEBIAN_IMAGE" && return
    command -v debootstrap >/dev/null || { log "debootstrap is missing: apt-get install debootstrap"; exit 1; }
    local mirror rootfs
    mirror="$(debian_mirror)"
    rootfs="$(mktemp -d "${TMPDIR:-/tmp}/fer-rootfs.XXXXXX")"
    # shellcheck disable=SC2064  # expand now: the folder of this call
    trap "rm -rf '$rootfs'" EXIT
    log "debootstrap bookworm from $mirror"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log" >&2; exit 1; }
    rm -f "$rootfs.log"
    # As Docker's debian:bookworm-slim: package scripts start no daemon, apt keeps no
    # lists, caches or downloaded packages, dpkg installs no documentation or translations,
    # and the release's updates come with it.
    printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
    chmod 755 "$rootfs/usr/sbin/policy-rc.d"
    cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
DPKG
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias \
        -exec rm -rf {} +
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$mirror" "$mirror" \
        >"$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/* "$rootfs"/tmp/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["bash"]' - "$DEBIAN_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    log "made $DEBIAN_IMAGE"
}

python_base() {
    podman image exists "$PYTHON_IMAGE" && return
    debian_base
    podman build --format docker --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" \
        -f deploy/podman/python.Containerfile -t "$PYTHON_IMAGE" deploy/podman
    log "made $PYTHON_IMAGE"
}

build_prometheus() {
    debian_base
    podman build --format docker --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" \
        -f deploy/podman/prometheus.Containerfile -t "$PROMETHEUS_IMAGE" deploy/podman
    log "built $PROMETHEUS_IMAGE"
}

host_pip() {
    if [ -x .venv/bin/python ]; then .venv/bin/python -m pip "$@"; else python3 -m pip "$@"; fi
}

# The CA bundle pip uses on this host, mounted into the builds (the Dockerfile's PIP_CERT).
pip_cert_options() {
    local ca="${PIP_CERT:-$(host_pip config get global.cert 2>/dev/null || true)}"
    ca="${ca:-${SSL_CERT_FILE:-}}"
    if [ -n "$ca" ] && [ -f "$ca" ]; then
        echo "--volume=$ca:/run/pip-cert.pem:ro --build-arg=PIP_CERT=/run/pip-cert.pem"
    fi
}

# The CPU build of the pinned torch, from wherever pip finds it here (a wheel folder of its
# configuration, or an index), into a folder mounted into the train build; none found:
# nothing, and the build asks PyTorch's CPU index (the Dockerfile's TORCH_INDEX_URL).
torch_options() {
    local folder="${TORCH_WHEELS:-}" pin
    if [ -z "$folder" ]; then
        pin="$(python3 deploy/docker/requirements.py train | grep -E '^torch==')"
        folder="$CACHE/wheels"
        mkdir -p "$folder"
        if ! compgen -G "$folder/torch-${pin#torch==}+cpu-cp311-*.whl" >/dev/null \
            && ! host_pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
                --dest "$folder" "$pin+cpu" >&2; then
            log "no CPU wheel of $pin found here: the train build asks PyTorch's CPU index"
            return
        fi
    fi
    echo "--volume=$folder:/wheels:ro --build-arg=TORCH_INDEX_URL= --build-arg=WHEELS=/wheels"
}

build_target() {
    local target="$1" options
    python_base
    options="$(pip_cert_options)"
    [ "$target" != train ] || options="$options $(torch_options)"
    # shellcheck disable=SC2086  # options are separate words
    podman build --format docker --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" $options \
        --target "$target" -t "fer-service:$target" .
    log "built fer-service:$target"
}

main() {
    local targets=("$@")
    [ ${#targets[@]} -gt 0 ] || targets=(cpu train prometheus)
    for target in "${targets[@]}"; do
        case "$target" in
            base) python_base ;;
            cpu | train) build_target "$target" ;;
            prometheus) build_prometheus ;;
            *) log "unknown target $target (base, cpu, train, prometheus)"; exit 2 ;;
        esac
    done
}

main "$@"
