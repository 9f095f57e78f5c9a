#!/usr/bin/env bash
# Debian packages hvs uses: the Fashion-MNIST dataset, and chromium for the browser test of the search
# page (tests/test_browser.py drives /usr/bin/chromium with Playwright; skipped without it). Installed
# when missing and apt-get is usable; otherwise a one-line hint (fashion-mnist:DIR reads the same files
# from any folder).
set -u
# CJK fonts for the kanji-fonts dataset (hvs/data/kanji_fonts.py, its FONT_TABLE classifies them):
# print faces for the gallery, handwriting/brush faces for the queries. Only what the dataset uses:
# 28 packages, ~425 MiB installed (measured on Debian 12). Not fonts-yozvox-yozfont (1.2 GB of
# near-duplicates), nor Takao / WenQuanYi Micro Hei (same glyphs as IPA / Droid Sans Fallback).
kanji_fonts=(
  fonts-ipaexfont-mincho fonts-ipaexfont-gothic fonts-ipafont-mincho fonts-ipafont-gothic fonts-noto-cjk
  fonts-morisawa-bizud-mincho fonts-morisawa-bizud-gothic fonts-sawarabi-mincho fonts-sawarabi-gothic
  fonts-dejima-mincho fonts-oradano-mincho-gsrr fonts-motoya-l-cedar fonts-motoya-l-maruberi fonts-vlgothic
  fonts-umeplus fonts-droid-fallback fonts-wqy-zenhei
  fonts-seto fonts-klee fonts-kiloji fonts-yusei-magic fonts-kouzan-mouhitsu fonts-aoyagi-kouzan-t
  fonts-aoyagi-soseki fonts-arphic-ukai fonts-arphic-gkai00mp fonts-arphic-bkai00mp fonts-cwtex-kai
)
missing=()
for pkg in dataset-fashion-mnist chromium "${kanji_fonts[@]}"; do
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
