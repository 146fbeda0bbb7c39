"""The comparative part (`search.trend`): `Peers` read each finished trial once, and
`TrendPruner.judge` keeps slow starters, reads maximized and zero-crossing metrics the right
way, gives the same decisions at any scale, and ends (not prunes) a good trial that cannot win."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState, create_trial

from search.curves import Curve
from search.trend import Peers, TrendPruner

MIN, MAX = StudyDirection.MINIMIZE, StudyDirection.MAXIMIZE


def finished(values: list[float], *, number: int, pruned: bool = False) -> FrozenTrial:
    trial = create_trial(
        value=None if pruned else min(values),
        state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
        intermediate_values={e + 1: v for e, v in enumerate(values)},
    )
    trial.number = number
    return trial


def falling(
    n: int, *, start: float = 2.0, scale: float = 1.0, shift: float = 0.0, epochs: int = 25
) -> list:
    """`n` complete trials falling from `start` to 0.3-0.6 over `epochs` epochs (25: long
    enough for the full 5-epoch warm-up)."""
    out = []
    for i in range(n):
        end = 0.3 * (1 + i / n)
        values = [
            (start * (end / start) ** (e / (epochs - 1))) * scale + shift for e in range(epochs)
        ]
        out.append(finished(values, number=i))
    return out


def peers_of(trials: list[FrozenTrial], direction: StudyDirection = MIN) -> Peers:
    peers = Peers(direction)
    peers.add(trials)
    return peers


def curve(values: list[float], direction: StudyDirection = MIN, **extra: Any) -> Curve:
    rows = [{"epoch": i + 1, "val_loss": v} for i, v in enumerate(values)]
    return Curve.from_rows(rows, metric="val_loss", direction=direction, **extra)


FLAT = [2.0, 1.9, 1.85, 1.8, 1.8, 1.8, 1.8]
SLOW = [2.0, 2.0, 1.9, 1.5, 1.1, 0.8, 0.6, 0.45, 0.34, 0.26, 0.2, 0.17, 0.15, 0.14]


def first_verdict(pruner: TrendPruner, values: list[float], peers: Peers, **kw: Any) -> Any:
    for n in range(1, len(values) + 1):
        verdict = pruner.judge(curve(values[:n], **kw), peers)
        if verdict is not None:
            return n, verdict
    return None, None


def test_peers_count_each_finished_trial_once() -> None:
    trials = falling(4)
    peers = Peers(MIN)
    peers.add(trials)
    peers.add(trials[:2])  # given again: ignored
    peers.add([create_trial(state=TrialState.FAIL)])  # not finished: ignored
    assert (peers.finished, peers.complete, peers.horizon) == (4, 4, 25)
    assert len(peers.by_step[1]) == 4 and peers.by_step[25] == sorted(peers.finals)
    pruned = finished([2.0, 1.9], number=9, pruned=True)
    peers.add([pruned])
    assert (peers.finished, peers.complete) == (5, 4)
    assert peers.population(25, 100) == float("inf")  # the pruned one counts as worst


def test_peers_flip_a_maximized_metric_and_know_its_spread_and_floor() -> None:
    trials = [finished([0.1 * i, 0.2 * i], number=i) for i in range(1, 6)]
    peers = peers_of(trials, MAX)
    assert peers.by_step[2] == pytest.approx([-1.0, -0.8, -0.6, -0.4, -0.2])
    assert peers.floor == -1.0
    assert peers.spread() == pytest.approx(0.3)
    assert peers_of(trials[:4], MAX).spread() is None  # fewer than 5 at the first step


def test_no_peers_no_comparison() -> None:
    assert TrendPruner().judge(curve(FLAT), None) is None
    assert TrendPruner().judge(curve(FLAT), peers_of(falling(4))) is None  # < 5 complete


def test_a_flat_trial_behind_its_peers_is_pruned_at_the_end_of_warm_up() -> None:
    epoch, verdict = first_verdict(TrendPruner(), FLAT, peers_of(falling(30)))
    assert epoch == 5 and verdict.rule == "comparative" and not verdict.end
    assert verdict.reason.startswith("val_loss best 1.8 at epoch 5 is behind the 50th percentile")
    assert verdict.reason.endswith("of 30 finished trials")


@pytest.mark.parametrize(("epochs", "first"), [(10, 2), (15, 3), (20, 4), (40, 5)])
def test_the_comparison_starts_at_a_fifth_of_a_short_trial(epochs: int, first: int) -> None:
    """In a study of 15-epoch trials a 5-epoch wait is a third of every trial: by default
    the comparison starts at a fifth of the trials' length (at least 2, at most 5); an
    explicit `n_warmup_steps` holds whatever the length."""
    peers = peers_of(falling(30, epochs=epochs))
    assert first_verdict(TrendPruner(), FLAT, peers)[0] == first
    assert first_verdict(TrendPruner(n_warmup_steps=5), FLAT, peers)[0] == 5


@pytest.mark.parametrize(("epochs", "last"), [(40, 31), (15, 11), (10, 7)])
def test_a_trial_behind_its_peers_in_their_last_fifth_completes(epochs: int, last: int) -> None:
    """Stopped in the last fifth of the complete trials' length it would save at most a fifth
    of its epochs and lose its result (top-5 curves of the replay were pruned at epoch 40 of
    40, two healthy runs of the shapes' divergences family at 24-25 of 30)."""
    peers = peers_of(falling(30, epochs=epochs))
    behind = [2.0 * (0.7 / 2.0) ** (e / (epochs - 1)) for e in range(epochs)]  # behind all
    pruner = TrendPruner(n_warmup_steps=last)
    assert pruner.judge(curve(behind[:last]), peers) is not None
    for step in range(last + 1, epochs + 1):
        assert pruner.judge(curve(behind[:step]), peers) is None


def test_a_slow_starter_that_falls_fast_is_kept() -> None:
    assert first_verdict(TrendPruner(), SLOW, peers_of(falling(30)))[0] is None


def test_the_comparison_waits_out_the_trials_warm_up() -> None:
    peers = peers_of(falling(30))
    flat = [*FLAT, 1.8, 1.8]
    assert first_verdict(TrendPruner(), flat, peers, params={"warmup_epochs": 6})[0] == 8


#: issue 11: a dip, a rise while the learning rate warms up (4 epochs), then the fall
SPIKE = [2.0, 1.94, 1.97, 2.0, 2.05, 2.08, 2.0, 1.6, 1.2, 0.9, 0.7, 0.55, 0.45, 0.38, 0.33, 0.3]


def test_a_rise_after_a_known_warm_up_is_not_held_against_the_trial() -> None:
    """Known from the params or from a reported lr, the warm-up rise is waited out and the
    trend is read from the peak on; with nothing known the same values are pruned."""
    peers = peers_of(falling(30))
    assert first_verdict(TrendPruner(), SPIKE, peers, params={"warmup_epochs": 3}) == (None, None)
    lr = [0.25, 0.5, 0.75] + [1.0] * 13
    for n in range(1, len(SPIKE) + 1):
        rows = [{"epoch": i + 1, "val_loss": SPIKE[i], "lr": lr[i]} for i in range(n)]
        assert (
            TrendPruner().judge(Curve.from_rows(rows, metric="val_loss", direction=MIN), peers)
            is None
        )
    assert first_verdict(TrendPruner(), SPIKE, peers)[0] == 5


def test_a_trial_lagging_by_half_its_warm_up_is_compared_at_its_age() -> None:
    """A 6-epoch linear warm-up trains at half the learning rate on average: a trial three
    epochs behind a good peer is kept when its warm-up is known, pruned when it is not."""
    peers = peers_of(falling(30))
    good = [2.0 * (0.36 / 2.0) ** (e / 19) for e in range(20)]
    lagging = [2.0] * 3 + good[:17]
    assert first_verdict(TrendPruner(), lagging, peers, params={"warmup_epochs": 6})[0] is None
    assert first_verdict(TrendPruner(), lagging, peers)[0] == 5


def test_no_comparison_at_the_epoch_the_learning_rate_restarts() -> None:
    peers = peers_of(falling(30))
    lr = [1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 1.0, 0.8]
    rows = [{"epoch": i + 1, "val_loss": v, "lr": lr[i]} for i, v in enumerate(FLAT)]
    assert (
        TrendPruner().judge(Curve.from_rows(rows, metric="val_loss", direction=MIN), peers) is None
    )
    assert TrendPruner().judge(curve(FLAT), peers) is not None  # the same epoch, no restart


@pytest.mark.parametrize("scale", [1e-4, 1e4])
def test_decisions_are_the_same_at_any_scale(scale: float) -> None:
    peers, scaled = peers_of(falling(30)), peers_of(falling(30, scale=scale))
    for values in (FLAT, SLOW, [2.0, 1.5, 1.2, 1.0, 0.9, 0.85, 0.84, 0.83, 0.83, 0.83]):
        at, verdict = first_verdict(TrendPruner(), values, peers)
        at_scaled, scaled_verdict = first_verdict(
            TrendPruner(), [v * scale for v in values], scaled
        )
        assert at == at_scaled
        assert (verdict is None) == (scaled_verdict is None)


def test_a_maximized_metric_is_read_flipped() -> None:
    accuracy = [
        finished([(0.9 - 0.01 * i) * (1 - 0.7 ** (e + 1)) for e in range(25)], number=i)
        for i in range(20)
    ]
    for t in accuracy:  # a maximized study's trials hold their best (highest) value
        t.value = max(t.intermediate_values.values())
    peers = peers_of(accuracy, MAX)
    epoch, verdict = first_verdict(
        TrendPruner(), [0.2, 0.25, 0.3, 0.3, 0.3, 0.3], peers, direction=MAX
    )
    assert epoch == 5
    assert verdict.reason.startswith("val_loss best 0.3 at epoch 5 is behind the 50th percentile")
    rising = [0.1, 0.2, 0.35, 0.5, 0.62, 0.72, 0.8, 0.85, 0.88, 0.9]
    assert first_verdict(TrendPruner(), rising, peers, direction=MAX)[0] is None


def test_a_metric_that_crosses_zero_is_projected_linearly() -> None:
    """Issue 11: projected in log space while still positive, a trial falling like its
    peers (which end below 0) was pruned against them."""
    peers = peers_of(
        [finished([1.0 - 0.1 * e * (1 + i / 20) for e in range(25)], number=i) for i in range(20)]
    )
    behind = [1.0, 0.9, 0.7, 0.4, 0.1]  # behind now, but falling fast towards 0 and below
    assert first_verdict(TrendPruner(), behind, peers)[0] is None
    assert first_verdict(TrendPruner(), [1.0, 0.9, 0.8, 0.75, 0.72], peers)[0] == 5


def test_a_good_trial_that_cannot_win_is_ended_at_its_best() -> None:
    peers = peers_of(falling(30))
    plateau = [2.0, 1.2, 0.9, 0.75, 0.7, 0.68, 0.67, 0.67, 0.66, 0.66, 0.66, 0.66]
    epoch, verdict = first_verdict(TrendPruner(percentile=100, end_percentile=15), plateau, peers)
    assert epoch == 10 and verdict.end and not verdict.infeasible
    assert verdict.reason.endswith("complete trials; ended at its best")
    assert (
        first_verdict(TrendPruner(percentile=100, end_percentile=None), plateau, peers)[0] is None
    )


def test_prune_rereads_the_study_at_most_every_refresh_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 9: `complete // 50` re-read every trial every epoch for the first 50 trials."""
    study = optuna.create_study(pruner=TrendPruner(n_warmup_steps=1))
    study.add_trials(falling(10))
    trial = study.ask()
    reads = []
    original = study._storage.get_all_trials
    monkeypatch.setattr(
        study._storage, "get_all_trials", lambda *a, **k: reads.append(1) or original(*a, **k)
    )
    for epoch in range(1, 12):
        trial.report(0.1, epoch)
        assert not trial.should_prune()
    assert len(reads) == 3  # decisions 1, 6 and 11: every refresh_every = 5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"percentile": 101}, "percentile must be in [0, 100], but got percentile=101"),
        ({"end_percentile": -1}, "end_percentile must be in [0, 100], but got end_percentile=-1"),
        ({"refresh_every": 0}, "refresh_every must be >= 1, but got refresh_every=0"),
    ],
)
def test_bad_options_name_themselves(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrendPruner(**options)
