"""What a search knows about each candidate: the records every part of the search shares.

A Candidate is proposed by the controller (evolution.py); an Evaluation is what the
workers (evaluate.py, run through runtime/backends.py) or the driver's cheap checks
found about it.
Rejection is data, never an exception: every candidate ends with a status, its cost per
stage, and its lineage. Both records round-trip through plain JSON types, because they are
written to the run folder's state and sent to Ray workers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SURVIVOR, REJECTED, DUPLICATE, FAILED = "survivor", "rejected", "duplicate", "failed"
STATUSES = (SURVIVOR, REJECTED, DUPLICATE, FAILED)

# Rejection stages, cheapest first. "duplicate" reuses the fitness of an equivalent
# candidate (same functional fingerprint) instead of training again.
STAGES = ("static", "numeric", "causal", "duplicate", "stability", "quality", "proxy")


@dataclass
class Candidate:
    candidate_id: str
    genome: dict  # Genome.to_dict()
    parent_id: str | None
    mutation: str  # mutation name, "random", or "zoo:<name>"
    structural_hash: str = ""
    fingerprint: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        return cls(**d)


@dataclass
class Evaluation:
    """The outcome of one candidate.

    fitness: proxy validation accuracy per architecture (the objectives), for survivors
        and duplicates; None otherwise.
    stage_seconds: measured seconds spent in each stage this candidate reached.
    share: the device share the evaluation held (1 CPU task = 1.0, --gpus-per-eval 0.25
        = 0.25), so the ledger charges seconds * share device-seconds.
    metrics: anything else worth browsing (accuracy at the quality check per arch, the
        largest gradient norm of the stability test, ...).
    """

    candidate_id: str
    status: str
    fitness: dict[str, float] | None = None
    reject_stage: str | None = None
    reject_reason: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    share: float = 1.0
    metrics: dict[str, float] = field(default_factory=dict)
    duplicate_of: str | None = None
    worker: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")

    @property
    def seconds(self) -> float:
        return sum(self.stage_seconds.values())

    def objectives(self, archs: list[str]) -> tuple[float, ...] | None:
        if self.fitness is None:
            return None
        return tuple(self.fitness[a] for a in archs)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Evaluation":
        return cls(**d)


@dataclass
class RungResult:
    """A promoted candidate's training at a longer rung of the fidelity ladder.

    steps: the rung's training length. fitness: per architecture, the mean over the
        seeds trained (scores); None when the training failed (reason says why), and the
        candidate then stays at the rung below.
    scores: per architecture, one score per seed (seed 0 is the search's common seed),
        so a rung trained on several seeds says its spread.
    seconds / device / share: what the ledger charges to stage `rung<steps>`.
    """

    candidate_id: str
    steps: int
    fitness: dict[str, float] | None
    scores: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"
    share: float = 1.0
    worker: str = ""
    reason: str | None = None

    @property
    def stage(self) -> str:
        return f"rung{self.steps}"

    def spread(self) -> dict[str, dict[str, float]]:
        """Per architecture: std (population), min and max of the seeds' scores."""
        out = {}
        for arch, values in self.scores.items():
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
            out[arch] = {"std": std, "min": min(values), "max": max(values)}
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RungResult":
        return cls(**d)
