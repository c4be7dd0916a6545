"""Real teacher/student pairs: the configs, each model's prompt format, the end-token remap token by token,
vocabulary checks, memory options, and full runs on Qwen3-format tiny models saved as on the hub.

The hub checkpoints are replaced by tiny models saved with `eopd.tasks.hub_formats` (config.json with
model_type qwen3 / llama, safetensors, family tokenizers with their chat templates); the real pair configs
are composed unchanged and only their paths are pointed at those directories.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import conftest
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

import eopd.data
import eopd.models
import eopd.scoring
import eopd.train
from eopd.batch import RolloutBatch, pad_prompts
from eopd.data import PromptDataset
from eopd.models import ModelSource, load_model, load_tokenizer, prepare_student
from eopd.module import DistillModule
from eopd.objectives import preset
from eopd.specs import PairSpec
from eopd.tasks.hub_formats import save_tiny_model
from eopd.tasks.math_data import PAPER_SUFFIX
from eopd.train import ConfigError, plan

CONF_DIR = Path(eopd.train.CONF_DIR)
compose_train = partial(conftest.compose_train, default_pair=None)  # these tests choose their pairs
# The pairs of hub models (the built, random and converted pairs have tests of their own).
REAL_PAIRS = sorted(
    p.stem
    for p in (CONF_DIR / "pair").glob("*.yaml")
    if p.stem not in ("embedded", "tiny_random", "smollm2_pruned")
)
QWEN_PAIR = "qwen3_8b_to_qwen3_0.6b_base"
LLAMA_PAIR = "llama3.1_8b_instruct_to_llama3.2_3b_instruct"
# Records as the math data module makes them: the question with the paper's suffix (data.suffix); the
# pair's formats only wrap that text in each model's template.
PROBLEMS = [
    {"id": "a", "prompt": "What is 2+2?" + PAPER_SUFFIX, "answer": "4"},
    {"id": "b", "prompt": "What is 3+1?" + PAPER_SUFFIX, "answer": "4"},
    {"id": "c", "prompt": "What is 2+3?" + PAPER_SUFFIX, "answer": "5"},
]


def answer_four(model, tokenizer) -> None:
    """Make a model answer "\\boxed{4}" and end, after any prompt that ends with a newline.

    Attention and MLP outputs are zeroed, so the last hidden state is the normalised embedding of the
    current token and the model is a bigram table; the output rows then point each token of the chain
    newline -> \\ -> b -> o -> x -> e -> d -> { -> 4 -> } -> end at the next one (40 nats above the rest).
    """
    chain = [tokenizer.convert_tokens_to_ids(t) for t in ["Ċ", "\\", "b", "o", "x", "e", "d", "{", "4", "}"]]
    chain.append(tokenizer.eos_token_id)
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    hidden = model.model.norm(model.get_input_embeddings().weight[chain[:-1]])  # (n, H), |h|^2 = H
    weight = model.get_output_embeddings().weight
    weight.zero_()
    weight[chain[1:]] = hidden * (40 / hidden.shape[-1])


@pytest.fixture(scope="module")
def qwen3_dirs(tmp_path_factory):
    """A Qwen3-format chat teacher that answers "\\boxed{4}" and a random Qwen3-format base student."""
    root = tmp_path_factory.mktemp("qwen3_pair")
    teacher = save_tiny_model(
        root / "teacher", "qwen3", eos_token="<|im_end|>", hidden_size=64, seed=2, edit=answer_four
    )
    student = save_tiny_model(root / "student", "qwen3", eos_token="<|endoftext|>", seed=1)
    return {"teacher": teacher, "student": student}


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_pair")
    return {
        "teacher": save_tiny_model(root / "teacher", "llama", eos_token="<|eot_id|>", hidden_size=64, seed=2),
        "student": save_tiny_model(root / "student", "llama", eos_token="<|eot_id|>", seed=1),
    }


def local(pair: str, dirs: dict[str, Path], *overrides: str):
    """The real pair config `pair` with its hub ids replaced by the local directories."""
    return compose_train(
        [
            f"pair={pair}",
            f"pair.student.path={dirs['student']}",
            f"pair.teacher.path={dirs['teacher']}",
            *overrides,
        ]
    )


@pytest.fixture
def math_records(monkeypatch):
    """Three math problems from a local JSONL file as every split, with the paper's suffix like data=math."""

    def load(data):
        path = Path(__file__).parent / "fixtures" / "math_problems.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [{**row, "prompt": row["prompt"] + PAPER_SUFFIX} for row in rows]
        return {"train": rows * 2, "val": rows, "test": rows}

    monkeypatch.setattr(eopd.data, "load_records", load)


@pytest.fixture
def no_model_loads(monkeypatch):
    def forbidden(*args, **kwargs):
        pytest.fail("a model was loaded before the pair was refused")

    monkeypatch.setattr(eopd.models, "load_model", forbidden)


# ---- the configs ---------------------------------------------------------------------------------------


def test_the_issue_pairs_exist():
    assert {
        "qwen3_8b_to_qwen3_0.6b_base",
        "qwen3_8b_to_qwen3_1.7b_base",
        "qwen3_8b_to_qwen3_4b_base",
        "llama3.1_8b_instruct_to_llama3.2_3b_instruct",
        "qwen3_1.7b_to_qwen3_0.6b_base",
    } <= set(REAL_PAIRS)


@pytest.mark.parametrize("name", REAL_PAIRS)
def test_real_pair_config_validates_without_loading_weights(name, tmp_path, monkeypatch, no_model_loads):
    monkeypatch.setattr(eopd.models, "_in_hub_cache", lambda repo_id: True)  # offline: no download to check
    cfg = compose_train([f"pair={name}"])
    header = (CONF_DIR / "pair" / f"{name}.yaml").read_text().split("\nname:")[0]

    p = plan(cfg, tmp_path / "run")

    assert cfg.pair.name == name
    assert "Memory" in header and " GB" in header, "the header states what the pair needs in memory"
    for source in (p.student_source, p.teacher_source):
        assert source.path.count("/") == 1, f"{source.path} is not a hub id"
    # bf16 teacher, fp32 master weights for the student (bf16 cannot hold lr 3e-6 updates), checkpointing.
    assert (cfg.pair.dtype, p.student_source.dtype) == ("bfloat16", "float32")
    assert p.teacher_source.dtype in (None, "bfloat16")
    assert p.student_source.gradient_checkpointing
    assert p.teacher_format.template == "chat"
    assert cfg.pair.remap_end_token
    if p.student_source.path.endswith("-Base"):  # a base student with a Qwen3 chat teacher
        assert p.student_format.template == "plain"
        assert (cfg.pair.student_eos, cfg.pair.teacher_eos) == ("<|endoftext|>", "<|im_end|>")
        assert p.teacher_format.enable_thinking is False
    else:  # an instruct student reads its own chat template
        assert p.student_format.template == "chat"
    # The paper's instruction is the data's suffix (data.suffix); a format that added it too would double it.
    assert "boxed" not in p.teacher_format.suffix + p.student_format.suffix


def test_lora_without_peft_says_how_to_install_it(monkeypatch):
    find_spec = eopd.models.importlib.util.find_spec
    monkeypatch.setattr(
        eopd.models.importlib.util, "find_spec", lambda name: None if name == "peft" else find_spec(name)
    )

    with pytest.raises(ValueError, match=r"pip install 'eopd\[lora\]'"):
        ModelSource(path="Qwen/Qwen3-0.6B-Base", lora={"r": 8})


@pytest.mark.parametrize(
    ("option", "value"),
    [("gradient_checkpointing", "true"), ("lora", "{r: 4}")],
    ids=["checkpointing", "lora"],
)
def test_lora_or_checkpointing_on_the_teacher_is_refused(option, value, tmp_path, monkeypatch):
    if option == "lora":
        pytest.importorskip("peft")
    monkeypatch.setattr(eopd.models, "_in_hub_cache", lambda repo_id: True)
    cfg = compose_train([f"pair={QWEN_PAIR}", f"+pair.teacher.{option}={value}"])

    with pytest.raises(ConfigError, match=f"pair.teacher.{option}"):
        plan(cfg, tmp_path / "run")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lora": {"r": 0}}, "lora.r=0"),
        ({"lora": {"target_modules": []}}, "target_modules"),
        ({"dtype": "bf16"}, "dtype='bf16'"),
        ({"path": None, "tokenizer": "embedded", "device_map": "auto"}, "device_map"),
    ],
)
def test_bad_loading_options_are_named(fields, message):
    if "lora" in fields:
        pytest.importorskip("peft")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModelSource(**{"path": "Qwen/Qwen3-0.6B-Base", **fields})


# ---- prompts and the teacher's view, token by token ----------------------------------------------------


def test_teacher_scores_its_template_prompt_then_the_shared_response_with_the_end_token_swapped(
    qwen3_dirs, tmp_path, monkeypatch
):
    monkeypatch.setattr(eopd.models, "_in_hub_cache", lambda repo_id: True)
    p = plan(local(QWEN_PAIR, qwen3_dirs), tmp_path / "run")
    student_tok = load_tokenizer(p.student_source)
    teacher_tok = load_tokenizer(p.teacher_source)
    vocab = eopd.models.check_shared_vocabulary(student_tok, teacher_tok)
    endoftext, im_end = student_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    student = load_model(p.student_source, vocab_size=vocab)
    teacher = load_model(p.teacher_source, vocab_size=vocab, dtype="bfloat16")
    items = PromptDataset(
        PROBLEMS[:2],
        student_tokenizer=student_tok,
        student_format=p.student_format,
        teacher_tokenizer=teacher_tok,
        teacher_format=p.teacher_format,
    ).items
    # Row 0 ends with the student's end token; row 1 is cut off before it (and padded with the same id).
    responses = [student_tok.encode(" So \\boxed{4}", add_special_tokens=False) + [endoftext]]
    responses.append(student_tok.encode(" It", add_special_tokens=False))
    width = max(map(len, responses))
    prompt_ids, prompt_mask = pad_prompts([item["prompt_ids"] for item in items], endoftext)
    response_ids = torch.tensor([r + [endoftext] * (width - len(r)) for r in responses])
    response_mask = torch.tensor([[i < len(r) for i in range(width)] for r in responses])
    rollout = RolloutBatch(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        response_mask=response_mask,
        prompt_length=prompt_ids.shape[1],
        truncated=torch.tensor([False, True]),
    )
    module = DistillModule(
        student,
        teacher,
        preset("eopd"),
        pair=PairSpec(vocab, endoftext, (endoftext,), (im_end,), remap_end_token=(endoftext, im_end)),
    )
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, args[0].clone())  # the first forward: the ids that model scores

        return hook

    for name, model in (("student", student), ("teacher", teacher)):
        model.get_input_embeddings().register_forward_hook(record(name))

    side = module.score_teacher(rollout, items)
    module.score_old_policy(rollout, side)

    for row, (problem, response) in enumerate(zip(PROBLEMS, responses, strict=False)):
        teacher_prompt = teacher_tok.encode(
            f"<|im_start|>user\n{problem['prompt']}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
            add_special_tokens=False,
        )
        student_prompt = student_tok.encode(f"{problem['prompt']}\n", add_special_tokens=False)
        swapped = [im_end if t == endoftext else t for t in response]
        teacher_row = seen["teacher"][row].tolist()
        student_row = seen["student"][row].tolist()
        teacher_start = len(teacher_row) - width - len(teacher_prompt)
        student_start = len(student_row) - width - len(student_prompt)
        assert (
            teacher_row[teacher_start : teacher_start + len(teacher_prompt) + len(response)]
            == teacher_prompt + swapped
        )
        assert (
            student_row[student_start : student_start + len(student_prompt) + len(response)]
            == student_prompt + response
        )
        assert set(teacher_row[:teacher_start]) <= {endoftext}, (
            "left padding only before the teacher's prompt"
        )

    # The teacher's log-prob of the student's end token is its log-prob of its own <|im_end|> there.
    context = teacher_tok.encode(
        f"<|im_start|>user\n{PROBLEMS[0]['prompt']}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        add_special_tokens=False,
    ) + [im_end if t == endoftext else t for t in responses[0]]
    with torch.no_grad():
        logits = teacher(torch.tensor([context])).logits[0, -2, :vocab].float()  # predicts the last token
    expected = torch.log_softmax(logits, dim=-1)[im_end]
    end_position = len(responses[0]) - 1
    torch.testing.assert_close(side.stats.token_logprobs[0, end_position], expected, atol=2e-2, rtol=0)
    assert side.stats.token_logprobs[0, end_position] > -1, "the scripted teacher expects its end token here"


def test_llama_instruct_pair_reads_its_own_chat_template_with_one_begin_of_text(
    llama_dirs, tmp_path, monkeypatch
):
    monkeypatch.setattr(eopd.models, "_in_hub_cache", lambda repo_id: True)
    p = plan(local(LLAMA_PAIR, llama_dirs), tmp_path / "run")
    student_tok, teacher_tok = load_tokenizer(p.student_source), load_tokenizer(p.teacher_source)

    item = PromptDataset(
        PROBLEMS[:1],
        student_tokenizer=student_tok,
        student_format=p.student_format,
        teacher_tokenizer=teacher_tok,
        teacher_format=p.teacher_format,
    ).items[0]

    expected = student_tok.encode(
        f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{PROBLEMS[0]['prompt']}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        add_special_tokens=False,
    )
    assert item["prompt_ids"] == item["teacher_prompt_ids"] == expected
    assert expected.count(student_tok.bos_token_id) == 1
    assert student_tok.eos_token == teacher_tok.eos_token == "<|eot_id|>"  # nothing to remap


# ---- refusing a pair at start-up ---------------------------------------------------------------------------


def test_pair_of_two_families_is_refused_naming_the_first_differing_token(
    qwen3_dirs, llama_dirs, tmp_path, no_model_loads, math_records
):
    cfg = compose_train(
        [
            f"pair={QWEN_PAIR}",
            f"pair.student.path={qwen3_dirs['student']}",
            f"pair.teacher.path={llama_dirs['teacher']}",
            "data.batch_size=2",
            "update.mini_batch_size=2",
        ]
    )

    with pytest.raises(eopd.train.ConfigError) as info:
        eopd.train.run(cfg, tmp_path / "run")

    assert "config 'pair'" in str(info.value)
    # Bytes and merges agree; the first special token does not.
    assert "token id 285 differs: student '<|endoftext|>', teacher '<|begin_of_text|>'" in str(info.value)


def test_teacher_end_token_that_does_not_close_its_turns_is_refused(
    qwen3_dirs, tmp_path, no_model_loads, math_records
):
    cfg = local(
        QWEN_PAIR,
        qwen3_dirs,
        "pair.teacher_eos='<|endoftext|>'",
        "data.batch_size=2",
        "update.mini_batch_size=2",
    )

    with pytest.raises(ConfigError, match="pair.teacher_eos.*<\\|endoftext\\|>"):
        eopd.train.run(cfg, tmp_path / "run")


# ---- memory options ------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients(qwen3_dirs):
    source = ModelSource(path=str(qwen3_dirs["student"]), gradient_checkpointing=True)
    plain = load_model(ModelSource(path=str(qwen3_dirs["student"])), vocab_size=0).train()
    checkpointed = prepare_student(load_model(source, vocab_size=0), source).train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])

    grads = []
    for model in (plain, checkpointed):
        hidden = eopd.scoring.final_hidden_states(model, ids, torch.ones_like(ids))
        hidden.square().sum().backward()
        grads.append(model.get_input_embeddings().weight.grad)

    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1])


def test_lora_student_optimises_only_its_adapters(qwen3_dirs):
    pytest.importorskip("peft")
    source = ModelSource(path=str(qwen3_dirs["student"]), lora={"r": 4, "alpha": 8})
    student = prepare_student(load_model(source, vocab_size=0), source)
    teacher = load_model(ModelSource(path=str(qwen3_dirs["teacher"])), vocab_size=0)
    module = DistillModule(student, teacher, preset("eopd"), pair=PairSpec(290, 285, (285,)))

    optimized = {
        id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]
    }

    trainable = {name for name, p in student.named_parameters() if id(p) in optimized}
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) == sum(p.requires_grad for p in student.parameters())


def test_teacher_device_map_and_dtype_reach_transformers_loading(qwen3_dirs, monkeypatch):
    pytest.importorskip("accelerate")
    calls = []
    original = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda path, **kw: calls.append(kw) or original(path, **kw)
    )
    source = ModelSource(path=str(qwen3_dirs["teacher"]), device_map="auto", dtype="bfloat16")

    teacher = load_model(source, vocab_size=0, dtype="float32")  # the side's own dtype wins

    assert calls == [{"dtype": torch.bfloat16, "device_map": "auto"}]
    assert teacher.dtype == torch.bfloat16


# ---- full runs ---------------------------------------------------------------------------------------------

RUN = [
    "rollout_steps=2",
    "data.batch_size=2",
    "update.mini_batch_size=1",
    "rollout.max_new_tokens=12",
    "eval.grader=math",
    "eval.every_n_rollout_steps=0",
    "eval.n_problems=3",
    "eval.n_samples=2",
    "eval.max_new_tokens=16",
    "eval.final.n_problems=3",
    "eval.final.n_samples=2",
    "logger=csv",
]


def test_qwen3_format_pair_trains_in_bf16_and_is_graded_with_math_verify(
    qwen3_dirs, tmp_path, math_records, caplog
):
    cfg = local(QWEN_PAIR, qwen3_dirs, *RUN, "trainer.precision=bf16-mixed")
    run_dir = tmp_path / "run"

    with caplog.at_level(logging.INFO, logger="eopd.train"):
        metrics = eopd.train.run(cfg, run_dir)

    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    table = json.loads((run_dir / "eval.json").read_text())
    # The scripted teacher answers \boxed{4} to every problem: right on two of three, graded by math-verify.
    assert table["teacher"]["avg@2"] == pytest.approx(2 / 3)
    assert table["teacher"]["pass@2"] == pytest.approx(2 / 3)
    assert 0 <= table["student after"]["avg@2"] <= 1
    saved = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert saved.config.model_type == "qwen3"
    # The start-up self-test showed both formats and what the teacher scores.
    logged = caplog.text
    assert "teacher prompt format" in logged and "<think>\\n\\n</think>\\n\\n" in logged
    # A response in the task's own format (MathGrader.example_response: the first record's answer, 4),
    # ending with the student's <|endoftext|>, remapped.
    assert "The answer is $\\\\boxed{4}$.<|im_end|>" in logged


def test_lora_run_saves_the_adapter_and_a_merged_model(qwen3_dirs, tmp_path, math_records):
    pytest.importorskip("peft")
    cfg = local(QWEN_PAIR, qwen3_dirs, *RUN, "pair.student.lora={r: 4, alpha: 8}", "optimizer.lr=1e-2")
    run_dir = tmp_path / "run"

    eopd.train.run(cfg, run_dir)

    adapter = json.loads((run_dir / "student" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4
    initial = AutoModelForCausalLM.from_pretrained(qwen3_dirs["student"]).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "student").state_dict()
    assert merged.keys() == initial.keys(), "the merged model is a plain model of the base architecture"
    changed = {k for k in initial if not torch.equal(initial[k], merged[k])}
    assert changed, "the adapters were not trained or not merged"
    assert all(k.endswith("proj.weight") for k in changed), f"weights outside the adapters changed: {changed}"
    assert OmegaConf.select(cfg, "pair.student.lora.r") == 4
