#!/usr/bin/env bash
# The GPU benchmark in one go (issue 17 §3): SD1.5-512 and SDXL-1024, ours vs diffusers' reference scripts.
#
#   benchmarks/gpu_suite.sh fetch   # HERE, once, from the repository root (needs PyPI): wheels the device image
#                                   #   lacks into .whl/ and diffusers' two reference scripts into .peer/ (both
#                                   #   git-ignored through .git/info/exclude; neither is ever committed)
#   benchmarks/gpu_suite.sh run     # ON THE DEVICE (device tool: run with carry [".whl", ".peer"]): installs the
#                                   #   carried wheels, runs `python -m benchmarks.run --suite gpu`, writes
#                                   #   gpu.json + gpu.md to $OUT (or benchmarks/out/). Under 8 minutes in all.
#
# fetch reads the scripts from a diffusers git directory: DIFFUSERS_GIT (default: the `fetch` tool's mirror,
# /work/.mirror/huggingface+diffusers/repo); the commit is recorded in .peer/COMMIT and in the results.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"

# What the device image ('cuda', Python 3.12) lacks: diffusers, datasets (the scripts' loader) and its two
# pure-Python needs; peft pinned to the project's range. Versions as the CPU lock and the peer venv had them.
WHEELS=(diffusers==0.42.1 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 tomli-w==1.2.0)

case "$mode" in
fetch)
    exclude="$(git rev-parse --git-path info/exclude)"
    for d in /.whl/ /.peer/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >>"$exclude"; done
    mkdir -p .whl .peer
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "${WHEELS[@]}"
    git_dir="${DIFFUSERS_GIT:-/work/.mirror/huggingface+diffusers/repo}"
    git --git-dir="$git_dir" show HEAD:examples/text_to_image/train_text_to_image_lora.py >.peer/train_text_to_image_lora.py
    git --git-dir="$git_dir" show HEAD:examples/text_to_image/train_text_to_image_lora_sdxl.py >.peer/train_text_to_image_lora_sdxl.py
    git --git-dir="$git_dir" rev-parse HEAD >.peer/COMMIT
    du -sh .whl .peer
    ;;
run)
    started=$(date +%s)
    out="${OUT:-benchmarks/out}"
    mkdir -p "$out"
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site:$PWD"
    else
        export PYTHONPATH="$PWD"
    fi
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
    peer=()
    if [ -f .peer/COMMIT ]; then
        peer=(--peer-script .peer/train_text_to_image_lora.py --peer-script-sdxl .peer/train_text_to_image_lora_sdxl.py
              --peer-commit "$(cat .peer/COMMIT)")
    fi
    set -o pipefail
    python3 -m benchmarks.run --suite gpu "${peer[@]}" --model-cache /tmp/bench-models \
        --json "$out/gpu.json" --markdown "$out/gpu.md" "${@:2}" 2>&1 | tee "$out/gpu.log"
    echo "whole run, set-up included: $(( $(date +%s) - started )) s" | tee -a "$out/gpu.log"
    ;;
*)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
