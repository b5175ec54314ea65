"""The search's records in its run folder, and the rules every reader of them shares.

Where it sits: the driver (driver.py) writes these records after every finished
evaluation; the report (report.py), the results reader (results.py, behind `evonas top`,
`show RUN:ID`, `export RUN:ID`) and full training (fulltrain/) read them. None of them
imports the driver.

Two files, so that recording a candidate costs the same at the 10th and the 100,000th:

    journal.jsonl  one line per finished candidate, {"candidate": ..., "evaluation": ...},
                   in the order the driver finished them; only ever appended to. A search
                   with a fidelity ladder (SearchConfig.rungs) adds two kinds of line:
                   {"promote": {"candidate_id", "steps"}} when a candidate clears a
                   rung's hurdle (written once: a resume trains the promotions that have
                   no result yet and never decides one again) and {"rung": RungResult}
                   when its training at that rung finished. Folders written before the
                   ladder have neither and read as they are.
    state.json     the bounded rest (STATE_FORMAT): the controller's population and random
                   state (its history is rebuilt from the journal), the ledger, the MLflow
                   parent run, the driver's own seconds, and `journal_bytes`: how much of
                   the journal is committed

A candidate is finished when a state.json naming its line has replaced the previous one
(the driver writes one per step of its loop, for every line the step appended). The
journal line is written first, so a kill between the two leaves a line past
journal_bytes: readers ignore it and a resume cuts it off (the controller never learnt of
it, and proposes afresh). Run folders of the first format kept everything in state.json
(LEGACY_FORMAT); they are read as they are and rewritten in two files on resume.

The rules: the mean fitness (the scalar of `RUN:best`, `evonas top` and the report), the
ranking of survivors (SearchState.rank_key: the highest rung reached first, then the best
mean fitness there, ties toward the lower candidate id; without a ladder every survivor
is at rung 0 and this is the best mean first), which seconds of an evaluation the ledger
charges to which device at which share, and what status the controller is told.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from evonas.errors import EvonasError
from evonas.search.records import REJECTED, SURVIVOR, Candidate, Evaluation, RungResult
from evonas.search.runfolder import RunFolder

STATE_FORMAT = "evonas.search-state/2"
LEGACY_FORMAT = "evonas.search-state/1"
# Stages run by the driver itself, on its CPU, before a candidate costs a worker anything.
DRIVER_STAGES = ("static", "numeric", "causal", "duplicate")


# --- the rules ----------------------------------------------------------------------------


def mean_fitness(ev: Evaluation) -> float:
    return sum(ev.fitness.values()) / len(ev.fitness)


def rank_key(ev: Evaluation) -> tuple[float, str]:
    """Sort key of survivors by their proxy (rung 0) score alone, best first: the higher
    mean fitness, then the lower id (the layer found first). The leaderboard ranks by
    SearchState.rank_key, which puts the ladder's higher rungs first."""
    return -mean_fitness(ev), ev.candidate_id


def hurdle_places(n: int, fraction: float) -> int:
    """How many of a rung's n scores clear its hurdle: the best `fraction`, rounded up
    (at least one), so a small rung still promotes its best."""
    return max(1, math.ceil(fraction * n - 1e-9))


def clears_hurdle(candidate_id: str, scores: dict[str, float], fraction: float,
                  min_population: int) -> bool | None:
    """Whether a candidate's score at a rung (scores: candidate id -> mean fitness at the
    rung, its own included) is among the best `fraction` of them; ties toward the lower
    candidate id. None while the rung holds fewer than min_population scores: its hurdle
    is not defined yet."""
    if len(scores) < min_population:
        return None
    order = sorted(scores, key=lambda cid: (-scores[cid], cid))
    return order.index(candidate_id) < hurdle_places(len(order), fraction)


def charges(ev: Evaluation) -> Iterator[tuple[str, float, float, str]]:
    """(stage, seconds, share, device) the ledger charges for a finished evaluation: the
    driver's stages at share 1 on its CPU, the worker's at the evaluation's share of its
    device."""
    for stage, seconds in ev.stage_seconds.items():
        on_driver = stage in DRIVER_STAGES
        yield stage, seconds, 1.0 if on_driver else ev.share, "cpu" if on_driver else ev.device


def told_status(ev: Evaluation) -> str:
    """The status the controller is told ("rejected:<stage>" for a rejection)."""
    return ev.status if ev.status != REJECTED else f"rejected:{ev.reject_stage}"


def outcome(ev: Evaluation) -> str:
    """What a finished candidate counts as, once: "duplicate" for any candidate equal to
    an earlier one (its fitness or its rejection reused), "rejected:<stage>" for a layer
    rejected on its own, else its status (survivor, failed)."""
    if ev.duplicate_of is not None:
        return "duplicate"
    return told_status(ev)


# --- what is finished ---------------------------------------------------------------------


@dataclass
class SearchState:
    """Every finished candidate, and the driver's bookkeeping beside the controller and
    the ledger."""

    candidates: dict[str, Candidate] = field(default_factory=dict)
    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)  # fingerprint -> evaluated id
    parent_run_id: str | None = None
    # Seconds the driver itself spent (checks, controller, state), not waiting for
    # workers: what bounds how many workers one driver can feed.
    driver_seconds: float = 0.0
    # The fidelity ladder: candidate id -> steps -> its result at that rung (above rung 0;
    # failed trainings included), and the promotions decided, as (candidate id, steps).
    rungs: dict[str, dict[int, RungResult]] = field(default_factory=dict)
    promoted: set[tuple[str, int]] = field(default_factory=set)

    def add_rung(self, result: RungResult) -> None:
        self.rungs.setdefault(result.candidate_id, {})[result.steps] = result

    def score(self, ev: Evaluation) -> tuple[int, dict[str, float]]:
        """(steps, fitness) at the highest rung the candidate reached: 0 and its proxy
        fitness when it never trained beyond the proxy (or every longer training failed)."""
        reached = [r for r in self.rungs.get(ev.candidate_id, {}).values() if r.fitness]
        if not reached:
            return 0, ev.fitness
        top = max(reached, key=lambda r: r.steps)
        return top.steps, top.fitness

    def rank_key(self, ev: Evaluation) -> tuple[int, float, str]:
        """Sort key of survivors, best first: the highest rung reached, then the higher
        mean fitness there, then the lower id. A candidate that stopped at a lower rung
        did not clear a hurdle the other cleared, so it ranks below whatever its shorter
        training scored."""
        steps, fitness = self.score(ev)
        return -steps, -sum(fitness.values()) / len(fitness), ev.candidate_id

    def add(self, cand: Candidate, ev: Evaluation) -> None:
        """Record a finished candidate. A layer evaluated on its own (not a duplicate, not
        a failure: that says nothing of the layer) becomes the original its equivalents
        reuse."""
        if ev.status in (SURVIVOR, REJECTED) and cand.fingerprint and ev.duplicate_of is None:
            self.fingerprints.setdefault(cand.fingerprint, cand.candidate_id)
        self.candidates[cand.candidate_id] = cand
        self.evaluations[cand.candidate_id] = ev

    def survivors(self) -> list[Evaluation]:
        return [e for e in self.evaluations.values() if e.status == SURVIVOR]

    def leaderboard(self, n: int | None = None) -> list[Evaluation]:
        return sorted(self.survivors(), key=self.rank_key)[:n]

    def best(self) -> Evaluation | None:
        """The first of the leaderboard: what `RUN:best` names."""
        board = self.leaderboard(1)
        return board[0] if board else None

    def history(self, archs: list[str]) -> list[list]:
        """The controller's history (evolution.py's to_state entries), in telling order."""
        return [[cid, c.parent_id, c.mutation, told_status(e), _listed(e.objectives(archs))]
                for (cid, c), e in zip(self.candidates.items(), self.evaluations.values())]


def _listed(fitness) -> list[float] | None:
    return None if fitness is None else list(fitness)


# --- the journal --------------------------------------------------------------------------


class Journal:
    """journal.jsonl open for appending, cut back to its committed length."""

    def __init__(self, path: Path, committed: int):
        self.path = path
        # Bytes past `committed` are a line whose state.json never came: not finished.
        with open(path, "ab") as f:
            f.truncate(committed)
        self._file = open(path, "ab")
        self.size = committed

    def append(self, cand: Candidate, ev: Evaluation) -> None:
        """Write one line to the kernel (it survives a kill of this process from here)."""
        # vars(): the records' fields as they are; to_dict (dataclasses.asdict) would copy
        # the genome deeply first, a third of a line's cost.
        self.append_entry({"candidate": vars(cand), "evaluation": vars(ev)})

    def append_entry(self, entry: dict) -> None:
        """One line of any kind ({"candidate", "evaluation"}, {"promote"}, {"rung"})."""
        line = json.dumps(entry, ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n"
        self._file.write(line)
        self._file.flush()
        self.size += len(line)

    def sync(self) -> None:
        os.fdatasync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_journal(path: Path, committed: int) -> Iterator[tuple[Candidate, Evaluation]]:
    """The committed candidates of a journal, in finishing order (the ladder's lines
    left out)."""
    for entry in journal_entries(path, committed):
        if "candidate" in entry:
            yield Candidate.from_dict(entry["candidate"]), Evaluation.from_dict(entry["evaluation"])


def journal_entries(path: Path, committed: int) -> Iterator[dict]:
    """The committed lines of a journal as dicts, in the order written."""
    try:
        with open(path, "rb") as f:
            data = f.read(committed)
    except FileNotFoundError:
        data = b""
    if len(data) != committed:
        raise EvonasError(f"{path}: shorter than state.json says ({len(data)} of {committed} "
                          f"bytes; cut by a power loss?); restore the run folder from a copy")
    for line in data.splitlines():
        yield json.loads(line)


# --- state.json ---------------------------------------------------------------------------


def read(folder: RunFolder) -> tuple[dict, SearchState] | None:
    """(state.json as a dict, the finished candidates), or None before the first save.
    Raises EvonasError for a file that is no search state."""
    raw = folder.read_state()
    if raw is None:
        return None
    state = SearchState(parent_run_id=raw.get("parent_run_id"),
                        driver_seconds=raw.get("driver_seconds", 0.0))
    if raw.get("format") == STATE_FORMAT:
        for entry in journal_entries(folder.journal_path, int(raw["journal_bytes"])):
            if "candidate" in entry:
                state.add(Candidate.from_dict(entry["candidate"]),
                          Evaluation.from_dict(entry["evaluation"]))
            elif "rung" in entry:
                state.add_rung(RungResult.from_dict(entry["rung"]))
            elif "promote" in entry:
                state.promoted.add((entry["promote"]["candidate_id"],
                                    int(entry["promote"]["steps"])))
    elif raw.get("format") == LEGACY_FORMAT:
        for cid, ev in raw["evaluations"].items():
            state.add(Candidate.from_dict(raw["candidates"][cid]), Evaluation.from_dict(ev))
    else:
        raise EvonasError(f"{folder.path}: state.json is not a search state "
                          f"({raw.get('format')!r}); start a new search in another folder")
    return raw, state


def write(folder: RunFolder, state: SearchState, *, journal_bytes: int, controller: dict,
          ledger: dict, durable: bool = True) -> None:
    """Replace state.json: the commit of every journal line up to journal_bytes.
    durable=False skips the fsyncs: the file still survives a kill of this process, not
    necessarily a power loss."""
    folder.write_state({"format": STATE_FORMAT, "controller": controller, "ledger": ledger,
                        "parent_run_id": state.parent_run_id,
                        "driver_seconds": state.driver_seconds,
                        "journal_bytes": journal_bytes}, durable=durable)


__all__ = ["STATE_FORMAT", "DRIVER_STAGES", "SearchState", "Journal", "mean_fitness",
           "rank_key", "hurdle_places", "clears_hurdle", "journal_entries", "charges",
           "told_status", "outcome", "read", "write", "read_journal"]
