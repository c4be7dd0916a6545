"""DistillModule on a tiny random pair: what one step does to the student, and what it must not do to the teacher."""

import math

import lightning as L
import pytest
import torch

from eopd.models import build_causal_lm
from eopd.module import DistillModule
from eopd.objectives import LinearLogits, preset
from eopd.scoring import output_weight, response_hidden_states
from eopd.specs import OptimSpec, PairSpec, RolloutSpec, UpdateSpec

V, PAD, EOS, TEACHER_EOS = 40, 0, 1, 2


def tiny_pair(seed=0):
    student = build_causal_lm(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, seed=seed)
    teacher = build_causal_lm(vocab_size=V + 8, hidden_size=48, num_layers=2, num_heads=4, seed=seed + 1)
    return student, teacher  # the teacher's output layer is padded past the shared vocabulary


def prompts(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(2, 6, (1,), generator=g))
        ids = torch.randint(3, V, (length,), generator=g).tolist()
        rows.append({"prompt_ids": ids, "teacher_prompt_ids": [3, *ids]})  # teacher format differs
    return rows


def make_module(objective="eopd", **kw):
    student, teacher = tiny_pair()
    pair = PairSpec(
        vocab_size=V,
        pad_token_id=PAD,
        student_eos_ids=(EOS,),
        teacher_eos_ids=(TEACHER_EOS,),
        remap_end_token=(EOS, TEACHER_EOS),
    )
    return DistillModule(
        student,
        teacher,
        preset(objective, top_k=8),
        pair=pair,
        rollout=kw.pop("rollout", RolloutSpec(max_new_tokens=10)),
        update=kw.pop("update", UpdateSpec(mini_batch_size=4)),
        optim=OptimSpec(lr=1e-3, schedule="constant"),
        **kw,
    )


def fit(module, tmp_path, rollout_steps=1, batch_size=8, callbacks=()):
    loader = torch.utils.data.DataLoader(
        prompts(batch_size * rollout_steps), batch_size=batch_size, collate_fn=list
    )
    steps = rollout_steps * module.update_spec.steps_per_rollout(batch_size)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True),
            *callbacks,
        ],
    )
    trainer.fit(module, loader)
    return trainer


def test_one_rollout_step_trains_the_student_and_leaves_the_teacher_alone(tmp_path):
    module = make_module()
    student_before = [p.detach().clone() for p in module.student.parameters()]
    teacher_before = [p.detach().clone() for p in module.teacher.parameters()]
    trainer = fit(module, tmp_path)

    assert trainer.global_step == 2  # 8 prompts / mini-batch 4 = 2 optimizer steps for one rollout batch
    assert torch.isfinite(torch.tensor(float(trainer.lightning_module.last_logs["train/loss"])))
    assert any(
        not torch.equal(a, b) for a, b in zip(student_before, module.student.parameters(), strict=True)
    )
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, module.teacher.parameters(), strict=True))
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    assert not module.teacher.training  # still in eval mode after fit
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimizer_params & {id(p) for p in module.teacher.parameters()}
    assert optimizer_params == {id(p) for p in module.student.parameters()}
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"] and not any(k.startswith("teacher") for k in checkpoint["state_dict"])
    assert all(k.startswith("student.") for k in checkpoint["state_dict"])
    assert checkpoint["eopd"]["rollout_step"] == 1


def objective_on(module, rollout, teacher, old) -> float:
    """The module's objective on a whole rollout batch at the student's current weights."""
    with torch.no_grad():
        hidden = response_hidden_states(module.student, rollout)
        full = LinearLogits(teacher.hidden, module._teacher_weight(), V)
        return float(
            module.objective(
                student=LinearLogits(hidden, output_weight(module.student), V),
                tokens=rollout.responses,
                mask=rollout.response_mask,
                teacher_stats=teacher.stats,
                teacher=full if module.objective.needs_teacher_logits else None,
                old_logprobs=old,
                gate_weights=teacher.gates,
            ).loss
        )


@pytest.mark.parametrize("objective", ["opd", "fkl", "jsd"])
def test_other_objectives_train(tmp_path, objective):
    module = make_module(objective)
    trainer = fit(module, tmp_path)
    assert torch.isfinite(torch.tensor(float(trainer.lightning_module.last_logs["train/loss"])))
    term = module.objective.terms[0].name
    assert trainer.lightning_module.last_logs[f"loss/{term}"] == pytest.approx(
        trainer.lightning_module.last_logs["train/loss"]
    )  # one term: the loss is that term, logged under its name

    # The update lowers the objective it optimises, on the rollout batch it was given.
    module = make_module(objective)
    optim = module.configure_optimizers()
    module.optimizers = lambda: optim["optimizer"]
    module.lr_schedulers = lambda: optim["lr_scheduler"]["scheduler"]
    module.manual_backward = lambda loss: loss.backward()
    batch = prompts(8)
    rollout, _ = module.make_rollout(batch)
    teacher = module.score_teacher(rollout, batch)
    old, _ = module.score_old_policy(rollout, teacher)
    before = objective_on(module, rollout, teacher, old)
    module.update(rollout, teacher, old)
    assert objective_on(module, rollout, teacher, old) < before


def test_off_policy_and_mixed_rollouts(tmp_path):
    module = make_module(rollout=RolloutSpec(source="teacher", max_new_tokens=10))
    trainer = fit(module, tmp_path)
    assert float(trainer.lightning_module.last_logs["rollout/on_policy"]) == 0.0
    module = make_module(rollout=RolloutSpec(source="mix", lmbda=0.0, max_new_tokens=10))
    assert float(fit(module, tmp_path / "mix").lightning_module.last_logs["rollout/on_policy"]) == 0.0


def gradients_of_one_update(micro_batch_size):
    """The gradients the optimizer would apply at the first update of a fixed rollout batch."""
    module = make_module(update=UpdateSpec(mini_batch_size=4, micro_batch_size=micro_batch_size))
    module.student.train()
    batch = prompts(4)
    rollout, _ = module.make_rollout(batch)
    teacher = module.score_teacher(rollout, batch)
    old, _ = module.score_old_policy(rollout, teacher)
    captured = {}

    class Capture:
        param_groups = [{"lr": 0.0}]

        def step(self):
            captured["grads"] = [p.grad.clone() for p in module.student.parameters()]

        def zero_grad(self, set_to_none=True):
            module.student.zero_grad(set_to_none=True)

    module.optimizers = lambda: Capture()
    module.lr_schedulers = lambda: type("NoSchedule", (), {"step": lambda self: None})()
    module.manual_backward = lambda loss: loss.backward()
    module.update(rollout, teacher, old)
    return captured["grads"]


def test_micro_batches_give_the_same_update_as_whole_mini_batches():
    """Gradient accumulation over micro-batches is normalised by the mini-batch's token count."""
    whole, accumulated = gradients_of_one_update(None), gradients_of_one_update(1)
    for a, b in zip(accumulated, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_teacher_scores_its_own_prompt_format_with_the_end_token_remapped():
    module = make_module()
    batch = prompts(4)
    rollout, _ = module.make_rollout(batch)
    seen = {}
    inner = module.teacher.model.forward

    def inner_spy(*args, **kwargs):
        seen["ids"] = kwargs["input_ids"]
        return inner(*args, **kwargs)

    module.teacher.model.forward = inner_spy
    module.score_teacher(rollout, batch)
    ids = seen["ids"]
    responses = ids[:, -rollout.response_length :]
    mask = rollout.response_mask
    assert not (responses[mask] == EOS).any()  # the student's end token never reaches the teacher
    ended = (rollout.responses == EOS) & mask
    assert torch.equal(responses[ended], torch.full_like(responses[ended], TEACHER_EOS))
    for row, item in enumerate(batch):  # teacher format: the extra leading token 3
        prompt = ids[row, : ids.shape[1] - rollout.response_length]
        assert (
            prompt[prompt != PAD].tolist()[-len(item["teacher_prompt_ids"]) :] == item["teacher_prompt_ids"]
        )


def test_samples_stay_inside_the_shared_vocabulary():
    module = make_module()
    with torch.no_grad():  # make the teacher's padded rows the most likely tokens
        output_weight(module.teacher)[V:] = 0
    rollout, _ = module.make_rollout(prompts(8))
    assert int(rollout.responses.max()) < V


def test_bad_construction_is_reported():
    student, teacher = tiny_pair()
    pair = PairSpec(vocab_size=V, pad_token_id=PAD, student_eos_ids=(EOS,))
    with pytest.raises(ValueError, match="temperature"):
        DistillModule(student, teacher, preset("eopd", temperature=0.7, top_k=8), pair=pair)
    with pytest.raises(ValueError, match="fewer than the shared vocabulary"):
        DistillModule(
            student,
            teacher,
            preset("eopd", top_k=8),
            pair=PairSpec(vocab_size=V + 20, pad_token_id=PAD, student_eos_ids=(EOS,)),
        )
    with pytest.raises(ValueError, match="outside the shared vocabulary"):
        PairSpec(vocab_size=V, pad_token_id=V + 1, student_eos_ids=(EOS,))
    with pytest.raises(ValueError, match="rollout.source='bogus'"):
        RolloutSpec(source="bogus")
    with pytest.raises(ValueError, match="micro_batch_size=3"):
        UpdateSpec(mini_batch_size=4, micro_batch_size=3)
    with pytest.raises(ValueError, match="not a multiple of update.mini_batch_size=3"):
        UpdateSpec(mini_batch_size=3).steps_per_rollout(8)


def test_lr_schedule_warmup_and_cosine():
    spec = OptimSpec(lr=1.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    assert spec.factor(0, 12) == pytest.approx(0.5)
    assert spec.factor(1, 12) == pytest.approx(1.0)
    assert spec.factor(2, 12) == pytest.approx(1.0)
    assert spec.factor(7, 12) == pytest.approx(0.55)
    assert spec.factor(12, 12) == pytest.approx(0.1)
    assert OptimSpec(schedule="constant").factor(50, 10) == 1.0


def adamw_reference(params, grads_per_step, spec):
    """AdamW from its definition in float64: decoupled weight decay, bias-corrected moments."""
    (b1, b2), eps = spec.betas, 1e-8
    params = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for p, g, m_i, v_i in zip(params, grads, m, v, strict=True):
            g = g.double()
            m_i.mul_(b1).add_((1 - b1) * g)
            v_i.mul_(b2).add_((1 - b2) * g * g)
            p.mul_(1 - spec.lr * spec.weight_decay)
            p.sub_(spec.lr * (m_i / (1 - b1**t)) / ((v_i / (1 - b2**t)).sqrt() + eps))
    return params


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_is_fused_on_the_cpu_unless_turned_off_and_steps_as_its_definition(fused):
    spec = OptimSpec(lr=1e-3, weight_decay=0.1, fused=fused)
    model = build_causal_lm(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    optimizer = spec.adamw(params)
    assert bool(optimizer.defaults["fused"]) is fused
    g = torch.Generator().manual_seed(0)
    steps = [[torch.randn(p.shape, generator=g) * 10.0**-k for p in params] for k in range(1, 4)]
    for grads in steps:
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
        optimizer.step()
    expected = adamw_reference(start, steps, spec)
    for p, want in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="optimizer.fused='yes'"):
        OptimSpec(fused="yes")


def test_the_teacher_scores_the_student_end_token_as_its_own():
    """With the remap, log p_te(y_t) at the student's end token is the teacher's log-prob of ITS end token."""
    module = make_module()
    batch = prompts(8)
    rollout, _ = module.make_rollout(batch)
    stats = module.score_teacher(rollout, batch).stats
    ended = (rollout.responses == EOS) & rollout.response_mask
    assert ended.any()
    from eopd.batch import with_prompts
    from eopd.scoring import response_logits

    copy = with_prompts(rollout, [row["teacher_prompt_ids"] for row in batch], pad_token_id=PAD)
    logp = torch.log_softmax(response_logits(module.teacher, copy)[..., :V].float(), -1)
    torch.testing.assert_close(
        stats.token_logprobs[ended], logp[..., TEACHER_EOS][ended], rtol=1e-4, atol=1e-4
    )
    top1 = stats.topk_indices[..., 0][ended]  # the teacher's favourite there, in the student's ids
    assert not (top1 == TEACHER_EOS).any() or (logp[..., TEACHER_EOS][ended] < logp[..., EOS][ended]).all()
    # Everywhere, the top-k is the teacher's in the student's ids: the two end tokens' columns swapped.
    swapped = logp.clone()
    swapped[..., [EOS, TEACHER_EOS]] = logp[..., [TEACHER_EOS, EOS]]
    mask = rollout.response_mask
    expected = swapped.gather(-1, stats.topk_indices)[mask]
    torch.testing.assert_close(stats.topk_logprobs[mask], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(stats.topk_indices[mask], swapped.topk(stats.k, dim=-1).indices[mask])


def test_a_teacher_end_id_written_mid_response_is_read_as_the_teachers_end_and_scored_by_the_swapped_row():
    """docs/pairs-and-memory.md: the remap translates the student's end id only; a teacher end id the
    student writes stays in the teacher's copy (the teacher reads its own end of turn there) and its
    log-prob is read from the swapped row, the teacher's log-prob of the student's end token."""
    from eopd.batch import RolloutBatch, with_prompts
    from eopd.scoring import remap_end_token, response_logits

    module = make_module()
    batch = prompts(1)
    response = [7, TEACHER_EOS, 9, 11, EOS]  # the teacher's end id in the middle, the student's at the end
    prompt = batch[0]["prompt_ids"]
    rollout = RolloutBatch(
        input_ids=torch.tensor([prompt + response]),
        attention_mask=torch.ones(1, len(prompt) + len(response), dtype=torch.long),
        response_mask=torch.ones(1, len(response), dtype=torch.bool),
        prompt_length=len(prompt),
        truncated=torch.tensor([False]),
    )
    stats = module.score_teacher(rollout, batch).stats

    copy = with_prompts(rollout, [batch[0]["teacher_prompt_ids"]], pad_token_id=PAD)
    ids = remap_end_token(copy.input_ids, copy.response_mask, from_id=EOS, to_id=TEACHER_EOS)
    assert ids[0, -len(response) :].tolist() == [7, TEACHER_EOS, 9, 11, TEACHER_EOS]  # what the teacher reads
    logp = torch.log_softmax(response_logits(module.teacher, copy, input_ids=ids)[..., :V].float(), -1)[0]
    got = stats.token_logprobs[0]
    torch.testing.assert_close(got[1], logp[1, EOS], rtol=1e-4, atol=1e-4)  # mid-response: the swapped row
    torch.testing.assert_close(got[4], logp[4, TEACHER_EOS], rtol=1e-4, atol=1e-4)  # the end: its own end
    torch.testing.assert_close(got[[0, 2, 3]], logp[[0, 2, 3], [7, 9, 11]], rtol=1e-4, atol=1e-4)


class _IdsTokenizer:
    """Decodes token ids to their numbers, for reward functions in tests."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


@pytest.mark.parametrize("objective", ["tip", "sead", "reopold"])
def test_gates_on_the_student_side_are_decided_at_the_rollout_policy(tmp_path, objective):
    module = make_module(objective)
    assert module.objective.needs_student_signals
    batch = prompts(8)
    rollout, _ = module.make_rollout(batch)
    teacher = module.score_teacher(rollout, batch)
    assert teacher.gates is None  # not decidable from the teacher alone
    old, diagnostics = module.score_old_policy(rollout, teacher)
    # The same gates as the objective decides by itself on the whole batch at these weights.
    with torch.no_grad():
        hidden = response_hidden_states(module.student, rollout)
        scores = module.objective.score_rollout(
            student=LinearLogits(hidden, output_weight(module.student), V),
            tokens=rollout.responses,
            mask=rollout.response_mask,
            teacher_stats=teacher.stats,
            teacher=LinearLogits(teacher.hidden, module._teacher_weight(), V),
        )
    torch.testing.assert_close(teacher.gates, scores.gate_weights)
    assert 0 < diagnostics.means()["gate/fraction"] <= 1
    trainer = fit(make_module(objective), tmp_path)
    logs = trainer.lightning_module.last_logs
    assert math.isfinite(logs["train/loss"])
    terms = [f"loss/{t.name}" for t in module.objective.terms]
    assert sum(logs[k] for k in terms) == pytest.approx(logs["train/loss"], rel=1e-5, abs=1e-7)


def test_grpo_samples_each_prompt_several_times_grades_them_and_trains_on_the_group_advantage(tmp_path):
    graded = []

    def reward(records, texts):
        graded.append([r["prompt_ids"] for r in records])
        return [float("7" in text.split()) for text in texts]  # any toy verifiable reward

    module = make_module(
        "grpo",
        rollout=RolloutSpec(max_new_tokens=10, n_samples=2),
        tokenizer=_IdsTokenizer(),
        reward=reward,
    )
    student_before = [p.detach().clone() for p in module.student.parameters()]
    trainer = fit(module, tmp_path)
    assert trainer.global_step == 4  # 8 prompts x 2 samples / mini-batch 4
    rows = graded[0]
    assert len(rows) == 16 and all(rows[2 * i] == rows[2 * i + 1] for i in range(8))  # groups are adjacent
    logs = trainer.lightning_module.last_logs
    assert 0.0 <= logs["train/reward"] <= 1.0 and "train/reward_flat_groups" in logs
    assert any(
        not torch.equal(a, b) for a, b in zip(student_before, module.student.parameters(), strict=True)
    )
    with pytest.raises(ValueError, match="rollout.n_samples >= 2"):
        make_module("grpo", tokenizer=_IdsTokenizer(), reward=reward)
    with pytest.raises(ValueError, match="reward=..."):
        make_module("grpo", rollout=RolloutSpec(max_new_tokens=10, n_samples=2))
    with pytest.raises(ValueError, match="tokenizer=..."):
        make_module("grpo", rollout=RolloutSpec(max_new_tokens=10, n_samples=2), reward=reward)


# ---- the first mini-batch scored by its own forward ------------------------------------------------------


def train_recording_the_old_pass(tmp_path, monkeypatch, reuse: bool, mini_batch_size: int, objective="eopd"):
    """Two rollout steps; returns the logs of each step, the final weights and the rows each
    rollout-policy pass (eval mode, no grad) scored."""
    import eopd.module as module_file
    import eopd.scoring

    scored_rows = []
    original = eopd.scoring.response_hidden_states

    def recording(model, batch, **kw):
        if not model.training:
            scored_rows.append(batch.batch_size)
        return original(model, batch, **kw)

    monkeypatch.setattr(module_file, "response_hidden_states", recording)
    module = make_module(
        objective, update=UpdateSpec(mini_batch_size=mini_batch_size, reuse_on_policy_forward=reuse)
    )
    logs = []

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            logs.append(dict(pl_module.last_logs))

    fit(module, tmp_path / ("reused" if reuse else "separate"), rollout_steps=2, callbacks=[Keep()])
    return logs, [p.detach().clone() for p in module.student.parameters()], scored_rows


@pytest.mark.parametrize("objective", ["eopd", "fkl"])
@pytest.mark.parametrize("mini_batch_size", [8, 4])
def test_the_first_mini_batch_scored_by_its_own_forward_trains_and_logs_what_a_separate_pass_gives(
    tmp_path, monkeypatch, mini_batch_size, objective
):
    reused, weights, rows = train_recording_the_old_pass(
        tmp_path, monkeypatch, True, mini_batch_size, objective
    )
    separate, weights_separate, rows_separate = train_recording_the_old_pass(
        tmp_path, monkeypatch, False, mini_batch_size, objective
    )
    # The pass at the rollout policy scores only the rows outside the first mini-batch: none with one.
    assert rows_separate == [8, 8]
    assert rows == ([] if mini_batch_size == 8 else [4, 4])
    # The same training: the forward is the same arithmetic on the same rows, so the old log-probs agree.
    for a, b in zip(weights, weights_separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for step, (logs, logs_separate) in enumerate(zip(reused, separate, strict=True)):
        timing = {k for k in logs_separate if k.startswith(("time/", "perf/"))}
        assert set(logs) == set(logs_separate), f"step {step}"
        assert {"div/fkl", "div/rkl", "entropy/student", "gate/fraction"} <= set(logs)  # every row's
        for key in sorted(set(logs) - timing):
            assert logs[key] == pytest.approx(logs_separate[key], rel=1e-5, abs=1e-7), f"step {step} {key}"


def test_a_student_with_dropout_keeps_the_separate_pass_at_the_rollout_policy(tmp_path, monkeypatch):
    from eopd.models import has_active_dropout

    student, _ = tiny_pair()
    assert not has_active_dropout(student)
    student.config.attention_dropout = 0.1  # a training-mode forward is not the rollout policy
    assert has_active_dropout(student)
    student.config.attention_dropout = 0.0
    student.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.1))
    assert has_active_dropout(student)

    import eopd.module as module_file

    monkeypatch.setattr(module_file, "has_active_dropout", lambda model: True)
    _, _, rows = train_recording_the_old_pass(tmp_path, monkeypatch, True, 8)
    assert rows == [8, 8]  # every row scored by the separate pass, as without reuse
