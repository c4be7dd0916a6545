"""Answer extraction and grading for math responses: the last `\\boxed{...}`, compared with math-verify.

math-verify guards parsing and comparison with `signal.alarm` timeouts, which only work in the main
thread of the main interpreter. `grade_math` uses them there (5 s each) and switches them off in any other
thread (a data-loader worker thread, a thread pool): a pathological expression can then hang that thread,
so run long grading jobs in processes (each process has its own main thread) rather than threads.
"""

from __future__ import annotations

import logging
import threading

from math_verify import parse, verify

_BOXED_COMMANDS = ("\\boxed", "\\fbox")
_TIMEOUT_SECONDS = 5

# math-verify logs a warning each time its timeouts are disabled; that is expected off the main thread.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces included.

    Example: `extract_boxed(r"so \\boxed{\\frac{1}{2}}.")` is `\\frac{1}{2}`.

    Returns:
        The text between the braces, unstripped; None if there is no such command or its braces never
        close.
    """
    start = max(text.rfind(command) for command in _BOXED_COMMANDS)
    if start < 0:
        return None
    command = next(command for command in _BOXED_COMMANDS if text.startswith(command, start))
    position = start + len(command)
    while position < len(text) and text[position].isspace():
        position += 1
    if position >= len(text) or text[position] != "{":
        return None
    depth = 0
    for end in range(position, len(text)):
        if text[end] == "{":
            depth += 1
        elif text[end] == "}":
            depth -= 1
            if depth == 0:
                return text[position + 1 : end]
    return None


def grade_math(response: str, gold: str, *, require_boxed: bool = True) -> bool:
    """Whether `response` states an answer mathematically equal to `gold`, as math-verify judges it.

    `\\frac{1}{2}`, `1/2` and `0.5` are equal; so are `\\boxed{5}` and `5`.

    Args:
        response: the model's text.
        gold: the reference answer, bare (`\\frac{1}{2}`, `0.5`) or boxed.
        require_boxed: True (default, as when the prompt asks for the answer in `\\boxed{}`): the answer is
            the last `\\boxed{...}`, and a response without one is wrong. False: without a `\\boxed{}`,
            math-verify's own extraction searches the whole response for an answer.

    Returns:
        True if equal; False when they differ, when no answer is found, or when math-verify fails or
        times out.
    """
    boxed = extract_boxed(response)
    if boxed is None and require_boxed:
        return False
    # Wrapping the answer in \boxed{} points math-verify's extractor straight at it.
    predicted_text = response if boxed is None else f"\\boxed{{{boxed}}}"
    gold_boxed = extract_boxed(gold)
    gold_text = f"\\boxed{{{gold if gold_boxed is None else gold_boxed}}}"

    timeout = _TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = parse(gold_text, parsing_timeout=timeout)
        predicted = parse(predicted_text, parsing_timeout=timeout)
        if not gold_parsed or not predicted:
            return False
        return bool(verify(gold_parsed, predicted, timeout_seconds=timeout))
    except Exception:  # math-verify raises on timeouts and on expressions sympy cannot handle
        return False


def stated_answer(response: str) -> str | None:
    """The answer a free-text response states: its last `\\boxed{...}`, else math-verify's reading of it.

    math-verify reads the final number or expression (preferring one after "the answer is"); this is
    what `grade_math(..., require_boxed=False)` compares, as a string for majority votes.
    """
    boxed = extract_boxed(response)
    if boxed is not None:
        return boxed.strip()
    timeout = _TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    try:
        parsed = parse(response, parsing_timeout=timeout)
    except Exception:  # noqa: BLE001 - math-verify raises on timeouts and on what sympy cannot handle
        return None
    return str(parsed[-1]) if parsed else None
