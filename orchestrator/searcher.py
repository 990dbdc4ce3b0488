"""The one Tune searcher of every sweep run: it hands Tune the sweep's trials, each carrying its clmim id.

A sweep's trials are known before Tune starts (``records.Plan``: every grid point x samples, random draws made
from ``search.seed``), or, for optuna, proposed one at a time by Tune's ``OptunaSearch``. A first run queues every
planned trial; a resume queues only those that have not ended, with their ids and values, and tells optuna the
results of the ended ones, so it continues the same search. Nothing of Tune's saved state is read (see
``records.py``).
"""

from __future__ import annotations

from ray.tune.search import Searcher

from .records import TRIAL_KEY


class TrialSearcher(Searcher):
    """Suggests ``queue``'s trials in order (id, values), then up to ``extra`` trials proposed by ``inner`` (an
    optuna searcher), each with a new id ``<prefix>_<index>`` counting from ``next_index``. ``evaluated``:
    (values, result) of ended trials, told to ``inner`` before it proposes anything."""

    def __init__(self, queue: list[tuple[str, dict]], metric: str, mode: str, inner: Searcher | None = None,
                 extra: int = 0, prefix: str = "", next_index: int = 0,
                 evaluated: list[tuple[dict, float]] | None = None):
        super().__init__(metric=metric, mode=mode)
        self._queue = list(queue)
        self._inner = inner
        self._extra = extra if inner is not None else 0
        self._prefix, self._next = prefix, next_index
        self._evaluated = list(evaluated or [])
        self._from_inner: set[str] = set()  # Tune's ids of the trials ``inner`` proposed

    @property
    def total(self) -> int:
        """Trials this searcher will suggest at most."""
        return len(self._queue) + self._extra

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        # Tune is given no metric (the scheduler reads its own keys): the search's is this searcher's
        if self._inner is not None:
            if not self._inner.set_search_properties(metric or self.metric, mode or self.mode, config, **spec):
                return False
            for values, reward in self._evaluated:
                self._inner.add_evaluated_point(values, reward)
            self._evaluated = []
        return True

    def suggest(self, trial_id: str):
        if self._queue:
            tid, values = self._queue.pop(0)
            return {**values, TRIAL_KEY: tid}
        if self._extra <= 0:
            return Searcher.FINISHED
        config = self._inner.suggest(trial_id)
        if not isinstance(config, dict):
            return config  # None (wait) or FINISHED
        self._extra -= 1
        self._from_inner.add(trial_id)
        tid = f"{self._prefix}_{self._next:05d}"
        self._next += 1
        return {**config, TRIAL_KEY: tid}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._from_inner:
            self._inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._from_inner:
            self._inner.on_trial_complete(trial_id, result=result, error=error)

    # HyperBandForBOHB tells the searcher when it pauses and resumes a trial (hpbandster's bookkeeping); this one
    # proposes from ended trials only
    def on_pause(self, trial_id: str) -> None:
        pass

    def on_unpause(self, trial_id: str) -> None:
        pass

    # Tune saves a searcher's state with its experiment; this one's state is the sweep's records (``records.py``),
    # which a resume reads instead of Tune's pickles
    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass
