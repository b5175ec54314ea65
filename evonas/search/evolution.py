"""Search controllers: which candidate layer to evaluate next.

Place in the flow: the search loop asks a controller for a Proposal, sends its genome to a
worker (rejection stages, equivalence cache, proxy training on K architectures) and tells
the controller the outcome. A controller only orchestrates: genomes are opaque values it
handles through the GenomeOps callables; it does no I/O, training, logging or threading,
and draws every random number from the one numpy Generator it owns (the callables get
that generator too). Same seed and same interleaving of ask and tell calls give the same
proposals; a controller resumed from to_state() continues the same random sequence.

Call order (Controller): ask() -> dispatch -> tell(id, ...), with any number of asks
outstanding and tells in any order. Each asked id is told exactly once; telling an id that
was never asked, was already told, or was lost on resume raises ValueError. Controllers
are not thread-safe: call them from the loop's driver thread.

Two controllers, compared at equal budget in the paper's central ablation:
- RegularizedEvolution: aging evolution with a multi-objective tournament. The zoo seeds
  (initial="zoo") come first, each proposed once; random genomes complete the first
  population_size proposals. After that, each proposal mutates a tournament winner:
  sample tournament_size members (all, while fewer live) uniformly without replacement
  and draw the winner uniformly from the Pareto front of their fitness vectors (with K=1,
  a random one of the argmax). With random_fraction r > 0, each proposal after the
  initial phase is a fresh random genome with probability r instead (random immigrants,
  Grefenstette 1992). Why: with the paper's rejection protocols a window fills with the
  few layers the initial phase let through, mostly trivial ones (linear, x*v1), whose
  mutants are trivial or broken; good layers are rare finds of random sampling (about
  one in 340 random proposals on the CIFAR-10 ablation), and the immigrants keep finding
  them while the tournament exploits each one found. The initial phase counts
  proposals, not survivors: with the paper's rejection protocols most random layers are
  rejected (95% of them on the CIFAR-10 proxies here), and waiting for population_size
  survivors would spend the whole budget on random search. The population grows from the survivors to
  population_size and then ages. An ask that finds it empty proposes a random genome.
- RandomSearch: zoo seeds if given, then random genomes only.

Who enters the population (status of tell; "rejected:<stage>" counts as "rejected"):
- "survivor" enters with its fitness.
- "duplicate" enters with the fitness stored for its functional equivalent: that is the
  point of the cache, an equivalent layer is a valid child at no training cost, and a
  behaviour that aged out comes back when it is re-derived, as in AutoML-Zero. It does
  not enter while a living member has the same behaviour (the `behaviour` key given to
  tell, the driver's functional fingerprint): neutral mutations re-derive the same layer
  over and over at no cost, and as clones they would fill the window with one behaviour
  (measured on CIFAR-10: 180 of 548 proposals, the population nearly all copies of a
  few linear layers) and leave the tournament nothing to choose between.
- "rejected" never enters: the paper discards rejected layers. It is still recorded in
  history and frees its in-flight slot.
- "failed" (a worker error) never enters, for the same reasons.
Aging: when a member is added and the population exceeds population_size, the oldest
member (by time of insertion, i.e. of tell) is removed, not the worst. Rejected and
failed candidates age nobody.

Resume: to_state() is a JSON-safe dict; state["in_flight"] lists the ids asked but not
told. from_state() does NOT restore them: their evaluations died with the killed search,
they never enter the population, and telling them afterwards raises ValueError. Their
slots are simply free again; the next asks propose fresh candidates (with new ids) in
their place, and zoo seeds that were in flight are proposed again. history keeps only
told candidates and no genomes, so 100k entries take tens of MB; only the living
population keeps its genomes (whoever needs every genome logs it at dispatch).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from evonas.errors import EvonasError
from evonas.search.pareto import pareto_front

Genome = Any  # opaque to the controllers
Fitness = tuple[float, ...]

from evonas.search.records import DUPLICATE, FAILED, REJECTED  # noqa: E402
from evonas.search.records import SURVIVOR as OK  # noqa: E402
_ENTERS = frozenset({OK, DUPLICATE})
_KINDS = frozenset({OK, DUPLICATE, REJECTED, FAILED})
RANDOM = "random"
ZOO_PREFIX = "zoo:"
STATE_VERSION = 1
# Bit generators a state file may name; the name is looked up in numpy.random.
_BIT_GENERATORS = frozenset({"PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937"})


@dataclass(frozen=True)
class GenomeOps:
    """What a controller may do with genomes; each callable gets the controller's rng."""

    random_genome: Callable[[np.random.Generator], Genome]
    mutate: Callable[[Genome, np.random.Generator], tuple[Genome, str]]  # (child, mutation name)
    encode: Callable[[Genome], dict]  # JSON-safe, for to_state()
    decode: Callable[[dict], Genome]


@dataclass(frozen=True)
class Proposal:
    """One candidate to evaluate. mutation: the mutation's name, "random" or "zoo:<name>"."""

    candidate_id: str
    genome: Genome
    parent_id: str | None
    mutation: str


class Told(NamedTuple):
    """One history entry: a tuple, so 100k of them stay small."""

    candidate_id: str
    parent_id: str | None
    mutation: str
    status: str
    fitness: Fitness | None


@dataclass(frozen=True)
class Member:
    """A population member. age: members added after it (the newest has age 0)."""

    candidate_id: str
    genome: Genome
    fitness: Fitness
    age: int


def status_kind(status: str) -> str:
    """The kind of a status: survivor, duplicate, rejected or failed ("rejected:<stage>" -> rejected)."""
    kind = status.split(":", 1)[0]
    if kind not in _KINDS:
        raise ValueError(
            f"unknown status {status!r}: use survivor, duplicate, failed, rejected or rejected:<stage>"
        )
    return kind


@dataclass(frozen=True)
class EvolutionConfig:
    """Regularized-evolution settings.

    The defaults fit a CPU-sized search of about a thousand evaluations (a 100-step proxy
    takes ~10 s per architecture on CPU). A window of 50 keeps the random initial phase
    to ~5% of such a budget while each member survives 50 additions, long enough for its
    children to be judged. A tournament of 10 (20% of the window) is moderate pressure, as
    in Real et al. 2019 (P=100, S=25, recalled); with K objectives the winner comes from a
    front of several members, which lowers the pressure further and keeps diversity.
    """

    population_size: int = 50
    # An int is a member count; a float in (0, 1] a fraction of population_size.
    tournament_size: int | float = 10
    num_objectives: int = 1  # K: one proxy accuracy per architecture
    initial: str = "random"  # "random", or "zoo": the seed genomes first, then random
    # Share of proposals after the initial phase that are random immigrants (0: the
    # paper's algorithm, every proposal a mutant).
    random_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not _is_int(self.population_size) or self.population_size < 2:
            raise EvonasError(
                f"population_size must be an integer >= 2, got {self.population_size!r} (e.g. 50)"
            )
        _check_tournament(self.tournament_size, self.population_size)
        if not _is_int(self.num_objectives) or self.num_objectives < 1:
            raise EvonasError(
                f"num_objectives must be an integer >= 1 (one per proxy architecture), "
                f"got {self.num_objectives!r}"
            )
        if self.initial not in ("random", "zoo"):
            raise EvonasError(f"initial must be 'random' or 'zoo', got {self.initial!r}")
        if not (isinstance(self.random_fraction, (int, float))
                and not isinstance(self.random_fraction, bool)
                and 0.0 <= self.random_fraction < 1.0):
            raise EvonasError(f"random_fraction must be a number in [0, 1), got "
                              f"{self.random_fraction!r} (e.g. 0.5)")

    @property
    def tournament_count(self) -> int:
        """Members sampled per tournament."""
        if isinstance(self.tournament_size, float):
            return max(1, round(self.tournament_size * self.population_size))
        return self.tournament_size


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_tournament(size: int | float, population_size: int) -> None:
    if _is_int(size) and 1 <= size <= population_size:
        return
    if isinstance(size, float) and 0.0 < size <= 1.0:
        return
    raise EvonasError(
        f"tournament_size must be an integer in [1, population_size={population_size}] "
        f"or a fraction in (0, 1], got {size!r} (e.g. 10 or 0.2)"
    )


def tournament(
    fitnesses: Sequence[Fitness], size: int, rng: np.random.Generator, *,
    ladders: Sequence[Sequence[Fitness]] | None = None,
) -> tuple[list[int], int]:
    """Multi-objective tournament over fitnesses: (contestant indices, winner index).

    size contestants (all, if fewer) are sampled uniformly without replacement; the winner
    is drawn uniformly from the Pareto front of their fitness vectors. ladders: each
    member's fitness at every rung of the fidelity ladder it reached (rung 0 first); the
    front is then ladder_front's, each pair compared at the highest rung both reached.
    """
    size = min(size, len(fitnesses))
    contestants = [int(i) for i in rng.choice(len(fitnesses), size=size, replace=False)]
    if ladders is not None and any(len(ladders[i]) > 1 for i in contestants):
        front = ladder_front([ladders[i] for i in contestants])
    else:
        front = pareto_front([fitnesses[i] for i in contestants])
    return contestants, contestants[front[int(rng.integers(len(front)))]]


def ladder_front(ladders: Sequence[Sequence[Fitness]]) -> list[int]:
    """Indices, ascending, of the members no other dominates, where a dominates b when
    a's fitness vector dominates b's at the highest rung both reached (min of their
    rung counts): a longer training is compared with a longer training wherever both
    have one, and never a long one against a short one."""
    from evonas.search.pareto import dominates

    def beats(a: Sequence[Fitness], b: Sequence[Fitness]) -> bool:
        rung = min(len(a), len(b)) - 1
        return dominates(a[rung], b[rung])

    front = [i for i, b in enumerate(ladders)
             if not any(beats(a, b) for j, a in enumerate(ladders) if j != i)]
    if front:
        return front
    # Comparing at different rungs can go round in a cycle (b beats a at rung 1, a beats
    # c at rung 0, c beats b at rung 0), leaving no member undominated: the front is then
    # that of the members that climbed highest, at their top rung.
    top = max(len(x) for x in ladders)
    highest = [i for i, x in enumerate(ladders) if len(x) == top]
    return [highest[k] for k in pareto_front([ladders[i][-1] for i in highest])]


class Controller(ABC):
    """A search strategy driven by ask and tell; see the module docstring for the order."""

    @abstractmethod
    def ask(self) -> Proposal:
        """The next candidate to evaluate; its id is now in flight."""

    @abstractmethod
    def tell(self, candidate_id: str, fitness: Fitness | None, status: str, *,
             behaviour: str | None = None) -> None:
        """The outcome of an asked candidate, in any order; ValueError if not in flight.

        behaviour: an identity of what the layer computes (equal for equivalent layers),
        or None; a duplicate whose behaviour a living member has does not enter."""

    @abstractmethod
    def in_flight(self) -> list[str]:
        """Ids asked and not yet told, oldest first."""

    def update(self, candidate_id: str, rung: int, fitness: Fitness) -> None:
        """A told survivor's fitness at rung `rung` (1, 2, ...) of the fidelity ladder,
        rungs in order. Ignored by controllers that keep no population, and for a
        candidate that is no member (aged out, or a clone kept out)."""

    @property
    @abstractmethod
    def history(self) -> Sequence[Told]:
        """Every told candidate, in order of tell. Read-only."""

    @abstractmethod
    def to_state(self, *, history: bool = True) -> dict:
        """A JSON-safe snapshot; from_state() resumes from it (in-flight ids dropped).
        history=False leaves the history out (an empty list), for a caller that keeps the
        told outcomes itself and puts them back before from_state: the history grows with
        every tell, the rest of the state does not."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict, ops: GenomeOps) -> Controller:
        """The controller a to_state() snapshot describes."""


class _BaseController(Controller):
    """Bookkeeping shared by the controllers: ids, rng, seeds, in-flight set, history."""

    kind: ClassVar[str]

    def __init__(
        self, ops: GenomeOps, num_objectives: int, seed: int, seeds: Mapping[str, Genome]
    ) -> None:
        if not _is_int(seed):
            raise EvonasError(f"seed must be an integer, got {seed!r}")
        self._ops = ops
        self._num_objectives = num_objectives
        self._rng = np.random.default_rng(seed)
        self._next_id = 0
        self._in_flight: dict[str, Proposal] = {}
        self._history: list[Told] = []
        self._pending_seeds: deque[tuple[str, Genome]] = deque(seeds.items())

    @property
    def num_objectives(self) -> int:
        return self._num_objectives

    def ask(self) -> Proposal:
        if self._pending_seeds:
            name, genome = self._pending_seeds.popleft()
            parent_id, mutation = None, ZOO_PREFIX + name
        else:
            genome, parent_id, mutation = self._propose()
        proposal = Proposal(f"c{self._next_id:06d}", genome, parent_id, mutation)
        self._next_id += 1
        self._in_flight[proposal.candidate_id] = proposal
        return proposal

    def tell(self, candidate_id: str, fitness: Fitness | None, status: str, *,
             behaviour: str | None = None) -> None:
        proposal = self._in_flight.get(candidate_id)
        if proposal is None:
            raise ValueError(self._not_in_flight(candidate_id))
        kind = status_kind(status)
        fit = self._checked_fitness(candidate_id, fitness, kind)
        # Checks first, then changes: a ValueError leaves the controller as it was.
        del self._in_flight[candidate_id]
        self._history.append(
            Told(candidate_id, proposal.parent_id, proposal.mutation, status, fit)
        )
        if kind in _ENTERS:
            self._admit(proposal, fit, behaviour, clone_ok=kind == OK)

    def in_flight(self) -> list[str]:
        return list(self._in_flight)

    @property
    def history(self) -> Sequence[Told]:
        return self._history

    @abstractmethod
    def _propose(self) -> tuple[Genome, str | None, str]:
        """(genome, parent id, mutation name) once the zoo seeds are all proposed."""

    def _admit(self, proposal: Proposal, fitness: Fitness, behaviour: str | None,
               clone_ok: bool) -> None:
        """Hook for a told ok/duplicate candidate; random search keeps no population.
        clone_ok: whether it may enter beside a living member of the same behaviour."""

    def _random(self) -> tuple[Genome, None, str]:
        return self._ops.random_genome(self._rng), None, RANDOM

    def _not_in_flight(self, candidate_id: str) -> str:
        number = candidate_id[1:] if candidate_id.startswith("c") else ""
        if number.isdigit() and int(number) < self._next_id:
            return (
                f"candidate {candidate_id} was already told, "
                "or was in flight when the state was saved"
            )
        return f"candidate {candidate_id} was never asked"

    def _checked_fitness(
        self, candidate_id: str, fitness: Fitness | None, kind: str
    ) -> Fitness | None:
        if fitness is None:
            if kind in _ENTERS:
                raise ValueError(f"candidate {candidate_id}: status {kind!r} needs a fitness")
            return None
        fit = tuple(float(v) for v in fitness)
        if len(fit) != self._num_objectives or not all(math.isfinite(v) for v in fit):
            raise ValueError(
                f"candidate {candidate_id}: fitness must be {self._num_objectives} finite "
                f"numbers (one per objective), got {fitness!r}"
            )
        return fit

    # --- state -------------------------------------------------------------------------

    def _common_state(self, history: bool) -> dict:
        # In-flight seeds go back to the front of the queue: the zoo is always evaluated.
        seeds = [
            (p.mutation[len(ZOO_PREFIX):], p.genome)
            for p in self._in_flight.values()
            if p.parent_id is None and p.mutation.startswith(ZOO_PREFIX)
        ]
        seeds += list(self._pending_seeds)
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "num_objectives": self._num_objectives,
            "rng": self._rng.bit_generator.state,
            "next_id": self._next_id,
            "in_flight": self.in_flight(),
            "pending_seeds": [[name, self._ops.encode(g)] for name, g in seeds],
            "history": [
                [t.candidate_id, t.parent_id, t.mutation, t.status, _listed(t.fitness)]
                for t in self._history
            ] if history else [],
        }

    def _restore_common(self, state: dict) -> None:
        self._rng = _generator_from(state["rng"])
        self._next_id = int(state["next_id"])
        seeds = state["pending_seeds"]
        self._pending_seeds = deque((name, self._ops.decode(g)) for name, g in seeds)
        self._history = [
            Told(cid, parent, mutation, status, _tupled(fit))
            for cid, parent, mutation, status, fit in state["history"]
        ]


class _Slot(NamedTuple):
    candidate_id: str
    genome: Genome
    fitness: Fitness
    born: int  # value of the additions clock when it entered
    behaviour: str | None = None  # what tell was given: equal for equivalent layers
    higher: tuple[Fitness, ...] = ()  # fitness at the ladder's rungs 1, 2, ... reached


def _check_seeding(initial: str, seeds: Mapping[str, Genome]) -> None:
    if initial == "zoo" and not seeds:
        raise EvonasError(
            "initial='zoo' needs seed genomes (the zoo); pass seeds or use initial='random'"
        )
    if initial == "random" and seeds:
        raise EvonasError(
            "seed genomes were given but initial='random'; use initial='zoo' to start from them"
        )


class RegularizedEvolution(_BaseController):
    """Aging evolution with a multi-objective tournament (Liu et al. 2020; Real et al. 2019)."""

    kind = "regularized_evolution"

    def __init__(
        self,
        ops: GenomeOps,
        config: EvolutionConfig = EvolutionConfig(),
        *,
        seed: int,
        seeds: Mapping[str, Genome] | None = None,
    ) -> None:
        seeds = dict(seeds or {})
        _check_seeding(config.initial, seeds)
        super().__init__(ops, config.num_objectives, seed, seeds)
        self.config = config
        self._population: deque[_Slot] = deque()
        self._additions = 0  # members ever added: the clock that ages them

    def population(self) -> list[Member]:
        """The current members, oldest first."""
        now = self._additions - 1
        return [Member(s.candidate_id, s.genome, s.fitness, now - s.born) for s in self._population]

    def _propose(self) -> tuple[Genome, str | None, str]:
        initial = self._next_id < self.config.population_size
        if initial or not self._population:
            return self._random()
        if self.config.random_fraction > 0 and self._rng.random() < self.config.random_fraction:
            return self._random()
        fitnesses = [s.fitness for s in self._population]
        ladders = [(s.fitness, *s.higher) for s in self._population]
        _, winner = tournament(fitnesses, self.config.tournament_count, self._rng,
                               ladders=ladders)
        parent = self._population[winner]
        child, name = self._ops.mutate(parent.genome, self._rng)
        if name == RANDOM or name.startswith(ZOO_PREFIX):
            raise ValueError(f"mutation name {name!r} is reserved for non-mutants (random, zoo:*)")
        return child, parent.candidate_id, name

    def _admit(self, proposal: Proposal, fitness: Fitness, behaviour: str | None,
               clone_ok: bool) -> None:
        if not clone_ok and behaviour is not None and any(
                s.behaviour == behaviour for s in self._population):
            return  # a clone of a living member: in history, not in the population
        slot = _Slot(proposal.candidate_id, proposal.genome, fitness, self._additions,
                     behaviour)
        self._population.append(slot)
        self._additions += 1
        if len(self._population) > self.config.population_size:
            self._population.popleft()  # aging: the oldest goes, whatever its fitness

    def update(self, candidate_id: str, rung: int, fitness: Fitness) -> None:
        fit = self._checked_fitness(candidate_id, fitness, OK)
        for i, slot in enumerate(self._population):
            if slot.candidate_id == candidate_id:
                if rung != len(slot.higher) + 1:
                    raise ValueError(f"candidate {candidate_id}: rung {rung} told after "
                                     f"{len(slot.higher)} rungs above the proxy")
                self._population[i] = slot._replace(higher=(*slot.higher, fit))
                return

    def to_state(self, *, history: bool = True) -> dict:
        state = self._common_state(history)
        state["config"] = asdict(self.config)
        state["additions"] = self._additions
        state["population"] = [
            [s.candidate_id, self._ops.encode(s.genome), list(s.fitness), s.born, s.behaviour]
            + ([[list(f) for f in s.higher]] if s.higher else [])
            for s in self._population
        ]
        return state

    @classmethod
    def from_state(cls, state: dict, ops: GenomeOps) -> RegularizedEvolution:
        _check_state(state, cls.kind)
        # States written before random immigrants existed ran without them.
        config = EvolutionConfig(**{"random_fraction": 0.0, **state["config"]})
        self = cls.__new__(cls)
        # The seeds come from the state, so the zoo/random consistency check is skipped.
        _BaseController.__init__(self, ops, config.num_objectives, 0, {})
        self.config = config
        self._additions = int(state["additions"])
        # Entries of states written before behaviours were kept have four fields; a
        # sixth holds the fitness at the ladder's higher rungs, when the member has some.
        self._population = deque(
            _Slot(cid, ops.decode(g), tuple(fit), int(born), *rest[:1],
                  *[tuple(tuple(f) for f in rest[1])] if len(rest) > 1 else [])
            for cid, g, fit, born, *rest in state["population"]
        )
        self._restore_common(state)
        return self


class RandomSearch(_BaseController):
    """The baseline: the zoo seeds if given, then random genomes only; no population."""

    kind = "random_search"

    def __init__(
        self,
        ops: GenomeOps,
        *,
        num_objectives: int = 1,
        seed: int,
        seeds: Mapping[str, Genome] | None = None,
    ) -> None:
        if not _is_int(num_objectives) or num_objectives < 1:
            raise EvonasError(f"num_objectives must be an integer >= 1, got {num_objectives!r}")
        super().__init__(ops, num_objectives, seed, dict(seeds or {}))

    def _propose(self) -> tuple[Genome, None, str]:
        return self._random()

    def to_state(self, *, history: bool = True) -> dict:
        return self._common_state(history)

    @classmethod
    def from_state(cls, state: dict, ops: GenomeOps) -> RandomSearch:
        _check_state(state, cls.kind)
        self = cls(ops, num_objectives=int(state["num_objectives"]), seed=0)
        self._restore_common(state)
        return self


_COMMON_KEYS = frozenset(
    {"num_objectives", "rng", "next_id", "in_flight", "pending_seeds", "history"}
)
_STATE_KEYS = {
    RegularizedEvolution.kind: _COMMON_KEYS | {"config", "additions", "population"},
    RandomSearch.kind: _COMMON_KEYS,
}
_CONTROLLERS: dict[str, type[_BaseController]] = {
    RegularizedEvolution.kind: RegularizedEvolution,
    RandomSearch.kind: RandomSearch,
}


def load_controller(state: dict, ops: GenomeOps) -> Controller:
    """Resume whichever controller wrote state (its "kind")."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in _CONTROLLERS:
        raise EvonasError(
            f"controller state has kind {kind!r}; expected one of {sorted(_CONTROLLERS)} "
            "(is this the state file of an evonas search?)"
        )
    return _CONTROLLERS[kind].from_state(state, ops)


def _check_state(state: dict, kind: str) -> None:
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise EvonasError(f"state is for controller {found!r}, not {kind!r}; use load_controller()")
    if state.get("version") != STATE_VERSION:
        raise EvonasError(
            f"controller state version {state.get('version')!r} is not {STATE_VERSION}: "
            "it was written by another evonas version; resume it with that version"
        )
    missing = sorted(_STATE_KEYS[kind] - state.keys())
    if missing:
        raise EvonasError(
            f"controller state lacks {missing}: the state file is truncated or edited"
        )


def _generator_from(rng_state: dict) -> np.random.Generator:
    name = rng_state.get("bit_generator")
    if name not in _BIT_GENERATORS:
        raise EvonasError(f"controller state names an unknown bit generator {name!r}")
    bit_generator = getattr(np.random, name)()
    bit_generator.state = rng_state
    return np.random.Generator(bit_generator)


def _listed(fitness: Fitness | None) -> list[float] | None:
    return None if fitness is None else list(fitness)


def _tupled(fitness: list[float] | None) -> Fitness | None:
    return None if fitness is None else tuple(fitness)
