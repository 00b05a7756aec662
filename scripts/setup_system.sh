#!/usr/bin/env bash
# System packages napari needs on a bare Debian machine: Xvfb + Mesa OpenGL and the
# Qt xcb libraries (QT_QPA_PLATFORM=offscreen has no OpenGL, so napari's canvas
# needs a real X server, virtual or not). Installs only what is missing.
set -euo pipefail
pkgs=(xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4
      libxcb-keysyms1 libxcb-shape0 libxcb-render-util0 libxcb-image0 libdbus-1-3 libfontconfig1)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "setup_system: missing system packages: ${missing[*]}" >&2
  echo "setup_system: install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "setup_system: installing ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
