#!/usr/bin/env bash
# The first run on a real GPU (issue 20), as one prepared script.
#
#   scripts/gpu-check.sh prepare   # here, on a machine with PyPI: builds what travels into .gpu/
#   scripts/gpu-check.sh run       # on the GPU machine, from the repository root: the check
#
# `prepare` builds the stripped CUDA binary and the GPU test binary of tests/precision.rs
# (scripts/build-cuda.sh), compresses both with xz into .gpu/ (the device tool carries 64 MiB
# in all), and adds
# what the check reads that lives outside the repository: stories260K, the first 16
# instructions of the 12-model AlpacaEval pool, the HumanEval file (bench generate's prompts)
# and the CPU f32 scores of those 16 instructions, to compare the GPU's with.
#
# `run` needs only the GPU machine's python3 (PyTorch, transformers, pandas) and its CUDA 13
# libraries (the nvidia-* packages in that Python environment). It writes its raw outputs to
# $OUT (default benches/gpu/latest): device.txt (GPU, driver, torch), results.jsonl (every
# figure, ours and transformers', one JSON object a line), memory.jsonl (peak GPU memory of each
# step, sampled by nvidia-smi), precision.log and log.txt. Call it through the device tool with `carry: [".gpu"]` and a timeout that leaves
# room for a rerun; it is sized to about 6 minutes on one H100.
#
# A rehearsal on a machine without a GPU runs every step small, to catch a broken step before
# it costs device time:  DEVICE=cpu SCORE_SHAPE=smollm2-135m TRAIN_SHAPE=smollm2-135m
# FORWARD_SHAPES=1x64 GEN_BATCHES=1,2 NEW_TOKENS=8 TRAIN_BATCH=1x64 OUT=/tmp/rehearsal
# HARNESS_BIN=target/release/harness PYTHON=<python with torch> scripts/gpu-check.sh run
set -euo pipefail
cd "$(dirname "$0")/.."
stage=.gpu

prepare() {
    mkdir -p "$stage"  # ignored (.gitignore): it travels only where `carry` names it
    scripts/build-cuda.sh
    scripts/build-cuda.sh test --test precision --no-run 2>&1 | tee "$stage/test-build.log"
    local test_bin
    test_bin=$(grep -o 'target/cuda/[^ )]*/deps/precision-[0-9a-f]*' "$stage/test-build.log" | tail -1)
    xz -9 -T0 -c target/cuda/release/harness >"$stage/harness.xz"
    # Without its debug info the test binary packs to a third.
    strip -o "$stage/precision" "$test_bin"
    xz -9 -T0 -c "$stage/precision" >"$stage/precision.xz" && rm "$stage/precision"
    cp ../shared/models/stories260K.gguf "$stage/"
    cp ../shared/data/eval/HumanEval.jsonl.gz "$stage/"
    # The first 16 instructions (all their candidates) of the pool, and their CPU f32 scores.
    python3 - <<'PY'
import gzip, json
seen, rows = [], []
for line in gzip.open("../shared/data/pools/alpacaeval-12models.jsonl.gz", "rt"):
    row = json.loads(line)
    if row["instruction_id"] not in seen:
        if len(seen) == 16:
            break
        seen.append(row["instruction_id"])
    rows.append(line)
open(".gpu/pool16.jsonl", "w").writelines(rows)
PY
    cargo run --release -- score --model "$stage/stories260K.gguf" --pool "$stage/pool16.jsonl" \
        --out "$stage/cpu-scores.parquet"
    du -ch "$stage"/* | tail -1
}

run() {
    local out="${OUT:-benches/gpu/latest}"
    local device="${DEVICE:-cuda}" py="${PYTHON:-python3}"
    local score_shape="${SCORE_SHAPE:-llama-3.1-8b}" train_shape="${TRAIN_SHAPE:-qwen2.5-0.5b}"
    local h="${HARNESS_BIN:-/tmp/gpu/harness}"
    local forward="${FORWARD_SHAPES:-8x512,2x2048}" batches="${GEN_BATCHES:-1,16,64}" new="${NEW_TOKENS:-64}"
    local steps_shape="${TRAIN_BATCH:-4x512}"
    mkdir -p "$out" /tmp/gpu
    # The CUDA 13 libraries ship inside the Python environment as nvidia-* packages.
    local libs
    libs=$(python3 - <<'PY'
import os, site
dirs = set()
for root in site.getsitepackages():
    for path, _, files in os.walk(os.path.join(root, "nvidia")):
        if any(f.startswith(("libcublas.so", "libcudart.so", "libcurand.so")) for f in files):
            dirs.add(path)
print(":".join(sorted(dirs)))
PY
)
    # The driver's libcuda.so.1 (the binary links a stub of it): where the loader finds it, or
    # in the driver's own folder.
    local driver
    for driver in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
        if [[ -e "$driver/libcuda.so.1" ]]; then libs="$libs:$driver"; fi
    done
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "no nvidia-smi: a rehearsal on $device"
        "$py" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
        echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    } | tee "$out/device.txt"
    if [[ -z "${HARNESS_BIN:-}" ]]; then
        xz -dc "$stage/harness.xz" >/tmp/gpu/harness && chmod +x /tmp/gpu/harness
        xz -dc "$stage/precision.xz" >/tmp/gpu/precision && chmod +x /tmp/gpu/precision
    fi
    # The tests and the data folder expect ../shared beside the repository (absent there).
    if [[ ! -e ../shared/models/stories260K.gguf ]]; then
        mkdir -p ../shared/models ../shared/data/eval
        cp "$stage/stories260K.gguf" ../shared/models/
        cp "$stage/HumanEval.jsonl.gz" ../shared/data/eval/
    fi
    # Peak GPU memory of each step, sampled beside it.
    peak() {
        local step=$1; shift
        local sampler=""
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"/tmp/gpu/$step.mem" &
            sampler=$!
        fi
        local status=0 started=$SECONDS
        "$@" || status=$?
        if [[ -n "$sampler" ]]; then kill "$sampler"; fi
        local mib
        mib=$(sort -n "/tmp/gpu/$step.mem" 2>/dev/null | tail -1 || true)
        echo "{\"step\": \"$step\", \"peak_gpu_mib_nvidia_smi\": ${mib:-null}, \"status\": $status, \"seconds\": $((SECONDS - started))}" | tee -a "$out/memory.jsonl"
    }

    # At most 8 files come back: logs go to log.txt, every figure to results.jsonl.
    local log="$out/log.txt" results="$out/results.jsonl"
    # Our bench's JSON array as lines of results.jsonl.
    ours() { python3 -c 'import json, sys; [print(json.dumps({"engine": "harness", "step": sys.argv[1], **x})) for x in json.load(sys.stdin)]' "$1"; }
    export -f ours

    echo "== 1. correctness: the GPU tests, then a pool slice against CPU f32 scores" | tee -a "$log"
    if [[ -x /tmp/gpu/precision && -z "${HARNESS_BIN:-}" ]]; then
        peak precision bash -c "/tmp/gpu/precision --nocapture >$out/precision.log 2>&1; tail -3 $out/precision.log"
    fi
    for dtype in f32 bf16; do
        peak "score-gpu-$dtype" bash -c "$h --device $device --dtype $dtype score --model $stage/stories260K.gguf --pool $stage/pool16.jsonl --out /tmp/gpu/gpu-$dtype.parquet >>$log 2>&1"
    done
    "$py" - "$stage/cpu-scores.parquet" /tmp/gpu/gpu-f32.parquet /tmp/gpu/gpu-bf16.parquet <<'PY' | tee -a "$results"
import json, sys
import pandas as pd
cpu = pd.read_parquet(sys.argv[1]).set_index("pair")
for path, name in [(sys.argv[2], "f32"), (sys.argv[3], "bf16")]:
    gpu = pd.read_parquet(path).set_index("pair")
    both = cpu.join(gpu, rsuffix="_gpu", how="inner")
    mean = lambda s, n: s / n.clip(lower=1)
    gap = (mean(both.sum_logprob, both.n_tokens) - mean(both.sum_logprob_gpu, both.n_tokens_gpu)).abs()
    print(json.dumps({"step": "score-agreement", "dtype": name, "pairs": len(both), "cpu_pairs": len(cpu),
                      "same_tokens": bool((both.n_tokens == both.n_tokens_gpu).all()),
                      "max_gap_nats_per_token": float(gap.max()), "mean_gap_nats_per_token": float(gap.mean())}))
PY

    echo "== 2. scoring throughput on the $score_shape shape (bf16), ours and transformers" | tee -a "$log"
    "$h" model random --shape "$score_shape" --out /tmp/gpu/l8 --weights bf16 >>"$log" 2>&1
    peak forward-ours bash -c "$h --device $device --dtype bf16 bench forward --model /tmp/gpu/l8 --shapes $forward --iterations 3 --json 2>>$log | ours forward | tee -a $results"
    peak forward-transformers bash -c "$py benches/reference/hf_score.py /tmp/gpu/l8 --device $device --shapes $forward --iterations 3 2>>$log | tee -a $results"

    echo "== 3. greedy generation on the same shape at batch 1, 16 and 64" | tee -a "$log"
    peak generate-ours bash -c "$h --device $device --dtype bf16 bench generate --model /tmp/gpu/l8 --batch $batches --prompts 64 --max-new-tokens $new --json 2>>$log | ours generate | tee -a $results"
    # transformers' prompts as long as ours were on average (HumanEval's, in this tokenizer).
    local prompt_len
    prompt_len=$(python3 -c 'import json, sys; g = [json.loads(l) for l in open(sys.argv[1]) if "\"generate\"" in l and "harness" in l][-1]; print(round(g["prompt_tokens"] / g["prompts"]))' "$results")
    peak generate-transformers bash -c "$py benches/reference/hf_generate.py /tmp/gpu/l8 --device $device --batches $batches --prompt-len $prompt_len --new-tokens $new 2>>$log | tee -a $results"
    rm -rf /tmp/gpu/l8

    echo "== 4. training steps on the $train_shape shape (f32 weights and moments in both)" | tee -a "$log"
    "$h" model random --shape "$train_shape" --out /tmp/gpu/q05 >>"$log" 2>&1
    peak train-ours bash -c "$h --device $device bench train --model /tmp/gpu/q05 --shape $steps_shape --steps 3 --json 2>>$log | ours train | tee -a $results"
    peak train-transformers bash -c "$py benches/reference/hf_train.py /tmp/gpu/q05 --shape $steps_shape --steps 3 --device $device --json 2>>$log | tee -a $results"

    echo "== peak GPU memory per step (nvidia-smi)"
    cat "$out/memory.jsonl"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
