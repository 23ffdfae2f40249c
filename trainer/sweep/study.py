"""Optuna glue: the study of a sweep, its search space as Optuna distributions, and reporting results.

The study is stored in ``<sweep dir>/optuna.journal`` with Optuna's journal file storage: an append-only log
that several processes (local workers, array tasks on other nodes of a shared filesystem) can write at once,
and that outlives any of them. Optuna is imported only by Optuna sweeps.
"""

from __future__ import annotations

from typing import Any

from trainer.sweep.space import Space, format_value

JOURNAL = "optuna.journal"


def storage(path: str) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(path))


def load(plan: Any, worker: int = 0) -> Any:
    """The sweep's study. ``worker`` (0, 1, ... in the order workers joined the sweep) offsets the sampler's
    seed: workers with one seed would propose the same points during the sampler's random start-up."""
    import optuna

    s = plan.settings
    plan.dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = s.seed + 1000 * worker
    sampler = (
        optuna.samplers.TPESampler(seed=seed, constant_liar=True)  # liar: concurrent trials spread out
        if s.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed)
    )
    pruner = make_pruner(pruner_spec(s))
    return optuna.create_study(study_name=plan.name, storage=storage(str(plan.dir / JOURNAL)), load_if_exists=True,
                               direction=s.direction, sampler=sampler, pruner=pruner)  # fmt: skip


def pruner_spec(settings: Any) -> dict[str, Any]:
    """The pruner's settings, for the trial processes: a study does not store its pruner."""
    return {"kind": settings.pruner, "startup_trials": settings.pruner_startup_trials,
            "warmup_steps": settings.pruner_warmup_steps}  # fmt: skip


def make_pruner(spec: dict[str, Any]) -> Any:
    import optuna

    if spec.get("kind") == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=spec["startup_trials"], n_warmup_steps=spec["warmup_steps"]
        )
    return optuna.pruners.NopPruner()


def distributions(space: Space) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for p in space.params:
        if p.kind == "choice":
            # Optuna's choices must be None, bool, int, float or str: each is stored as its override text.
            out[p.name] = CategoricalDistribution([format_value(c) for c in p.choices])
        elif p.kind == "range":
            if all(float(v).is_integer() for v in (p.low, p.high, p.step)):
                values = p.values()
                out[p.name] = IntDistribution(int(values[0]), int(values[-1]), step=int(p.step))
            else:
                out[p.name] = CategoricalDistribution(p.values())
        else:
            out[p.name] = FloatDistribution(p.low, p.high, log=p.log)
    return out


def values(space: Space, params: dict[str, Any]) -> dict[str, Any]:
    """An Optuna trial's params as the space's own values (categorical ones back from their override text)."""
    out = dict(params)
    for p in space.params:
        if p.kind == "choice":
            out[p.name] = {format_value(c): c for c in p.choices}[params[p.name]]
    return out


def count(study: Any) -> int:
    """Trials the study holds in any state (failed ones count: a space that always fails must end)."""
    return len(study.get_trials(deepcopy=False))


def tell(study: Any, number: int, state: str, value: float | None) -> None:
    from optuna.trial import TrialState

    try:
        if state == "finished" and value is not None:
            study.tell(number, value)
        elif state == "pruned":
            study.tell(number, state=TrialState.PRUNED)
        else:
            study.tell(number, state=TrialState.FAIL)
    # Told already: a worker that died between telling the study and recording it in the ledger.
    except (RuntimeError, ValueError) as err:
        print(f"[sweep] trial {number}: {err}", flush=True)


def best(study: Any) -> Any:
    try:
        return study.best_trial
    except ValueError:  # no finished trial
        return None
