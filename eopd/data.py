"""Prompt data: records, how each model formats a prompt, and the dataloader of rollout batches.

A record is a dict with at least "prompt" (text) and usually "answer" and "id". Each model sees the prompt
in its own format (a base student: plain text; a chat teacher: its chat template); the response tokens
are shared, only the prompt part differs between the two contexts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

TEMPLATES = ("plain", "chat")
SOURCES = ("embedded", "math", "word_arithmetic")
LONG_PROMPTS = ("drop", "truncate")


@dataclass(frozen=True)
class PromptFormat:
    """How one model sees a prompt.

    Attributes:
        template: "plain" (prefix + text + suffix, encoded as is) or "chat" (one user turn through the
            tokenizer's chat template, with the generation prompt).
        prefix: text before the prompt (plain) or a system message (chat, when non-empty).
        suffix: text after the prompt, e.g. the paper's "Let's think step by step and output the final
            answer within \\boxed{}."
        enable_thinking: passed to chat templates that know it (Qwen3: False = non-thinking mode).
    """

    template: str = "plain"
    prefix: str = ""
    suffix: str = ""
    enable_thinking: bool | None = None

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"format.template={self.template!r} is unknown; allowed: {', '.join(TEMPLATES)}")

    def render(self, tokenizer: Any, text: str) -> str:
        """The prompt as text, ready to encode without adding special tokens."""
        if self.template == "plain":
            return f"{self.prefix}{text}{self.suffix}"
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"format.template='chat' but the tokenizer {type(tokenizer).__name__} has no chat_template; "
                "use template='plain' or a tokenizer with a chat template"
            )
        messages = [{"role": "user", "content": f"{text}{self.suffix}"}]
        if self.prefix:
            messages.insert(0, {"role": "system", "content": self.prefix})
        extra = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)

    def encode(self, tokenizer: Any, text: str) -> list[int]:
        """Token ids of the rendered prompt."""
        return list(tokenizer.encode(self.render(tokenizer, text), add_special_tokens=False))


class PromptDataset(Dataset):
    """Records rendered for the student and the teacher.

    Items are dicts: "prompt_ids" (student format), "teacher_prompt_ids" (teacher format), plus the
    record's own fields ("prompt", "answer", "id", ...).
    """

    def __init__(
        self,
        records: Sequence[dict[str, Any]],
        *,
        student_tokenizer: Any,
        student_format: PromptFormat,
        teacher_tokenizer: Any = None,
        teacher_format: PromptFormat | None = None,
        max_prompt_tokens: int | None = None,
        long_prompts: str = "drop",
    ) -> None:
        if long_prompts not in LONG_PROMPTS:
            raise ValueError(
                f"data.long_prompts={long_prompts!r} is unknown; allowed: {', '.join(LONG_PROMPTS)}"
            )
        self.records = list(records)
        self.items = []
        teacher_tokenizer = teacher_tokenizer or student_tokenizer
        teacher_format = teacher_format or student_format
        self.dropped = 0
        self.truncated = 0
        for record in self.records:
            student_ids = student_format.encode(student_tokenizer, record["prompt"])
            teacher_ids = teacher_format.encode(teacher_tokenizer, record["prompt"])
            if max_prompt_tokens is not None and max(len(student_ids), len(teacher_ids)) > max_prompt_tokens:
                # Counted and reported, never a crash mid-run. Truncation keeps the end of the prompt: the
                # question's last words, the suffix and the chat template's generation prompt.
                if long_prompts == "drop":
                    self.dropped += 1
                    continue
                self.truncated += 1
                student_ids = student_ids[-max_prompt_tokens:]
                teacher_ids = teacher_ids[-max_prompt_tokens:]
            self.items.append({**record, "prompt_ids": student_ids, "teacher_prompt_ids": teacher_ids})
        if not self.items:
            raise ValueError(
                f"no prompt left out of {len(self.records)} records"
                + (
                    f" after dropping those over max_prompt_tokens={max_prompt_tokens}"
                    if self.dropped
                    else ""
                )
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def prompt_loader(
    dataset: Dataset, *, batch_size: int, seed: int = 0, shuffle: bool = True, batches: Sampler | None = None
) -> DataLoader:
    """Rollout batches of `batch_size` prompts (lists of item dicts), reshuffled each epoch from `seed`.

    `batches` replaces the sampler of prompt indices, e.g. the curriculum's (`eopd.curriculum`); it must
    be resumable as `ResumableBatches` is (`state_dict`, `load_state_dict`).

    The loader can resume mid-epoch: Lightning stores its `state_dict` (the batches handed out) in every
    checkpoint, and a resumed run continues with the prompts an uninterrupted run would have seen next.
    """
    if len(dataset) < batch_size:
        raise ValueError(
            f"data.batch_size={batch_size} exceeds the {len(dataset)} training prompts; lower data.batch_size"
        )
    if batches is None:
        batches = ResumableBatches(len(dataset), batch_size=batch_size, seed=seed, shuffle=shuffle)
    return _ResumableLoader(dataset, batch_sampler=batches, collate_fn=list)


class ResumableBatches(Sampler[list[int]]):
    """Batches of dataset indices, a fresh permutation each epoch, that can start in the middle of an epoch.

    Epoch e uses the (e+1)-th permutation drawn from a generator seeded with `seed`, so the order depends on
    the seed and the epoch alone; `served` counts the batches handed out so far, over all epochs, and is
    all a checkpoint needs. The last incomplete batch of an epoch is dropped.

    Under data parallelism (a torch.distributed process group, read when the batches are drawn) the ranks
    share each epoch's permutation: the k-th batch of rank r is slice r of the k-th run of world x
    batch_size prompts, so ranks see disjoint prompts and `served` is the same on all of them.
    """

    def __init__(self, n: int, *, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.served = 0

    def __len__(self) -> int:
        return self.n // (self.batch_size * rank_and_world()[1])

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = rank_and_world()
        if len(self) == 0:
            raise ValueError(
                f"data.batch_size={self.batch_size} x {world} ranks exceeds the {self.n} training prompts; "
                "lower data.batch_size"
            )
        epoch, start = divmod(self.served, len(self))
        order = self._order(epoch)
        for k in range(start, len(self)):
            self.served += 1  # counted when handed out: the loader reads one batch at a time (no workers)
            first = (k * world + rank) * self.batch_size
            yield order[first : first + self.batch_size]

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        # The draws a shuffling torch DataLoader with a seeded generator makes per epoch (a worker base
        # seed, then the permutation), so the order is the one runs had before this sampler existed.
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch + 1):
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            order = torch.randperm(self.n, generator=generator)
        return order.tolist()

    def state_dict(self) -> dict[str, int]:
        return {"batches_served": self.served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "curriculum" in state:
            raise ValueError(
                "the checkpoint's prompt loader holds a curriculum: resume with the run's curriculum config "
                "(e.g. curriculum=sead)"
            )
        self.served = int(state["batches_served"])


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process's torch.distributed group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _ResumableLoader(DataLoader):
    """A DataLoader whose position Lightning saves and restores (its `_Stateful` protocol)."""

    def state_dict(self) -> dict[str, Any]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)


def load_records(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Prompt records per split ("train", "val", "test") from a data config (conf/data/*.yaml)."""
    source = data.get("source")
    if source == "embedded":
        from eopd.tasks.multipath import DEFAULT_SIZES, make_splits

        splits = make_splits(
            data["seed"],
            data["n_train"],
            data["n_val"],
            data["n_test"],
            sizes=tuple(data.get("sizes", DEFAULT_SIZES)),
            before=bool(data.get("before", False)),
        )
        return {
            name: [{"id": p.id, "prompt": p.prompt, "answer": p.answer, "problem": p} for p in problems]
            for name, problems in splits.items()
        }
    if source == "math":
        return _math_splits(data)
    if source == "word_arithmetic":
        from dataclasses import fields

        from eopd.tasks.word_arithmetic import WordTask, make_splits

        return make_splits(WordTask(**{f.name: data[f.name] for f in fields(WordTask) if f.name in data}))
    raise ValueError(f"data.source={source!r} is unknown; allowed: {', '.join(SOURCES)}")


# The keys of a math data config (conf/data/math_train.yaml) that say where the rows come from.
_MATH_SOURCE_KEYS = (
    "path", "hub_id", "hub_config", "split", "prompt_field", "answer_field", "answer_from_boxed",
    "prompt_pattern", "id_field", "suffix", "limit",
)  # fmt: skip


def _math_splits(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """ "train", "val" and "test" from one math source: `n_val` and `n_test` prompts held out (seeded).

    A split with no prompts (n_val = 0 or n_test = 0) is left out.
    """
    import random

    from eopd.tasks.math_data import MathSource, load_math_records

    records = load_math_records(MathSource(**{k: data[k] for k in _MATH_SOURCE_KEYS if k in data}))
    n_val, n_test = int(data.get("n_val", 0)), int(data.get("n_test", 0))
    if n_val < 0 or n_test < 0 or n_val + n_test >= len(records):
        raise ValueError(
            f"data.n_val={n_val} and data.n_test={n_test} must be >= 0 and leave training prompts: "
            f"the data has {len(records)}"
        )
    held_out = random.Random(data.get("seed", 0)).sample(range(len(records)), n_val + n_test)
    split_of = {index: "val" if rank < n_val else "test" for rank, index in enumerate(held_out)}
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    for index, record in enumerate(records):
        splits[split_of.get(index, "train")].append(record)
    return {name: rows for name, rows in splits.items() if rows}
