"""The one Tune searcher of every sweep run: it hands Tune the sweep's trials, each carrying its clmim id.

A sweep's trials are known before Tune starts (``records.Plan``: every grid point x samples, random draws made
from ``search.seed``), or, for optuna and nsga2, proposed one at a time by Tune's ``OptunaSearch`` (TPE on one
metric; NSGA-II on ``search.objectives`` together). A first run queues every planned trial; a resume queues only
those that have not ended, with their ids and values, and tells the model the results of the ended ones (and of
the ``search.warm_start`` sweeps' trials), so it continues the same search. Nothing of Tune's saved state is read
(see ``records.py``).
"""

from __future__ import annotations

from pathlib import Path

from ray.tune.search import Searcher

from .layout import list_sweeps
from .query import query
from .records import TRIAL_KEY, Status
from .space import SearchSection, Space, SpaceError, objective_modes


def search_target(search: SearchSection) -> tuple[str | list[str], str | list[str]]:
    """What the sweep's model searches on: (metric, mode), or for nsga2 (objectives, their modes)."""
    if search.algorithm == "nsga2":
        return list(search.objectives), objective_modes(search)
    return search.metric, search.mode


def reward(search: SearchSection, final: dict) -> float | list[float] | None:
    """A finished trial's result as the model is told it (``search_target``); None when it lacks any of it."""
    metric, _ = search_target(search)
    names = metric if isinstance(metric, list) else [metric]
    values = [final.get(m) for m in names]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in values):
        return None
    return [float(v) for v in values] if isinstance(metric, list) else float(values[0])


def warm_start(root: Path, space: Space, sweep: str) -> list[tuple[dict, float | list[float]]]:
    """(values, result) of the finished trials of ``search.warm_start``'s sweeps under ``root`` whose every axis
    value lies in this space (and that measured what it searches on), for the model to be told first; a
    ``SpaceError`` before Ray starts for a sweep that is not there or lacks an axis. The sweeps' other settings are
    not compared: warm-start from sweeps of the same base config and budget."""
    names = list(space.search.warm_start)
    if not names:
        return []
    if sweep in names:
        raise SpaceError(f"search.warm_start: names this sweep ({sweep!r}) itself; its own finished trials are told "
                         "to the search on a resume anyway")
    there = {d.name for d in list_sweeps(root)}
    if missing := [n for n in names if n not in there]:
        raise SpaceError(f"search.warm_start: no sweep {missing[0]!r} under {root}")
    rows = query(f"SELECT * FROM trials WHERE sweep IN ({', '.join('?' * len(names))}) AND status = ?", root,
                 [*names, Status.TERMINATED.value])
    axes = space.axes()
    target, _ = search_target(space.search)
    if absent := [c for c in [*axes, *(target if isinstance(target, list) else [target])] if c not in rows]:
        raise SpaceError(f"search.warm_start: the trials of {', '.join(names)} have no {absent[0]!r} column (an axis "
                         "or objective of this space); warm-start from sweeps over the same axes")
    points = []
    for row in rows.to_dict("records"):
        values = {k: _plain(row[k]) for k in axes}
        told = reward(space.search, row)
        if told is not None and all(_within(values[k], kind, vals) for k, (kind, vals) in axes.items()):
            points.append((values, told))
    print(f"warm start: {len(points)} of the {len(rows)} finished trials of {', '.join(names)} told to "
          f"{space.search.algorithm} (the rest lie outside this space or lack {target})", flush=True)
    return points


def _plain(v):
    return v.item() if hasattr(v, "item") else v  # (numpy scalars from the table: optuna wants Python values)


def _within(v, kind: str, vals) -> bool:
    """``v`` is a value the axis could have drawn."""
    if kind == "choice":
        return v in list(vals)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
        return False
    lo, hi = float(vals[0]), float(vals[1])
    return lo <= v < hi if kind == "randint" else lo <= v <= hi


def population_size(trials: int) -> int:
    """NSGA-II's generation size for a search of ``trials``: optuna's 50 where there is room for several
    generations, else a quarter of the trials (at least 4): with its default a search of 24 would never leave its
    first, random, generation."""
    return max(4, min(50, trials // 4))


def model_searcher(search: SearchSection, trials: int) -> Searcher:
    """The model proposing a searched sweep's ``trials``: Tune's ``OptunaSearch`` with TPE (optuna) or NSGA-II
    (nsga2, ``population_size``), seeded by ``search.seed``. Results told before it proposes anything (a resume's
    ended trials, warm-start sweeps' trials) join NSGA-II's first generation, so its first offspring are bred from
    them."""
    # (optuna: an optional dependency, imported only by a sweep that searches with it)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.NSGAIISampler(population_size=population_size(trials), seed=search.seed) \
        if search.algorithm == "nsga2" else None

    class _Search(OptunaSearch):
        """``OptunaSearch`` whose told results may have several objectives (Tune's passes a list as one value),
        placed in NSGA-II's first generation (a told trial without one is in none, and no parent is ever drawn
        from it)."""

        def add_evaluated_point(self, parameters: dict, value, error: bool = False, pruned: bool = False,
                                intermediate_values=None) -> None:
            if not isinstance(value, list):
                return super().add_evaluated_point(parameters, value, error, pruned, intermediate_values)
            attrs = {sampler._get_generation_key(): 0} if sampler is not None else {}  # (optuna's own key)
            self._ot_study.add_trial(optuna.trial.create_trial(
                state=optuna.trial.TrialState.COMPLETE, values=value, params=parameters, distributions=self._space,
                system_attrs=attrs))
            return None

    if sampler is not None:
        metric, mode = search_target(search)
        return _Search(metric=metric, mode=mode, sampler=sampler)
    return _Search(seed=search.seed)


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
        # optuna records each result as an intermediate value (what its pruners read) and needs the metric in it;
        # a trial's evaluations carry it, the step logs between them do not
        if trial_id in self._from_inner and all(m in result for m in _as_list(self._inner.metric)):
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


def _as_list(metric: str | list[str] | None) -> list[str]:
    return [] if metric is None else [metric] if isinstance(metric, str) else list(metric)
