#!/usr/bin/env bash
# Install the Prometheus services the test-suite starts by hand (tests/plugins/prometheus.py):
# Debian's `prometheus` and `prometheus-pushgateway`, and Debian's `chromium`, the headless browser that
# renders the HTML report in tests/test_report_html.py. Idempotent: runs `apt-get update` only when a
# package is missing and no candidate is known, never starts or enables system services, and prints
# the installed versions.
set -euo pipefail

PKGS=(prometheus prometheus-pushgateway chromium)
BINS=(/usr/bin/prometheus /usr/bin/prometheus-pushgateway /usr/bin/chromium)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "install-test-services: need root (or passwordless sudo) to install ${PKGS[*]}" >&2
        exit 1
    fi
fi

missing=()
for i in "${!PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "${PKGS[$i]}" 2>/dev/null | grep -q "install ok installed" \
        || [ ! -x "${BINS[$i]}" ]; then
        missing+=("${PKGS[$i]}")
    fi
done

if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    # Refresh the package lists only when apt does not know a candidate for a missing package.
    need_update=0
    for p in "${missing[@]}"; do
        cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')
        if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then need_update=1; fi
    done
    if [ "$need_update" -eq 1 ]; then
        $SUDO apt-get update -qq
    fi
    # policy-rc.d exit 101 forbids invoke-rc.d from starting services during the install
    # (a no-op where no init system runs, as in containers and CI).
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod +x "$policy"
        created_policy=1
    fi
    trap 'if [ "$created_policy" -eq 1 ]; then $SUDO rm -f "$policy"; fi' EXIT
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

for b in "${BINS[@]}"; do
    if [ ! -x "$b" ]; then echo "install-test-services: $b missing after install" >&2; exit 1; fi
done
/usr/bin/prometheus --version 2>&1 | head -1
/usr/bin/prometheus-pushgateway --version 2>&1 | head -1
/usr/bin/chromium --version 2>/dev/null | head -1  # its wrapper script warns on stderr
