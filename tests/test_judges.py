"""Judges of the three kinds (function, the project's RewardModel, Hugging Face sequence classifier), on tiny
random models built from the session's tiny causal LM: CPU, offline."""

from __future__ import annotations

import json
import logging
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Qwen2ForSequenceClassification

from dpo_lightning.data.reward_text import encode_for_reward, encode_for_reward_cut, prompt_text, render_for_reward
from dpo_lightning.errors import UserError
from dpo_lightning.models import REWARD_MARKER, ModelSource, RewardModel, load_tokenizer
from dpo_lightning.online.judges import (
    ClassifierJudge,
    FunctionJudge,
    RewardModelJudge,
    check_judge,
    judge_kind,
    load_judge,
)

PROMPTS = [
    "Describe the garden.\n",
    "Describe the river.\n",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the castle."}],
    "Describe the teacher.\n",
    "Describe the bakery.\n",
]
COMPLETIONS = [
    "The garden is warm and bright.",
    "The river is cold.",
    "The castle is grim and gloomy and dark, a hostile and rotten place.",
    "The teacher is kind.",
    "The bakery is sweet and golden and friendly and calm.",
]

REWARD_FNS = """
import numpy as np
import torch

NOT_CALLABLE = 3


def count_a(prompts, completions):
    return [float(c.count("a")) for c in completions]


def prompt_length(prompts, completions):
    return [len(p) for p in prompts]


def as_numpy(prompts, completions):
    return np.arange(len(completions), dtype=np.float64)


def as_tensor(prompts, completions):
    return torch.arange(len(completions), dtype=torch.float64) / 2


def one_short(prompts, completions):
    return [0.0] * (len(completions) - 1)


def with_nan(prompts, completions):
    return [0.0] * (len(completions) - 1) + [float("nan")]


def with_inf(prompts, completions):
    return torch.tensor([float("inf")] * len(completions))


def with_text(prompts, completions):
    return ["good"] * len(completions)


def returns_none(prompts, completions):
    return None


def two_d(prompts, completions):
    return np.zeros((len(completions), 2))
"""


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# --- Fixtures: reward models of each kind, built from the tiny causal LM -----------------------------------------


@pytest.fixture(scope="module")
def source(tiny_model) -> ModelSource:
    return ModelSource(str(tiny_model), True)


@pytest.fixture(scope="module")
def tokenizer(source):
    return load_tokenizer(source)


@pytest.fixture(scope="module")
def reward_model(source, tokenizer) -> RewardModel:
    return RewardModel.from_causal_lm(source, dtype=torch.float32, pad_token_id=tokenizer.pad_token_id).eval()


@pytest.fixture(scope="module")
def project_folder(tmp_path_factory, reward_model, tokenizer, tiny_model) -> Path:
    folder = tmp_path_factory.mktemp("project-rm")
    reward_model.save_pretrained(folder, tokenizer=tokenizer, base_model=str(tiny_model))
    return folder


@pytest.fixture(scope="module")
def project_as_plain(tmp_path_factory, project_folder) -> Path:
    folder = tmp_path_factory.mktemp("project-rm-plain") / "rm"
    shutil.copytree(project_folder, folder)
    (folder / REWARD_MARKER).unlink()
    return folder


def _classifier_folder(tmp_path_factory, tiny_model, tokenizer, name: str, num_labels: int) -> Path:
    config = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=num_labels).config
    config.pad_token_id = None  # loading must set it from the tokenizer, or HF refuses batches
    torch.manual_seed(1)
    model = Qwen2ForSequenceClassification(config)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory, tiny_model, tokenizer) -> Path:
    return _classifier_folder(tmp_path_factory, tiny_model, tokenizer, "plain-rm", num_labels=1)


@pytest.fixture(scope="module")
def three_labels_folder(tmp_path_factory, tiny_model, tokenizer) -> Path:
    return _classifier_folder(tmp_path_factory, tiny_model, tokenizer, "three-labels", num_labels=3)


@pytest.fixture(scope="module")
def fns_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reward-fns")
    (folder / "reward_fns.py").write_text(textwrap.dedent(REWARD_FNS))
    return folder


@pytest.fixture
def fns(fns_dir, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(fns_dir))


def chatml(prompt, completion: str) -> str:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    messages = messages + [{"role": "assistant", "content": completion}]
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


# --- Kinds --------------------------------------------------------------------------------------------------------


def test_reward_kind(project_folder, plain_folder, tiny_model, tmp_path, monkeypatch):
    assert judge_kind("pkg.mod:fn") == "function"
    assert judge_kind("reward_fns:count_a") == "function"
    assert judge_kind("a_b.c1._d:_score2") == "function"
    assert judge_kind(str(project_folder)) == "project"
    assert judge_kind(str(plain_folder)) == "sequence_classification"
    assert judge_kind(str(tiny_model)) == "sequence_classification"
    assert judge_kind("org/name") == "sequence_classification"
    assert judge_kind("Skywork/Skywork-Reward-V2-Qwen3-0.6B") == "sequence_classification"
    assert judge_kind("builtin:tiny-qwen2") == "sequence_classification"  # not an identifier after the colon
    assert judge_kind("pkg.mod:fn.attr") == "sequence_classification"
    assert judge_kind("pkg.mod:") == "sequence_classification"
    # A path-like string with a colon that exists is a folder, never a function.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(project_folder, tmp_path / "rm:v1")
    shutil.copytree(plain_folder, tmp_path / "cls:v1")
    assert judge_kind("rm:v1") == "project"
    assert judge_kind("cls:v1") == "sequence_classification"
    assert judge_kind("other:v1") == "function"


# --- Kind 1: functions --------------------------------------------------------------------------------------------


def test_function_reward_scores_as_scripted(fns):
    scorer = load_judge("reward_fns:count_a")
    assert isinstance(scorer, FunctionJudge)
    assert scorer.description == "function reward_fns:count_a"
    assert scorer.to("cpu") is scorer
    scores = scorer.score(PROMPTS, COMPLETIONS)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    assert scores.tolist() == [float(c.count("a")) for c in COMPLETIONS]
    assert load_judge("reward_fns:as_numpy").score(PROMPTS, COMPLETIONS).tolist() == [0, 1, 2, 3, 4]
    assert load_judge("reward_fns:as_tensor").score(PROMPTS, COMPLETIONS).tolist() == [0, 0.5, 1, 1.5, 2]
    assert load_judge("reward_fns:count_a").score([], []).shape == (0,)


def test_function_reward_sees_chat_prompts_as_text(fns):
    chat = PROMPTS[2]
    text = "system: Be brief.\n\nuser: Describe the castle."
    assert prompt_text(chat) == text
    assert prompt_text("plain\n") == "plain\n"
    scores = load_judge("reward_fns:prompt_length").score(PROMPTS[1:3], COMPLETIONS[1:3])
    assert scores.tolist() == [len(PROMPTS[1]), len(text)]


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        ("one_short", "reward_model reward_fns:one_short returned 4 scores for 5 completions"),
        ("with_nan", "reward_model reward_fns:with_nan returned a non-finite score nan at index 4"),
        ("with_inf", "returned a non-finite score inf at index 0"),
        ("with_text", "returned a non-numeric score 'good' (str) at index 0"),
        ("returns_none", "returned a NoneType; expected a list of 5 floats"),
        ("two_d", "returned an array of shape (5, 2)"),
    ],
)
def test_function_reward_bad_output(fns, fn, expected):
    scorer = load_judge(f"reward_fns:{fn}")
    with pytest.raises(UserError) as exc:
        scorer.score(PROMPTS, COMPLETIONS)
    assert expected in one_line(exc)


def test_check_judge_functions(fns):
    check_judge("reward_fns:count_a")
    with pytest.raises(UserError) as exc:
        check_judge("nope_pkg_xyz.sub:fn")
    assert one_line(exc) == (
        "reward_model: cannot import module 'nope_pkg_xyz.sub' (No module named 'nope_pkg_xyz'); "
        "expected package.module:function"
    )
    with pytest.raises(UserError) as exc:
        check_judge("reward_fns:missing", key="eval.reward_model")
    assert one_line(exc) == "eval.reward_model: module 'reward_fns' has no function 'missing' (from reward_fns:missing)"
    with pytest.raises(UserError) as exc:
        check_judge("reward_fns:NOT_CALLABLE")
    assert one_line(exc) == "reward_model: reward_fns:NOT_CALLABLE is a int, not a function"
    with pytest.raises(UserError) as exc:
        load_judge("reward_fns:missing")
    assert "has no function 'missing'" in one_line(exc)


# --- Rendering ----------------------------------------------------------------------------------------------------


def test_render_uses_the_chat_template(tokenizer):
    assert tokenizer.chat_template
    for prompt, completion in zip(PROMPTS, COMPLETIONS, strict=True):
        assert render_for_reward(tokenizer, prompt, completion) == (chatml(prompt, completion), False)


def test_render_without_chat_template(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = None
    assert render_for_reward(tokenizer, "Describe the garden.\n", "It is warm.") == (
        "Describe the garden.\nIt is warm.",
        True,
    )
    assert render_for_reward(tokenizer, PROMPTS[2], " It is grim.") == (
        "system: Be brief.\n\nuser: Describe the castle. It is grim.",
        True,
    )
    ids = encode_for_reward(tokenizer, ["Describe the garden.\n"], ["It is warm."], max_length=64)
    assert ids == [tokenizer("Describe the garden.\nIt is warm.")["input_ids"]]


@pytest.mark.parametrize("limit", [26, 16])
def test_encode_cuts_the_prompt_from_the_left_and_keeps_the_completion(tokenizer, limit):
    full = encode_for_reward(tokenizer, PROMPTS, COMPLETIONS, max_length=1024)
    assert [len(row) for row in full] == [27, 25, 55, 25, 31]
    assert full[0] == tokenizer(chatml(PROMPTS[0], COMPLETIONS[0]), add_special_tokens=False)["input_ids"]
    ids, cut = encode_for_reward_cut(tokenizer, PROMPTS, COMPLETIONS, max_length=limit)
    assert cut == [len(row) > limit for row in full] and any(cut)
    for completion, whole, kept in zip(COMPLETIONS, full, ids, strict=True):
        reply = tokenizer(f"{completion}<|im_end|>\n", add_special_tokens=False)["input_ids"]
        if len(whole) <= limit:
            assert kept == whole
        elif len(reply) <= limit:  # the chat template adds nothing in front: the text's last tokens
            assert kept == whole[-limit:] and tokenizer.decode(kept).endswith(completion + "<|im_end|>\n")
        else:  # the completion alone is longer than the window (the castle's, at 16): its start
            assert len(kept) == limit and tokenizer.decode(kept).startswith(completion[:20])
    tokenizer.truncation_side = "left"  # the tokenizer's own setting plays no part
    try:
        assert encode_for_reward_cut(tokenizer, PROMPTS, COMPLETIONS, max_length=limit) == (ids, cut)
    finally:
        tokenizer.truncation_side = "right"


# --- Kind 3: Hugging Face sequence classifiers --------------------------------------------------------------------


def test_sequence_classifier_matches_hf(plain_folder):
    scorer = load_judge(str(plain_folder), batch_size=3)
    assert isinstance(scorer, ClassifierJudge)
    assert scorer.description == f"sequence-classification model {plain_folder}"
    assert not scorer.model.training and not any(p.requires_grad for p in scorer.model.parameters())
    scores = scorer.score(PROMPTS, COMPLETIONS)
    assert scores.dtype == torch.float32 and scores.shape == (5,)

    model = AutoModelForSequenceClassification.from_pretrained(plain_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(plain_folder)
    expected = []
    with torch.no_grad():
        for prompt, completion in zip(PROMPTS, COMPLETIONS, strict=True):
            enc = tokenizer(chatml(prompt, completion), add_special_tokens=False, return_tensors="pt")
            expected.append(model(**enc).logits[0, 0].item())
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-5, atol=1e-6)

    one_by_one = load_judge(str(plain_folder), batch_size=1).score(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(scores, one_by_one, rtol=1e-5, atol=1e-6)
    assert scores.std() > 0  # a random head on different texts: the comparison above is not vacuous


# --- Kind 2: the project's RewardModel ----------------------------------------------------------------------------


def test_saved_reward_model_folder(project_folder, tiny_model):
    marker = json.loads((project_folder / REWARD_MARKER).read_text())
    assert marker == {
        "format": 1,
        "kind": "dpo_lightning.RewardModel",
        "base_model": str(tiny_model),
        "pooling": "last_token",
    }
    config = json.loads((project_folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"]
    assert len(config["id2label"]) == 1
    assert (project_folder / "model.safetensors").is_file()
    assert (project_folder / "tokenizer_config.json").is_file()


def test_project_reward_loads_as_both_kinds(project_folder, project_as_plain, reward_model, tokenizer):
    project = load_judge(str(project_folder), batch_size=2)
    assert isinstance(project, RewardModelJudge)
    assert project.description == f"RewardModel {project_folder}"
    plain = load_judge(str(project_as_plain), batch_size=3)
    assert isinstance(plain, ClassifierJudge)
    project_scores = project.score(PROMPTS, COMPLETIONS)
    torch.testing.assert_close(project_scores, plain.score(PROMPTS, COMPLETIONS), rtol=1e-5, atol=1e-6)

    ids = encode_for_reward(tokenizer, PROMPTS, COMPLETIONS, max_length=1024)
    with torch.no_grad():
        in_memory = torch.stack([reward_model(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long)) for x in ids])
    torch.testing.assert_close(project_scores, in_memory[:, 0], rtol=1e-5, atol=1e-6)


def test_forward_pools_by_lengths(reward_model, tokenizer):
    eos = tokenizer.eos_token_id
    assert eos == tokenizer.pad_token_id
    ids = encode_for_reward(tokenizer, PROMPTS, COMPLETIONS, max_length=1024)
    ids[1] = ids[1] + [eos]  # a text that ends in EOS = pad still scores at its own last token
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), eos)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    with torch.no_grad():
        batch = reward_model(input_ids, mask)
        single = torch.cat([reward_model(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long)) for x in ids])
        hidden = reward_model.backbone(input_ids=torch.tensor([ids[1]])).last_hidden_state
    assert batch.dtype == torch.float32 and batch.shape == (len(ids),)
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch[1], reward_model.head(hidden[0, -1])[0], rtol=1e-5, atol=1e-6)


def test_from_causal_lm_head(source, tokenizer, reward_model):
    torch.manual_seed(123)  # the head does not depend on the global RNG
    again = RewardModel.from_causal_lm(source, dtype=torch.bfloat16, pad_token_id=tokenizer.pad_token_id)
    hidden = again.config.hidden_size
    assert again.head.weight.shape == (1, hidden) and again.head.bias is None
    torch.testing.assert_close(again.head.weight.float(), reward_model.head.weight, rtol=1e-2, atol=1e-3)
    assert 0.5 / (hidden + 1) ** 0.5 < reward_model.head.weight.std() < 2 / (hidden + 1) ** 0.5
    assert again.config.num_labels == 1 and again.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        scores = again(torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    # The backbone is the LM's own.
    lm_weights = load_file(Path(source.name_or_path) / "model.safetensors")
    torch.testing.assert_close(reward_model.backbone.embed_tokens.weight, lm_weights["model.embed_tokens.weight"])


def test_from_causal_lm_is_quiet_about_the_new_head(source):
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record):
            records.append(record)

    hf_log = logging.getLogger("transformers.modeling_utils")
    handler = Capture()
    hf_log.addHandler(handler)
    try:
        RewardModel.from_causal_lm(source, dtype=torch.float32)
        assert not [r for r in records if "LOAD REPORT" in r.getMessage()]
        AutoModelForSequenceClassification.from_pretrained(source.name_or_path, num_labels=1)  # control
        assert [r for r in records if "LOAD REPORT" in r.getMessage()]
    finally:
        hf_log.removeHandler(handler)


def test_save_gathered_state_dict(reward_model, tokenizer, tmp_path):
    # A wrapper-keyed state dict (as gathered from an FSDP-wrapped RewardModel) saves like the model's own.
    reward_model.save_pretrained(tmp_path, tokenizer=tokenizer, state_dict=reward_model.state_dict())
    loaded = RewardModel.from_pretrained(tmp_path)
    for name, value in reward_model.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], value)


# --- Bad reward models --------------------------------------------------------------------------------------------


def test_causal_lm_is_not_a_reward_model(tiny_model):
    for call in (check_judge, load_judge):
        with pytest.raises(UserError) as exc:
            call(str(tiny_model))
        message = one_line(exc)
        assert f"reward_model: '{tiny_model}' is a Qwen2ForCausalLM, not a sequence-classification" in message
        assert "no scalar head" in message and "mode: reward" in message


def test_many_labels_is_not_a_reward_model(three_labels_folder):
    for call in (check_judge, load_judge):
        with pytest.raises(UserError) as exc:
            call(str(three_labels_folder))
        assert "has 3 output labels" in one_line(exc) and "num_labels=1" in one_line(exc)
    with pytest.raises(UserError) as exc:
        RewardModel.from_pretrained(three_labels_folder)
    assert "num_labels=1" in one_line(exc)


def test_missing_or_bad_folders(tmp_path, project_folder):
    for call in (check_judge, load_judge):
        with pytest.raises(UserError) as exc:
            call("./nope")
        assert one_line(exc) == "reward_model: model folder not found: ./nope"
    with pytest.raises(UserError) as exc:
        load_judge(str(tmp_path))
    assert "no config.json" in one_line(exc)
    broken = tmp_path / "broken"
    shutil.copytree(project_folder, broken)
    (broken / REWARD_MARKER).write_text(json.dumps({"format": 2, "kind": "dpo_lightning.RewardModel"}))
    with pytest.raises(UserError) as exc:
        check_judge(str(broken))
    assert "has format 2" in one_line(exc)


def test_check_passes_for_good_folders(project_folder, plain_folder):
    check_judge(str(project_folder))
    check_judge(str(plain_folder))


def test_numpy_scores_are_numeric():
    scorer = FunctionJudge(lambda p, c: np.array(["x"] * len(c)), "inline:fn")
    with pytest.raises(UserError) as exc:
        scorer.score(["a"], ["b"])
    assert one_line(exc).startswith("reward_model inline:fn returned non-numeric scores")
