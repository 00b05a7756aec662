#!/usr/bin/env bash
# Make the starter encoders that ship in src/napari_fewlabel/models/weights/.
#
#   bash scripts/pretrain_shipped_encoders.sh [SECONDS_PER_METHOD]   (default 900)
#
# The same recipe without one scan, for a benchmark that evaluates on it
# (benchmarks/pretraining.py --volume brain-tumour):
#
#   EXCLUDE=brain1_image.nrrd OUT=/tmp/heldout bash scripts/pretrain_shipped_encoders.sh
#
# writes /tmp/heldout/{ideal,medmoco}-encoder-without-brain1.safetensors.
# EXTRA="SCAN ..." adds scans. lung2 is the archive's only CT, so the encoder for
# --volume lung-tumour swaps in the other chest CT to keep the modality mix:
#
#   EXCLUDE=lung2_image.nrrd EXTRA=~/.cache/napari-fewlabel/test-data/pyradiomics/lung1_image.nrrd \
#     METHODS=ideal OUT=/tmp/heldout bash scripts/pretrain_shipped_encoders.sh
#
# writes /tmp/heldout/ideal-encoder-without-lung2-with-lung1.safetensors.
#
# On a GPU (how the H100 encoders of docs/benchmarks.md were made; they did no
# better than the CPU-made ones that ship, see docs/pretraining.md):
#
#   DEVICE=cuda WORKERS=3 bash scripts/pretrain_shipped_encoders.sh 400
#
# METHODS="ideal" (or "medmoco") makes one encoder only, e.g. to run the two
# methods side by side on one GPU; DEVICE (default auto) and WORKERS (data-loading
# processes, default 1) go to `fewlabel pretrain`.
#
# Data: the real public scans of ../shared/DATA.md that no benchmark or
# adaptation experiment scores with the shipped encoders (the two tumour
# targets, brain1 and lung2, take held-out encoders as above): brain MRI
# (nibabel's anatomical.nii, pyradiomics brain1 and brain2, dipy's
# S0_10slices), breast MRI (pyradiomics breast1) and chest CT (pyradiomics
# lung2). Left out on purpose: the MNI152 template (annotation-efficiency
# benchmark), the ITK head T1 and the InVesalius head CT (adaptation
# benchmark), pyradiomics lung1 (emphysema tests).
# Run `bash scripts/fetch_test_data.sh` first. The model cards in
# docs/model-cards/ record what a run produced.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET="${1:-900}"
PY="${PYTHON:-python}"
DATA="${FEWLABEL_TEST_DATA:-$HOME/.cache/napari-fewlabel/test-data}/pyradiomics"
NIB=$("$PY" -c "import nibabel, os; print(os.path.dirname(nibabel.__file__))")
DIPY=$("$PY" -c "import dipy, os; print(os.path.dirname(dipy.__file__))")
SCANS=(
  "$NIB/tests/data/anatomical.nii"
  "$DIPY/data/files/S0_10slices.nii.gz"
  "$DATA/brain1_image.nrrd"
  "$DATA/brain2_image.nrrd"
  "$DATA/breast1_image.nrrd"
  "$DATA/lung2_image.nrrd"
)
OUT="${OUT:-src/napari_fewlabel/models/weights}"
METHODS="${METHODS:-ideal medmoco}"
DEVICE="${DEVICE:-auto}"
WORKERS="${WORKERS:-1}"
SUFFIX=""
if [[ -n "${EXCLUDE:-}" ]]; then
  KEEP=()
  for scan in "${SCANS[@]}"; do
    [[ "$(basename "$scan")" == "$EXCLUDE" ]] || KEEP+=("$scan")
  done
  if (( ${#KEEP[@]} == ${#SCANS[@]} )); then
    echo "EXCLUDE=$EXCLUDE is not one of the archive's scans: ${SCANS[*]##*/}" >&2
    exit 2
  fi
  SCANS=("${KEEP[@]}")
  SUFFIX="-without-${EXCLUDE%%_image*}"
  SUFFIX="${SUFFIX%%.*}"
fi
for scan in ${EXTRA:-}; do
  if [[ ! -e "$scan" ]]; then
    echo "EXTRA: $scan does not exist" >&2
    exit 2
  fi
  SCANS+=("$scan")
  name="$(basename "$scan")"
  name="${name%%_image*}"
  SUFFIX="$SUFFIX-with-${name%%.*}"
done
mkdir -p "$OUT"
for method in $METHODS; do
  "$PY" -m napari_fewlabel.cli pretrain "${SCANS[@]}" --method "$method" \
    --time-budget "$BUDGET" --steps 100000 --half --device "$DEVICE" --workers "$WORKERS" --seed 0 \
    --out "$OUT/$method-encoder$SUFFIX.safetensors"
  rm -f "$OUT/$method-encoder$SUFFIX.state.safetensors"   # resume state: not shipped
done
