"""The one evaluation, for a trial's eval points, its end-of-training sampling study and
``diffscale eval`` alike, sharded over every rank of the process group: NLL in bits/dim,
Frechet distance and improved precision/recall of EMA samples, the sample grid and the
sampling-steps study.

``shard.py`` (how work is split by index and gathered), ``steps.py`` (the steps),
``point.py`` (a trial's eval point), ``command.py`` (a checkpoint: ``diffscale eval``),
``workers.py`` (the same on N Ray Train workers). The feature extractor is the dataset's
default (:func:`diffusion.data.default_features`): a small offline classifier on the
built-in digits (reported as ``digits_fd``, never as FID), pytorch-fid's Inception network
on image datasets (reported as ``fid``).
"""

from orchestrator.evaluate.command import EvalOptions, evaluate_checkpoint, torch_threads
from orchestrator.evaluate.point import TrialEvaluation, evaluate_trial
from orchestrator.evaluate.shard import Shard
from orchestrator.evaluate.steps import (
    FeatureMetrics,
    SampleSet,
    draw_samples,
    feature_metrics,
    load_real_images,
    measure_nll,
    real_features,
    sample_features,
    sampling_study,
    save_grid,
)
from orchestrator.evaluate.workers import evaluate_on_workers

__all__ = [
    "EvalOptions",
    "FeatureMetrics",
    "SampleSet",
    "Shard",
    "TrialEvaluation",
    "draw_samples",
    "evaluate_checkpoint",
    "evaluate_on_workers",
    "evaluate_trial",
    "feature_metrics",
    "load_real_images",
    "measure_nll",
    "real_features",
    "sample_features",
    "sampling_study",
    "save_grid",
    "torch_threads",
]
