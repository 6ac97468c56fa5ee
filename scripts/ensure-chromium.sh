#!/usr/bin/env bash
# Makes a headless Chromium available for the browser test of `dpo-sam report`
# (tests/report.rs): Debian's `chromium` package, installed with apt-get when it is missing and
# this runs as root. Never fails: where it cannot install, it says why, and the browser test
# then skips with that reason.
set -u
for name in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$name" >/dev/null 2>&1; then
        echo "ensure-chromium: using $(command -v "$name")"
        exit 0
    fi
done
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: no chromium and no apt-get here; the browser test of dpo-sam report will be skipped"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure-chromium: no chromium, and installing it needs root (apt-get install -y chromium); the browser test will be skipped"
    exit 0
fi
echo "ensure-chromium: installing Debian's chromium (apt-get install -y chromium)"
if ! { timeout 600 apt-get install -y --no-install-recommends chromium >/tmp/ensure-chromium.log 2>&1 \
       || { timeout 300 apt-get update >>/tmp/ensure-chromium.log 2>&1 \
            && timeout 600 apt-get install -y --no-install-recommends chromium >>/tmp/ensure-chromium.log 2>&1; }; }; then
    echo "ensure-chromium: apt-get could not install chromium (see /tmp/ensure-chromium.log); the browser test will be skipped"
    tail -n 3 /tmp/ensure-chromium.log
    exit 0
fi
echo "ensure-chromium: installed $(command -v chromium)"
