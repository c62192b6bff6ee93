#!/usr/bin/env bash
# A python:3.11-slim-like base image made from Debian's packages only, for building the
# Bento's images where Docker Hub cannot be reached (air-gapped sites, this project's
# machines). Debian bookworm's Python is 3.11, as the Bento's images use.
#
#   deploy/docker/base-image.sh [TAG]          # default TAG: llm-bundle/python:3.11-debian
#
# Needs root, debootstrap and a Docker engine. The host's trusted CA certificates (those
# `update-ca-certificates` installs from /usr/local/share/ca-certificates) are added to the
# image, so that pip and uv inside a build work behind a TLS-inspecting proxy. Debian marks
# its Python EXTERNALLY-MANAGED; a container image is the environment, so that marker is
# removed and PIP_BREAK_SYSTEM_PACKAGES=1 set (BentoML's Dockerfile installs uv with pip).
set -euo pipefail

TAG="${1:-llm-bundle/python:3.11-debian}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
PACKAGES="${PACKAGES:-python3,python3-venv,python3-pip,ca-certificates,curl}"  # add e.g. build-essential to compile sdists

rootfs="$(mktemp -d /tmp/llm-bundle-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT

echo "debootstrap $SUITE into $rootfs (from $MIRROR)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >/dev/null

# The host's own CA certificates, trusted inside as on the host.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$rootfs/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
fi
chroot "$rootfs" update-ca-certificates >/dev/null

# `python` and `pip` as the official images name them; pip may install into the system.
ln -sf python3 "$rootfs/usr/bin/python"
ln -sf pip3 "$rootfs/usr/bin/pip"
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED

# Slim: no apt lists, no docs, no caches.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
    "$rootfs"/var/cache/apt/*.bin "$rootfs"/root/.cache

tar -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
docker run --rm "$TAG" python3 -c 'import ssl, sys; print(sys.version.split()[0], ssl.OPENSSL_VERSION)'
echo "built $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
