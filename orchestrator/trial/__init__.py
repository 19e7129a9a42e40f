"""One trial of the scaling grid: DDP training of one configuration on Ray Train (V2).

- :mod:`.driver`: :func:`run_trial` builds the ``TorchTrainer`` named after the trial (a
  re-run resumes it) and :func:`prepare_trial_data` the data every worker reads;
- :mod:`.loop`: :func:`train_loop_per_worker`, the worker: setup, restore, the step, the
  log window, the eval point, the checkpoint;
- :mod:`.state`: :class:`TrialState`, everything a checkpoint keeps, with save/load;
- :mod:`.restore`: the newest checkpoint that verifies;
- :mod:`.window`: the per-example training statistics between two log points.
"""

from orchestrator.trial.driver import prepare_trial_data, run_trial
from orchestrator.trial.loop import train_loop_per_worker
from orchestrator.trial.state import RankRng, TrialState

__all__ = ["RankRng", "TrialState", "prepare_trial_data", "run_trial", "train_loop_per_worker"]
