#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages the GUI tests need, when they are missing:
# Xvfb (virtual X server, started by pytest-xvfb) and the libraries Qt 6's xcb
# platform plugin and napari's OpenGL canvas load (Mesa's software renderer).
# Needs root or sudo and apt-get; without them it says what to install and fails.
set -euo pipefail

packages=(
  xvfb
  libgl1 libegl1 libgl1-mesa-dri libglx-mesa0
  libxkbcommon0 libxkbcommon-x11-0
  libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0
  libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xinerama0 libxcb-xkb1
  libfontconfig1 libdbus-1-3 libglib2.0-0
)

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  if command -v Xvfb >/dev/null 2>&1; then
    echo "system-deps: no apt-get; Xvfb found, assuming the Qt xcb libraries are present" >&2
    exit 0
  fi
  echo "system-deps: install these packages (or your distribution's equivalents): ${missing[*]}" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
  else
    echo "system-deps: run as root, or install: ${missing[*]}" >&2
    exit 1
  fi
fi
echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
