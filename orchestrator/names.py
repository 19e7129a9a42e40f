"""Every name the orchestrator writes and reads back: MLflow metric keys and tags, and the
files of a sweep folder and of a checkpoint. One place, so a writer and its readers can never
drift apart; the strings are part of the project's contract (DESIGN.md, "MLflow layout").

This module imports nothing: every other module may use it.
"""

from __future__ import annotations

# ---------------------------------------------------------------- metrics (step = optimizer step)
TRAIN_LOSS = "train/loss"
TRAIN_MSE = "train/mse"
TRAIN_VB = "train/vb"
TRAIN_QUARTILES = 4  # train/loss_q0 .. train/loss_q3, by quartile of t
# per log window: the per-example variance of the importance-weighted objective terms (Eq. 18's
# target), and the mean and across-step variance of the gradient norm (trial/window.py)
TRAIN_OBJECTIVE_VAR = "train/objective_var"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_GRAD_NORM_VAR = "train/grad_norm_var"


def train_loss_quartile(q: int) -> str:
    """``train/loss_q{q}``: the mean loss over examples whose t lies in quartile q."""
    return f"train/loss_q{q}"


EVAL_PREFIX = "eval/"
EVAL_NLL = "eval/nll_bpd"
EVAL_NLL_STDERR = "eval/nll_stderr"
EVAL_NLL_FULL = "eval/nll_bpd_full"  # logged only when the full bound was evaluated
EVAL_FID = "eval/fid"  # Frechet distance in FID Inception features
EVAL_DIGITS_FD = "eval/digits_fd"  # Frechet distance in the offline digits features
EVAL_FD_KEYS = (EVAL_FID, EVAL_DIGITS_FD)
EVAL_PRECISION = "eval/precision"
EVAL_RECALL = "eval/recall"


def eval_metric(name: str) -> str:
    """``eval/<name>``, e.g. the Frechet-distance metric a feature extractor reports."""
    return f"{EVAL_PREFIX}{name}"


SAMPLING_PREFIX = "sampling/"


def sampling_metric(fd: str, method: str, steps: int) -> str:
    """``sampling/<fd>/<method>/<steps>``: the sampling-steps study at a trial's end."""
    return f"{SAMPLING_PREFIX}{fd}/{method}/{steps}"


PERF_IMAGES_PER_S = "perf/images_per_s"
PERF_FLOPS_PER_S = "perf/flops_per_s"
PERF_TRAIN_TIME_FRACTION = "perf/train_time_fraction"

COMPUTE_PREFIX = "compute/"
COMPUTE_IMAGES = "compute/images"
COMPUTE_FLOPS = "compute/flops"
COMPUTE_EVAL_FLOPS = "compute/eval_flops"  # cumulative FLOPs of the eval points so far

REPORT_STEP = "step"  # beside the metrics in each ray.train.report (not logged to MLflow)

# ---------------------------------------------------------------- MLflow tags and params
ROLE_TAG = "diffscale.role"  # "sweep" on a sweep's parent run, "trial" on each child
ROLE_SWEEP = "sweep"
ROLE_TRIAL = "trial"
SWEEP_TAG = "sweep"
TRIAL_TAG = "trial"
SIZE_TAG = "size"
BUDGET_TAG = "budget"
CELLS_TAG = "cells"  # JSON list of {"cell", "budget", "step"}
PARENT_RUN_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
MLFLOW_TAG_PREFIX = "mlflow."
MODEL_PARAMS_PARAM = "model.params"
MODEL_FLOPS_PARAM = "model.flops_per_image"

# ---------------------------------------------------------------- files
DEFAULT_TRACKING_DB = "mlflow.db"  # the embedded default, sqlite:///<cwd>/mlflow.db

# a sweep folder, storage/NAME/
SWEEP_RECORD = "sweep.json"  # the definition, tracking URI, trials and run ids
SWEEP_DRIVER = "driver.json"  # the driver's host, pid, heartbeat and end state
SWEEP_CANCEL = "cancel"  # present while a cancel is requested
SWEEP_STATE_DIR = "state"  # state/<trial>.json: status, step/total, latest metrics
SWEEP_TUNE_DIR = "tune"  # Ray Tune's experiment folder
SWEEP_TRIALS_DIR = "trials"  # one Ray Train run folder per trial
SWEEP_PLAN_ARTIFACT = "plan.json"  # on the parent run, beside the sweep file
SWEEP_FILE_ARTIFACT = "sweep.yaml"

# a checkpoint directory
CHECKPOINT_MANIFEST = "manifest.json"  # sha256 per file, written last
CHECKPOINT_META = "meta.json"
CHECKPOINT_STATE = "trainer_state.pt"  # a trial's, rank 0: model, EMA, optimizer, sampler, data
CHECKPOINT_RNG = "rng_rank{rank}.pt"  # a trial's: each rank's RNG states and log window
CHECKPOINT_RANK_MANIFEST = "manifest_rank{rank}.json"  # a trial's: sha256 of one rank's files
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint folders in a trial's run folder
CHECKPOINT_SCORE = "checkpoint_score"  # beside a checkpoint's report: which ones Ray keeps


def checkpoint_dir_name(step: int) -> str:
    """``checkpoint_step<step, 8 digits>``: a trial's checkpoint folder, named by its step."""
    return f"{CHECKPOINT_PREFIX}step{step:08d}"


# a trial's storage, beside its run folder
DATASETS_DIR = "datasets"  # storage/datasets/<name>: a built-in dataset prepared as shards

# a trial run's MLflow artifacts
SAMPLES_ARTIFACT_DIR = "samples"  # the sample grid of each eval point


def samples_grid_file(step: int) -> str:
    """``samples_<step, 8 digits>.png``: the sample grid a trial logs at an eval point."""
    return f"samples_{step:08d}.png"


# diffscale fit's outputs: outputs/analysis/NAME/<fit name>/ and analysis/<fit name>/ on the
# sweep's parent run (one folder per metric, x axis and form)
ANALYSIS_ARTIFACT_DIR = "analysis"
ANALYSIS_FIT_FILE = "fit.json"

# diffscale eval's outputs
EVAL_RESULT_FILE = "eval.json"
EVAL_SAMPLES_FILE = "samples.png"

# diffscale demo's outputs (beside its samples.png)
DEMO_RESULT_FILE = "result.json"
DEMO_CHECKPOINT_DIR = "checkpoint"
