#!/usr/bin/env bash
# Debian packages hvs uses: the Fashion-MNIST dataset. Installed when missing and apt-get is usable;
# otherwise a one-line hint (fashion-mnist:DIR reads the same files from any folder).
set -u
missing=()
for pkg in dataset-fashion-mnist; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || echo "warning: could not install ${missing[*]}; tests that need them are skipped" >&2
else
  echo "warning: missing Debian packages ${missing[*]} (apt-get unusable here); install them or use fashion-mnist:DIR" >&2
fi
exit 0
