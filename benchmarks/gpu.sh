#!/usr/bin/env bash
# The GPU checks of issue 11 in one short script (under 6 minutes on one GPU), writing
# benchmarks/results/gpu.json:
#   1. a CUDA smoke trial: digits, 1 GPU worker, 50 steps with checkpoints, then the same
#      trial resumed to 100 steps (same MLflow run, every train/loss step once);
#   2. training-step images/s and achieved TFLOP/s of imagenet64-w64 at batch 32 in fp32,
#      bf16, channels_last and both, against the device's own bf16 matmul peak measured in
#      the same run (benchmarks/train_step.py --device cuda);
#   3. host syncs per training step of the trial loop, counted with
#      torch.cuda.set_sync_debug_mode (benchmarks/host_syncs.py), fp32 and bf16;
#   4. sharded evaluation of the smoke trial's checkpoint on 1 GPU worker
#      (`diffscale eval CKPT --workers 1 --gpu --json`, its `seconds`).
# Each part runs under its own time limit and records its exit status; a failed part does
# not stop the others. `benchmarks/gpu.sh --cpu` rehearses every part on the CPU with
# smaller sizes, writing /tmp/diffscale-gpu-rehearsal.json (no GPU figures: for checking
# the script on a machine without one).
#
#   bash benchmarks/gpu.sh [--cpu]        (from the repository root or anywhere)
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-.venv/bin/python}"
DIFFSCALE="${DIFFSCALE:-.venv/bin/diffscale}"
MODE=gpu
[[ "${1:-}" == "--cpu" ]] && MODE=cpu
OUTFILE="${OUTFILE:-benchmarks/results/gpu.json}"
[[ $MODE == cpu ]] && OUTFILE="${OUTFILE_CPU:-/tmp/diffscale-gpu-rehearsal.json}"
WORK="$(mktemp -d /tmp/diffscale-gpu.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
mkdir -p "$(dirname "$OUTFILE")" "$WORK/parts"
START=$(date +%s)

if [[ $MODE == gpu ]]; then
    DEVICE=cuda USE_GPU=true GPU_FLAG=--gpu
    STEP_ARGS=(--model imagenet64-w64 --batch 32 --steps 20 --rounds 2 --warmup 3)
    SYNC_STEPS=20 EVAL_IMAGES=256 CPUS=4
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "gpu.sh: no CUDA device visible to torch (use --cpu for a rehearsal)" >&2
        exit 2
    }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        > "$WORK/parts/nvidia_smi.txt" 2>&1 || true
else
    DEVICE=cpu USE_GPU=false GPU_FLAG=
    STEP_ARGS=(--model digits-xs --batch 16 --steps 2 --rounds 1 --warmup 1)
    SYNC_STEPS=3 EVAL_IMAGES=32 CPUS=1
fi

# part NAME SECONDS COMMAND...: run it with a time limit; log, exit status and seconds
part() {
    local name=$1 limit=$2
    shift 2
    local t0 rc
    t0=$(date +%s)
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" > "$WORK/parts/$name.log" 2>&1
    rc=$?
    echo "$rc $(($(date +%s) - t0))" > "$WORK/parts/$name.status"
    echo "   exit $rc after $(($(date +%s) - t0)) s"
    [[ $rc == 0 ]] || tail -20 "$WORK/parts/$name.log"
    return 0
}

# 1. the smoke trial, then its resume
cat > "$WORK/trial.yaml" <<EOF
name: gpu-smoke
data: {dataset: digits}
model: {name: digits-xs}
diffusion: {num_timesteps: 1000}
train: {batch_size: 64, log_every: 10, checkpoint_every: 25, max_failures: 0, seed: 0}
budget: {steps: 50}
eval: {num_points: 1, nll_images: 64, nll_timesteps: 10, fid_samples: 64, sample_steps: "25", grid_samples: 4}
resources: {num_workers: 1, use_gpu: $USE_GPU, cpus_per_worker: $CPUS}
tracking: {uri: "sqlite:///$WORK/mlflow.db", experiment: gpu}
storage: {path: "$WORK/runs"}
EOF
part trial_50 150 "$DIFFSCALE" train "$WORK/trial.yaml"
part trial_resume_100 150 "$DIFFSCALE" train "$WORK/trial.yaml" --set budget.steps=100

# 2. the training step
part train_step 150 "$PY" benchmarks/train_step.py --device "$DEVICE" "${STEP_ARGS[@]}" \
    --out "$WORK/parts/train_step.json"

# 3. host syncs per step
part syncs_fp32 60 "$PY" benchmarks/host_syncs.py --device "$DEVICE" --steps "$SYNC_STEPS" \
    --out "$WORK/parts/syncs_fp32.json"
part syncs_bf16 60 "$PY" benchmarks/host_syncs.py --device "$DEVICE" --steps "$SYNC_STEPS" \
    --bf16 --out "$WORK/parts/syncs_bf16.json"

# 4. sharded evaluation, 1 worker, of the newest smoke checkpoint
CKPT=$(ls -d "$WORK"/runs/gpu-smoke/checkpoint_* 2> /dev/null | sort | tail -1)
if [[ -n "$CKPT" ]]; then
    # shellcheck disable=SC2086  # GPU_FLAG is empty or one word
    part eval_1_worker 120 "$DIFFSCALE" eval "$CKPT" --workers 1 $GPU_FLAG --device "$DEVICE" \
        --num-images "$EVAL_IMAGES" --num-samples "$EVAL_IMAGES" --sample-steps 50 --json \
        --out "$WORK/eval"
else
    echo "1 0" > "$WORK/parts/eval_1_worker.status"
    echo "no checkpoint of the smoke trial" > "$WORK/parts/eval_1_worker.log"
fi

# gpu.json: every part's status, figures and the smoke trial's checks
"$PY" - "$WORK" "$OUTFILE" "$MODE" "$START" <<'EOF'
import json, sys, time
from pathlib import Path

import mlflow

work, out, mode, start = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
parts = work / "parts"


def status(name):
    path = parts / f"{name}.status"
    if not path.exists():
        return {"ran": False}
    rc, seconds = path.read_text().split()
    log = (parts / f"{name}.log").read_text(errors="replace") if rc != "0" else ""
    return {"exit": int(rc), "seconds": int(seconds), **({"log_tail": log[-2000:]} if log else {})}


def load(name):
    path = parts / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


result = {"mode": mode, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
smi = parts / "nvidia_smi.txt"
result["nvidia_smi"] = smi.read_text().strip() if smi.exists() else None

# 1. the smoke trial: final step, one MLflow run, each train/loss step exactly once
trial = {"first": status("trial_50"), "resume": status("trial_resume_100")}
metas = sorted(
    (json.loads(p.read_text()) for p in (work / "runs" / "gpu-smoke").glob("checkpoint_*/meta.json")),
    key=lambda m: m["step"],
)
trial["checkpoint_steps"] = [m["step"] for m in metas]
try:
    client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")
    exp = client.get_experiment_by_name("gpu")
    runs = client.search_runs([exp.experiment_id], "tags.mlflow.runName = 'gpu-smoke'")
    trial["mlflow_runs"] = len(runs)
    run = runs[0]
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    steps = sorted(m.step for m in losses)
    trial["train_loss_steps"] = steps
    trial["final_train_loss"] = max(losses, key=lambda m: m.step).value
    trial["run_status"] = run.info.status
    for key in ("perf/images_per_s", "perf/train_time_fraction", "eval/nll_bpd"):
        history = client.get_metric_history(run.info.run_id, key)
        trial[key] = max(history, key=lambda m: m.step).value if history else None
    trial["ok"] = (
        trial["first"].get("exit") == 0
        and trial["resume"].get("exit") == 0
        and bool(metas) and metas[-1]["step"] == 100
        and len(runs) == 1 and run.info.status == "FINISHED"
        and steps == list(range(10, 101, 10))
    )
except Exception as exc:  # report, do not lose the other parts
    trial["ok"], trial["error"] = False, repr(exc)
result["smoke_trial"] = trial

# 2. the training step
step = load("train_step")
result["train_step"] = {"status": status("train_step")}
if step is not None:
    peak = step["matmul_flops_per_s"]["bf16"]
    result["train_step"].update(
        model=step["model"],
        batch=step["batch"],
        device=step["device"],
        bf16_matmul_peak_tflops=peak / 1e12,
        fp32_matmul_peak_tflops=step["matmul_flops_per_s"]["fp32"] / 1e12,
        variants={
            name: {
                "images_per_s": v["images_per_s"],
                "achieved_tflops": v["achieved_flops_per_s"] / 1e12,
                "share_of_bf16_matmul_peak": v["utilisation_of_bf16_matmul_peak"],
                "ratio_vs_fp32": v["ratio_vs_fp32"],
            }
            for name, v in step["variants"].items()
        },
    )

# 3. host syncs
for name in ("syncs_fp32", "syncs_bf16"):
    result[name] = {"status": status(name), **(load(name) or {})}

# 4. evaluation on one worker
ev = {"status": status("eval_1_worker")}
log = parts / "eval_1_worker.log"
if ev["status"].get("exit") == 0 and log.exists():
    text = log.read_text()
    try:
        doc = json.loads(text[text.index("{"):])
        ev.update(seconds=doc.get("seconds"), workers=doc.get("workers"), metrics=doc.get("metrics", doc))
    except ValueError as exc:
        ev["parse_error"] = repr(exc)
result["eval_1_worker"] = ev
result["total_seconds"] = int(time.time()) - start

out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: v for k, v in result.items() if k != "train_step"}, indent=2)[:4000])
print(json.dumps(result["train_step"], indent=2))
print(f"wrote {out} ({result['total_seconds']} s)")
EOF
