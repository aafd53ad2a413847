#!/usr/bin/env bash
# One GPU sitting, in phases (each fits one call of a lent GPU machine):
#
#   bash benchmarks/gpu_sitting.sh check    # CUDA tests, then layer / step / Mirror benchmarks (fp32 and bf16), alone on the GPU
#   bash benchmarks/gpu_sitting.sh probe    # LR probe for lora_r8 on each task at the GPU budget (seed 0)
#   bash benchmarks/gpu_sitting.sh grid TASKS CONDITIONS LR_<task>=...   # quality grid, N parallel workers
#
# Environment: MODEL (HF path; default the bundled MiniLM), GLUE (GLUE root; default unified_lora's
# resolution), RESULTS and QOUT (where perf and quality results are written), DEADLINE_AT (epoch
# seconds at which unfinished runs are stopped), DTYPES, LAYER_REPEATS, LAYER_MIN_TIME, VARIANT_REPEATS (check phase), WORKERS (parallel run.py processes per task sharing the GPU, default 12; W_<task>
# overrides it for one task), GRID_DEVICE (default cuda; cpu runs the grid phase anywhere), CHECK_DEVICE and
# CHECK_QUICK (CHECK_DEVICE=cpu CHECK_QUICK=1 SKIP_TESTS=1: the check phase as a quick dry run on any machine, which
# tests/test_benchmarks_smoke.py runs so a flag or path typo costs no device time), OUT (a folder that
# receives a tarball of the results), and PYTHON. The library is imported from src/ (no install
# needed on a machine that already has torch, transformers and peft).
#
# GPU budget: 3 epochs per task at batch 16 (drop_last), SST-2 on the fixed 8000-example subsample.
# A grid phase's workers take jobs by claim files in a fresh /tmp/gpu_claims.XXXX of their own (a run
# stopped at the deadline leaves no claim for the next call; finished runs in QOUT are skipped), which
# keeps every worker busy until the grid is empty.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
MODEL_ARG=${MODEL:+--model $MODEL}
GLUE_ARG=${GLUE:+--data-dir $GLUE}
WORKERS=${WORKERS:-12}
OUTDIR=${OUT:-/tmp/gpu_out}
LOGS=${LOGS:-/tmp/gpu_logs}  # per-process logs travel inside the tarball (a device call returns at most 8 files)
mkdir -p "$OUTDIR" $LOGS
RES=${RESULTS:-benchmarks/results}  # perf JSON + perf_gpu.md; a folder outside the repo survives a re-synced tree
Q=${QOUT:-benchmarks/results/quality_gpu}
RD="--results-dir $RES"
limit() {  # "timeout N" up to DEADLINE_AT (epoch seconds), so finished runs are packed before a call's limit
    [ -n "${DEADLINE_AT:-}" ] && echo "timeout $(( DEADLINE_AT - $(date +%s) > 1 ? DEADLINE_AT - $(date +%s) : 1 ))"
}
DEV=${CHECK_DEVICE:-cuda}
QK=${CHECK_QUICK:+--quick}
declare -A STEPS=([mrpc]=687 [rte]=465 [cola]=1602 [sst2]=1500)

pack() {  # results and logs travel back as one tarball, unpacked at the repo root
    tar czf "$OUTDIR/results_$1.tgz" --ignore-failed-read $RES/perf_gpu.md \
        $(ls $RES/perf_*_cuda_*.json 2>/dev/null) $Q $LOGS 2>/dev/null
    ls -la "$OUTDIR"
}

case "${1:-}" in
check)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    # the C++ extensions (layer kernel="cpp", Mirror kernel="fused") build with g++ and ninja; ninja travels in .gpucarry
    $PY -c "import ninja" 2>/dev/null || $PY -m pip install -q --no-index --find-links .gpucarry/wheels ninja 2>&1 | tail -1
    # load_inline runs `ninja` from PATH: add where pip puts scripts (the interpreter's, or the user's with --user)
    export PATH="$($PY -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$HOME/.local/bin:$PATH"
    # the versions (on stderr, so they show) and whether g++ and ninja are there, in one interpreter start-up
    WITH_CPP=$($PY -c "import shutil, sys, torch, transformers, peft, safetensors
from torch.utils.cpp_extension import is_ninja_available as n
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', \
peft.__version__, 'safetensors', safetensors.__version__, file=sys.stderr)
print('--with-cpp' if shutil.which('g++') and n() else '')" | tail -1)
    echo "layer kernel='cpp' arm: ${WITH_CPP:-left out (no g++ or ninja)}"
    # (skip reasons and the slowest tests too: bitsandbytes or mamba-ssm may be missing on the machine)
    [ -z "${SKIP_TESTS:-}" ] && $(limit) $PY -m pytest -q -rs --durations=5 -p no:cacheprovider tests/test_cuda.py 2>&1 \
        | grep -v "Warning\|warnings.warn\|^  " | tail -40
    # most wanted first (bf16, the layer with both kernels); with DEADLINE_AT, each step stops in time for `pack`
    for dt in ${DTYPES:-bfloat16 float32}; do
        $(limit) $PY benchmarks/perf/layer.py --device $DEV --dtype $dt --repeats ${LAYER_REPEATS:-15} \
            --min-time ${LAYER_MIN_TIME:-0.2} $WITH_CPP $QK $RD 2>&1 | grep -v "^STAGE\|profiler\|USDT\|Warning\|warn"
        $(limit) $PY benchmarks/perf/controller_overhead.py --device $DEV --dtype $dt $MODEL_ARG --repeats 30 $QK $RD 2>&1 \
            | grep -v "^rep \|Loading"
        $(limit) $PY benchmarks/perf/mirror_cost.py --device $DEV --dtype $dt $QK $RD 2>&1 | tail -3
        $(limit) $PY benchmarks/perf/layer_variants.py --device $DEV --dtype $dt --shapes tiny,minilm,llama1b \
            --repeats ${VARIANT_REPEATS:-11} --min-time 0.1 $QK $RD 2>&1 | grep "^[a-z0-9]* r[0-9]*:\|left out"
    done
    pack check
    ;;
probe)
    for task in mrpc rte cola sst2; do
        for lr in 3e-4 1e-3 3e-3; do
            $PY benchmarks/quality/run.py $MODEL_ARG $GLUE_ARG --device cuda --threads 1 --tasks $task \
                --methods lora_r8 --conditions clean --seeds 0 --steps ${STEPS[$task]} --lr $lr \
                --out $Q/lrprobe/lr$lr > "$LOGS/probe_${task}_$lr.log" 2>&1 &
        done
    done
    wait
    grep -H "lora_r8__clean" $LOGS/probe_*.log
    pack probe
    ;;
grid)  # grid "rte,cola" "clean,noise40" "rte=1e-3,cola=3e-3" "lora_r8,..." [shock options...]
    tasks=$2 conds=$3 lrs=$4 methods=$5
    shift 5
    claims=$(mktemp -d /tmp/gpu_claims.XXXX)
    for task in ${tasks//,/ }; do
        lr=$(tr ',' '\n' <<<"$lrs" | sed -n "s/^$task=//p")
        [ -z "$lr" ] && { echo "no LR for $task in $lrs"; exit 2; }
        wv="W_$task"
        w=${!wv:-$WORKERS}  # W_<task> overrides WORKERS (give long tasks more workers)
        for ((i = 0; i < w; i++)); do
            $(limit) $PY benchmarks/quality/run.py $MODEL_ARG $GLUE_ARG --device ${GRID_DEVICE:-cuda} --threads 1 --tasks $task \
                --methods "$methods" --conditions "$conds" --steps ${STEPS[$task]} --lr $lr --out $Q \
                --claim "$claims" "$@" > "$LOGS/grid_${task}_${conds//,/-}_$i.log" 2>&1 &
        done
    done
    wait
    grep -h "wall=" $LOGS/grid_*.log | sort | awk '{print $1, $2}' | tr '\n' ';'
    grep -l "Traceback" $LOGS/grid_*.log && tail -5 $(grep -l "Traceback" $LOGS/grid_*.log | head -1)
    pack "grid_$(date +%H%M%S)"
    ;;
*)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
