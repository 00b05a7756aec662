#!/usr/bin/env bash
# Install the real scans the tests and benchmarks use (see ../shared/DATA.md).
# Nothing is committed to the repository; data goes to system paths (apt) and to
# ${FEWLABEL_TEST_DATA:-~/.cache/napari-fewlabel/test-data} (pyradiomics CT).
# Python-wheel data (nibabel, nilearn, pydicom, dipy) comes with the test environment.
set -euo pipefail
DATA="${FEWLABEL_TEST_DATA:-$HOME/.cache/napari-fewlabel/test-data}"
mkdir -p "$DATA"

apt_pkgs=()
[ -f /usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz ] || apt_pkgs+=(insighttoolkit5-examples)
[ -f /usr/share/doc/invesalius-examples/examples/Cranium.inv3 ] || apt_pkgs+=(invesalius-examples)
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
  else
    echo "fetch_test_data: as root, run: apt-get install -y ${apt_pkgs[*]}" >&2
  fi
fi

# Chest CT (lung1/lung2) and brain MRI NRRDs: only pyradiomics' source archive carries them.
if [ ! -f "$DATA/pyradiomics/lung1_image.nrrd" ]; then
  tmp=$(mktemp -d)
  python3 -m venv "$tmp/venv"
  "$tmp/venv/bin/pip" install -q numpy versioneer setuptools wheel
  "$tmp/venv/bin/pip" download -q --no-deps --no-binary :all: --no-build-isolation -d "$tmp" pyradiomics==3.0.1
  tar xzf "$tmp"/pyradiomics-3.0.1.tar.gz -C "$tmp" pyradiomics-3.0.1/data
  rm -rf "$DATA/pyradiomics.partial" && mv "$tmp/pyradiomics-3.0.1/data" "$DATA/pyradiomics.partial"
  mv "$DATA/pyradiomics.partial" "$DATA/pyradiomics"
  rm -rf "$tmp"
fi
echo "fetch_test_data: test data ready in $DATA and /usr/share/doc/*-examples"
