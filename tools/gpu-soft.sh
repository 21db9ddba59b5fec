#!/usr/bin/env bash
# The app's tests render a snapshot through wgpu; on a machine without a GPU that needs a
# software Vulkan driver (Mesa's lavapipe). Installs Debian's mesa-vulkan-drivers when absent.
set -euo pipefail
if ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  echo "tessera: installing mesa-vulkan-drivers (software Vulkan for the app's snapshot test)" >&2
  sudo_cmd=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo_cmd=sudo; fi
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers >/dev/null ||
    { $sudo_cmd apt-get update -qq && $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers >/dev/null; }
else
  echo "tessera: no apt-get; install a Vulkan driver (e.g. Mesa lavapipe) for the snapshot test" >&2
fi
