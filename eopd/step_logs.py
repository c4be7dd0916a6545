"""What a training step logs beyond the objective's metrics: rollout statistics, phase times, samples.

Samples are decoded responses with the teacher's entropy per token (samples.jsonl, a wandb Table); entropy
histograms go to wandb.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eopd.batch import RolloutBatch
from eopd.objectives import LinearLogits, Metrics, teacher_token_stats
from eopd.scoring import output_weight, response_hidden_states


def rollout_metrics(module, rollout: RolloutBatch, old_logprobs: Tensor, on_policy: bool) -> dict[str, float]:
    """Rollout statistics of the whole batch: under data parallelism summed over the ranks' shards."""
    lengths = rollout.response_lengths.float()
    mask = rollout.response_mask
    sums = Metrics()
    sums.add("rollout/len_mean", lengths)
    sums.add("rollout/truncated_frac", rollout.truncated.float())
    if on_policy and rollout.sampler_logprobs is not None:
        # On-policy guard: the sampler's log-probs against the trainer's recomputed ones.
        log_ratio = (old_logprobs - rollout.sampler_logprobs)[mask]
        sums.add("rollout/sampler_kl_k3", torch.expm1(log_ratio) - log_ratio)
        sums.add("rollout/sampler_ratio_mean", log_ratio.exp())
    logs = module._all_ranks(sums).means()
    logs["rollout/len_max"] = module._reduce(float(lengths.max()), "max")
    logs["rollout/on_policy"] = float(on_policy)  # the same on every rank (one coin)
    return logs


def log_samples(module, batch: list[dict[str, Any]], rollout: RolloutBatch, teacher_entropy: Tensor) -> None:
    """At the logging steps of `module.log_spec`: decoded samples with per-token teacher entropy (rank 0).

    Samples go to `<run dir>/samples.jsonl` and a wandb Table; entropy histograms of teacher and student
    go to wandb only. Under FSDP every rank takes part in the student's forward for the histogram.

    Args:
        module: the `DistillModule` (its tokenizer, loggers, run directory and steps).
        batch: the prompt records of the rollout.
        rollout: the rollout batch.
        teacher_entropy: (B, R) the teacher's entropy per response token.
    """
    spec = module.log_spec
    step = module.rollout_step
    want_samples = spec.samples_every > 0 and (step == 1 or step % spec.samples_every == 0)
    want_hist = spec.histograms_every > 0 and step % spec.histograms_every == 0
    want_hist = want_hist and any(type(lg).__name__ == "WandbLogger" for lg in module.loggers)
    student_entropy = None
    if want_hist and (module.sharded or module.global_rank == 0):  # sharded: a forward needs every rank
        student_entropy = _student_entropy(module, rollout)
    if not (want_samples or want_hist) or module.global_rank != 0:
        return
    mask = rollout.response_mask
    if want_samples and module.tokenizer is not None:
        rows = []
        for i in range(min(spec.num_samples, rollout.batch_size)):
            ids = rollout.responses[i][mask[i]].tolist()
            entropy = teacher_entropy[i][mask[i]].tolist()
            pieces = [module.tokenizer.decode([t]) for t in ids]
            rows.append(
                {
                    "step": step,
                    "prompt": batch[i].get("prompt", module.tokenizer.decode(batch[i]["prompt_ids"])),
                    "response": module.tokenizer.decode(ids),
                    "teacher_entropy": " ".join(
                        f"{p!r}:{h:.2f}" for p, h in zip(pieces, entropy, strict=True)
                    ),
                }
            )
        run_dir = Path(module.trainer.default_root_dir) if module._trainer is not None else None
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "samples.jsonl", "a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        for logger in module.loggers:
            if type(logger).__name__ == "WandbLogger":
                columns = list(rows[0]) if rows else []
                logger.log_table("samples", columns=columns, data=[list(r.values()) for r in rows], step=step)
    if want_hist:
        for logger in module.loggers:
            if type(logger).__name__ == "WandbLogger":
                import wandb

                logger.experiment.log(
                    {
                        "hist/teacher_entropy": wandb.Histogram(teacher_entropy[mask].cpu().numpy()),
                        "hist/student_entropy": wandb.Histogram(student_entropy.cpu().numpy()),
                        "trainer/global_step": module.global_step,
                    }
                )


@torch.no_grad()
def _student_entropy(module, rollout: RolloutBatch) -> Tensor:
    def entropy(model) -> Tensor:
        hidden = response_hidden_states(model, rollout, pack=module.update_spec.pack_sequences)
        hidden = hidden[rollout.response_mask]
        source = LinearLogits(hidden, output_weight(model), module.pair.vocab_size)
        tokens = rollout.responses[rollout.response_mask]
        return teacher_token_stats(source, tokens, k=1, temperature=module.objective.temperature).entropy

    return module.on_student(entropy)


class PhaseTimer:
    """Wall-clock seconds per named phase (synchronising CUDA so that the phases are honest)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _sync()
        start = time.perf_counter()
        yield
        _sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
