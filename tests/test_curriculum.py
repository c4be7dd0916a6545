"""The easy-to-hard prompt curriculum: pools, the competence gate, resume, ranks, config errors, a real run."""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import conftest
import pytest

import eopd.data
import eopd.train
from eopd.curriculum import CurriculumBatches, CurriculumSpec, field_difficulties, stage_pools
from eopd.plan import ConfigError, plan

TINY = [*conftest.TINY_RUN, "eval.every_n_rollout_steps=0"]
compose_train = partial(conftest.compose_train, base=TINY)


def spec(**knobs) -> CurriculumSpec:
    return CurriculumSpec(**{"enabled": True, "stages": 4, "window": 2, "max_stage_steps": 5, **knobs})


def draw(sampler: CurriculumBatches, steps: int, competence) -> list[list[int]]:
    """Batches as the trainer takes them: one per step, each followed by that step's competence."""
    drawn = []
    while len(drawn) < steps:  # epoch after epoch, as Lightning reads the loader
        for batch in sampler:
            drawn.append(batch)
            sampler.observe(competence(len(drawn)))
            if len(drawn) == steps:
                break
    return drawn


# ---- pools -----------------------------------------------------------------------------------------------


def test_pools_grow_from_the_easiest_prompts_and_the_last_holds_every_prompt():
    difficulty = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.0]

    pools = stage_pools(difficulty, 4, seed=0)

    # by difficulty: 7 (0.0), 1, 5, 3, 2, 4, 6, 0 (0.9)
    assert pools == [[1, 7], [1, 3, 5, 7], [1, 2, 3, 4, 5, 7], list(range(8))]


def test_ties_at_a_bucket_boundary_are_broken_by_the_seed_not_the_data_order():
    difficulty = [0.5] * 40

    firsts = {tuple(stage_pools(difficulty, 4, seed=s)[0]) for s in range(5)}

    assert len(firsts) > 1, "the same prompts open the curriculum whatever the seed"
    assert all(len(f) == 10 for f in firsts)
    assert stage_pools(difficulty, 4, seed=3) == stage_pools(difficulty, 4, seed=3)


def test_field_difficulty_names_the_field_and_the_record_without_a_number():
    records = [{"id": "a", "level": 1}, {"id": "b", "level": "hard"}]

    with pytest.raises(ValueError, match=r"curriculum.field='level'.*record 1 \(id 'b'\).*'hard'"):
        field_difficulties(records, "level")
    assert field_difficulties([{"level": 2}, {"level": 0.5}], "level") == [2.0, 0.5]


# ---- the competence gate ------------------------------------------------------------------------------------


def test_batches_come_from_the_current_pool_and_the_pool_grows_when_the_window_mean_passes():
    difficulty = [i / 40 for i in range(40)]  # prompt i is the i-th easiest
    sampler = CurriculumBatches(40, batch_size=2, spec=spec(advance_at=0.5), seed=1, difficulty=difficulty)
    # competence 0 for 3 steps, then 1: the window of 2 reaches 0.5 after step 4 (0, 1), then after 2 more
    drawn = draw(sampler, 8, lambda step: 0.0 if step <= 3 else 1.0)

    stages = [sampler.stage_of(b) for b in range(8)]
    assert stages == [0, 0, 0, 0, 1, 1, 2, 2]
    for batch, stage in zip(drawn, stages, strict=True):
        assert set(batch) <= set(range(10 * (stage + 1))), f"stage {stage} drew {batch}"
    assert sampler.stage_starts == [0, 4, 6, 8]  # the last stage opens for the batch after these


def test_a_stage_ends_at_its_deadline_and_the_last_stage_never_ends():
    sampler = CurriculumBatches(40, batch_size=2, spec=spec(max_stage_steps=3), difficulty=[0.0] * 40)

    draw(sampler, 20, lambda step: 0.0)  # never competent

    assert sampler.stage_starts == [0, 3, 6, 9]
    assert sampler.stage == 3 and sampler.observe(1.0) is False


def test_a_metric_where_lower_is_better_advances_when_the_mean_falls_to_the_threshold():
    sampler = CurriculumBatches(
        40, batch_size=2, spec=spec(advance_at=0.3, higher_is_better=False), difficulty=[0.0] * 40
    )

    assert [sampler.observe(v) for v in (0.9, 0.2, 0.3, 0.1)] == [False, False, True, False]


def test_the_first_stage_must_hold_a_batch():
    with pytest.raises(ValueError, match="first stage holds 2 prompts, fewer than data.batch_size=4"):
        CurriculumBatches(8, batch_size=4, spec=spec(), difficulty=[0.0] * 8)


# ---- resume and ranks ---------------------------------------------------------------------------------------


def test_a_sampler_restored_from_its_state_serves_what_the_uninterrupted_one_serves():
    difficulty = [(7 * i) % 13 / 13 for i in range(30)]
    competence = lambda step: [0.1, 0.9, 0.9, 0.2, 0.8, 0.8, 0.8, 0.1][step % 8]  # noqa: E731
    knobs = dict(batch_size=3, spec=spec(stages=3, advance_at=0.7), seed=4)

    full = draw(CurriculumBatches(30, difficulty=difficulty, **knobs), 14, competence)
    first = CurriculumBatches(30, difficulty=difficulty, **knobs)
    head = draw(first, 6, competence)
    resumed = CurriculumBatches(30, **knobs)  # no difficulty: it comes from the state, as on resume
    resumed.load_state_dict(first.state_dict())
    tail = draw(resumed, 8, lambda step: competence(step + 6))

    assert head + tail == full
    assert first.stage_starts[1:], "the test never crossed a stage"


def test_ranks_share_the_stream_and_draw_disjoint_slices(monkeypatch):
    difficulty = [i / 48 for i in range(48)]

    def batches(rank: int, world: int, batch_size: int) -> list[list[int]]:
        monkeypatch.setattr(eopd.data, "rank_and_world", lambda: (rank, world))
        sampler = CurriculumBatches(
            48, batch_size=batch_size, spec=spec(stages=2), seed=2, difficulty=difficulty
        )
        return draw(sampler, 9, lambda step: 1.0 if step >= 3 else 0.0)

    one = batches(0, 1, 4)
    rank0, rank1 = batches(0, 2, 2), batches(1, 2, 2)

    assert [a + b for a, b in zip(rank0, rank1, strict=True)] == one
    assert all(not set(a) & set(b) for a, b in zip(rank0, rank1, strict=True))


def test_a_plain_loader_refuses_a_checkpoint_with_a_curriculum_and_the_reverse():
    plain_sampler = eopd.data.ResumableBatches(12, batch_size=4)
    curriculum = CurriculumBatches(12, batch_size=2, spec=spec(stages=2), difficulty=[0.0] * 12)

    with pytest.raises(ValueError, match="holds a curriculum.*curriculum=sead"):
        plain_sampler.load_state_dict(curriculum.state_dict())
    with pytest.raises(ValueError, match="no curriculum state.*curriculum=none"):
        curriculum.load_state_dict(plain_sampler.state_dict())


# ---- config ------------------------------------------------------------------------------------------------


def test_objective_sead_selects_the_curriculum_and_sead_tokens_does_not(tmp_path):
    sead = plan(compose_train(["objective=sead", "curriculum.stages=3"]), tmp_path / "a")
    tokens = plan(compose_train(["objective=sead_tokens"]), tmp_path / "b")

    assert sead.curriculum.enabled and not tokens.curriculum.enabled
    assert sead.objective.terms == tokens.objective.terms


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["curriculum.stages=4"],
            r"'curriculum.stages'=4: the easiest stage holds 3 of the 12 training prompts",
        ),
        (["curriculum.difficulty=hardest"], r"'curriculum'.*difficulty='hardest' is unknown"),
        (["curriculum.difficulty=field"], r"set curriculum.field"),
        (["curriculum.difficulty=field", "curriculum.field=level"], r"curriculum.field='level'.*record 0"),
        (["curriculum.window=abc"], r"'curriculum.window'='abc' must be an integer"),
        (["curriculum.metric=train/rewrd"], r"metric='train/rewrd' is not a step metric.*train/reward"),
        (["rollout=teacher"], r"rollout.source='teacher'.*curriculum=none"),
    ],
)
def test_bad_curriculum_config_is_refused_before_a_model_loads(overrides, message, tmp_path):
    cfg = compose_train(["curriculum=sead", "curriculum.stages=2", *overrides])

    with pytest.raises(ConfigError, match=message):
        plan(cfg, tmp_path / "run")


# ---- a real run ------------------------------------------------------------------------------------------


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_a_run_probes_the_student_then_trains_easy_to_hard_and_logs_the_stages(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_train(
        [
            "curriculum=sead",
            "curriculum.stages=3",
            "curriculum.probe_samples=2",
            "curriculum.max_stage_steps=2",
            "rollout_steps=6",
        ]
    )

    eopd.train.run(cfg, run_dir)

    rows = read_rows(run_dir)
    probe = [r for r in rows if r.get("time/curriculum_probe")]
    assert len(probe) == 1 and 0.0 <= float(probe[0]["curriculum/difficulty_mean"]) <= 1.0
    stages = [float(r["curriculum/stage"]) for r in rows if r.get("curriculum/stage")]
    pools = [float(r["curriculum/pool_size"]) for r in rows if r.get("curriculum/pool_size")]
    assert stages == [1, 1, 2, 2, 3, 3]  # the random student is never competent: the deadlines move it on
    assert pools == [4, 4, 8, 8, 12, 12]


def test_more_ranks_than_batches_of_prompts_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(eopd.data, "rank_and_world", lambda: (0, 4))
    sampler = CurriculumBatches(12, batch_size=4, spec=spec(stages=3), difficulty=[0.0] * 12)

    with pytest.raises(ValueError, match=r"data.batch_size=4 x 4 ranks exceeds the 12 training prompts"):
        next(iter(sampler))
