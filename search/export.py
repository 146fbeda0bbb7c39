"""`search export`: every trial of a study as JSON (round-trips) or CSV (one row per trial).

Each trial carries its number, state, value, parameters (with their distributions, so the
JSON can be loaded back into Optuna trials), intermediate values, user attributes, the retry
keys of its system attributes and its reasons (`prune_rule`, `prune_reason`, `fail_reason`,
`outcome`, `retry_of`, `retry_reason`, `early_stopped`). Non-finite values (a NaN loss) are
written as JSON's `NaN` / `Infinity`, which Python's `json` reads back.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
from typing import Any

import optuna
from optuna.distributions import distribution_to_json, json_to_distribution
from optuna.trial import FrozenTrial, TrialState

from search import record

FORMAT_VERSION = 1
REASON_KEYS = (
    record.PRUNE_RULE,
    record.PRUNE_REASON,
    record.FAIL_REASON,
    record.OUTCOME,
    record.RETRY_OF,
    record.RETRY_REASON,
    record.EARLY_STOPPED,
)
SYSTEM_KEYS = (record.FAILED_TRIAL, record.RETRY_HISTORY, record.CRASH_RETRIES)


def export_study(study: optuna.Study) -> dict[str, Any]:
    """The study and all its trials as plain JSON-able data."""
    return {
        "format": FORMAT_VERSION,
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "user_attrs": study.user_attrs,
        "trials": [trial_record(t) for t in study.get_trials(deepcopy=False)],
    }


def trial_record(trial: FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value,
        "params": trial.params,
        "distributions": {k: distribution_to_json(d) for k, d in trial.distributions.items()},
        "intermediate_values": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
        "user_attrs": trial.user_attrs,
        "system_attrs": {k: trial.system_attrs[k] for k in SYSTEM_KEYS if k in trial.system_attrs},
        "reasons": {k: trial.user_attrs[k] for k in REASON_KEYS if k in trial.user_attrs},
        "datetime_start": _iso(trial.datetime_start),
        "datetime_complete": _iso(trial.datetime_complete),
    }


def to_json(study: optuna.Study) -> str:
    return json.dumps(export_study(study), indent=1, default=str)


def trials_from_json(text: str) -> list[FrozenTrial]:
    """Load an export back as Optuna frozen trials (e.g. `study.add_trials(...)`)."""
    data = json.loads(text)
    trials = []
    for t in data["trials"]:
        state = TrialState[t["state"]]
        trial = optuna.trial.create_trial(
            state=state,
            value=t["value"] if state == TrialState.COMPLETE else None,
            params=t["params"],
            distributions={k: json_to_distribution(d) for k, d in t["distributions"].items()},
            user_attrs=t["user_attrs"],
            system_attrs=t["system_attrs"],
            intermediate_values={int(k): v for k, v in t["intermediate_values"].items()},
        )
        trial.number = t["number"]
        trials.append(trial)
    return trials


def to_csv(study: optuna.Study) -> str:
    """One row per trial: scalars and params as columns, nested data as JSON cells."""
    trials = study.get_trials(deepcopy=False)
    params = sorted({k for t in trials for k in t.params})
    columns = [
        "number",
        "state",
        "value",
        "datetime_start",
        "datetime_complete",
        *(f"params_{p}" for p in params),
        *REASON_KEYS,
        "intermediate_values",
        "user_attrs",
    ]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for trial in trials:
        row = trial_record(trial)
        writer.writerow(
            {
                "number": row["number"],
                "state": row["state"],
                "value": "" if row["value"] is None else repr(row["value"]),
                "datetime_start": row["datetime_start"] or "",
                "datetime_complete": row["datetime_complete"] or "",
                **{f"params_{p}": trial.params.get(p, "") for p in params},
                **{k: row["reasons"].get(k, "") for k in REASON_KEYS},
                "intermediate_values": json.dumps(row["intermediate_values"]),
                "user_attrs": json.dumps(row["user_attrs"], default=str),
            }
        )
    return out.getvalue()


def _iso(value: datetime.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
