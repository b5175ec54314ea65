"""The fidelity ladder: the hurdle, the tournament at the highest common rung, the flags,
and a ladder search killed with SIGKILL and resumed promoting each candidate once."""

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from evonas.search.evolution import (EvolutionConfig, GenomeOps, RegularizedEvolution,
                                     ladder_front, load_controller, tournament)
from evonas.search.state import clears_hurdle, hurdle_places

LADDER = ["--space", "norm_act_s", "--dataset", "synthetic", "--archs", "resnet",
          "--rungs", "6,12,24", "--quality-steps", "3", "--quality-threshold", "0.05",
          "--proxy-batch", "32", "--proxy-width", "8", "--stability-steps", "2",
          "--population", "4", "--tournament", "2", "--rung-min-population", "2",
          "--promote-fraction", "0.5", "--top-rung-seeds", "2", "--workers", "0"]


def test_the_hurdle_is_the_rungs_top_fraction_once_it_holds_its_minimum():
    scores = {f"c{i:06d}": s for i, s in enumerate([0.1, 0.5, 0.3, 0.9, 0.2, 0.4, 0.8, 0.7])}
    assert hurdle_places(8, 0.25) == 2 and hurdle_places(5, 0.25) == 2
    assert hurdle_places(3, 0.25) == 1  # a small rung still promotes its best
    assert [c for c in scores if clears_hurdle(c, scores, 0.25, 4)] == ["c000003", "c000006"]
    assert clears_hurdle("c000003", {"c000003": 0.9, "c000000": 0.1}, 0.25, 4) is None
    tied = {"c000002": 0.5, "c000001": 0.5, "c000000": 0.1, "c000003": 0.2}
    assert clears_hurdle("c000001", tied, 0.25, 4) and not clears_hurdle("c000002", tied, 0.25, 4)


def test_the_tournament_compares_members_at_the_highest_rung_both_reached():
    # a leads at rung 0, b at rung 1: a rung-0 tournament would pick a, the ladder picks b.
    a, b = [(0.9,), (0.3,)], [(0.5,), (0.6,)]
    c = [(0.7,)]  # only rung 0: a beats it, it beats b there: a cycle, the highest decide
    assert ladder_front([a, b]) == [1]
    assert ladder_front([a, b, c]) == [1]
    assert ladder_front([[(0.1,)], c]) == [1]
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert tournament([a[0], b[0]], 2, rng, ladders=[a, b])[1] == 1


def _ops():
    return GenomeOps(random_genome=lambda rng: {"g": int(rng.integers(1000))},
                     mutate=lambda g, rng: ({"g": g["g"] + 1}, "bump"),
                     encode=dict, decode=dict)


def test_the_controller_learns_rung_scores_and_keeps_them_across_a_resume():
    evo = RegularizedEvolution(_ops(), EvolutionConfig(population_size=2, tournament_size=2),
                               seed=1)
    first, second = evo.ask(), evo.ask()
    evo.tell(first.candidate_id, (0.9,), "survivor")
    evo.tell(second.candidate_id, (0.5,), "survivor")
    evo.update(second.candidate_id, 1, (0.6,))
    evo.update(first.candidate_id, 1, (0.4,))  # both at rung 1 now, where second leads
    evo.update("c999999", 1, (0.1,))  # no member: ignored
    with pytest.raises(ValueError):
        evo.update(first.candidate_id, 3, (0.1,))  # rung 2 first
    state = json.loads(json.dumps(evo.to_state()))
    resumed = load_controller(state, _ops())
    assert resumed.to_state() == evo.to_state()
    # Every mutant is the child of the member that leads at rung 1.
    parents = {resumed.ask().parent_id for _ in range(10)}
    assert parents == {second.candidate_id}


@pytest.mark.parametrize("flags, message", [
    (["--rungs", "12,6"], "must increase strictly"),
    (["--rungs", "12"], "two or more"),
    (["--rungs", "2,12", "--quality-steps", "6"], "below the quality check"),
    (["--rungs", "6,12", "--proxy-steps", "12"], "must start at the proxy"),
    (["--rungs", "6,12", "--promote-fraction", "0"], "--promote-fraction"),
    (["--rungs", "6,12", "--top-rung-seeds", "0"], "--top-rung-seeds"),
])
def test_bad_ladder_flags_fail_in_one_line_before_any_file(tmp_path, capsys, flags, message):
    from evonas.cli import main

    code = main(["search", "--budget", "2evals", "--out", str(tmp_path / "r"), "--dataset",
                 "synthetic", "--quality-steps", "3", *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.strip().count("\n") == 0
    assert not (tmp_path / "r").exists()


def _journal(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "journal.jsonl").read_text().splitlines()]


def test_a_ladder_search_killed_and_resumed_promotes_each_candidate_once(tmp_path):
    run = tmp_path / "ladder"
    cmd = [sys.executable, "-m", "evonas", "search", "--budget", "10evals", "--out", str(run),
           "--seed", "5", *LADDER]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        journal = run / "journal.jsonl"
        if journal.exists() and b'"promote"' in journal.read_bytes():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the search ended before a promotion to kill it after"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    resumed = subprocess.run([*cmd[:4], "--resume", str(run)], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = resumed.stdout

    from evonas.search.results import load_run
    loaded = load_run(run)
    state = loaded.state
    entries = _journal(run)
    promotes = Counter((e["promote"]["candidate_id"], e["promote"]["steps"])
                       for e in entries if "promote" in e)
    rungs = Counter((e["rung"]["candidate_id"], e["rung"]["steps"])
                    for e in entries if "rung" in e)
    assert promotes and set(promotes.values()) == {1}  # decided once, across the kill
    assert set(rungs.values()) == {1}  # no rung trained twice
    assert set(rungs) == set(promotes)  # every promotion trained, nothing else
    for cid, steps in promotes:  # each climbed from the rung below
        assert steps == 12 or state.rungs[cid][12].fitness
        assert state.evaluations[cid].status == "survivor"
    assert "rung12" in summary
    # The leaderboard puts the highest rung first, and RUN:best is its head.
    best = state.best()
    top_steps = max(state.score(e)[0] for e in state.survivors())
    assert state.score(best)[0] == top_steps > 0
    assert loaded.candidate("best")[0].candidate_id == best.candidate_id
    for r in state.rungs.values():
        for result in r.values():
            if result.fitness and result.steps == 24:
                assert len(result.scores["resnet"]) == 2  # the top rung's seeds

    # MLflow: each rung score once, on the candidate's run; rung 0 on every survivor's.
    raw = json.loads((run / "state.json").read_text())
    client = MlflowClient(f"sqlite:///{run.resolve()}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    children = client.search_runs(experiments, max_results=1000, filter_string=
                                  f"tags.mlflow.parentRunId = '{raw['parent_run_id']}'")
    by_id = {r.data.tags["evonas.candidate_id"]: r for r in children}
    assert len(by_id) == len(children) == len(state.evaluations)
    for ev in state.survivors():
        assert "fitness.resnet.r6" in by_id[ev.candidate_id].data.metrics
    for (cid, steps), _ in rungs.items():
        result = state.rungs[cid][steps]
        history = client.get_metric_history(by_id[cid].info.run_id, f"fitness.resnet.r{steps}")
        assert len(history) == (1 if result.fitness else 0)
        if result.fitness:
            assert history[0].value == pytest.approx(result.fitness["resnet"])
            assert history[0].step == steps

    shown = subprocess.run([*cmd[:3], "show", f"{run}:best"], capture_output=True, text=True)
    assert f"rung {top_steps} steps:" in shown.stdout
    from evonas.search.report import ladder
    rows = ladder(loaded)
    assert [r.steps for r in rows] == [6, 12, 24]
    assert rows[1].reached + rows[1].failed == sum(1 for _, s in promotes if s == 12)
