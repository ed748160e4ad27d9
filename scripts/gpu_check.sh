#!/usr/bin/env bash
# The GPU checks of issues #6 and #7, in one run: CUDA tests (engine consistency fp32/bf16, FlexAttention
# training == dense), `make bench`'s engine figures on CUDA (toy model fp32; a ~0.2B random-init model
# bf16), and one parallel-SFT + PAPO run on CUDA. Usage: scripts/gpu_check.sh OUT_DIR [PYTHON]
# (PYTHON defaults to .venv/bin/python; the toy base model comes from .npr/cache or is bootstrapped).
# GPU_CHECK_STEPS picks a subset of: tests bench_toy bench_large train speed. `speed` needs SPEED_MODEL, a
# two-mode checkpoint (e.g. npr's final one after `make run`): its evaluation speedups on CUDA and, as the
# baseline on the same machine, on 2 CPU threads.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [PYTHON]}
py=${2:-.venv/bin/python}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=".:tests:${PYTHONPATH:-}"
base=$(ls -d .npr/cache/toy_base/*/ 2>/dev/null | head -1)
model_arg=${base:+--model-path $base}
"$py" -c 'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))' \
  | tee "$out/versions.txt"
steps=" ${GPU_CHECK_STEPS:-tests bench_toy bench_large train speed} "
step() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  [[ $steps == *" $name "* ]] || return 0
  local t0=$SECONDS
  timeout "$secs" "$@" > "$out/$name.log" 2>&1
  echo "== $name: rc $? in $((SECONDS - t0)) s"; tail -n 12 "$out/$name.log"
}
step train 150 "$py" -m npr_pipelines.training.device_check --device cuda $model_arg --out "$out/training_cuda.json"
step tests 180 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_engine_gpu.py tests/test_training_attention.py
step bench_toy 150 "$py" -m npr_pipelines.bench --device cuda $model_arg --reps 3 --out "$out/engine_cuda_toy.json"
step bench_large 240 "$py" -m npr_pipelines.bench --device cuda --model large --dtype bfloat16 --reps 2 \
  --traces 4 --new-tokens 64 \
  --out "$out/engine_cuda_large.json"
if [[ -n ${SPEED_MODEL:-} ]]; then
  step speed 240 bash -c "'$py' -m npr_pipelines.eval.speed_check '$SPEED_MODEL' --device cuda --chunk 64 300 \
      --out '$out/speed_cuda.json' && '$py' -m npr_pipelines.eval.speed_check '$SPEED_MODEL' --device cpu \
      --threads 2 --out '$out/speed_cpu2.json'"
fi
