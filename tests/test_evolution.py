"""The search controllers (evolution.py) and Pareto dominance (pareto.py) on toy genomes.

A toy genome is a tuple of 3 floats in [-1, 1]; mutation perturbs one coordinate and names
it; fitness is a known function of the genome. That exercises the controller algorithm
without torch: the controllers never look inside genomes.
"""

import json

import numpy as np
import pytest

from evonas.errors import EvonasError
from evonas.search.evolution import (
    Controller,
    EvolutionConfig,
    GenomeOps,
    RandomSearch,
    RegularizedEvolution,
    load_controller,
    tournament,
)
from evonas.search.pareto import dominates, pareto_front

TARGET_A = np.array([0.3, -0.6, 0.8])
TARGET_B = np.array([0.5, -0.2, 0.4])


def random_genome(rng):
    return tuple(float(v) for v in rng.uniform(-1.0, 1.0, size=3))


def mutate(genome, rng):
    i = int(rng.integers(3))
    child = list(genome)
    child[i] = float(np.clip(child[i] + rng.normal(0.0, 0.1), -1.0, 1.0))
    return tuple(child), f"perturb_x{i}"


OPS = GenomeOps(random_genome, mutate, encode=lambda g: {"x": list(g)}, decode=lambda d: tuple(d["x"]))


def fitness1(genome):
    return (-float(np.sum((np.asarray(genome) - TARGET_A) ** 2)),)


def fitness2(genome):
    x = np.asarray(genome)
    return (-float(np.sum((x - TARGET_A) ** 2)), -float(np.sum((x - TARGET_B) ** 2)))


def evolution(seed=0, population_size=10, tournament_size=3, k=2, **kwargs):
    config = EvolutionConfig(population_size, tournament_size, k, kwargs.pop("initial", "random"),
                             kwargs.pop("random_fraction", 0.0))
    return RegularizedEvolution(OPS, config, seed=seed, **kwargs)


def drive(ctrl, steps, fitness, workers=4, schedule_seed=0, judge=None):
    """Asynchronous loop: keep `workers` in flight, finish a random one, ask a new one.

    Returns every proposal asked and the list still running. judge(genome) -> status.
    """
    pick = np.random.default_rng(schedule_seed)
    running, asked = [], []
    while len(running) < workers:
        asked.append(ctrl.ask())
        running.append(asked[-1])
    for _ in range(steps):
        done = running.pop(int(pick.integers(len(running))))
        status = judge(done.genome) if judge else "survivor"
        fit = fitness(done.genome) if status in ("survivor", "duplicate") else None
        ctrl.tell(done.candidate_id, fit, status)
        asked.append(ctrl.ask())
        running.append(asked[-1])
    return asked, running


def ids(members):
    return [m.candidate_id for m in members]


# --- pareto.py -------------------------------------------------------------------------


def brute_front(points):
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_pareto_front_matches_brute_force(k):
    rng = np.random.default_rng(k)
    for _ in range(200):
        n = int(rng.integers(0, 40))
        # Small integer grids force ties and exact duplicates.
        grid = rng.random() < 0.5
        points = (rng.integers(0, 5, size=(n, k)) if grid else rng.random((n, k))).tolist()
        assert pareto_front(points) == brute_front(points)


def test_pareto_front_keeps_every_copy_of_a_front_point():
    points = [(1.0, 2.0), (2.0, 1.0), (1.0, 2.0), (0.5, 0.5), (2.0, 1.0)]
    assert pareto_front(points) == [0, 1, 2, 4]


def test_dominates_is_strict():
    assert dominates((1, 2), (1, 1))
    assert not dominates((1, 1), (1, 1))
    assert not dominates((2, 0), (0, 2))


def test_pareto_front_rejects_nan_and_ragged_input():
    with pytest.raises(ValueError, match="NaN"):
        pareto_front([(1.0, float("nan")), (0.0, 0.0)])
    with pytest.raises(ValueError):
        pareto_front([(1.0, 2.0), (1.0,)])


def test_pareto_front_handles_thousands_of_points():
    # Points on a circle arc are all mutually non-dominated: the worst case for the front.
    theta = np.linspace(0.0, np.pi / 2, 3000)
    arc = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    cloud = np.random.default_rng(0).random((2000, 2)) * 0.7
    assert pareto_front(np.concatenate([arc, cloud])) == list(range(3000))


# --- tournament ------------------------------------------------------------------------


def test_tournament_winner_is_always_on_the_contestants_front():
    for seed in range(300):
        rng = np.random.default_rng(seed)
        k = 1 + seed % 3
        fits = [tuple(v) for v in rng.integers(0, 6, size=(int(rng.integers(1, 30)), k)).tolist()]
        contestants, winner = tournament(fits, int(rng.integers(1, 12)), rng)
        assert len(set(contestants)) == len(contestants)
        assert winner in contestants
        assert not any(dominates(fits[c], fits[winner]) for c in contestants)
        if k == 1:
            assert fits[winner] == max(fits[c] for c in contestants)


def test_tournament_draws_uniformly_from_the_front():
    fits = [(3.0, 0.0), (2.0, 2.0), (0.0, 3.0), (1.0, 1.0), (0.0, 0.0)]
    rng = np.random.default_rng(0)
    wins = np.bincount([tournament(fits, 5, rng)[1] for _ in range(3000)], minlength=5)
    assert wins[3] == wins[4] == 0
    assert all(850 < w < 1150 for w in wins[:3])


def test_mutation_parents_are_on_the_population_front_when_the_tournament_is_everyone():
    ctrl = evolution(seed=3, population_size=8, tournament_size=8)
    for step in range(200):
        members = ctrl.population()
        p = ctrl.ask()
        if p.parent_id is not None:
            fits = {m.candidate_id: m.fitness for m in members}
            assert not any(dominates(f, fits[p.parent_id]) for f in fits.values())
        ctrl.tell(p.candidate_id, fitness2(p.genome), "survivor")


# --- the ask/tell protocol -------------------------------------------------------------


def test_asynchronous_interleaving():
    ctrl = evolution(population_size=6)
    first = [ctrl.ask() for _ in range(8)]
    assert [p.candidate_id for p in first] == [f"c{i:06d}" for i in range(8)]
    assert all(p.mutation == "random" and p.parent_id is None for p in first)
    for p in [first[i] for i in (5, 2, 7, 0)]:
        ctrl.tell(p.candidate_id, fitness2(p.genome), "survivor")
    assert ctrl.in_flight() == [first[i].candidate_id for i in (1, 3, 4, 6)]
    # 4 members + 4 in flight fill the window of 6: the next proposal is a mutant.
    child = ctrl.ask()
    assert child.parent_id in {first[i].candidate_id for i in (5, 2, 7, 0)}
    assert child.mutation.startswith("perturb_x")
    for p in [first[i] for i in (6, 1, 4, 3)] + [child]:
        ctrl.tell(p.candidate_id, fitness2(p.genome), "survivor")
    assert ctrl.in_flight() == []
    assert [t.candidate_id for t in ctrl.history][-1] == child.candidate_id
    assert len(ctrl.population()) == 6


def test_telling_an_unknown_or_told_id_raises():
    ctrl = evolution()
    p = ctrl.ask()
    with pytest.raises(ValueError, match="never asked"):
        ctrl.tell("c000999", (0.0, 0.0), "survivor")
    ctrl.tell(p.candidate_id, (0.0, 0.0), "survivor")
    with pytest.raises(ValueError, match="already told"):
        ctrl.tell(p.candidate_id, (0.0, 0.0), "survivor")


def test_bad_tells_raise_and_change_nothing():
    ctrl = evolution()
    p = ctrl.ask()
    bad = [(None, "survivor"), ((1.0,), "survivor"), ((1.0, float("nan")), "duplicate"), ((1.0, 1.0), "odd")]
    for fitness, status in bad:
        with pytest.raises(ValueError):
            ctrl.tell(p.candidate_id, fitness, status)
    assert ctrl.in_flight() == [p.candidate_id] and ctrl.history == []


def test_aging_removes_the_oldest_not_the_worst():
    ctrl = evolution(population_size=3, tournament_size=2)
    asked = [ctrl.ask() for _ in range(5)]
    # Insertion time is the time of tell, not of ask; the first inserted is the best.
    order = [4, 2, 0, 1, 3]
    for rank, i in enumerate(order):
        ctrl.tell(asked[i].candidate_id, (10.0 - rank, 10.0 - rank), "survivor")
    members = ctrl.population()
    assert ids(members) == [asked[i].candidate_id for i in (0, 1, 3)]
    assert [m.age for m in members] == [2, 1, 0]


def test_rejected_and_failed_never_enter_duplicates_do():
    ctrl = evolution(population_size=5)
    statuses = ["survivor", "survivor", "duplicate", "rejected:quality", "failed"]
    seen, duplicates_in_population = {}, 0
    pick = np.random.default_rng(1)
    running = [ctrl.ask() for _ in range(4)]
    for _ in range(300):
        done = running.pop(int(pick.integers(len(running))))
        # A status fixed by the genome's digits: every kind turns up, in no pattern.
        status = seen[done.candidate_id] = statuses[int(abs(done.genome[0]) * 1e6) % 5]
        fitness = fitness2(done.genome) if status in ("survivor", "duplicate") else None
        ctrl.tell(done.candidate_id, fitness, status)
        members = [seen[m.candidate_id] for m in ctrl.population()]
        assert set(members) <= {"survivor", "duplicate"}
        duplicates_in_population += "duplicate" in members
        running.append(ctrl.ask())
    assert {t.candidate_id: t.status for t in ctrl.history} == seen
    assert set(seen.values()) == set(statuses)
    assert duplicates_in_population > 0


def test_a_duplicate_enters_with_its_equivalents_fitness():
    ctrl = evolution(population_size=4)
    a, b = ctrl.ask(), ctrl.ask()
    ctrl.tell(a.candidate_id, (0.7, 0.2), "survivor")
    ctrl.tell(b.candidate_id, (0.7, 0.2), "duplicate")
    assert [(m.candidate_id, m.fitness) for m in ctrl.population()] == [
        (a.candidate_id, (0.7, 0.2)),
        (b.candidate_id, (0.7, 0.2)),
    ]


def test_a_duplicate_of_a_living_member_stays_out_until_that_behaviour_ages_out():
    ctrl = evolution(population_size=2, tournament_size=1)
    a, b, c, d, e = (ctrl.ask() for _ in range(5))
    ctrl.tell(a.candidate_id, (0.7, 0.2), "survivor", behaviour="fp-a")
    # A clone of a living member: recorded, but the population keeps one copy.
    ctrl.tell(b.candidate_id, (0.7, 0.2), "duplicate", behaviour="fp-a")
    assert ids(ctrl.population()) == [a.candidate_id]
    assert ctrl.history[-1].status == "duplicate"
    ctrl.tell(c.candidate_id, (0.1, 0.9), "survivor", behaviour="fp-c")
    ctrl.tell(d.candidate_id, (0.3, 0.3), "survivor", behaviour="fp-d")
    assert ids(ctrl.population()) == [c.candidate_id, d.candidate_id]  # a aged out
    # Re-derived once its behaviour has left the window, it comes back.
    ctrl.tell(e.candidate_id, (0.7, 0.2), "duplicate", behaviour="fp-a")
    assert ids(ctrl.population()) == [d.candidate_id, e.candidate_id]
    # The behaviours survive a round trip through the state file.
    again = load_controller(json.loads(json.dumps(ctrl.to_state())), OPS)
    f = again.ask()
    again.tell(f.candidate_id, (0.3, 0.3), "duplicate", behaviour="fp-d")
    assert ids(again.population()) == [d.candidate_id, e.candidate_id]


def test_rejections_in_the_initial_phase_are_refilled_with_random_proposals():
    ctrl = evolution(population_size=4)
    first = [ctrl.ask() for _ in range(4)]
    ctrl.tell(first[0].candidate_id, None, "rejected:stability")
    ctrl.tell(first[1].candidate_id, (0.1, 0.1), "failed")
    assert ctrl.ask().mutation == "random"  # 0 members + 2 in flight + 1 new < 4
    assert ctrl.ask().mutation == "random"
    assert ctrl.population() == []


def test_an_empty_population_falls_back_to_random():
    ctrl = evolution(population_size=3)
    assert all(ctrl.ask().mutation == "random" for _ in range(10))


def test_zoo_seeds_come_first_then_random():
    seeds = {"bn_relu": (0.0, 0.0, 0.0), "evonorm_s0": (0.1, 0.2, 0.3)}
    ctrl = evolution(population_size=4, initial="zoo", seeds=seeds)
    asked = [ctrl.ask() for _ in range(4)]
    assert [p.mutation for p in asked] == ["zoo:bn_relu", "zoo:evonorm_s0", "random", "random"]
    assert asked[1].genome == seeds["evonorm_s0"]


def test_config_is_checked_at_the_boundary():
    for bad in [dict(population_size=1), dict(tournament_size=0), dict(tournament_size=11),
                dict(tournament_size=1.5), dict(num_objectives=0), dict(initial="zoo2")]:
        with pytest.raises(EvonasError):
            EvolutionConfig(**{"population_size": 10, **bad})
    assert EvolutionConfig(50, 0.2).tournament_count == 10
    with pytest.raises(EvonasError, match="initial='zoo'"):
        RegularizedEvolution(OPS, EvolutionConfig(initial="zoo"), seed=0)
    with pytest.raises(EvonasError, match="initial='random'"):
        RegularizedEvolution(OPS, EvolutionConfig(), seed=0, seeds={"bn": (0.0, 0.0, 0.0)})


# --- determinism and resume ------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda s: evolution(seed=s), lambda s: RandomSearch(OPS, num_objectives=2, seed=s)]
)
def test_same_seed_same_proposals(make):
    runs = [drive(make(7), 150, fitness2)[0] for _ in range(2)]
    assert runs[0] == runs[1]
    assert drive(make(8), 150, fitness2)[0] != runs[0]


def test_state_round_trip_mid_run_continues_identically():
    a = evolution(seed=11, population_size=10, tournament_size=4)
    _, running = drive(a, 60, fitness2, schedule_seed=1)
    lost = [p.candidate_id for p in running]
    assert a.in_flight() == lost and lost
    state = json.loads(json.dumps(a.to_state()))
    assert state["in_flight"] == lost
    b = load_controller(state, OPS)
    assert isinstance(b, RegularizedEvolution) and b.in_flight() == []
    # The killed search lost its running evaluations; a's are simply never told.
    after_a, _ = drive(a, 80, fitness2, schedule_seed=2)
    after_b, _ = drive(b, 80, fitness2, schedule_seed=2)
    assert after_a == after_b
    assert a.population() == b.population()
    assert list(a.history) == list(b.history)
    assert a.to_state()["rng"] == b.to_state()["rng"]
    with pytest.raises(ValueError, match="in flight when the state was saved"):
        b.tell(lost[0], (0.0, 0.0), "survivor")


def test_resume_drops_in_flight_and_reproposes_in_flight_seeds():
    seeds = {"bn_relu": (0.0, 0.0, 0.0), "gn_relu": (0.5, 0.5, 0.5)}
    a = evolution(seed=2, population_size=4, initial="zoo", seeds=seeds)
    _, s1, _ = a.ask(), a.ask(), a.ask()
    a.tell(s1.candidate_id, (0.1, 0.1), "survivor")
    b = RegularizedEvolution.from_state(json.loads(json.dumps(a.to_state())), OPS)
    assert ids(b.population()) == [s1.candidate_id]
    again = b.ask()
    assert (again.mutation, again.genome) == ("zoo:bn_relu", seeds["bn_relu"])
    assert again.candidate_id == "c000003"  # ids are never reused
    # The first population_size (4) proposals are made; evolution mutates the survivor.
    assert b.ask().parent_id == s1.candidate_id


def test_random_search_round_trip_and_kind_checks():
    a = RandomSearch(OPS, num_objectives=2, seed=5, seeds={"bn": (0.0, 0.0, 0.0)})
    seed = a.ask()
    assert seed.mutation == "zoo:bn"
    a.tell(seed.candidate_id, (0.5, 0.5), "survivor")
    drive(a, 30, fitness2)
    b = load_controller(json.loads(json.dumps(a.to_state())), OPS)
    assert isinstance(b, RandomSearch) and isinstance(b, Controller)
    assert [a.ask() for _ in range(5)] == [b.ask() for _ in range(5)]
    with pytest.raises(EvonasError):
        RegularizedEvolution.from_state(a.to_state(), OPS)
    with pytest.raises(EvonasError):
        load_controller({"kind": "simulated_annealing"}, OPS)
    truncated = {k: v for k, v in a.to_state().items() if k != "history"}
    with pytest.raises(EvonasError, match="history"):
        load_controller(truncated, OPS)


def test_random_search_proposes_only_random_genomes():
    ctrl = RandomSearch(OPS, num_objectives=2, seed=0)
    asked, _ = drive(ctrl, 100, fitness2)
    assert all(p.mutation == "random" and p.parent_id is None for p in asked)


# --- evolution beats random search at equal budget -------------------------------------


def best_scalar(history):
    return max(t.fitness[0] for t in history if t.fitness is not None)


def hypervolume_2d(points, ref=(-0.3, -0.3)):
    """Area dominated by points above ref; ref sits near the front, where search is hard."""
    inside = [p for p in points if p[0] > ref[0] and p[1] > ref[1]]
    front = sorted({tuple(inside[i]) for i in pareto_front(inside)}, reverse=True)
    volume, prev_y = 0.0, ref[1]
    for x, y in front:  # x descending, so y ascending along the front
        volume += (x - ref[0]) * (y - prev_y)
        prev_y = y
    return volume


def test_hypervolume_helper():
    points = [(1.0, 0.0), (0.0, 1.0), (-0.5, 2.0)]
    assert hypervolume_2d(points, ref=(-1.0, -1.0)) == pytest.approx(2 + 1 + 0.5)
    assert hypervolume_2d([(-2.0, 5.0)], ref=(-1.0, -1.0)) == 0.0


# Margins over 30 seeds (checked when writing these): evolution's best squared error is
# 20x-6000x smaller, and its hypervolume 1.26x-3.0x random search's, on every seed.
# The thresholds below leave room for a changed random sequence.


def test_evolution_beats_random_search_single_objective():
    wins = 0
    for seed in range(5):
        evo = evolution(seed=seed, population_size=20, tournament_size=5, k=1)
        rnd = RandomSearch(OPS, num_objectives=1, seed=seed)
        drive(evo, 400, fitness1, schedule_seed=seed)
        drive(rnd, 400, fitness1, schedule_seed=seed)
        wins += best_scalar(evo.history) > best_scalar(rnd.history)
        assert best_scalar(evo.history) > -0.01  # within 0.1 of the optimum
    assert wins >= 4


def test_evolution_beats_random_search_on_the_pareto_front():
    wins = 0
    for seed in range(5):
        evo = evolution(seed=seed, population_size=20, tournament_size=5, k=2)
        rnd = RandomSearch(OPS, num_objectives=2, seed=seed)
        drive(evo, 400, fitness2, schedule_seed=seed)
        drive(rnd, 400, fitness2, schedule_seed=seed)
        hv_evo, hv_rnd = (hypervolume_2d([t.fitness for t in c.history]) for c in (evo, rnd))
        wins += hv_evo > 1.1 * hv_rnd
    assert wins >= 4


def test_evolution_eventually_gets_close_despite_rejections():
    ctrl = evolution(seed=4, population_size=20, tournament_size=5, k=1)
    # A third of the space is rejected; the optimum sits inside the accepted part.
    drive(ctrl, 600, fitness1, judge=lambda g: "rejected:quality" if g[1] > 0.3 else "survivor")
    assert best_scalar([t for t in ctrl.history if t.status == "survivor"]) > -0.01


def needle(genome):
    """A narrow well around TARGET_A (1.4% of the cube) in a plateau that tilts away from it:
    the shape of the layer search, where good layers are rare finds and most random
    survivors are trivial ones whose mutants lead nowhere."""
    x = np.asarray(genome)
    d = float(np.linalg.norm(x - TARGET_A))
    return ((1.0 - d) if d < 0.3 else -0.01 * float(np.linalg.norm(x + TARGET_A)),)


def test_random_immigrants_find_rare_good_regions_and_evolution_refines_them():
    # Measured when writing this, seeds 0-19: with immigrants the best is in the well on
    # every seed and above random search's best on 18 of 20; without them evolution never
    # leaves the plateau on 14 of 20.
    in_well, beats_random, stuck_without = 0, 0, 0
    for seed in range(5):
        immigrants = evolution(seed=seed, population_size=20, tournament_size=5, k=1,
                               random_fraction=0.5)
        plain = evolution(seed=seed, population_size=20, tournament_size=5, k=1)
        rnd = RandomSearch(OPS, num_objectives=1, seed=seed)
        for ctrl in (immigrants, plain, rnd):
            drive(ctrl, 400, needle, schedule_seed=seed)
        best = [max(t.fitness[0] for t in c.history if t.fitness) for c in (immigrants, plain, rnd)]
        in_well += best[0] > 0.7
        beats_random += best[0] > best[2]
        stuck_without += best[1] <= 0.0
    assert in_well == 5 and beats_random >= 4 and stuck_without >= 2


def test_random_immigrants_take_their_share_of_proposals_after_the_initial_phase():
    for fraction in (0.0, 0.5):
        ctrl = evolution(seed=1, population_size=10, tournament_size=3, k=2,
                         random_fraction=fraction)
        asked, _ = drive(ctrl, 400, fitness2)
        later = [p.mutation for p in asked[10:]]
        share = later.count("random") / len(later)
        assert (share == 0.0) if fraction == 0.0 else (0.42 < share < 0.58)
    with pytest.raises(EvonasError, match="random_fraction"):
        EvolutionConfig(random_fraction=1.0)
