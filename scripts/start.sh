#!/usr/bin/env bash
# README command 1: set everything up and run the main job.
#   bash scripts/start.sh              napari with the plugin's widget and the cardiac sample
#   bash scripts/start.sh --headless   the whole loop without a window; outputs in ./outputs
# Extra arguments go to `fewlabel demo` (see `fewlabel demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_system.sh

# A private environment in .venv; torch first (a CPU build from this machine's disk on
# the project's standard machine; a CUDA machine may already have its own torch).
stamp=".venv/.fewlabel-installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[napari,mni]" PyQt6
  rm -f .venv/.fewlabel-installed-* && touch "$stamp"
fi

if [[ " $* " == *" --headless "* ]]; then
  exec .venv/bin/fewlabel demo "$@"
elif [ -z "${DISPLAY:-}" ]; then
  echo "start: no display found; running napari on a virtual screen (Xvfb)." >&2
  echo "start: a screenshot of the window is saved to outputs/napari.png, then napari closes." >&2
  exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/fewlabel demo --screenshot outputs/napari.png "$@"
else
  exec .venv/bin/fewlabel demo "$@"
fi
