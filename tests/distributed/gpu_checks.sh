#!/usr/bin/env bash
# The checks CPU CI cannot run (FSDP1 needs an accelerator device in torch 2.13; accelerate 1.15 runs an
# FSDP config on CPU without distributing). On a machine with 2 GPUs, from the repository root, in the tox env:
#   bash tests/distributed/gpu_checks.sh
# Each run writes rank0.json and adapter_rank0/ under $OUT; compare with the 1-process adapter as
# tests/distributed/test_engines.py does (GPU matmuls: compare at atol 1e-4, TF32 off).
set -euo pipefail
OUT=${OUT:-/tmp/peftcore-gpu-checks}
export NVIDIA_TF32_OVERRIDE=0
run() {  # config method extra...
  local config=$1 method=$2; shift 2
  accelerate launch --config_file "configs/accelerate/$config.yaml" tests/distributed/train_worker.py \
    --engine accelerate --method "$method" --out "$OUT/$config-$method" "$@"
}
run fsdp1 lora                                  # peftcore's fsdp_auto_wrap_policy: trains, whole adapter saved
run fsdp1 prompt_tuning
if run fsdp1 lora --fsdp1-policy accelerate; then  # blocks only: expected to fail (peft #1702)
  echo "UNEXPECTED: FSDP1 without fsdp_auto_wrap_policy trained" >&2; exit 1
fi
run fsdp2 lora
run deepspeed_zero3 lora
python - "$OUT" <<'PY'
import json, sys, pathlib
for d in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    if (d / "rank0.json").is_file():
        f = json.loads((d / "rank0.json").read_text())
        print(d.name, "world", f["world"], "fsdp1 units", f["fsdp1_units"], "sharded", f["sharded_adapter_tensors"])
PY
