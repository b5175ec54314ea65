"""Reading a search's run folder: its candidates, their verdicts, the leaderboard.

Read-only: takes no lock, so `evonas top RUN` and `evonas show RUN:ID` work while the
search runs (state.json is replaced atomically and names how much of the journal is
committed: state.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from evonas.errors import EvonasError
from evonas.layers.genome import Genome
from evonas.search import state as records
from evonas.search.config import SearchConfig
from evonas.search.records import Candidate, Evaluation
from evonas.search.runfolder import RunFolder
from evonas.search.state import SearchState


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
        return [(self.state.candidates[e.candidate_id], e) for e in self.state.leaderboard(n)]

    def counts(self) -> Counter:
        """Finished candidates by state.outcome, as the search's progress line counts them."""
        return Counter(records.outcome(e) for e in self.state.evaluations.values())


def load_run(path: str | Path) -> Run:
    folder = RunFolder.open(path, lock=False)
    config = SearchConfig.from_dict(folder.read_config())
    loaded = records.read(folder)
    if loaded is None:
        raise EvonasError(f"{path}: holds no search state yet")
    return Run(Path(path), config, loaded[1])


def split_run_spec(spec: str) -> tuple[str, str] | None:
    """("runs/s1", "c000012") for "runs/s1:c000012" when runs/s1 is a run folder."""
    if ":" not in spec:
        return None
    path, cid = spec.rsplit(":", 1)
    if not (Path(path) / "config.json").is_file():
        return None
    return path, cid


__all__ = ["Run", "load_run", "split_run_spec"]
