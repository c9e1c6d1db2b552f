#!/usr/bin/env bash
# Install everything the tests and the demo need on a fresh Debian machine (idempotent).
# Debian packages: zookeeper (ZooKeeper store tests), openssh (static driver / host-key scan
# tests), e2fsprogs + qemu-utils (real image files from the shipped build command), chromium +
# chromium-driver (the dashboard test drives a real headless browser through Selenium), podman +
# runc + debootstrap (the podman driver's real container nodes and their Debian images).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v java >/dev/null 2>&1 && [ -f /usr/share/java/zookeeper.jar ] || need_apt+=(zookeeper)
command -v ssh-keyscan >/dev/null 2>&1 || need_apt+=(openssh-client)
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v mke2fs >/dev/null 2>&1 || need_apt+=(e2fsprogs)
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
# the podman driver's real nodes: containers (podman with Debian's runc), node roots (debootstrap)
command -v podman >/dev/null 2>&1 || need_apt+=(podman)
command -v runc >/dev/null 2>&1 || need_apt+=(runc)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need_apt+=(debootstrap)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian packages: ${need_apt[*]}"
        export DEBIAN_FRONTEND=noninteractive
        # packages must not start services (no init system here; tests start their own)
        [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    else
        echo "warning: cannot install ${need_apt[*]} (not root or no apt-get); tests that need them will be skipped" >&2
    fi
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test,zookeeper,aws,openstack]'

# The OpenStack driver's tests run a real local OpenStack from Debian's packages (root only).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    bash tests/fixtures/openstack/install.sh
fi
