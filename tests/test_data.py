"""Data: sources, formats, bad rows, tokenization (TRL 1.16's contract), prompt-level split, pipeline.

Expected values are written out by hand or computed independently with the tokenizer's own calls.
"""

import copy
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from dpo_lightning import builtin
from dpo_lightning.config import DPOConfig
from dpo_lightning.data import check_source, prepare_pairs
from dpo_lightning.data.formats import normalize
from dpo_lightning.data.sources import load_splits
from dpo_lightning.data.split import prompt_key, split_by_prompt
from dpo_lightning.data.tokenize import split_and_truncate, tokenize_pair, tokenize_rows
from dpo_lightning.errors import UserError

HH_CHOSEN = (
    "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: Sure, an apple."
)
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a fruit.\n\nAssistant: Sure, no."
TEXTS = builtin.corpus(0) + [HH_CHOSEN, HH_REJECTED, "The sky is blue. The sky is green. 0123456789 ,.;:!?"]
ROWS = [
    {"prompt": "Describe the garden.\n", "chosen": "It is lovely.", "rejected": "It is grim."},
    {"prompt": "Describe the river.\n", "chosen": "It is calm.", "rejected": "It is cold."},
    {"prompt": "Describe the bridge.\n", "chosen": "It is bright.", "rejected": "It is broken."},
]
U = {"role": "user", "content": "Name a fruit."}
A_GOOD, A_BAD = {"role": "assistant", "content": "An apple."}, {"role": "assistant", "content": "A rock."}


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    folder = builtin.build_tiny_model(tmp_path_factory.mktemp("tiny"), texts=TEXTS)
    return AutoTokenizer.from_pretrained(folder)


def cfg(name, **overrides) -> DPOConfig:
    return DPOConfig(dataset_name=str(name), **{"val_fraction": 0.0, **overrides})


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return path


def norm(rows, columns=None, on_bad_rows="error", label="pairs", label_values=None):
    dataset = datasets.Dataset.from_list(rows)
    return normalize(dataset, columns=columns or {}, on_bad_rows=on_bad_rows, label=label, label_values=label_values)


# ----------------------------------------------------------------------------- formats


def test_explicit_text_passes_through():
    assert norm(ROWS).rows == ROWS


def test_explicit_conversational_wraps_text_completions():
    rows = norm([{"prompt": [U], "chosen": [A_GOOD], "rejected": "A rock."}]).rows
    assert rows == [{"prompt": [U], "chosen": [A_GOOD], "rejected": [A_BAD]}]


@pytest.mark.parametrize(
    "chosen, rejected, expected",
    [
        ("The sky is blue.", "The sky is green.", ("The sky is", " blue.", " green.")),
        ("The sky is blue.", "The sky is black.", ("The sky is", " blue.", " black.")),  # cut mid-word
        ("Yes.", "No.", ("", "Yes.", "No.")),
    ],
)
def test_implicit_text_prompt_ends_at_shared_whitespace(chosen, rejected, expected):
    row = norm([{"chosen": chosen, "rejected": rejected}]).rows[0]
    assert (row["prompt"], row["chosen"], row["rejected"]) == expected


def test_hh_multi_turn_prompt_ends_at_last_shared_assistant_marker():
    row = norm([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]).rows[0]
    # The replies share " Sure," but the prompt must stop at the marker, with the earlier turns in it.
    assert row["prompt"] == HH_CHOSEN[: HH_CHOSEN.rindex("\n\nAssistant:") + len("\n\nAssistant:")]
    assert row["prompt"].startswith("\n\nHuman: Hi there\n\nAssistant: Hello!")
    assert (row["chosen"], row["rejected"]) == (" Sure, an apple.", " Sure, no.")


def test_implicit_conversational_shared_messages_are_the_prompt():
    first = {"role": "assistant", "content": "Hi!"}
    rows = norm([{"chosen": [U, first, U, A_GOOD], "rejected": [U, first, U, A_BAD]}]).rows
    assert rows == [{"prompt": [U, first, U], "chosen": [A_GOOD], "rejected": [A_BAD]}]


def test_messages_column_is_the_prompt():
    rows = norm([{"messages": [U], "chosen": "An apple.", "rejected": [A_BAD]}]).rows
    assert rows == [{"prompt": [U], "chosen": [A_GOOD], "rejected": [A_BAD]}]


def _ultrafeedback(prompt: str, good: str, bad: str) -> dict:
    """A row of HuggingFaceH4/ultrafeedback_binarized as it comes: the prompt as text, each completion the whole
    conversation (repeating the user turn), `messages` equal to the chosen one, the scores beside."""
    user = {"role": "user", "content": prompt}
    chosen = [user, {"role": "assistant", "content": good}]
    rejected = [user, {"role": "assistant", "content": bad}]
    return {
        "prompt": prompt,
        "prompt_id": "x1",
        "chosen": chosen,
        "rejected": rejected,
        "messages": chosen,
        "score_chosen": 8.0,
        "score_rejected": 4.5,
    }


UF = [_ultrafeedback("Name a fruit.", "An apple.", "A rock."), _ultrafeedback("Name a colour.", "Blue.", "Loud.")]
UF_EXPLICIT = [  # the same pairs in TRL's explicit conversational form
    {"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]}
    for r in UF
]


@pytest.mark.parametrize(
    "drop, columns",
    [((), None), (("prompt",), None), (("prompt",), {"prompt": "messages"}), ((), {"prompt": "messages"})],
    ids=["as it comes", "without prompt", "messages as the prompt", "messages mapped over prompt"],
)
def test_ultrafeedback_binarized_gives_the_explicit_conversational_pairs(tok, drop, columns):
    """The prompt is what the two conversations share, the completions their assistant turns; a `messages`
    column equal to the chosen conversation is never taken for the prompt (it was, and every pair then trained
    on the answer as its prompt)."""
    rows = [{k: v for k, v in r.items() if k not in drop} for r in UF]
    got = norm(rows, columns=columns).rows
    assert got == UF_EXPLICIT
    tokenized = tokenize_rows(got, tok, max_prompt_length=None, max_length=None).dataset.to_list()
    assert tokenized == tokenize_rows(UF_EXPLICIT, tok, max_prompt_length=None, max_length=None).dataset.to_list()


def test_trl_lib_ultrafeedback_and_capybara_preferences_need_no_settings():
    """trl-lib/ultrafeedback_binarized: whole conversations alone; argilla/Capybara-Preferences: whole multi-turn
    conversations beside a text prompt that is their first user turn. Both give the shared turns as the prompt."""
    trl_lib = [{"chosen": r["chosen"], "rejected": r["rejected"], "score_chosen": 8.0} for r in UF]
    assert norm(trl_lib).rows == UF_EXPLICIT
    first, reply = {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}
    again = {"role": "user", "content": "And another?"}
    capybara = {
        "source": "x",
        "prompt": "Name a fruit.",
        "chosen": [first, reply, again, {"role": "assistant", "content": "A pear."}],
        "chosen_rating": 5,
        "rejected": [first, reply, again, {"role": "assistant", "content": "No."}],
        "rejected_rating": 2,
    }
    assert norm([capybara]).rows == [
        {
            "prompt": [first, reply, again],
            "chosen": [{"role": "assistant", "content": "A pear."}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }
    ]


def test_a_text_prompt_that_is_not_the_shared_user_turn_is_a_bad_row():
    row = {**UF[0], "prompt": "Name a vegetable."}
    with pytest.raises(UserError, match="row 1: 'prompt' is text that is none of the user turns"):
        norm([row])


def test_conversations_must_part_at_an_assistant_turn():
    other = {"role": "user", "content": "Name a stone."}
    with pytest.raises(
        UserError, match="row 1: 'chosen' departs from the shared conversation at message 3, a user turn"
    ):
        norm([{"chosen": [U, A_GOOD, U, A_GOOD], "rejected": [U, A_GOOD, other, A_BAD]}])


ORCA = {"system": "You are terse.", "question": "Name a fruit.", "chosen": "An apple.", "rejected": "A rock."}
SYSTEM = {"role": "system", "content": "You are terse."}


def test_a_system_column_is_the_conversations_system_message(tok):
    """Orca DPO pairs (`system`, `question`, `chosen`, `rejected`): the system text reaches the chat template as
    its system message, exactly as the explicit conversation with that message does."""
    columns = {"prompt": "question"}
    got = norm([ORCA, {**ORCA, "system": ""}], columns=columns).rows
    assert got == [
        {"prompt": [SYSTEM, U], "chosen": [A_GOOD], "rejected": [A_BAD]},
        {"prompt": [U], "chosen": [A_GOOD], "rejected": [A_BAD]},  # an empty system text adds no message
    ]
    explicit = [{"prompt": [SYSTEM, U], "chosen": [A_GOOD], "rejected": [A_BAD]}]
    assert (
        tokenize_rows(got[:1], tok, max_prompt_length=None, max_length=None).dataset.to_list()
        == tokenize_rows(explicit, tok, max_prompt_length=None, max_length=None).dataset.to_list()
    )
    with pytest.raises(UserError, match="row 1: 'system' differs from the prompt's own system message"):
        norm([{"system": "Be loud.", "prompt": [SYSTEM, U], "chosen": "An apple.", "rejected": "A rock."}])
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(UserError, match="conversational .* has no chat template"):
        tokenize_rows(got[:1], plain, max_prompt_length=None, max_length=None)
    with pytest.raises(UserError, match=r"columns has unknown role 'sytem'; valid roles: .*system"):
        cfg("x.jsonl", columns={"sytem": "s"})


# Two responses and a label, in the public datasets' own shapes; expected: the explicit pairs below.
EXPLICIT = [
    {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A rock."},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Loud."},
]
SHP = [  # stanfordnlp/SHP: labels 1 when human_ref_A is preferred
    {"history": "Name a fruit.", "human_ref_A": "An apple.", "human_ref_B": "A rock.", "labels": 1},
    {"history": "Name a colour.", "human_ref_A": "Loud.", "human_ref_B": "Blue.", "labels": 0},
]
SHP_SETTINGS = {
    "columns": {"prompt": "history", "response_a": "human_ref_A", "response_b": "human_ref_B", "label": "labels"},
    "label_values": {"1": "a", "0": "b"},
}
PKU = [  # PKU-Alignment/PKU-SafeRLHF: better_response_id names the better of response_0 and response_1
    {"prompt": "Name a fruit.", "response_0": "A rock.", "response_1": "An apple.", "better_response_id": 1},
    {"prompt": "Name a colour.", "response_0": "Blue.", "response_1": "Loud.", "better_response_id": 0},
]
PKU_SETTINGS = {
    "columns": {"response_a": "response_0", "response_b": "response_1", "label": "better_response_id"},
    "label_values": {"0": "a", "1": "b"},
}


def _turns(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


ARENA = [  # lmsys/chatbot_arena_conversations: whole conversations and a winner, ties included
    {
        "conversation_a": _turns("Name a fruit.", "An apple."),
        "conversation_b": _turns("Name a fruit.", "A rock."),
        "winner": "model_a",
    },
    {
        "conversation_a": _turns("Name a colour.", "Loud."),
        "conversation_b": _turns("Name a colour.", "Blue."),
        "winner": "model_b",
    },
    {
        "conversation_a": _turns("Name a day.", "Monday."),
        "conversation_b": _turns("Name a day.", "Friday."),
        "winner": "tie (bothbad)",
    },
]
ARENA_SETTINGS = {"columns": {"response_a": "conversation_a", "response_b": "conversation_b", "label": "winner"}}


@pytest.mark.parametrize("rows, settings", [(SHP, SHP_SETTINGS), (PKU, PKU_SETTINGS)], ids=["SHP", "PKU-SafeRLHF"])
def test_two_responses_and_a_label_give_the_explicit_pairs(tok, rows, settings):
    got = norm(rows, **settings).rows
    assert got == EXPLICIT
    swapped = {k: ("b" if v == "a" else "a") for k, v in settings["label_values"].items()}
    assert norm(rows, settings["columns"], label_values=swapped).rows == [
        {**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in EXPLICIT
    ]  # the mapping decides: read the other way round, the preference flips
    kwargs = {"max_prompt_length": None, "max_length": None}
    assert (
        tokenize_rows(got, tok, **kwargs).dataset.to_list() == tokenize_rows(EXPLICIT, tok, **kwargs).dataset.to_list()
    )


def test_arena_winners_pick_the_conversation_and_ties_are_dropped_and_counted(caplog):
    with caplog.at_level(logging.INFO):
        got = norm(ARENA, **ARENA_SETTINGS).rows
    assert got == [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in EXPLICIT
    ]
    assert "dropped 1 ties" in caplog.text


def test_a_numeric_label_without_label_values_is_refused_never_guessed():
    with pytest.raises(UserError, match=r"label '1' is a number, .* say it with label_values"):
        norm(SHP, SHP_SETTINGS["columns"])


def test_a_label_value_the_mapping_lacks_is_a_bad_row():
    rows = [*SHP, {**SHP[0], "labels": 7}]
    with pytest.raises(UserError, match=r"pairs row 3: label '7' is not among label_values \('1', '0'\)"):
        norm(rows, **SHP_SETTINGS)
    skipped = norm(rows, **SHP_SETTINGS, on_bad_rows="skip")
    assert (skipped.rows, skipped.skipped) == (EXPLICIT, 1)


def test_a_labelled_jsonl_file_trains_through_the_pipeline(tok, tmp_path):
    data = write_jsonl(tmp_path / "shp.jsonl", SHP * 5)
    pairs = prepare_pairs(cfg(data, **SHP_SETTINGS), tok)
    assert len(pairs.train) == 10
    with pytest.raises(Exception, match="label_values.1 is 'yes'"):
        cfg(data, columns=SHP_SETTINGS["columns"], label_values={"1": "yes"})


def test_columns_remap_and_missing_mapped_column():
    data = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in ROWS]
    mapping = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert norm(data, columns=mapping).rows == ROWS
    with pytest.raises(UserError, match=r"column 'answer' \(columns.chosen\) not found; available columns: question"):
        norm(data, columns={"chosen": "answer"})


def test_unknown_layout_names_the_columns():
    with pytest.raises(UserError, match=r"no preference pairs in columns text, label; accepted layouts"):
        norm([{"text": "a", "label": 1}])


GOOD = {"prompt": "p", "chosen": "yes", "rejected": "no"}
BAD_ROWS = [
    ([GOOD, {**GOOD, "chosen": None}], "pairs row 2: 'chosen' is missing"),
    ([{**GOOD, "chosen": 5}], "pairs row 1: 'chosen' is int, expected a string or a list of {role, content}"),
    ([GOOD, {**GOOD, "rejected": "  \n"}], "pairs row 2: 'rejected' is empty"),
    ([GOOD, {**GOOD, "rejected": "yes"}], "pairs row 2: 'chosen' and 'rejected' are identical"),
    (
        [
            {"prompt": [U], "chosen": "a", "rejected": "b"},
            {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
        ],
        "pairs row 2: 'prompt' message 1 is not a {role, content} message with string values",
    ),
    ([{**GOOD, "prompt": 3}], "pairs row 1: 'prompt' is int, expected a string"),
    (
        [
            {"chosen": "x\n\nAssistant: a", "rejected": "x\n\nAssistant: b"},
            {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: yo"},
        ],
        "pairs row 2: 'chosen' has nothing after the shared prompt",
    ),
    (
        [{"chosen": [U, A_GOOD], "rejected": [U, A_GOOD, U, A_BAD]}],
        "pairs row 1: 'chosen' has nothing after the shared",
    ),
]


@pytest.mark.parametrize("rows, message", BAD_ROWS)
def test_bad_row_error_and_skip(rows, message):
    with pytest.raises(UserError) as err:
        norm(rows)
    assert str(err.value).startswith(message)
    skipped = norm(rows, on_bad_rows="skip")
    assert (len(skipped.rows), skipped.skipped) == (len(rows) - 1, 1)


# ----------------------------------------------------------------------------- sources


def _write(path: Path, rows) -> Path:
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    elif path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(path)
    else:
        datasets.Dataset.from_list(rows).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".parquet", ".csv"])
def test_local_files_load(tmp_path, ext):
    raw = load_splits(cfg(_write(tmp_path / f"pairs{ext}", ROWS)))
    assert raw.eval is None and raw.label.endswith(f"pairs{ext}")
    assert norm_raw(raw.train) == ROWS


def norm_raw(dataset):
    return normalize(dataset, columns={}, on_bad_rows="error", label="x").rows


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "ds")
    raw = load_splits(cfg(tmp_path / "ds"))
    assert norm_raw(raw.train) == ROWS and raw.eval is None
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(tmp_path / "dd")
    raw = load_splits(cfg(tmp_path / "dd"))
    assert (len(raw.train), len(raw.eval)) == (3, 1)
    with pytest.raises(UserError, match=r"split 'dev' not found; available splits: test, train; set eval_split"):
        load_splits(cfg(tmp_path / "dd", eval_split="dev"))
    with pytest.raises(UserError, match=r"split 'all' not found; available splits: test, train; set train_split"):
        load_splits(cfg(tmp_path / "dd", train_split="all"))


def test_builtin_uses_its_test_split_as_eval():
    raw = load_splits(cfg(builtin.BUILTIN_DATASET, seed=3))
    expected = builtin.preference_rows(3)
    assert raw.train.to_list() == expected["train"] and raw.eval.to_list() == expected["test"]


@pytest.mark.parametrize("name", ["./nope.jsonl", "data/pairs.parquet", "~/missing/file.csv"])
def test_missing_local_path(name):
    with pytest.raises(UserError, match=f"^dataset file not found: {name}$"):
        check_source(cfg(name))
    with pytest.raises(UserError, match="dataset file not found"):
        load_splits(cfg(name))


def test_hub_dataset_offline_fails_fast_with_one_line(tmp_path):
    code = (
        "from dpo_lightning.config import DPOConfig\nfrom dpo_lightning.data.sources import load_splits\n"
        "from dpo_lightning.errors import UserError\ntry:\n"
        "    load_splits(DPOConfig(dataset_name='someone/no-such-dataset'))\nexcept UserError as e:\n"
        "    print('USERERROR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PYTHONPATH": str(Path.cwd())}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30
    line = [x for x in out.stdout.splitlines() if x.startswith("USERERROR")]
    assert len(line) == 1, out.stdout + out.stderr
    assert "could not load dataset 'someone/no-such-dataset' from the Hugging Face Hub (" in line[0]
    assert "point dataset_name at a local .jsonl/.parquet/.csv file" in line[0]


def test_hub_unreachable_uses_cache_only_and_restores_flags(monkeypatch):
    from dpo_lightning.data import sources

    monkeypatch.setattr(sources, "hub_reachable", lambda: False)  # as on a machine with no network
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as when HF_HUB_OFFLINE is not set
    start = time.monotonic()
    with pytest.raises(UserError, match="Hub is unreachable from this machine, so only the local cache was tried"):
        load_splits(cfg("someone/no-such-dataset"))
    assert time.monotonic() - start < 30 and datasets.config.HF_HUB_OFFLINE is False


# ----------------------------------------------------------------------------- JSON pre-scan

LINE = json.dumps(GOOD) + "\n"
PRESCAN = [
    (
        [LINE, LINE, '{"prompt": "a" "chosen": "b"}\n'],
        r"pairs.jsonl line 3, column 16: invalid JSON: a missing comma between two items$",
    ),
    ([LINE, "[1, 2]\n"], r"pairs.jsonl line 2: expected a JSON object, got list"),
    (["\n", "  \n"], r"pairs.jsonl has no rows"),
    (
        [LINE, '{"prompt": "p", "chosen": "c"}\n'],
        r"line 2: missing column 'rejected'; this row has columns: prompt, chosen",
    ),
    (
        [LINE, LINE, LINE, LINE, '{"prompt": "p", "chosen": 7, "rejected": "r"}\n'],
        r"line 5: column 'chosen' is int, expected a string or a list of \{role, content\} messages",
    ),
    (
        [LINE, '{"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "r"}\n'],
        r"line 2: column 'chosen' is a list",
    ),
]


@pytest.mark.parametrize("lines, message", PRESCAN)
def test_prescan_reports_line_and_problem(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", lines)
    with pytest.raises(UserError, match=message):
        load_splits(cfg(path))


def test_prescan_json_list_reports_absolute_line(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(
        '[\n  {"prompt": "p", "chosen": "c", "rejected": "r"},\n  {"prompt": "p", "chosen": 1, "rejected": "r"}\n]'
    )
    with pytest.raises(UserError, match=r"pairs.json line 3: column 'chosen' is int"):
        load_splits(cfg(path))
    path.write_text('[\n  {"prompt": "p", "chosen": "c", "rejected": "r"},\n  {"prompt": "p" "chosen": 1}\n]')
    with pytest.raises(UserError, match=r"pairs.json line 3, column 18: invalid JSON"):
        load_splits(cfg(path))


def test_prescan_skip_mode_counts_and_keeps_good_lines(tmp_path, caplog):
    bad = ['{"prompt": "p", "chosen": "c"}\n', '{"prompt": "p", "chosen": 7, "rejected": "r"}\n']
    path = write_jsonl(tmp_path / "pairs.jsonl", [ROWS[0], bad[0], ROWS[1], bad[1], ROWS[2]])
    with caplog.at_level(logging.WARNING):
        raw = load_splits(cfg(path, on_bad_rows="skip"))
    assert norm_raw(raw.train) == ROWS
    assert (
        raw.skipped == 2 and "skipped 2 bad lines (lines 2, 4; first: line 2: missing column 'rejected'" in caplog.text
    )
    # a line that is not JSON at all is skipped and counted the same way, its line number logged
    broken = '{"prompt": "p\tq", "chosen": "c", "rejected": "r"}\n'  # a raw tab inside a string
    write_jsonl(path, [ROWS[0], "{broken\n", ROWS[1], broken, ROWS[2]])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        raw = load_splits(cfg(path, on_bad_rows="skip"))
    assert norm_raw(raw.train) == ROWS and raw.skipped == 2
    assert "skipped 2 bad lines (lines 2, 4; first: line 2, column 2: invalid JSON: a key not in double quotes" in (
        caplog.text
    )
    write_jsonl(path, [ROWS[0], broken])
    with pytest.raises(UserError, match=r"line 2, column \d+: invalid JSON: a raw tab or line break inside a string"):
        load_splits(cfg(path))  # on_bad_rows: error stops at the first, in words


# ----------------------------------------------------------------------------- tokenization


def ids(tok, text):
    return tok(text=text)["input_ids"]


def test_text_pair_matches_direct_tokenization(tok):
    for row in ROWS:
        out = tokenize_pair(tok, **row, max_prompt_length=None, max_length=None)
        prompt = ids(tok, row["prompt"])
        joint = ids(tok, row["prompt"] + row["chosen"] + tok.eos_token)
        assert joint[: len(prompt)] == prompt  # the prompt ends on a token boundary ("\n")
        assert out["prompt_ids"] == prompt and out["chosen_ids"] == joint[len(prompt) :]
        assert out["rejected_ids"] == ids(tok, row["prompt"] + row["rejected"] + tok.eos_token)[len(prompt) :]


def test_eos_appended_once(tok):
    plain = tokenize_pair(tok, "Q\n", "It is calm.", "It is cold.", max_prompt_length=None, max_length=None)
    with_eos = tokenize_pair(
        tok, "Q\n", "It is calm." + tok.eos_token, "It is cold.", max_prompt_length=None, max_length=None
    )
    assert plain == with_eos
    assert plain["chosen_ids"][-1] == tok.eos_token_id and plain["chosen_ids"][-2] != tok.eos_token_id


def test_chat_pair_matches_chat_template(tok):
    out = tokenize_pair(tok, [U], [A_GOOD], [A_BAD], max_prompt_length=None, max_length=None)
    gen = tok.apply_chat_template([U], tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
    full = tok.apply_chat_template([U, A_GOOD], tokenize=True, return_dict=True)["input_ids"]
    assert out["prompt_ids"] == list(gen) and out["prompt_ids"] + out["chosen_ids"] == list(full)
    assert tok.decode(out["chosen_ids"]) == "An apple.<|im_end|>\n"


def test_completion_starts_where_prompt_and_joint_diverge():
    out = split_and_truncate([1, 2, 3], [1, 2, 9, 9], [1, 2, 3, 7], max_prompt_length=None, max_length=None)
    assert out == {"prompt_ids": [1, 2], "chosen_ids": [9, 9], "rejected_ids": [3, 7]}


def test_truncation_edge_cases():
    prompt, chosen, rejected = list(range(10)), list(range(10)) + [50, 51, 52], list(range(10)) + [60]

    def cut(mpl, ml):
        return split_and_truncate(prompt, chosen, rejected, max_prompt_length=mpl, max_length=ml)

    assert cut(4, None)["prompt_ids"] == [6, 7, 8, 9]  # the last prompt tokens
    assert cut(None, None)["prompt_ids"] == prompt
    assert cut(4, 6) == {"prompt_ids": [6, 7, 8, 9], "chosen_ids": [50, 51], "rejected_ids": [60]}
    assert cut(None, 11) == {"prompt_ids": prompt, "chosen_ids": [50], "rejected_ids": [60]}  # exactly 1 left
    assert cut(None, 10) is None and cut(None, 3) is None


def test_tokenize_rows_drops_and_counts(tok, caplog):
    long_prompt = {**ROWS[0], "prompt": "Describe the garden and the river and the bridge at length.\n"}
    max_length = len(ids(tok, long_prompt["prompt"]))
    with caplog.at_level(logging.INFO):
        out = tokenize_rows([long_prompt, *ROWS], tok, max_prompt_length=None, max_length=max_length)
    assert (
        out.dropped == 1
        and len(out.dataset) == 3
        and out.dataset.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    )
    assert "dropped 1" in caplog.text
    direct = [tokenize_pair(tok, **r, max_prompt_length=None, max_length=max_length) for r in ROWS]
    assert out.dataset.to_list() == direct


def test_pairs_that_truncation_makes_identical_are_dropped_and_counted(tok, tmp_path, caplog):
    """Forty shared words, then " good" or " bad": cut at max_length the two are the same tokens, a pair that
    would train at exactly log 2 with no gradient. They are dropped and counted, and a run left with none
    stops in one line before any model loads."""
    shared = " ".join(["the garden is green"] * 10)
    rows = [{"prompt": "Say.\n", "chosen": f"{shared} good", "rejected": f"{shared} bad"}, *ROWS]
    max_length = len(ids(tok, "Say.\n")) + 20
    with caplog.at_level(logging.WARNING):
        out = tokenize_rows(rows, tok, max_prompt_length=None, max_length=max_length)
    assert out.dropped == 1 and len(out.dataset) == 3
    assert "dropped 1 of 4 pairs left with chosen and rejected identical" in caplog.text and "pairs 1 in" in caplog.text
    # from a file, the dropped pair is named by its row there, as a bad row is (not by its place after the split)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [ROWS[0], ROWS[1], rows[0], ROWS[2]])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare_pairs(cfg(mixed, max_length=max_length, max_prompt_length=None, val_fraction=0.0), tok)
    assert "identical (they differ only past the cut) by truncation" in caplog.text
    assert caplog.text.rstrip().endswith(f"{mixed} row 3")
    data = write_jsonl(tmp_path / "same.jsonl", rows[:1])
    with pytest.raises(UserError, match="no training pairs left .* 1 dropped by truncation"):
        prepare_pairs(cfg(data, max_length=max_length, max_prompt_length=None), tok)


def test_tokenize_rows_mixes_text_and_chat(tok):
    rows = [ROWS[0], {"prompt": [U], "chosen": [A_GOOD], "rejected": [A_BAD]}, ROWS[1]]
    out = tokenize_rows(rows, tok, max_prompt_length=None, max_length=None)
    assert out.dataset.to_list() == [tokenize_pair(tok, **r, max_prompt_length=None, max_length=None) for r in rows]


def test_matches_trl_tokenization(tok):
    trl_data = pytest.importorskip("trl.data_utils")
    rows = [
        *ROWS,
        {"prompt": [U], "chosen": [A_GOOD], "rejected": [A_BAD]},
        {"prompt": "Hello wor", "chosen": "ld", "rejected": "m"},
    ]
    for row in rows:  # TRL 1.16 DPOTrainer._prepare_dataset: add_eos (text only), then tokenize_fn
        chat = isinstance(row["prompt"], list)
        chosen, rejected = (
            (row["chosen"], row["rejected"])
            if chat
            else (row["chosen"] + "<|endoftext|>", row["rejected"] + "<|endoftext|>")
        )
        p = trl_data._tokenize(tok, row["prompt"], **({"add_generation_prompt": True} if chat else {}))["input_ids"]
        c = trl_data._tokenize(tok, row["prompt"] + chosen)["input_ids"]
        r = trl_data._tokenize(tok, row["prompt"] + rejected)["input_ids"]
        n = min(trl_data.common_prefix_length(p, c), trl_data.common_prefix_length(p, r))
        expected = {"prompt_ids": p[:n], "chosen_ids": c[n:], "rejected_ids": r[n:]}
        assert tokenize_pair(tok, **row, max_prompt_length=None, max_length=None) == expected


def test_tokenizer_round_trip(tok):
    """The `tokenizers`-trained tokenizer and the Qwen2Tokenizer AutoTokenizer rebuilds from its folder agree."""
    trained = builtin.train_tokenizer(TEXTS)
    assert type(tok).__name__ == "Qwen2Tokenizer" and trained.get_vocab() == tok.get_vocab()
    samples = [
        "Hello, world!\n\nHuman: 42 apples?",
        "naïve café — 東京\n\tend  ",
        "3.14159 + 2,718 = ?!",
        "a\r\nb\n\n\nc",
    ]
    for text in samples:
        assert tok(text=text)["input_ids"] == trained(text=text)["input_ids"], text
        assert tok.decode(tok(text=text)["input_ids"]) == text


# ----------------------------------------------------------------------------- split and pipeline


def test_split_by_prompt_has_no_shared_prompt_and_is_seeded():
    rows = [{"prompt": f"prompt {i}", "chosen": "a", "rejected": f"b{j}"} for i in range(10) for j in range(3)]
    rows.append({"prompt": [U], "chosen": [A_GOOD], "rejected": [A_BAD]})
    train, val = split_by_prompt(rows, 0.3, seed=7)
    train_keys, val_keys = {prompt_key(r["prompt"]) for r in train}, {prompt_key(r["prompt"]) for r in val}
    assert not train_keys & val_keys and len(val_keys) == 3 and len(train) + len(val) == len(rows)
    assert split_by_prompt(rows, 0.3, seed=7) == (train, val)
    assert split_by_prompt(rows, 0.0, seed=7) == (rows, [])
    assert len(split_by_prompt(rows[:6], 0.01, seed=0)[1]) == 3  # at least one prompt (of 2) held out


def test_prepare_pairs_builtin_and_validation_skip(tok, tmp_path, caplog):
    pairs = prepare_pairs(cfg(builtin.BUILTIN_DATASET), tok)
    expected = builtin.preference_rows(DPOConfig().seed)  # its test split is the eval split
    assert (len(pairs.train), len(pairs.val)) == (len(expected["train"]), len(expected["test"]))
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    with caplog.at_level(logging.INFO):
        pairs = prepare_pairs(cfg(path, val_fraction=0.0), tok)
    assert pairs.val is None and len(pairs.train) == 3
    assert "3 rows read, 0 bad rows skipped" in caplog.text and "validation skipped" in caplog.text
    held = prepare_pairs(cfg(path, val_fraction=0.3), tok)
    assert (len(held.train), len(held.val)) == (2, 1)


def test_val_fraction_zero_on_a_source_with_a_test_split_says_validation_still_runs(tok, caplog):
    with caplog.at_level(logging.WARNING):
        pairs = prepare_pairs(cfg(builtin.BUILTIN_DATASET, val_fraction=0.0), tok)
    assert pairs.val is not None  # the source's test split
    lines = [r.getMessage() for r in caplog.records if "val_fraction 0" in r.getMessage()]
    assert len(lines) == 1 and "validation still runs on" in lines[0] and "[test]" in lines[0]


def test_prepare_pairs_empty_training_set(tok, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    with pytest.raises(UserError, match="no training pairs left .*3 dropped by truncation"):
        prepare_pairs(cfg(path, max_length=2, max_prompt_length=None), tok)


def test_max_completion_length_keeps_each_completions_start_before_max_length_applies():
    out = split_and_truncate(
        [1, 2], [1, 2, 3, 4, 5, 6], [1, 2, 7, 8], max_prompt_length=None, max_length=None, max_completion_length=3
    )
    assert out == {"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [7, 8]}
    # max_length then cuts what is left after the prompt
    out = split_and_truncate(
        [1, 2], [1, 2, 3, 4, 5, 6], [1, 2, 7, 8], max_prompt_length=None, max_length=4, max_completion_length=3
    )
    assert out == {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [7, 8]}


def test_eval_batch_size_sets_the_validation_batches(tmp_path):
    from dpo_lightning.config import make_config
    from dpo_lightning.data.datamodule import DPODataModule

    model = builtin.builtin_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model)
    values = {"model_name": str(model), "max_length": 48, "max_prompt_length": 16, "val_fraction": 0.2}
    for eval_batch_size, expected in ((None, 4), (7, 7)):
        module = DPODataModule(make_config({**values, "eval_batch_size": eval_batch_size}), tokenizer)
        module.prepare()
        assert module.val_dataloader().batch_size == expected
        assert module.train_dataloader().batch_size == 4


def test_show_data_prints_the_pairs_as_the_run_prepares_them_and_trains_nothing(tiny_model, tmp_path):
    """`--show_data 2` on the UltraFeedback shape: each pair's prompt, then its completions after a marked
    boundary, with token counts, then the split sizes and truncation; no model weights load, nothing is
    written."""
    data = write_jsonl(tmp_path / "uf.jsonl", UF * 3)
    out = tmp_path / "never-written"
    done = subprocess.run(
        [sys.executable, "entrypoint.py", "--config", "experiments/local-tiny.yaml", "--show_data", "2"]
        + ["--model_name", str(tiny_model), "--dataset_name", str(data), "--output_dir", str(out)]
        + ["--val_fraction", "0", "--max_length", "64", "--max_prompt_length", "32"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    heads = [line for line in lines if line.startswith("──") and "training pair" in line]
    assert len(heads) == 2 and heads[0].startswith("──────── training pair 1 of 6: prompt ")
    first = lines[lines.index(heads[0]) : lines.index(heads[1])]
    text = "\n".join(first)
    assert "Name a fruit." in text and text.count("Name a fruit.") == 1  # the user turn, in the prompt only
    boundary = next(i for i, line in enumerate(first) if line.startswith("──────── chosen ("))
    assert "An apple." in "\n".join(first[boundary:]) and "An apple." not in "\n".join(first[:boundary])
    assert "training pairs: 6; validation pairs: 0" in done.stdout
    assert "truncation (max_length 64, max_prompt_length 32" in done.stdout and "0 of 6 prompts cut" in done.stdout
    assert not out.exists() and "Loading weights" not in done.stderr


def test_repeated_pairs_are_counted_and_a_large_share_is_warned_about(tok, tmp_path, caplog):
    """31 copies of one pair among 70 rows (44%) used to pass without a word."""
    data = write_jsonl(tmp_path / "dup.jsonl", [ROWS[0]] * 31 + [{**ROWS[1], "prompt": f"{i}.\n"} for i in range(39)])
    with caplog.at_level(logging.INFO):
        prepare_pairs(cfg(data), tok)
    warned = [r for r in caplog.records if "repeat an earlier pair" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert (
        "30 of 70 rows (43%) repeat an earlier pair; the most repeated pair appears 31 times" in warned[0].getMessage()
    )


def test_a_csv_the_parser_cannot_read_and_invalid_utf8_name_the_place(tmp_path):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("prompt,chosen,rejected\na,b,c\nd,e,f,g,h\n")
    with pytest.raises(UserError, match="Expected 3 fields in line 3, saw 5"):
        load_splits(cfg(bad_csv))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff", "chosen": "b"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl line 2, byte 13 is not UTF-8 text"):
        load_splits(cfg(bad_json))
