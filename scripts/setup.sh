#!/usr/bin/env bash
# Installs everything Yun needs on a Debian machine, as root, and is safe to run again:
# system packages, a virtualenv holding the project, running libvirt daemons, the test
# guest image. With --test it also installs the test tools and a PostgreSQL server.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs packages and starts libvirtd)" >&2
  exit 1
fi

# --- system packages -------------------------------------------------------------------
PACKAGES=(
  python3 python3-venv python3-dev gcc pkg-config procps iproute2 iputils-ping
  libvirt-daemon-system libvirt-dev qemu-system-x86 qemu-utils
  dnsmasq-base nftables
  linux-image-cloud-amd64 busybox-static extlinux syslinux-common isolinux genisoimage
  e2fsprogs util-linux
)
if [ "$WITH_TEST" = 1 ]; then
  # debootstrap builds the Debian cloud guest of the system tests; ssh logs into it.
  PACKAGES+=(postgresql debootstrap debian-archive-keyring openssh-client)
fi
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  log "Debian packages present"
fi

# --- virtualenv --------------------------------------------------------------------------
EXTRA=""
[ "$WITH_TEST" = 1 ] && EXTRA="[test]"
stamp=".venv/.yun-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)$EXTRA"
if [ ! -x .venv/bin/python ]; then
  log "creating the virtualenv .venv"
  python3 -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing yun$EXTRA into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".$EXTRA"
  echo "$want" > "$stamp"
else
  log "virtualenv up to date"
fi
ln -sf "$ROOT/.venv/bin/yun" /usr/local/bin/yun

# --- libvirt daemons (no service manager on a bare machine or in CI) ----------------------
.venv/bin/python -m yun.testing.host libvirtd

# --- test guest image --------------------------------------------------------------------
# The disk image, its live ISO and its installer ISO (F-ISO), built together and cached.
log "test guest images: $(.venv/bin/python -m yun.testing.guest build --all | tr '\n' ' ')"
# A real Debian 12 cloud image (cloud-init, sshd) for the system tests: debootstrapped
# once from this machine's apt mirror and cached beside the test guest (about 90 s the
# first time, nothing after); the tests never download it themselves.
if [ "$WITH_TEST" = 1 ]; then
  log "Debian guest image: $(.venv/bin/python -m yun.testing.debian_guest)"
fi

# --- PostgreSQL for the tests ------------------------------------------------------------
if [ "$WITH_TEST" = 1 ]; then
  .venv/bin/python -m yun.testing.host postgres
fi
log "ready"
