#!/usr/bin/env bash
# Debian's chromium for the browser tests (tests/browser), installed with apt when missing.
#
# playwright's own browser download does not work on the machines this project is built on,
# so the tests drive /usr/bin/chromium. As root with apt this installs it; elsewhere it says
# what to do and the browser tests skip, except under CI=true, where a missing chromium
# fails here (and in the tests) instead of skipping them silently.
set -uo pipefail
chromium=/usr/bin/chromium
[ -x "$chromium" ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's chromium for the browser tests"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null
fi
[ -x "$chromium" ] && exit 0

if [ "${CI:-}" = true ]; then
    echo "setup: $chromium is missing and could not be installed; CI needs it for tests/browser" >&2
    exit 1
fi
echo "setup: $chromium is missing (as root: apt-get install chromium); the browser tests will skip"
