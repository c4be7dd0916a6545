"""Data-parallel training (2 gloo processes on CPU) equals one process on the same rollouts.

Two strategies: Lightning DDP (replicated student) and FSDP2 through ModelParallelStrategy (sharded
student, `trainer=fsdp`). Each rank trains on its half of a fixed rollout batch; the reference is a single
process on the whole batch. Loss, gradient norm, gradients before every optimizer step and the weights
after them must agree: the token mean divides by the count over all ranks, the ranks' gradient average is
undone, and batch-level gates (quantile, random) decide over the gathered batch, not each rank's half.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.strategies import ModelParallelStrategy

from eopd.batch import RolloutBatch
from eopd.models import build_causal_lm
from eopd.module import DistillModule
from eopd.objectives import NoGate, Objective, QuantileGate, RandomGate, Term
from eopd.objectives.gates import SoftOr
from eopd.rollout import sample
from eopd.specs import OptimSpec, PairSpec, RolloutSpec, UpdateSpec

V, PAD, EOS = 40, 0, 1
WORLD, ROWS_PER_RANK = 2, 4
SAMPLE_PROMPTS, SAMPLE_TOKENS = [[5, 6, 7], [8, 9]], (3, 9)  # rank r samples SAMPLE_TOKENS[r] after training


class FixedRollouts(DistillModule):
    """Trains on a given rollout instead of its own samples, and records the gradients of every optimizer step.

    It still samples from the student first, as every training step does (under FSDP gathered, under
    inference mode), and discards the draw: the update that follows must find the student's weights and
    FSDP's buffers as usable as before sampling. The draw uses its own generator, so the training is the
    same either way.
    """

    def make_rollout(self, batch):
        super().make_rollout(batch)
        return self.fixed_rollout, True

    def _clip_and_step(self, optimizer, scheduler, metrics):
        self.grads.append([_full(p.grad.detach()).clone() for p in self.student.parameters()])
        return super()._clip_and_step(optimizer, scheduler, metrics)

    def manual_backward(self, loss, *args, **kwargs):
        ddp = self.trainer.strategy.model
        self.syncs.append(getattr(ddp, "require_backward_grad_sync", None))  # None: not DDP-wrapped
        return super().manual_backward(loss, *args, **kwargs)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter or gradient gathered whole; a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _local_numel(tensor: torch.Tensor) -> int:
    return tensor.to_local().numel() if hasattr(tensor, "to_local") else tensor.numel()


def objective() -> Objective:
    fkl = {"k": 8, "tail": "renorm"}
    return Objective(
        (
            Term("ppo_rkl", options={"eps_low": 0.2, "eps_high": 0.2}),
            Term("topk_fkl", gate=QuantileGate(0.3), options=fkl, name="fkl_quantile"),
            Term("topk_fkl", gate=RandomGate(QuantileGate(0.5), seed=3), options=fkl, name="fkl_random"),
            Term("topk_fkl", weight=0.1, gate=NoGate(), options=fkl, name="fkl_all"),
            # A gate on the student's side (decided after the old-policy pass, over every rank's signals)
            # and a mean over the tokens it selects (its normaliser summed over ranks).
            Term(
                "topk_fkl",
                weight=0.5,
                gate=QuantileGate(0.4, signal=SoftOr("student_entropy", "log_ratio")),
                options=fkl,
                name="fkl_student_side",
                normalize="gate",
            ),
        ),
        top_k=8,
    )


def shards() -> tuple[list[RolloutBatch], list[list[dict]]]:
    """One fixed rollout batch split into WORLD row blocks, each trimmed to its own longest response."""
    g = torch.Generator().manual_seed(0)
    records = []
    for _ in range(WORLD * ROWS_PER_RANK):
        ids = torch.randint(3, V, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        records.append({"prompt_ids": ids})
    sampler = build_causal_lm(vocab_size=V, hidden_size=32, num_layers=1, num_heads=4, seed=7)
    whole = sample(
        sampler,
        [r["prompt_ids"] for r in records],
        max_new_tokens=12,
        eos_token_ids=EOS,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(1),
    )
    rollouts, groups = [], []
    for rank in range(WORLD):
        rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        part = whole.select(rows)
        width = int(part.response_lengths.max())  # ranks see different response widths
        end = part.prompt_length + width
        rollouts.append(
            RolloutBatch(
                part.input_ids[:, :end],
                part.attention_mask[:, :end],
                part.response_mask[:, :width],
                part.prompt_length,
                part.truncated,
                part.sampler_logprobs[:, :width],
            )
        )
        groups.append(records[rows])
    return rollouts, groups


def strategy(name: str):
    if name in ("fsdp", "fsdp_teacher"):  # what eopd.train builds for trainer=fsdp
        return ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
    return name


def train(world: int, rank: int, root: Path, strategy_name: str = "ddp") -> dict:
    """Two optimizer steps (two PPO epochs over one rollout batch, two micro-batches each)."""
    torch.set_num_threads(1)
    rollouts, groups = shards()
    if world == 1:
        rollout, records = RolloutBatch.concat(rollouts, pad_token_id=PAD), sum(groups, [])
    else:
        rollout, records = rollouts[rank], groups[rank]
    rows = len(records)
    student = build_causal_lm(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    teacher = build_causal_lm(vocab_size=V, hidden_size=48, num_layers=2, num_heads=4, seed=1)
    module = FixedRollouts(
        student,
        teacher,
        objective(),
        pair=PairSpec(vocab_size=V, pad_token_id=PAD, student_eos_ids=(EOS,)),
        rollout=RolloutSpec(max_new_tokens=12),
        update=UpdateSpec(mini_batch_size=rows, micro_batch_size=rows // 2, ppo_epochs=2, shuffle=False),
        optim=OptimSpec(lr=1e-3, schedule="constant"),
        shard_teacher=strategy_name == "fsdp_teacher",
    )
    module.fixed_rollout, module.grads, module.syncs = rollout, [], []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy(strategy_name) if world > 1 else "auto",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # each rank's loader already holds its own rows
        default_root_dir=str(root),
    )
    loader = torch.utils.data.DataLoader(records, batch_size=rows, collate_fn=list)
    trainer.fit(module, loader)
    # Sampling from the trained student, with as many tokens as the rank's number says: ranks draw
    # different numbers of tokens, so a sharded model must not need a collective per token. Off-policy
    # rollouts sample the teacher the same way.
    numbers = range(WORLD) if world == 1 else [rank]
    samples = {n: _draw(module.on_student, SAMPLE_TOKENS[n], seed=5) for n in numbers}
    teacher_samples = {n: _draw(module.on_teacher, SAMPLE_TOKENS[n], seed=6) for n in numbers}
    params = list(module.student.parameters())
    teacher_params = list(module.teacher.parameters())
    return {
        "logs": module.last_logs,
        "grads": module.grads,
        "syncs": module.syncs,
        "weights": {k: _full(v.detach()).clone() for k, v in module.student.state_dict().items()},
        "saved": module.student_state_dict(),
        "samples": samples,
        "teacher_samples": teacher_samples,
        "teacher_local_numel": sum(_local_numel(p) for p in teacher_params),
        "teacher_numel": sum(_full(p).numel() for p in teacher_params),
        "local_numel": sum(_local_numel(p) for p in params),
        "numel": sum(_full(p).numel() for p in params),
        "optimizer_numel": sum(
            _local_numel(v)
            for s in module.optimizers().optimizer.state.values()
            for v in s.values()
            if v.dim()
        ),
    }


def _draw(on_model, max_new_tokens: int, *, seed: int) -> torch.Tensor:
    """SAMPLE_PROMPTS sampled from the model `on_model` hands over (gathered whole when sharded)."""
    return on_model(
        lambda model: (
            sample(
                model,
                SAMPLE_PROMPTS,
                max_new_tokens=max_new_tokens,
                eos_token_ids=EOS,
                pad_token_id=PAD,
                generator=torch.Generator().manual_seed(seed),
            ).input_ids
        ),
        gathered=True,
    )


STRATEGIES = ("ddp", "fsdp", "fsdp_teacher")


def _worker(rank: int, port: int, root: str) -> None:
    # LOCAL_RANK set: Lightning joins these processes instead of launching its own.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    # One pair of processes trains under every strategy in turn (starting processes that import Lightning
    # is most of this file's time); the process group the first run opens is reused by the next.
    for name in STRATEGIES:
        torch.save(train(WORLD, rank, Path(root) / name, name), Path(root) / f"{name}-rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train(1, 0, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return root


@pytest.fixture(scope="module", params=STRATEGIES)
def runs(request, single, spawned):
    ranks = [torch.load(spawned / f"{request.param}-rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return single, ranks, request.param


def test_loss_and_metrics_equal_one_process(runs):
    single, ranks, _ = runs
    keys = ("train/loss", "loss/ppo_rkl", "loss/fkl_quantile", "loss/fkl_random", "gate/fkl_random_fraction")
    for key in (
        *keys,
        "gate/fraction",
        "div/fkl_topk_gated",
        "entropy/teacher",
        "div/fkl",
        "train/grad_norm",
        "rollout/len_mean",  # rollout statistics of the whole batch too, not of rank 0's shard
        "rollout/len_max",
        "rollout/truncated_frac",
        "rollout/sampler_kl_k3",
    ):
        for result in ranks:  # every rank logs the whole batch's value
            assert result["logs"][key] == pytest.approx(single["logs"][key], rel=1e-4, abs=1e-6), key


def test_gradients_equal_one_process(runs):
    single, ranks, _ = runs
    assert len(single["grads"]) == 2
    for result in ranks:
        assert len(result["grads"]) == 2
        # First step: the same weights, so float noise only. Second step: AdamW's first update divides by
        # |g| + eps, which turns float noise in tiny gradients into ~1e-5 relative differences of weights.
        for step, tolerance in ((0, 1e-5), (1, 1e-3)):
            for a, b in zip(result["grads"][step], single["grads"][step], strict=True):
                assert float((a - b).norm() / b.norm()) < tolerance, step


def test_updated_weights_equal_one_process(runs):
    single, ranks, _ = runs
    initial = build_causal_lm(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, seed=0).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in single["weights"].items())  # it did train
    for result in ranks:
        for name, value in single["weights"].items():
            # Measured against the update itself: AdamW magnifies float noise where a gradient is ~eps.
            step = (value - initial[name]).norm()
            assert float((result["weights"][name] - value).norm()) < 1e-2 * float(step), name


def test_sampling_and_saved_weights_equal_one_process(runs):
    single, ranks, _ = runs
    for rank, result in enumerate(ranks):
        assert torch.equal(result["samples"][rank], single["samples"][rank]), rank
        for name, value in result["saved"].items():  # the weights eopd.train saves after a sharded run
            assert torch.equal(value, result["weights"][name]), name
    # The ranks drew different numbers of tokens, each from the same trained student.
    assert ranks[0]["samples"][0].shape != ranks[1]["samples"][1].shape


def test_fsdp_shards_weights_and_optimizer_state(runs):
    single, ranks, name = runs
    if name == "ddp":
        pytest.skip("DDP replicates the student")
    for result in ranks:
        assert result["numel"] == single["numel"]
        # Each rank holds about half of every weight and of AdamW's two moments (dim-0 shards).
        assert result["local_numel"] <= 0.55 * single["numel"]
        assert result["optimizer_numel"] <= 0.55 * single["optimizer_numel"]
    assert sum(r["local_numel"] for r in ranks) == single["numel"]


def test_teacher_is_sharded_only_when_asked_and_samples_as_one_process(runs):
    single, ranks, name = runs
    for rank, result in enumerate(ranks):
        assert torch.equal(result["teacher_samples"][rank], single["teacher_samples"][rank])
        assert result["teacher_numel"] == single["teacher_numel"]
        if name == "fsdp_teacher":  # each rank holds about half of the frozen teacher
            assert result["teacher_local_numel"] <= 0.55 * single["teacher_numel"]
        else:
            assert result["teacher_local_numel"] == single["teacher_numel"]
    if name == "fsdp_teacher":
        assert sum(r["teacher_local_numel"] for r in ranks) == single["teacher_numel"]


def test_ddp_all_reduces_once_per_optimizer_step(runs):
    _, ranks, name = runs
    if name != "ddp":
        pytest.skip("FSDP reduce-scatters each micro-batch's gradients")
    for result in ranks:  # two optimizer steps of two micro-batches: gradients held, then synced
        assert result["syncs"] == [False, True, False, True]
