#!/usr/bin/env bash
# The GPU checks of one session on a GPU machine, in one go (docs/benchmarks.md
# records what they printed):
#   1. speed.py on the GPU, alone: step and inference rates against a MONAI UNet,
#      the default run on the phantom and on the 1 mm MNI brain MRI; then
#      compile.py: torch.compile against eager;
#   2. then, side by side on the one GPU: the CUDA tests (pytest -m cuda) and the
#      few-slice suite's network methods (ours, monai, upper) over three seeds, as
#      one process per case and seed, each appending JSON lines to its own file.
#
#   bash benchmarks/gpu_checks.sh OUTDIR [CASE_CACHE] [MRI_CASE] [SUITE_SECONDS] [WORKERS]
#
# CASE_CACHE holds the suite's cases as fewslice_cases.write_case saved them, so
# the GPU machine needs no source data (make them with fewslice_suite.py
# --case-cache DIR on a machine that has the data); MRI_CASE likewise for the
# 1 mm MNI case (speed.py --mri-case FILE). SUITE_SECONDS bounds the suite: rows
# finished by then are kept, the rest are simply missing from the table.
# DEVICE (cuda), STEPS (the product's default) and CASES (all seven) override,
# e.g. for a quick try on a CPU: DEVICE=cpu STEPS=3 CASES=brain-tumour.
# JOBS names a file of suite jobs to run instead of the default plan, one per
# line: "case seed method..." (e.g. "mni-deep-grey 1 ours[batch_labelled=8]");
# SUITE_ONLY=1 skips speed.py and the tests.
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUTDIR [CASE_CACHE] [MRI_CASE] [SUITE_SECONDS] [WORKERS]}
cache=${2:-.devdata/cases}
mri=${3:-.devdata/mni1mm.npz}
suite_seconds=${4:-360}
workers=${5:-16}
device=${DEVICE:-cuda}
cases=${CASES:-mni-deep-grey brain-tumour lung-tumour lungs-lr head-ct mni-gm-wm itk-head-brain}
export STEPS=${STEPS:-}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1

nvidia-smi -L
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

# 1. Speed, alone on the GPU.
[ -n "${STEPS:-}${SUITE_ONLY:-}" ] || python3 "$here/speed.py" --device "$device" --repeats 3 --mri-case "$mri" \
    >"$out/speed_gpu.json" 2>"$out/speed_gpu.err"
echo "speed.py exit $?"
# torch.compile against eager on the GPU (issue 25; not adopted on the CPU).
[ -n "${STEPS:-}${SUITE_ONLY:-}" ] || python3 "$here/compile.py" --device "$device" --repeats 5 \
    >"$out/compile_gpu.json" 2>"$out/compile_gpu.err"
echo "compile.py exit $?"

# 2. CUDA tests beside the suite.
[ -n "${SUITE_ONLY:-}" ] || python3 -m pytest -m cuda tests/train/test_cuda.py tests/train/test_device.py -q \
    -p no:cacheprovider -W ignore::DeprecationWarning >"$out/pytest_cuda.log" 2>&1 &
tests=$!

suite_dir=$(mktemp -d)
jobs_file="$suite_dir/jobs"
[ -n "${JOBS:-}" ] && cp "$JOBS" "$jobs_file"
[ -n "${JOBS:-}" ] || for seed in 0 1 2; do
    for case in $cases; do
        methods="ours monai"
        [ "$seed" = 0 ] && methods="ours monai upper"
        echo "$case $seed $methods" >>"$jobs_file"
    done
done
run_job() {
    set -f
    set -- $1
    local case=$1 seed=$2
    shift 2
    local steps=()
    [ -n "$STEPS" ] && steps=(--steps "$STEPS")
    python3 "$here/fewslice_suite.py" --cases "$case" --seeds "$seed" --k 1 2 3 \
        --methods "$@" --device "$device" --threads 1 --case-cache "$cache" "${steps[@]}" \
        --results "$suite_dir/$case-$seed.jsonl" --workdir "$suite_dir/work-$case-$seed" \
        2>>"$suite_dir/$case-$seed.err"
}
export -f run_job
export here cache suite_dir device
timeout "$suite_seconds" xargs -P "$workers" -I{} bash -c 'run_job "{}"' <"$jobs_file"
echo "suite exit $? (124: stopped at ${suite_seconds} s; finished rows are kept)"
pkill -f "$here/fewslice_suite.py" && sleep 1
cat "$suite_dir"/*.jsonl >"$out/fewslice_suite_gpu.jsonl" 2>/dev/null
tail -n 3 "$suite_dir"/*.err >"$out/fewslice_suite_gpu.err" 2>/dev/null
wc -l "$out/fewslice_suite_gpu.jsonl"

wait "$tests"
echo "pytest exit $?"
tail -n 5 "$out/pytest_cuda.log"
