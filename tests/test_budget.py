"""Budget parsing, the ledger's charging and exhaustion, its resume and its summary."""

import json
import time

import pytest

from evonas.search.budget import DEFAULT_SEARCH_FRACTION, Budget, Ledger, parse_budget
from evonas.errors import EvonasError


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- parsing --------------------------------------------------------------------------


@pytest.mark.parametrize("text, kind, amount, device, canonical", [
    ("200gpu-h", "device", 200 * 3600.0, "gpu", "200gpu-h"),
    ("2cpu-h", "device", 2 * 3600.0, "cpu", "2cpu-h"),
    ("0.5gpu-h", "device", 1800.0, "gpu", "0.5gpu-h"),
    (".25gpu-h", "device", 900.0, "gpu", "0.25gpu-h"),
    (" 200 GPU-H ", "device", 200 * 3600.0, "gpu", "200gpu-h"),
    ("3 cpu - h", "device", 3 * 3600.0, "cpu", "3cpu-h"),
    ("45m", "wall", 2700.0, None, "45m"),
    ("1.5h", "wall", 5400.0, None, "90m"),
    ("2h", "wall", 7200.0, None, "2h"),
    ("90s", "wall", 90.0, None, "90s"),
    ("0.5s", "wall", 0.5, None, "0.5s"),
    ("1.5 H", "wall", 5400.0, None, "90m"),
    ("500evals", "evals", 500.0, None, "500evals"),
    ("500 EVALS", "evals", 500.0, None, "500evals"),
])
def test_accepted_forms(text, kind, amount, device, canonical):
    budget = parse_budget(text)
    assert (budget.kind, budget.amount, budget.device) == (kind, amount, device)
    assert str(budget) == canonical
    assert parse_budget(str(budget)) == budget


@pytest.mark.parametrize("text", [
    "abc", "-3h", "0evals", "0h", "0.0gpu-h", "5 parsecs", "", "   ", "2.5evals", "3",
    "h", "1e3h", "1,5h", "200gpu", "200 gpu-hours", "2tpu-h", "1.5.h", "3h\n4h", "١٢h",
    "9" * 400 + "h", "1h 2m",
])
def test_rejected_forms_name_the_value_on_one_line(text):
    with pytest.raises(EvonasError) as info:
        parse_budget(text)
    message = str(info.value)
    assert "\n" not in message
    assert repr(text[:40])[:-1] in message  # the value as typed, cut if long
    for example in ("200gpu-h", "45m", "1.5h", "90s", "500evals"):
        assert example in message


def test_rejection_says_why_when_it_can():
    with pytest.raises(EvonasError, match="more than 0"):
        parse_budget("0evals")
    with pytest.raises(EvonasError, match="whole number"):
        parse_budget("2.5evals")


def test_no_catastrophic_backtracking():
    start = time.perf_counter()
    for text in ("1" * 100_000 + "x", " " * 100_000 + "1", "1." + "1" * 100_000 + "gpu-"):
        with pytest.raises(EvonasError):
            parse_budget(text)
    assert time.perf_counter() - start < 1.0


def test_budget_constructor_rejects_nonsense():
    with pytest.raises(ValueError):
        Budget("device", 10.0)  # no device
    with pytest.raises(ValueError):
        Budget("wall", -1.0)
    with pytest.raises(ValueError):
        Budget("evals", 2.5)
    with pytest.raises(ValueError):
        Budget("parsecs", 1.0)


# --- splitting ------------------------------------------------------------------------


def test_split_device_budget_default_rule():
    search, train = parse_budget("200gpu-h").split()
    assert DEFAULT_SEARCH_FRACTION == 0.8
    assert (str(search), str(train)) == ("160gpu-h", "40gpu-h")
    assert search.amount + train.amount == 200 * 3600.0
    assert search.device == train.device == "gpu"


def test_split_wall_budget():
    search, train = parse_budget("45m").split(0.8)
    assert (str(search), str(train)) == ("36m", "9m")


def test_split_parts_always_add_up():
    budget = parse_budget("0.7cpu-h")
    search, train = budget.split(0.3)
    assert search.amount + train.amount == budget.amount


def test_split_eval_budget_is_refused():
    with pytest.raises(EvonasError, match="500evals.*device-hours"):
        parse_budget("500evals").split()


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.2, float("nan")])
def test_split_fraction_must_be_inside_0_1(fraction):
    with pytest.raises(EvonasError, match="between 0 and 1"):
        parse_budget("10gpu-h").split(fraction)


# --- charging and exhaustion ----------------------------------------------------------


def test_charge_multiplies_time_by_device_share():
    ledger = Ledger(parse_budget("1gpu-h"), clock=FakeClock())
    ledger.charge("quality", 120.0, 0.25, device="gpu")
    assert ledger.spent == 30.0
    assert ledger.device_seconds("gpu") == 30.0
    ledger.charge("full_train", 100.0, 2, device="gpu")  # two whole GPUs
    assert ledger.spent == 230.0
    assert ledger.remaining == 3600.0 - 230.0


def test_cpu_time_does_not_spend_a_gpu_budget():
    ledger = Ledger(parse_budget("1gpu-h"), clock=FakeClock())
    ledger.charge("static", 5000.0)  # default device is the CPU
    assert ledger.spent == 0.0
    assert ledger.device_seconds("cpu") == 5000.0
    assert not ledger.exhausted()


def test_an_evaluation_over_several_stages_counts_once():
    ledger = Ledger(parse_budget("10evals"), clock=FakeClock())
    ledger.charge("static", 0.1)
    ledger.charge("numeric", 0.5)
    ledger.charge("quality", 60.0, 0.5, device="gpu")
    ledger.count_evaluation("quality")
    assert ledger.evaluations == 1
    assert ledger.spent == 1.0


@pytest.mark.parametrize("bad", [
    dict(stage="", seconds=1.0), dict(stage="static", seconds=-1.0),
    dict(stage="static", seconds=float("nan")), dict(stage="static", seconds=1.0, share=0.0),
    dict(stage="static", seconds=1.0, share=float("inf")),
    dict(stage="static", seconds=1.0, device="tpu"),
])
def test_charge_rejects_nonsense(bad):
    ledger = Ledger(parse_budget("1gpu-h"))
    with pytest.raises(ValueError):
        ledger.charge(**bad)


def test_device_budget_exhaustion():
    ledger = Ledger(parse_budget("0.01gpu-h"), clock=FakeClock())  # 36 GPU-seconds
    assert ledger.can_start() and not ledger.exhausted()
    ledger.charge("quality", 100.0, 0.25, device="gpu")  # 25
    ledger.count_evaluation("quality")
    assert ledger.can_start()
    assert ledger.can_start(expected_cost=11.0)
    assert not ledger.can_start(expected_cost=12.0)
    ledger.charge("quality", 100.0, 0.25, device="gpu")  # 50 > 36: overrun is recorded
    ledger.count_evaluation("quality")
    assert ledger.exhausted() and not ledger.can_start()
    assert ledger.remaining == 0.0
    assert ledger.fraction_spent == pytest.approx(50 / 36)


def test_wall_budget_exhaustion_with_fake_clock():
    clock = FakeClock()
    ledger = Ledger(parse_budget("90s"), clock=clock)
    clock.advance(1000)  # not started: does not count
    assert ledger.elapsed == 0.0
    ledger.start()
    clock.advance(60)
    assert ledger.spent == 60.0 and ledger.can_start()
    assert ledger.fraction_spent == pytest.approx(2 / 3)
    ledger.stop()
    clock.advance(500)  # stopped: does not count
    assert ledger.elapsed == 60.0
    ledger.start()
    ledger.start()  # idempotent: does not restart the segment
    clock.advance(30)
    assert ledger.exhausted() and not ledger.can_start()


def test_evals_budget_exhaustion():
    ledger = Ledger(parse_budget("3evals"), clock=FakeClock())
    for stage in ("static", "duplicate"):
        ledger.count_evaluation(stage)
    assert ledger.remaining == 1.0 and ledger.can_start()
    assert not ledger.can_start(expected_cost=2)
    ledger.count_evaluation("quality")
    assert ledger.exhausted() and not ledger.can_start()


# --- resume ---------------------------------------------------------------------------


def test_state_round_trip_mid_way_continues():
    clock = FakeClock()
    ledger = Ledger(parse_budget("2gpu-h"), clock=clock)
    ledger.start()
    ledger.charge("static", 0.2)
    ledger.count_evaluation("static")
    ledger.charge("quality", 3600.0, 0.5, device="gpu")
    ledger.count_evaluation("quality")
    clock.advance(3600.0)
    state = json.loads(json.dumps(ledger.to_state()))  # what state.json holds

    # A new process: its monotonic clock reads something unrelated.
    clock2 = FakeClock(now=5.0)
    resumed = Ledger.from_state(state, clock=clock2)
    assert resumed.elapsed == 3600.0  # stopped until start()
    clock2.advance(100)
    assert resumed.elapsed == 3600.0
    resumed.start()
    clock2.advance(10)
    assert resumed.elapsed == 3610.0
    assert resumed.spent == ledger.spent == 1800.0
    assert resumed.evaluations == 2
    assert resumed.summary()["stages"] == ledger.summary()["stages"]

    resumed.charge("quality", 3600.0, 1.5, device="gpu")  # 5400 more: 7200 = 2 gpu-h
    resumed.count_evaluation("quality")
    assert resumed.exhausted()
    assert resumed.summary()["stages"]["quality"]["evaluations"] == 2


@pytest.mark.parametrize("corrupt", [
    lambda s: s.pop("stages"),
    lambda s: s.update(version=99),
    lambda s: s.update(elapsed_s=-5),
    lambda s: s.update(evaluations=7),  # does not match the stages
    lambda s: s["budget"].update(amount="lots"),
    lambda s: s["stages"]["static"]["device_seconds"].update(cpu=None),
])
def test_from_state_rejects_malformed_state(corrupt):
    ledger = Ledger(parse_budget("1cpu-h"))
    ledger.charge("static", 1.0)
    ledger.count_evaluation("static")
    state = ledger.to_state()
    corrupt(state)
    with pytest.raises(EvonasError, match="malformed") as info:
        Ledger.from_state(state)
    assert "\n" not in str(info.value)


# --- summary --------------------------------------------------------------------------


def _busy_ledger(budget: str) -> Ledger:
    clock = FakeClock()
    ledger = Ledger(parse_budget(budget), clock=clock)
    ledger.start()
    for _ in range(6):
        ledger.charge("static", 0.5)
        ledger.count_evaluation("static")
    for _ in range(3):
        ledger.charge("static", 0.5)
        ledger.charge("numeric", 2.0)
        ledger.count_evaluation("numeric")
    for _ in range(2):
        ledger.charge("static", 0.5)
        ledger.charge("numeric", 2.0)
        ledger.charge("quality", 600.0, 0.25, device="gpu")
        ledger.count_evaluation("quality")
    ledger.charge("full_train", 3600.0, 1.0, device="gpu")
    ledger.count_evaluation("full_train")
    clock.advance(3723.0)
    return ledger


def test_summary_figures_add_up():
    ledger = _busy_ledger("10gpu-h")
    s = ledger.summary()
    stages = s["stages"]
    assert list(stages) == ["static", "numeric", "quality", "full_train"]
    assert [st["evaluations"] for st in stages.values()] == [6, 3, 2, 1]
    assert sum(st["evaluations"] for st in stages.values()) == s["evaluations"] == 12
    for device in ("gpu", "cpu"):
        assert sum(st["device_seconds"][device] for st in stages.values()) == pytest.approx(
            s["device_seconds"][device])
        assert sum(st["share"][device] for st in stages.values()) == pytest.approx(1.0)
    assert s["device_seconds"]["gpu"] == 300.0 + 3600.0
    assert s["device_seconds"]["cpu"] == 11 * 0.5 + 5 * 2.0
    assert s["spent"] + s["remaining"] == s["amount"] == 36000.0
    assert stages["quality"]["share"]["gpu"] == pytest.approx(300 / 3900)
    json.dumps(s)  # JSON-safe for MLflow and the report


def test_format_summary_device_budget():
    text = _busy_ledger("10gpu-h").format_summary()
    lines = text.splitlines()
    assert lines[0].split() == ["stage", "evals", "gpu-h", "share", "cpu-h", "share"]
    assert lines[1].split()[:2] == ["static", "6"]
    assert lines[3].split() == ["quality", "2", "0.0833", "7.7%", "0", "0.0%"]
    assert lines[5].split() == ["total", "12", "1.08", "100.0%", "0.00431", "100.0%"]
    assert lines[2].split() == ["numeric", "3", "0", "0.0%", "0.00278", "64.5%"]
    assert lines[-1] == ("budget 10gpu-h: spent 1.08 gpu-h, left 8.92 gpu-h (10.8% spent), "
                         "wall time 1:02:03")


def test_format_summary_wall_and_evals_budgets():
    wall = _busy_ledger("2h").format_summary().splitlines()[-1]
    assert wall == "budget 2h: spent 1:02:03, left 0:57:57 (51.7% spent), wall time 1:02:03"
    evals = _busy_ledger("500evals").format_summary().splitlines()[-1]
    assert evals.startswith("budget 500evals: spent 12 evals, left 488 evals (2.4% spent)")


def test_format_summary_of_an_empty_ledger():
    text = Ledger(parse_budget("500evals")).format_summary()
    assert text.splitlines()[0].split() == ["stage", "evals"]
    assert "spent 0 evals, left 500 evals" in text


@pytest.mark.parametrize("hours, shown", [
    (1.2, "1.20"), (199.4, "199"), (0.000123, "0.000123"), (1234.0, "1230"), (9.996, "10.0"),
    (0.0, "0"),
])
def test_device_hours_are_shown_with_3_significant_figures(hours, shown):
    budget = parse_budget("1gpu-h")
    assert budget.format_amount(hours * 3600.0) == f"{shown} gpu-h"


# --- budgets that bind ----------------------------------------------------------------


@pytest.mark.parametrize("text, share, gpus, inline, refused", [
    ("1gpu-h", 0.0, 8, False, "needs evaluations that hold a GPU"),
    ("1gpu-h", 0.25, 8, True, "--workers 0"),
    ("1gpu-h", 0.25, 0, False, "this machine has none"),
    ("1cpu-h", 0.25, 8, False, "a cpu-h budget is never spent"),
    ("1gpu-h", 0.25, 8, False, None),
    ("1gpu-h", 0.25, None, False, None),  # a cluster, checked once connected
    ("1cpu-h", 0.0, 0, False, None),
    ("45m", 0.25, 0, True, None),  # wall time and counts bind whatever the tasks hold
    ("5evals", 0.0, 0, False, None),
])
def test_a_device_budget_the_tasks_never_spend_is_refused(text, share, gpus, inline, refused):
    from evonas.search.budget import check_spendable

    budget = parse_budget(text)
    if refused is None:
        check_spendable(budget, share, gpus=gpus, inline=inline)
        return
    with pytest.raises(EvonasError, match=refused) as err:
        check_spendable(budget, share, gpus=gpus, inline=inline)
    assert "\n" not in str(err.value)


def test_a_gpu_budget_refuses_a_cluster_without_gpus_once_connected():
    from evonas.search.budget import cluster_check

    admit = cluster_check(parse_budget("1gpu-h"), 0.25)
    admit({"gpus_total": 4.0})
    with pytest.raises(EvonasError, match="the Ray cluster has none"):
        admit({"gpus_total": 0.0})
