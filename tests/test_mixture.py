"""Several datasets in one run: `dataset_name` as a list of sources, each with its own splits, columns and
labels, mixed by a share or a count of its rows drawn with the seed; validation likewise; the whole list in an
experiment file, on the command line, in the run record and in evaluate.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
import yaml
from contract import tiny_run_values, write_jsonl
from transformers import AutoTokenizer

from dpo_lightning.config import load_config, make_config, parse_overrides
from dpo_lightning.data import check_source, prepare_pairs
from dpo_lightning.data.tokenize import tokenize_pair
from dpo_lightning.determined.bridge import run
from dpo_lightning.errors import ConfigError, UserError
from dpo_lightning.evaluation.run import EvalOptions, evaluate

ROOT = Path(__file__).resolve().parents[1]
THINGS = ["garden", "river", "bridge", "tower", "forest", "meadow", "harbour", "castle", "valley", "orchard"]


def explicit(start: int, count: int) -> list[dict]:
    """`count` distinct explicit pairs, one prompt each."""
    return [
        {"prompt": f"Describe the {THINGS[i % 10]} {i}.\n", "chosen": " It is lovely.", "rejected": " It is grim."}
        for i in range(start, start + count)
    ]


def as_shp(rows: list[dict]) -> list[dict]:
    """The same pairs in SHP's shape: the preferred response alternately first (labels 1) and second (0)."""
    shaped = []
    for i, row in enumerate(rows):
        a, b = (row["chosen"], row["rejected"]) if i % 2 == 0 else (row["rejected"], row["chosen"])
        shaped.append({"history": row["prompt"], "human_ref_A": a, "human_ref_B": b, "labels": 1 - i % 2})
    return shaped


SHP_SOURCE = {
    "columns": {"prompt": "history", "response_a": "human_ref_A", "response_b": "human_ref_B", "label": "labels"},
    "label_values": {"1": "a", "0": "b"},
}


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def tokenized(tok, rows: list[dict]) -> list[dict]:
    return [tokenize_pair(tok, **row, max_prompt_length=None, max_length=None) for row in rows]


def mixture_config(sources: list[dict], **overrides):
    values = {"val_fraction": 0.0, "max_prompt_length": None, "max_length": 256, **overrides}
    return make_config({"dataset_name": sources, **values})


def test_sources_mix_by_count_and_share_with_their_own_columns_and_labels(tok, tmp_path, caplog):
    """4 of a file's 10 pairs and half of an SHP-shaped file's 8 (its own columns and labels) give 8 training
    pairs, exactly those of the same mixture written as explicit pairs; the draw follows the seed."""
    first, second = explicit(0, 10), explicit(10, 8)
    plain = write_jsonl(tmp_path / "plain.jsonl", first)
    shp = write_jsonl(tmp_path / "shp.jsonl", as_shp(second))
    shp_explicit = write_jsonl(tmp_path / "shp-explicit.jsonl", second)

    sources = [{"name": str(plain), "rows": 4}, {"name": str(shp), "fraction": 0.5, **SHP_SOURCE}]
    with caplog.at_level(logging.INFO):
        mixed = prepare_pairs(mixture_config(sources), tok).train.to_list()
    same = [sources[0], {"name": str(shp_explicit), "fraction": 0.5}]
    assert mixed == prepare_pairs(mixture_config(same), tok).train.to_list()

    assert len(mixed) == 8
    first_ids, second_ids = tokenized(tok, first), tokenized(tok, second)
    assert sum(pair in first_ids for pair in mixed) == 4 and sum(pair in second_ids for pair in mixed) == 4
    # in the order listed, each source's draw in its own order
    assert mixed[:4] == [pair for pair in first_ids if pair in mixed]
    assert f"dataset_name[1] ({plain}): 4 of 10 training pairs (50% of the mixture)" in caplog.text
    assert f"dataset_name[2] ({shp}): 4 of 8 training pairs (50% of the mixture)" in caplog.text

    again = prepare_pairs(mixture_config(sources), tok).train.to_list()
    other_seed = prepare_pairs(mixture_config(sources, seed=7), tok).train.to_list()
    assert again == mixed and other_seed != mixed and len(other_seed) == 8


def test_each_source_validates_on_its_own_split_or_its_draw(tok, tmp_path):
    """A folder with a test split validates on 2 of its 4 test pairs (eval_rows); a file without one holds out
    val_fraction of its prompts; the validation pairs are both, and no training prompt is among them."""
    folder = tmp_path / "with-test"
    splits = {"train": explicit(0, 6), "test": explicit(20, 4)}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(folder))
    plain = write_jsonl(tmp_path / "plain.jsonl", explicit(40, 10))
    cfg = mixture_config([{"name": str(folder), "eval_rows": 2}, {"name": str(plain)}], val_fraction=0.2)
    pairs = prepare_pairs(cfg, tok)

    val_rows = pairs.val_rows
    assert len(val_rows) == 4 and len(pairs.val) == 4 and len(pairs.train) == 6 + 8
    assert sum(row in splits["test"] for row in val_rows) == 2
    assert sum(row in explicit(40, 10) for row in val_rows) == 2
    train_prompts = {tok.decode(p["prompt_ids"]) for p in pairs.train.to_list()}
    assert not train_prompts & {row["prompt"] for row in val_rows}


def test_what_a_mixture_cannot_give_is_one_line_naming_the_source(tok, tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", explicit(0, 5))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say something.\n"}, {"prompt": "Say more.\n"}])
    with pytest.raises(UserError, match=r"^dataset_name\[2\] \(.*plain.jsonl\) pairs of .*: rows 9 asks for more than"
                       r" the 5 there are .*at most 5"):  # fmt: skip
        prepare_pairs(mixture_config([{"name": str(plain)}, {"name": str(plain), "rows": 9}]), tok)
    with pytest.raises(UserError, match=r"dataset_name\[2\] \(.*prompts.jsonl\) holds prompts \(mode online\) but "
                       r"dataset_name\[1\] .* holds preference pairs"):  # fmt: skip
        prepare_pairs(mixture_config([{"name": str(plain)}, {"name": str(prompts)}]), tok)
    # before anything loads: a missing file, named by its place in the list
    with pytest.raises(UserError, match=r"^dataset_name\[2\]: dataset file not found: .*plian.jsonl"):
        check_source(mixture_config([{"name": str(plain)}, {"name": str(tmp_path / "plian.jsonl")}]))
    # the configuration itself
    for sources, problem in [
        ([{"name": str(plain), "colums": {}}], r"dataset_name\[1\] has unknown key 'colums'; valid keys: name, "),
        ([{"name": str(plain), "rows": 2, "fraction": 0.5}], r"dataset_name\[1\]: give fraction or rows, not both"),
        ([{"name": str(plain), "fraction": 1.5}], r"dataset_name\[1\].fraction must be in \(0, 1\]"),
        ([{"name": str(plain)}, {"rows": 3}], r"dataset_name\[2\].name must name a dataset"),
        ([{"name": str(plain), "columns": {"answer": "x"}}], r"dataset_name\[1\].columns has unknown role 'answer'"),
        ([], "dataset_name is an empty list"),
    ]:
        with pytest.raises(ConfigError, match=problem):
            mixture_config(sources)


def test_a_mixture_from_the_command_line_is_the_file_list(tmp_path):
    sources = [{"name": "a.jsonl", "rows": 3}, {"name": "b.jsonl", "fraction": 0.5, "eval_rows": 2}]
    given = parse_overrides(["--dataset_name", json.dumps(sources)])
    assert make_config(given).dataset_name == sources
    with pytest.raises(ConfigError, match=r"^dataset_name: .* is not a JSON list .* write it as"):
        make_config(parse_overrides(["--dataset_name", '[{"name": a.jsonl}]']))


def test_a_run_on_a_mixture_records_it_and_evaluate_measures_its_held_out_pairs(tiny_model, tmp_path):
    """An experiment file lists two sources; the run trains, its record keeps the list and each source's
    description, and evaluate.py measures the pairs it held out of both (and refuses --split in one line)."""
    plain = write_jsonl(tmp_path / "plain.jsonl", explicit(0, 10))
    shp = write_jsonl(tmp_path / "shp.jsonl", as_shp(explicit(10, 10)))
    sources = [{"name": str(plain), "rows": 6}, {"name": str(shp), "fraction": 0.6, **SHP_SOURCE}]
    experiment = yaml.safe_load((ROOT / "experiments/local-tiny.yaml").read_text())
    experiment["hyperparameters"]["dataset_name"] = sources
    path = tmp_path / "mixture.yaml"
    path.write_text(yaml.safe_dump(experiment))
    out = tmp_path / "run"
    values = tiny_run_values(tiny_model, plain, out, max_prompt_length=16, max_steps=2, val_fraction=0.2)
    del values["dataset_name"]
    assert load_config(path, values).dataset_name == sources
    assert run(path, parse_overrides([part for k, v in values.items() for part in (f"--{k}", str(v))])) == 0

    record = json.loads((out / "run_config.json").read_text())
    assert record["config"]["dataset_name"] == sources
    source = record["data"]["source"]
    assert source["kind"] == "mixture" and [s["dataset_name"] for s in source["sources"]] == [str(plain), str(shp)]
    # 10 prompts each, 2 held out of each; 6 of plain's 8 left and 0.6 of shp's 8 (5) train
    assert (record["data"]["train_rows"], record["data"]["val_rows"]) == (11, 4)

    report = evaluate(EvalOptions(model_path=str(out), output_dir=str(tmp_path / "eval")))
    assert report["preference"]["num_pairs"] == 4 and report["data"]["training_rows"] is False
    assert report["data"]["dataset"] == f"{plain} + {shp}"
    with pytest.raises(UserError, match=r"^--split names a split of one dataset, but dataset_name lists 2 sources"):
        evaluate(EvalOptions(model_path=str(out), output_dir=str(tmp_path / "eval2"), split="train"))
