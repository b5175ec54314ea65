"""Reading a search's run folder: its candidates, their verdicts, the leaderboard.

Read-only: takes no lock, so `evonas top RUN` and `evonas show RUN:ID` work while the
search runs (the state file is replaced atomically, never half-written).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from evonas.errors import EvonasError
from evonas.layers.genome import Genome
from evonas.search.records import REJECTED, SURVIVOR, Candidate, Evaluation
from evonas.search.runfolder import RunFolder
from evonas.search.config import SearchConfig
from evonas.search.driver import STATE_FORMAT, SearchState, mean_fitness


@dataclass
class Run:
    path: Path
    config: SearchConfig
    state: SearchState

    def candidate(self, cid: str) -> tuple[Candidate, Evaluation]:
        if cid == "best":
            best = self.state.best()
            if best is None:
                raise EvonasError(f"{self.path}: no survivor yet, so no best layer; "
                                  f"`evonas top {self.path}` shows what was evaluated")
            cid = best.candidate_id
        if cid not in self.state.candidates:
            raise EvonasError(f"{self.path} has no finished candidate {cid!r}; "
                              f"`evonas top {self.path}` lists them")
        return self.state.candidates[cid], self.state.evaluations[cid]

    def genome(self, cid: str) -> Genome:
        cand, _ = self.candidate(cid)
        return Genome.from_dict(cand.genome).renamed(f"{self.path.name}_{cand.candidate_id}")

    def leaderboard(self, n: int) -> list[tuple[Candidate, Evaluation]]:
        scored = [e for e in self.state.evaluations.values() if e.status == SURVIVOR]
        scored.sort(key=lambda e: (-mean_fitness(e), e.candidate_id))
        return [(self.state.candidates[e.candidate_id], e) for e in scored[:n]]

    def counts(self) -> tuple[Counter, Counter]:
        evs = self.state.evaluations.values()
        return (Counter(e.status for e in evs),
                Counter(e.reject_stage for e in evs if e.status == REJECTED))


def load_run(path: str | Path) -> Run:
    folder = RunFolder.open(path, lock=False)
    config = SearchConfig.from_dict(folder.read_config())
    raw = folder.read_state()
    if raw is None or raw.get("format") != STATE_FORMAT:
        raise EvonasError(f"{path}: holds no search state yet")
    state = SearchState.from_dict(raw)
    return Run(Path(path), config, state)


def split_run_spec(spec: str) -> tuple[str, str] | None:
    """("runs/s1", "c000012") for "runs/s1:c000012" when runs/s1 is a run folder."""
    if ":" not in spec:
        return None
    path, cid = spec.rsplit(":", 1)
    if not (Path(path) / "config.json").is_file():
        return None
    return path, cid


__all__ = ["Run", "load_run", "split_run_spec"]
