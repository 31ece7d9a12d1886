#!/usr/bin/env bash
# What the napari viewer tests need from the system on a machine without a screen: Xvfb (a
# virtual X server) and the X/XCB libraries Qt 6 loads. Installed with apt-get when missing
# (Debian/Ubuntu, as root); anything else is left to the user, and the viewer test says so.
set -euo pipefail
packages=(xvfb xauth libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0
          libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 libgl1 libegl1 libdbus-1-3 libfontconfig1)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_display: missing ${missing[*]}: install them (Debian/Ubuntu: apt-get install ...)" >&2
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
