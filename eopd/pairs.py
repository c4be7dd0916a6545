"""Assembling a teacher/student pair's token facts: one shared vocabulary, the end ids, padding, the remap.

`assemble_pair` is the one place that turns two tokenizers and the names of their end tokens into the
`PairSpec` the module, the evaluation and the benchmarks use, so that a run, `python -m eopd.evaluate` and
`scripts/bench_step.py` read a pair the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from eopd.models import VocabularyMismatchError, check_shared_vocabulary
from eopd.specs import PairSpec

log = logging.getLogger("eopd.train")


class PairError(ValueError):
    """The two tokenizers or the end tokens do not make a pair; the message names the key and the fix."""


@dataclass(frozen=True)
class PairKeys:
    """The config keys the error messages name (the training config's by default)."""

    pair: str = "pair"
    student_eos: str = "pair.student_eos"
    teacher_eos: str = "pair.teacher_eos"


def token_id(tokenizer: Any, token: str, key: str) -> int:
    """The id of `token` in `tokenizer`; a `PairError` naming `key` when it is not one of its tokens."""
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise PairError(f"config '{key}'={token!r} is not a token of the tokenizer")
    return int(ids[0])


def assemble_pair(
    student_tokenizer: Any,
    teacher_tokenizer: Any | None = None,
    *,
    student_eos: str | None = None,
    teacher_eos: str | None = None,
    remap_end_token: bool = True,
    name: str = "pair",
    keys: PairKeys = PairKeys(),
) -> PairSpec:
    """The pair's `PairSpec`: shared vocabulary, pad id, end ids and the end-token remap.

    Args:
        student_tokenizer: the student's tokenizer.
        teacher_tokenizer: the teacher's; None for a student evaluated alone (its vocabulary is then the
            student tokenizer's and the teacher's end token is the student's).
        student_eos, teacher_eos: the end tokens as text (e.g. "<|endoftext|>", "<|im_end|>"); None takes
            the tokenizer's own `eos_token`.
        remap_end_token: score the student's end token as the teacher's on the teacher's copy (PAPER.md
            section 3) whenever the two differ.
        name: the pair's name, for messages.
        keys: the config keys the messages name.

    Raises:
        PairError: the tokenizers differ (naming the first differing token) or an end token is unknown.
    """
    if teacher_tokenizer is None:
        vocab_size = len(student_tokenizer)
    else:
        try:
            vocab_size = check_shared_vocabulary(student_tokenizer, teacher_tokenizer)
        except VocabularyMismatchError as error:
            raise PairError(
                f"config '{keys.pair}' ({name}): the student's and teacher's tokenizers differ: {error}. Pick a "
                "pair whose models share one tokenizer, or point pair.student.tokenizer / "
                "pair.teacher.tokenizer at one"
            ) from None
    student_end = token_id(student_tokenizer, student_eos or student_tokenizer.eos_token, keys.student_eos)
    if teacher_tokenizer is None:
        teacher_end = student_end
    else:
        teacher_end = token_id(
            teacher_tokenizer, teacher_eos or teacher_tokenizer.eos_token, keys.teacher_eos
        )
    pad = student_tokenizer.pad_token_id if student_tokenizer.pad_token_id is not None else student_end
    return PairSpec(
        vocab_size=vocab_size,
        pad_token_id=pad,
        student_eos_ids=(student_end,),
        teacher_eos_ids=(teacher_end,),
        remap_end_token=(student_end, teacher_end)
        if remap_end_token and student_end != teacher_end
        else None,
    )


def show_pair(
    record: dict[str, Any], grader: Any, student: tuple[Any, Any], teacher: tuple[Any, Any], pair: PairSpec
):
    """The start-up self-test: one prompt through both formats, and a response as the teacher scores it.

    Checks that the teacher's end token closes an assistant turn in its chat template, then logs the
    prompt in the student's and the teacher's format and a response in the task's own format (the
    grader's `example_response`) ending with the student's end token, as the teacher reads it: its own
    prompt, the same response ids, the end token remapped (PAPER.md section 3).

    Args:
        record: a training record ({"prompt", "answer", ...}).
        grader: the run's grader (`eopd.evaluation.GRADERS`), which writes a response in the task's format.
        student, teacher: (tokenizer, `PromptFormat`) of each model.
        pair: the pair's token facts (`assemble_pair`).

    Raises:
        PairError: the teacher's end token does not close an assistant turn in its chat template.
    """
    import torch

    from eopd.scoring import remap_end_token

    (student_tokenizer, student_format), (teacher_tokenizer, teacher_format) = student, teacher
    text = record["prompt"]
    log.info("student prompt format: %r", student_format.render(student_tokenizer, text))
    log.info("teacher prompt format: %r", teacher_format.render(teacher_tokenizer, text))
    teacher_end = pair.teacher_eos_ids[0]
    if teacher_format.template == "chat":
        # The teacher's end token must be the one that closes an assistant turn in its own template.
        turn = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]
        rendered = teacher_tokenizer.apply_chat_template(turn, tokenize=False)
        end_text = teacher_tokenizer.convert_ids_to_tokens(teacher_end)
        if end_text not in rendered[rendered.rindex("2") :]:
            raise PairError(
                f"config 'pair.teacher_eos'={end_text!r} does not close an assistant turn in the teacher's chat "
                f"template (it renders {rendered!r}); set pair.teacher_eos to the token that does"
            )
    prompt = teacher_format.encode(teacher_tokenizer, text)
    response = student_tokenizer.encode(grader.example_response(record), add_special_tokens=False)
    response.append(pair.student_eos_ids[0])
    ids = torch.tensor([prompt + response])
    if pair.remap_end_token is not None:
        from_id, to_id = pair.remap_end_token
        ids = remap_end_token(
            ids, torch.ones(1, len(response), dtype=torch.bool), from_id=from_id, to_id=to_id
        )
    log.info("teacher scores a response as: %r", teacher_tokenizer.decode(ids[0].tolist()))
