"""GPU check of the vLLM rollout engine: does it sample the trainer's current weights? Prints sampler_kl_k3.

    python scripts/check_vllm_sync.py                                  # a random student, 4096-token vocabulary
    python scripts/check_vllm_sync.py --student Qwen/Qwen3-0.6B-Base   # a real student (bf16)

Needs one CUDA device and the extra (`pip install -e '.[vllm]'`). Not run yet: no GPU was available when
it was written (docs/vllm.md). Four rollouts of the same prompts, which share a prefix longer than one KV
cache block, so vLLM's prefix cache holds their blocks from the first rollout on:

    1. in sync          the engine's copy holds the student's weights: k3 near 0 (kernel and dtype noise)
    2. stale            a few AdamW steps on the rollout changed the student, nothing pushed: k3 grows
                        (only at --sleep-level 1: after a level-2 sleep the engine always pushes first)
    3. pushed           after `sync_weights` (push, prefix-cache reset): k3 back near the in-sync value
    4. pushed, again    a second draw with the pushed weights and a warm cache: the same

k3 is `rollout/sampler_kl_k3` as the trainer logs it: the mean over response tokens of exp(d) - d - 1, with
d = log pi_trainer(y) - log pi_sampler(y). The exit code is 1 when a pushed k3 is not back within
`--tolerance` of the in-sync one or the stale one did not grow, so the check can gate a GPU CI job.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from eopd.batch import RolloutBatch
from eopd.models import build_causal_lm
from eopd.rollout_engines import VLLMEngine, VLLMOptions, save_engine_copy, vllm_available
from eopd.scoring import response_logits


def trainer_logprobs(model, batch: RolloutBatch, temperature: float, vocab_size: int) -> torch.Tensor:
    """log pi(y_t) of the drawn tokens as the trainer recomputes them (full forward), (B, R)."""
    with torch.no_grad():
        logits = response_logits(model.eval(), batch)[..., :vocab_size].float()  # (B, R, V)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, batch.responses[..., None]).squeeze(-1)


def sampler_kl_k3(model, batch: RolloutBatch, temperature: float, vocab_size: int) -> float:
    """The trainer's on-policy guard: mean of exp(d) - d - 1 over response tokens."""
    log_ratio = (trainer_logprobs(model, batch, temperature, vocab_size) - batch.sampler_logprobs)[
        batch.response_mask
    ]
    return float((torch.expm1(log_ratio) - log_ratio).mean())


def update(model, batch: RolloutBatch, *, steps: int, lr: float) -> None:
    """A few AdamW steps raising the log-likelihood of the drawn responses: weights as training moves them."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        logits = response_logits(model, batch).float()  # (B, R, V)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, batch.responses[..., None]).squeeze(-1)
        mask = batch.response_mask
        loss = -(logp * mask).sum() / mask.sum().clamp_min(1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def student_and_prompts(args) -> tuple[torch.nn.Module, int, int, int, list[list[int]]]:
    """The student on the GPU, its shared vocabulary, end and pad ids, and prompts sharing a long prefix."""
    generator = torch.Generator().manual_seed(0)
    if args.student is None:
        vocab, eos, pad = args.vocab, 1, 0
        rows = vocab + 64  # padded output rows, as real checkpoints have
        model = build_causal_lm(
            vocab_size=rows, hidden_size=args.hidden_size, num_layers=2, num_heads=4, seed=0
        )
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(4)  # peaked enough that stale weights show
        prefix = torch.randint(2, vocab, (48,), generator=generator).tolist()
        prompts = [
            prefix + torch.randint(2, vocab, (5 + i,), generator=generator).tolist()
            for i in range(args.prompts)
        ]
        return model.to(args.device, torch.float32), vocab, eos, pad, prompts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.student)
    model = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.bfloat16).to(args.device)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    instruction = (
        "Solve the problem. Let's think step by step and output the final answer within \\boxed{}. "
        "Show every intermediate result on its own line, and check the answer before writing it. "
    )
    questions = [f"What is {a} times {a + 7}, plus {3 * a}?" for a in range(args.prompts)]
    prompts = [tokenizer.encode(instruction + q, add_special_tokens=False) for q in questions]
    return model, len(tokenizer), eos, pad, prompts


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--student", default=None, help="a Hugging Face directory or hub id (default: random)"
    )
    parser.add_argument("--vocab", type=int, default=4096, help="random student: above vLLM's 1024-id limit")
    parser.add_argument("--hidden-size", type=int, default=256, help="random student")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--update-steps", type=int, default=3, help="AdamW steps between the rollouts")
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 random student, 1e-5 real one")
    parser.add_argument("--sleep-level", type=int, default=1, choices=[1, 2])
    parser.add_argument("--device", default="cuda", help="the trainer's device (vLLM takes the first GPU)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="allowed k3 above the in-sync value")
    args = parser.parse_args()
    if not (torch.cuda.is_available() or args.device == "cpu") or not vllm_available():
        print("needs a CUDA device and vLLM (pip install -e '.[vllm]')", file=sys.stderr)
        return 2
    lr = args.lr if args.lr is not None else (1e-3 if args.student is None else 1e-5)

    model, vocab, eos, pad, prompts = student_and_prompts(args)
    dtype = "float32" if args.student is None else "bfloat16"
    copy = save_engine_copy(model, Path(tempfile.mkdtemp(prefix="eopd_engine_")), vocab)
    longest = max(len(p) for p in prompts) + args.max_new_tokens
    options = VLLMOptions(dtype=dtype, sleep_level=args.sleep_level, max_model_len=longest)
    engine = VLLMEngine(copy, vocab_size=vocab, options=options)

    def rollout(seed: int) -> RolloutBatch:
        return engine.generate(
            model,
            prompts,
            max_new_tokens=args.max_new_tokens,
            eos_token_ids=(eos,),
            pad_token_id=pad,
            temperature=args.temperature,
            vocab_size=vocab,
            seed=seed,
        )

    print(
        f"student: {args.student or 'random'}, vocabulary {vocab}, vLLM {dtype}, sleep level {args.sleep_level}"
    )
    print(
        f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, shared prefix"
    )
    results = {}
    first = rollout(seed=0)
    results["in sync"] = sampler_kl_k3(model, first, args.temperature, vocab)
    update(model, first, steps=args.update_steps, lr=lr)
    if args.sleep_level == 1:  # level 2 discards vLLM's weights: the engine pushes before every generation
        results["stale (no push)"] = sampler_kl_k3(model, rollout(seed=1), args.temperature, vocab)
    engine.sync_weights(model)
    results["pushed"] = sampler_kl_k3(model, rollout(seed=2), args.temperature, vocab)
    results["pushed, again"] = sampler_kl_k3(model, rollout(seed=3), args.temperature, vocab)
    for name, value in results.items():
        print(f"sampler_kl_k3 {name:<16} {value:.3e}")

    in_sync = results["in sync"]
    ok = results.get("stale (no push)", float("inf")) > in_sync + args.tolerance
    ok &= all(results[k] <= in_sync + args.tolerance for k in ("pushed", "pushed, again"))
    print("OK: vLLM samples the pushed weights" if ok else "FAILED: see the numbers above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
