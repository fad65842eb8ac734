"""An Optuna sweeper whose study survives the sweep process: stop it, rerun it, it continues.

`hparams_search=optuna` keeps the study in `<sweep dir>/optuna.db` (SQLite). Hydra's Optuna sweeper
loads an existing study but would still run `n_trials` new trials and number their job dirs from 0
again, over the old ones. `ResumableOptunaSweeper` first reads the study: trials that finished
(complete, failed or pruned) count towards `n_trials` and are not run again; a trial that was
running when the sweep died is marked failed and its parameters are queued to run first; job dirs
continue after the highest trial number, so trial N always runs in `<sweep dir>/N`.

Rerun a stopped sweep with the same command plus `hydra.sweep.dir=<its dir>` (the default sweep dir
is new for every launch; the sweep logs the line to use when it starts).
"""

from __future__ import annotations

import logging
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

log = logging.getLogger(__name__)


class ResumableOptunaSweeper(OptunaSweeper):
    """Hydra's OptunaSweeper, continuing the study stored in `storage` instead of restarting it."""

    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        if impl.storage:
            self._continue_study(impl)
        return super().sweep(arguments)

    @staticmethod
    def _continue_study(impl: Any) -> None:
        import optuna
        from optuna.trial import TrialState

        try:
            study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
        except KeyError:  # no such study yet: a new sweep
            log.info(
                "Optuna study %r in %s; to continue this sweep if it stops, rerun the same "
                "command with: %s",
                impl.study_name,
                impl.storage,
                f"hydra.sweep.dir={impl.sweep_dir}",
            )
            return
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state.is_finished()]
        interrupted = [t for t in trials if t.state == TrialState.RUNNING]
        job_idx = len(trials)
        for trial in interrupted:
            # Its process died with the sweep: record it as failed and run its parameters again.
            study._storage.set_trial_state(trial._trial_id, TrialState.FAIL)
            study.enqueue_trial(trial.params)
        impl.n_trials = max(0, impl.n_trials - len(finished))
        impl.job_idx = job_idx  # Hydra's sweeper would number jobs from 0 again
        log.info(
            "Optuna study %r in %s continues: %d finished trials kept, %d interrupted re-queued, "
            "%d to run (job dirs from %d)",
            impl.study_name,
            impl.storage,
            len(finished),
            len(interrupted),
            impl.n_trials,
            impl.job_idx,
        )
