"""An easy-to-hard prompt curriculum gated by the student's competence (SEAD's third component).

The training prompts are ranked by difficulty and cut into `stages` equal buckets, easiest first. Rollout
batches are drawn from a pool that starts as the easiest bucket and takes in the next one when the student
is competent on the current pool: the mean of a logged metric (default `train/reward`, the grader's score
of the rollout samples) over the last `window` rollout steps of the stage passes `advance_at`, or, so that
a run always reaches every prompt, the stage has lasted `max_stage_steps` rollout steps.

    python -m eopd.train objective=sead                   # SEAD's preset turns it on (conf/curriculum/sead.yaml)
    python -m eopd.train curriculum=sead objective=eopd   # any objective can use it

Difficulty (`difficulty`):
    pass_rate  1 - the initial student's pass rate over `probe_samples` samples per training prompt, measured
               once before the first update with the training sampling settings (the probe costs
               n_train x probe_samples generations; it is logged as `time/curriculum_probe`)
    field      a numeric field of each prompt record (`field`, e.g. a dataset's difficulty level)

SEAD (2606.28562) names the curriculum "competence-gated" and "easy-to-hard"; its full text was not
available, so the difficulty measure, the buckets, the gate and the deadline here are this project's
reading, stated in docs/objectives.md.

`CurriculumBatches` draws the batches; the callback `eopd.callbacks.Curriculum` measures the difficulties
before the first update and reports each step's competence to it.

The sampler keeps everything a resumed run needs in the dataloader's state (Lightning stores it in every
checkpoint): the difficulties, the batch index at which each stage began (which gives the stage) and
the competence values of the current stage. Batch b depends only on that state, the seed and b, so a resumed run draws
what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Sampler

from eopd import data

DIFFICULTIES = ("pass_rate", "field")
# Step metrics every objective logs (train/reward: when the trainer grades, as `eopd.train` always does),
# so that a curriculum's competence metric is checked with the config, before the probe's cost.
COMPETENCE_METRICS = (
    "train/reward", "entropy/student", "entropy/student_high_frac", "div/fkl", "div/rkl",
    "div/fkl_high_entropy", "div/k1", "rollout/len_mean", "rollout/truncated_frac",
)  # fmt: skip


@dataclass(frozen=True)
class CurriculumSpec:
    """The curriculum's knobs (conf/curriculum/*.yaml).

    Attributes:
        enabled: False draws every batch from all training prompts (the default run).
        difficulty: "pass_rate" (probed from the initial student) or "field" (a record field).
        field: the record field read when difficulty="field"; larger is harder.
        probe_samples: samples per prompt of the pass-rate probe.
        stages: equal buckets of prompts by difficulty; the pool grows by one bucket per stage.
        metric: the logged step metric that measures competence (one of `COMPETENCE_METRICS`).
        advance_at: the competence needed to take in the next bucket.
        higher_is_better: True: advance when the metric's window mean >= advance_at; False: <=.
        window: rollout steps of the current stage averaged; a stage lasts at least this long, unless
            the deadline comes first.
        max_stage_steps: a stage lasts at most this many rollout steps (the deadline), so that the last
            bucket is reached by (stages - 1) x max_stage_steps at the latest.
    """

    enabled: bool = False
    difficulty: str = "pass_rate"
    field: str | None = None
    probe_samples: int = 4
    stages: int = 4
    metric: str = "train/reward"
    advance_at: float = 0.75
    higher_is_better: bool = True
    window: int = 5
    max_stage_steps: int = 30

    def __post_init__(self) -> None:
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty={self.difficulty!r} is unknown; allowed: {', '.join(DIFFICULTIES)}")
        if self.difficulty == "field" and not self.field:
            raise ValueError("difficulty='field' reads a record field: set curriculum.field (e.g. level)")
        for name in ("probe_samples", "stages", "window", "max_stage_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.metric not in COMPETENCE_METRICS:
            raise ValueError(
                f"metric={self.metric!r} is not a step metric every objective logs; allowed: "
                + ", ".join(COMPETENCE_METRICS)
            )
        if not math.isfinite(self.advance_at):
            raise ValueError(f"advance_at={self.advance_at!r} must be a finite number")


def field_difficulties(records: Sequence[dict[str, Any]], field: str) -> list[float]:
    """Each record's `field` as a float; a ValueError names the first record without a number there."""
    values = []
    for index, record in enumerate(records):
        value = record.get(field)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(
                f"curriculum.field={field!r}: training record {index} (id {record.get('id', index)!r}) has "
                f"{value!r} there, not a number; pick a numeric field or difficulty=pass_rate"
            )
        values.append(float(value))
    return values


def stage_pools(difficulty: Sequence[float], stages: int, seed: int) -> list[list[int]]:
    """The pool of each stage: indices of the easiest (s + 1) / stages of the prompts, for s < stages.

    Prompts are ranked by difficulty, ties in a seeded random order (so that a bucket boundary inside a
    tie does not follow the data's order); the last pool holds every prompt.
    """
    n = len(difficulty)
    tie_order = random.Random(f"eopd-curriculum-ties:{seed}").sample(range(n), n)
    tie_rank = {index: rank for rank, index in enumerate(tie_order)}
    ranked = sorted(range(n), key=lambda i: (difficulty[i], tie_rank[i]))
    return [sorted(ranked[: n * (s + 1) // stages]) for s in range(stages)]


class CurriculumBatches(Sampler[list[int]]):
    """Batches of prompt indices from a pool that grows with the student's competence; resumable.

    Each stage has its own endless stream of batches: its pool shuffled afresh every pass (seeded by the
    seed, the stage and the pass), the last incomplete batch of a pass dropped. Batch b comes from the
    stream of the stage b belongs to, at position b - (the batch index at which that stage began).

    An epoch, as Lightning counts it, is as many batches as one pass over all the prompts; the pool does not
    change what an epoch is. Under data parallelism the ranks share the stream: the k-th batch of rank r is
    slice r of the k-th run of world x batch_size prompts of the pool.

    `difficulty` is None until it is measured (`set_difficulty`) or restored from a checkpoint.
    """

    def __init__(
        self, n: int, *, batch_size: int, spec: CurriculumSpec, seed: int = 0, difficulty=None
    ) -> None:
        self.n = n
        self.batch_size = batch_size
        self.spec = spec
        self.seed = seed
        self.served = 0
        self.stage_starts: list[int] = [0]  # the batch index at which each stage began
        self.competence: list[float] = []  # the metric's values in the current stage
        self.difficulty: list[float] | None = None
        self._pools: list[list[int]] = []
        self._shuffled: tuple[tuple[int, int], list[int]] | None = None  # (stage, pass) -> its order
        if difficulty is not None:
            self.set_difficulty(difficulty)

    def set_difficulty(self, difficulty: Sequence[float]) -> None:
        if len(difficulty) != self.n:
            raise ValueError(f"{len(difficulty)} difficulties for {self.n} prompts")
        self.difficulty = [float(d) for d in difficulty]
        self._pools = stage_pools(self.difficulty, self.spec.stages, self.seed)
        self._shuffled = None
        smallest = len(self._pools[0])
        if smallest < self.batch_size:
            raise ValueError(
                f"curriculum.stages={self.spec.stages}: the first stage holds {smallest} prompts, fewer than "
                f"data.batch_size={self.batch_size}; lower curriculum.stages or data.batch_size"
            )

    @property
    def stage(self) -> int:
        """The current stage: 0 until the first advance."""
        return len(self.stage_starts) - 1

    def pool(self, stage: int | None = None) -> list[int]:
        """Indices of the prompts batches are drawn from in `stage` (default: the current one)."""
        return self._pools[self.stage if stage is None else stage]

    def stage_of(self, batch_index: int) -> int:
        """The stage batch `batch_index` was (or will be) drawn in."""
        return sum(1 for start in self.stage_starts[1:] if start <= batch_index)

    def __len__(self) -> int:
        return self.n // (self.batch_size * data.rank_and_world()[1])

    def __iter__(self) -> Iterator[list[int]]:
        if self.difficulty is None:
            raise RuntimeError("the curriculum's difficulties are not set: the Curriculum callback sets them")
        if len(self) == 0:
            raise ValueError(
                f"data.batch_size={self.batch_size} x {data.rank_and_world()[1]} ranks exceeds the {self.n} "
                "training prompts; lower data.batch_size"
            )
        end = (self.served // len(self) + 1) * len(self)
        while self.served < end:  # each batch computed when drawn: an advance applies to the next one
            batch = self.batch(self.served)
            self.served += 1
            yield batch

    def batch(self, batch_index: int) -> list[int]:
        """The prompt indices of batch `batch_index` on this rank."""
        rank, world = data.rank_and_world()
        stage = self.stage_of(batch_index)
        pool = self._pools[stage]
        per_pass = len(pool) // (self.batch_size * world)
        if per_pass == 0:
            raise ValueError(
                f"curriculum stage {stage} holds {len(pool)} prompts, fewer than data.batch_size="
                f"{self.batch_size} x {world} ranks; lower curriculum.stages or data.batch_size"
            )
        passes, k = divmod(batch_index - self.stage_starts[stage], per_pass)
        order = self._order(stage, passes)
        first = (k * world + rank) * self.batch_size
        return order[first : first + self.batch_size]

    def _order(self, stage: int, passes: int) -> list[int]:
        """The stage's pool shuffled for its pass `passes`; kept for the batches of the same pass."""
        key = (stage, passes)
        if self._shuffled is None or self._shuffled[0] != key:
            pool = self._pools[stage]
            seeded = random.Random(f"eopd-curriculum:{self.seed}:{stage}:{passes}")
            self._shuffled = (key, seeded.sample(pool, len(pool)))
        return self._shuffled[1]

    def observe(self, value: float) -> bool:
        """Record the competence metric of the step just trained; advance a stage when due. True if it did."""
        if self.stage >= self.spec.stages - 1:
            return False
        self.competence.append(float(value))
        spec = self.spec
        window = self.competence[-spec.window :]
        mean = sum(window) / len(window)
        competent = len(window) == spec.window and (
            mean >= spec.advance_at if spec.higher_is_better else mean <= spec.advance_at
        )
        if not (competent or len(self.competence) >= spec.max_stage_steps):
            return False
        self.stage_starts.append(self.served)  # the next batch drawn is the new stage's first
        self.competence = []
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches_served": self.served,
            "curriculum": {
                "difficulty": self.difficulty,
                "stage_starts": list(self.stage_starts),
                "competence": list(self.competence),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.served = int(state["batches_served"])
        saved = state.get("curriculum")
        if saved is None:
            raise ValueError(
                "the checkpoint's prompt loader has no curriculum state: it was written by a run without "
                "the curriculum; resume with the same curriculum config (curriculum=none)"
            )
        if saved["difficulty"] is not None:
            self.set_difficulty(saved["difficulty"])
        self.stage_starts = [int(s) for s in saved["stage_starts"]]
        self.competence = [float(c) for c in saved["competence"]]


__all__ = ["CurriculumBatches", "CurriculumSpec", "field_difficulties", "stage_pools"]
