"""`evonas search` end to end, as a user runs it: real processes, a real MLflow store,
real Ray, real (tiny) proxy trainings on synthetic data. Killed and resumed searches
are in test_search_resume.py."""

import json
import os

import pytest

from searchrun import TINY, candidate_ids, child_runs, evonas, state


def test_serial_search_records_every_candidate_and_exports_the_best(tmp_path):
    run = tmp_path / "s1"
    out = evonas("search", "--space", "norm_act_s", "--budget", "8evals", "--out", run,
                 "--workers", "0", "--seed", "3", "--seed-zoo", *TINY)
    assert "best:" in out.stdout
    s = state(run)
    assert len(s["evaluations"]) == 8
    # --seed-zoo on the S space starts from its batch-independent zoo layers
    mutations = [c["mutation"] for c in s["candidates"].values()]
    assert "zoo:evonorm_s0" in mutations and not any("bn_" in m for m in mutations)
    statuses = {e["status"] for e in s["evaluations"].values()}
    assert statuses <= {"survivor", "rejected", "duplicate", "failed"} and "survivor" in statuses

    children = child_runs(run, s["parent_run_id"])
    assert len(children) == 8 and {r.info.status for r in children} == {"FINISHED"}
    assert set(candidate_ids(children)) == set(s["evaluations"])
    survivors = child_runs(run, s["parent_run_id"], "tags.`evonas.status` = 'survivor'")
    assert len(survivors) == sum(e["status"] == "survivor" for e in s["evaluations"].values())
    assert all("fitness.resnet" in r.data.metrics for r in survivors)

    top = evonas("top", run).stdout
    assert "rank" in top and "survivor" in top
    shown = evonas("show", f"{run}:best").stdout
    assert shown.startswith("y = ")
    evonas("export", f"{run}:best", "--out", tmp_path / "best.py", "--class-name", "Best")
    assert "class Best(nn.Module)" in (tmp_path / "best.py").read_text()


def test_same_seed_same_serial_search(tmp_path):
    runs = []
    for name in ("a", "b"):
        evonas("search", "--space", "act", "--budget", "6evals", "--out", tmp_path / name,
               "--workers", "0", "--seed", "11", *TINY)
        s = state(tmp_path / name)
        runs.append([(cid, s["candidates"][cid]["genome"], s["evaluations"][cid]["status"],
                      s["evaluations"][cid]["fitness"]) for cid in sorted(s["evaluations"])])
    assert runs[0] == runs[1]


def test_search_on_local_ray_with_two_workers(tmp_path):
    run = tmp_path / "ray"
    evonas("search", "--space", "norm_act", "--budget", "6evals", "--out", run,
           "--workers", "2", "--seed", "1", *TINY)
    s = state(run)
    assert len(s["evaluations"]) >= 6
    workers = {e["worker"] for e in s["evaluations"].values() if e["worker"]}
    assert workers and all(":" in w for w in workers)


def test_failing_evaluations_are_recorded_and_the_search_goes_on(tmp_path):
    run = tmp_path / "f"
    evonas("search", "--space", "act", "--budget", "4evals", "--out", run, "--workers", "0",
           "--eval-time-limit", "0.001", *TINY)
    evs = state(run)["evaluations"].values()
    assert len(evs) == 4
    failed = [e for e in evs if e["status"] == "failed"]
    assert failed and all("time limit" in e["reject_reason"] for e in failed)


@pytest.mark.parametrize("args, message", [
    (["--budget", "abc"], "abc"),
    (["--budget", "5evals", "--space", "nope"], "unknown search space 'nope'"),
    (["--budget", "5evals", "--archs", "resnet,vgg"], "unknown architecture 'vgg'"),
    (["--budget", "5evals", "--dataset", "cifar10", "--data-dir", "{tmp}/nodata"],
     "CIFAR-10 not found"),
    (["--budget", "5evals", "--dataset", "imagenet"], "imagenet"),
    (["--budget", "5evals", "--workers", "-1"], "--workers"),
    (["--budget", "5evals", "--gpus-per-eval", "0.3"], "0.3"),
    (["--out", "{tmp}/x"], "needs --budget"),
    # the controller's own limits are checked before the run folder is made
    (["--budget", "5evals", "--population", "1", "--tournament", "1"], "--population"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "run")]
    if "--dataset" not in args:
        args += ["--dataset", "synthetic"]
    out = evonas("search", *args, check=False, timeout=120)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr, out.stderr
    assert sorted(os.listdir(tmp_path)) == []


def test_an_existing_run_folder_is_not_overwritten(tmp_path):
    run = tmp_path / "s"
    evonas("search", "--space", "act", "--budget", "1evals", "--out", run, "--workers", "0", *TINY)
    before = (run / "state.json").read_bytes()
    out = evonas("search", "--space", "act", "--budget", "1evals", "--out", run, "--workers", "0",
                 *TINY, check=False)
    assert out.returncode == 2 and "--resume" in out.stderr
    assert (run / "state.json").read_bytes() == before


def test_every_candidate_of_a_search_trains_under_the_same_random_numbers():
    """Common random numbers: one layer scores the same whenever it is proposed, so
    fitness differences between candidates come from the layers, not from their seeds."""
    from evonas.layers import zoo
    from evonas.search.records import Candidate
    from evonas.search.config import SearchConfig, StageConfig
    from evonas.search.evaluate import evaluate_candidate

    def score(candidate_id, seed):
        config = SearchConfig(space="norm_act_s", budget="2evals", dataset="synthetic", seed=seed,
                              archs=("resnet",), proxy_steps=8, proxy_batch_size=16,
                              proxy_width=4, workers=0,
                              stages=StageConfig(stability_steps=1, quality_steps=4,
                                                 quality_threshold=0.0))
        genome = zoo.get("evonorm_s0").to_dict()
        payload = {"candidate": Candidate(candidate_id, genome, None, "random").to_dict(),
                   "config": config.to_dict()}
        ev = evaluate_candidate(payload)
        assert ev["status"] == "survivor", ev
        return ev["fitness"]["resnet"], ev["metrics"]["stability_peak_grad_norm.resnet"]

    first = score("c000001", seed=0)
    assert score("c000977", seed=0) == first
    assert score("c000001", seed=1) != first


@pytest.mark.parametrize("dataset, flags, expected", [
    # The synthetic set is for smoke runs: a proxy of seconds unless a flag says otherwise.
    ("synthetic", [], dict(proxy_steps=60, proxy_batch_size=64, proxy_width=8,
                           quality_steps=30, stability_steps=5)),
    ("synthetic", ["--proxy-steps", "90", "--quality-steps", "45"],
     dict(proxy_steps=90, proxy_batch_size=64, quality_steps=45, stability_steps=5)),
    # CIFAR-10 keeps the paper-sized defaults: quality after 100 steps, stability 20 steps.
    ("cifar10", [], dict(proxy_steps=300, proxy_batch_size=128, proxy_width=16,
                         quality_steps=100, stability_steps=20)),
    ("cifar10", ["--proxy-width", "8", "--stability-steps", "3"],
     dict(proxy_steps=300, proxy_width=8, quality_steps=100, stability_steps=3)),
])
def test_proxy_sizes_default_per_dataset_and_flags_override_them(dataset, flags, expected):
    from evonas.cli import build_parser
    from evonas.cli.search import _config

    args = build_parser().parse_args(["search", "--budget", "5m", "--out", "unused",
                                      "--dataset", dataset, *flags])
    config = _config(args).to_dict()
    sizes = {**config, **config["stages"]}
    assert {name: sizes[name] for name in expected} == expected


def test_the_search_command_leaves_every_default_to_the_config(monkeypatch):
    from evonas.cli import build_parser
    from evonas.cli.search import FIELDS, SIZES, STAGE_FIELDS, _config
    from evonas.search.config import SearchConfig

    monkeypatch.delenv("EVONAS_DATA_DIR", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = build_parser().parse_args(["search", "--budget", "5m", "--out", "unused"])
    assert [f for f in (*FIELDS, *STAGE_FIELDS, *SIZES) if getattr(args, f) is not None] == []
    assert _config(args) == SearchConfig(budget="5m")


def test_a_duplicate_parked_behind_a_failed_evaluation_is_evaluated_once(tmp_path):
    """Equals proposed while a layer is evaluated wait for its verdict; when that
    evaluation fails, one of them is evaluated anew and the others wait for it."""
    from evonas.layers import zoo
    from evonas.runtime.backends import InlineBackend, Outcome
    from evonas.search.config import SearchConfig
    from evonas.search.driver import Search
    from evonas.search.records import SURVIVOR, Candidate, Evaluation
    from evonas.search.tracking import SearchTracker

    config = SearchConfig(space="norm_act_s", budget="10evals", dataset="synthetic",
                          archs=("resnet",), workers=1, population_size=4, tournament_size=2)
    search = Search.create(tmp_path / "d", config, backend=InlineBackend(),
                           tracker=SearchTracker(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    search._start_tracking()
    genome = zoo.get("evonorm_s0")
    first, second, third = (
        Candidate(search.controller.ask().candidate_id, genome.to_dict(), None, "random",
                  genome.structural_hash) for _ in range(3))
    for cand in (first, second, third):
        search._admit(cand, genome)
    assert list(search.in_flight) == [first.candidate_id]

    search.backend.shutdown()  # the worker dies with the first evaluation
    search._finished_outcome(Outcome(first.candidate_id, False, None, "worker died: SIGKILL", 2.0))
    assert [c.candidate_id for c in search.ready] == [second.candidate_id]
    search.stop()
    search._fill()
    assert list(search.in_flight) == [second.candidate_id]
    score = Evaluation(second.candidate_id, SURVIVOR, {"resnet": 0.5}, stage_seconds={"proxy": 1.0})
    search._finished_outcome(Outcome(second.candidate_id, True, score.to_dict(), 1.0))
    assert search.ready == [] and search.in_flight == {}
    evs = search.state.evaluations
    assert evs[first.candidate_id].status == "failed"
    assert (evs[third.candidate_id].status, evs[third.candidate_id].duplicate_of) == (
        "duplicate", second.candidate_id)
    search._end_tracking("FINISHED")
    search.folder.release()


def test_the_progress_line_counts_each_candidate_once():
    from collections import Counter

    from evonas.search.progress import Progress
    from evonas.search.records import DUPLICATE, REJECTED, SURVIVOR, Evaluation
    from evonas.search.state import outcome

    evs = [Evaluation("c1", SURVIVOR, {"resnet": 0.4}),
           Evaluation("c2", REJECTED, reject_stage="numeric", reject_reason="nan"),
           Evaluation("c3", DUPLICATE, {"resnet": 0.4}, duplicate_of="c1"),
           Evaluation("c4", REJECTED, reject_stage="duplicate", duplicate_of="c2",
                      reject_reason="equivalent to c2")]
    line = Progress().line(evaluated=4, outcomes=Counter(outcome(e) for e in evs), best=0.4,
                           spent="4 evals", left="0 evals", in_flight=0)
    assert "survivors 1, duplicates 2, failed 0; rejected: numeric 1)" in line


def test_a_synthetic_search_with_default_sizes_keeps_them_in_its_run_folder(tmp_path):
    run = tmp_path / "smoke"
    evonas("search", "--space", "act", "--budget", "1evals", "--dataset", "synthetic",
           "--archs", "resnet", "--workers", "0", "--out", run)
    config = json.loads((run / "config.json").read_text())
    assert (config["proxy_steps"], config["stages"]["quality_steps"]) == (60, 30)
    assert len(state(run)["evaluations"]) == 1
