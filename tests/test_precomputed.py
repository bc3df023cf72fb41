"""Precomputed reference log-probs (`precompute_ref_logps`): equal to the live reference's, cached on disk under
a key that changes with the reference, the data and the settings, never read when torn, and a run that uses
them trains as a live-reference run does, without the reference network."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from contract import stepwise_run_values, write_jsonl

from dpo_lightning.builtin import preference_rows
from dpo_lightning.config import make_config
from dpo_lightning.data.collate import PairCollator, collate_in_batches
from dpo_lightning.data.tokenize import tokenize_pair
from dpo_lightning.determined.bridge import run_local
from dpo_lightning.dpo.precomputed import (
    PrecomputedReference,
    cache_key,
    interleave_shares,
    pairs_fingerprint,
    rank_share,
    read_cached,
    reference_pass,
    weights_fingerprint,
    write_cached,
)
from dpo_lightning.dpo.reference import FrozenReference
from dpo_lightning.errors import UserError
from dpo_lightning.models import ModelSource, load_causal_lm, load_tokenizer
from dpo_lightning.training import references


@pytest.fixture(scope="module")
def tiny(tiny_model):
    source = ModelSource(str(tiny_model), True)
    model = load_causal_lm(source, dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=False)
    return model.eval(), load_tokenizer(source)


@pytest.fixture(scope="module")
def items(tiny):
    _, tokenizer = tiny
    rows = preference_rows(seed=1)["train"][:10]
    return [
        tokenize_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"], max_prompt_length=None, max_length=64)
        for r in rows
    ]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_precomputed_log_probs_equal_the_live_reference(tiny, items):
    model, tokenizer = tiny
    collate = PairCollator(tokenizer.pad_token_id)
    batches = collate_in_batches(items, collate, 3)
    values = reference_pass(FrozenReference(model, 16), batches, device=torch.device("cpu"), autocast_dtype=None)
    assert values.shape == (10, 2)
    live = FrozenReference(model)
    for start in range(0, 10, 4):  # other batches, so other padding widths, than the pass used
        chunk = items[start : start + 4]
        stored_values = values[start : start + len(chunk)]
        batch = collate(
            [
                {**item, "ref_chosen_logps": v[0], "ref_rejected_logps": v[1]}
                for item, v in zip(chunk, stored_values, strict=True)
            ]
        )
        stored = PrecomputedReference().logps(batch)
        torch.testing.assert_close(stored.logps, live.logps(batch).logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stored.num_tokens, live.logps(batch).num_tokens)


def test_rank_shares_cover_every_pair_once_and_come_back_in_order():
    for size, world in ((10, 2), (7, 3), (2, 4), (0, 2)):
        shares = [rank_share(size, rank, world) for rank in range(world)]
        assert len({len(indices) for indices in shares}) == 1  # every rank the same number of rows
        own = [len(range(rank, size, world)) for rank in range(world)]  # the rest only evens the shares out
        owned = sorted(i for indices, n in zip(shares, own, strict=True) for i in indices[:n])
        assert owned == list(range(size))
        values = torch.tensor([[[float(i), -float(i)] for i in indices] for indices in shares]).reshape(world, -1, 2)
        expected = torch.tensor([[float(i), -float(i)] for i in range(size)]).reshape(size, 2)
        torch.testing.assert_close(interleave_shares(values, size), expected)


def test_the_key_changes_with_the_reference_the_data_and_the_settings(tiny, items):
    model, _ = tiny
    weights, data = weights_fingerprint(model), pairs_fingerprint(_columns(items))
    settings = {"dtype": "float32", "precision": "32", "logps_chunk_size": 512, "device": "cpu"}
    key = cache_key(weights, {"train": data}, settings)
    assert key == cache_key(weights_fingerprint(copy.deepcopy(model)), {"train": data}, dict(settings))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        next(moved.parameters()).view(-1)[0] += 1e-3
    other_data = _columns(items[:-1] + [{**items[-1], "chosen_ids": items[-1]["chosen_ids"][:-1]}])
    assert (
        len(
            {
                key,
                cache_key(weights_fingerprint(moved), {"train": data}, settings),
                cache_key(weights, {"train": pairs_fingerprint(other_data)}, settings),
                cache_key(weights, {"train": data}, {**settings, "dtype": "bfloat16"}),
                cache_key(weights, {"train": data}, {**settings, "logps_chunk_size": 0}),
                cache_key(weights, {"train": data, "val": data}, settings),
            }
        )
        == 6
    )


def _columns(items: list[dict]) -> dict[str, list]:
    return {name: [item[name] for item in items] for name in ("prompt_ids", "chosen_ids", "rejected_ids")}


def test_a_torn_or_foreign_cache_file_is_not_read(tmp_path):
    path = tmp_path / "ref.pt"
    values = {"train": torch.randn(5, 2)}
    write_cached(path, "k1", values)
    assert torch.equal(read_cached(path, "k1", {"train": 5})["train"], values["train"])
    assert read_cached(path, "k2", {"train": 5}) is None  # another key
    assert read_cached(path, "k1", {"train": 6}) is None  # other data
    assert read_cached(path, "k1", {"train": 5, "val": 1}) is None
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # torn
    assert read_cached(path, "k1", {"train": 5}) is None
    assert read_cached(tmp_path / "missing.pt", "k1", {"train": 5}) is None
    assert list(tmp_path.iterdir()) == [path]  # no partial file left behind


def test_the_precomputed_reference_has_no_model_to_sample():
    with pytest.raises(UserError, match="precompute_ref_logps"):
        with PrecomputedReference().sampling_model():
            pass


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pre") / "pairs.jsonl", preference_rows(seed=2)["train"][:48])


def _reports(output_dir) -> dict[tuple[str, int], dict]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["group"], r["step"]): r["metrics"] for r in rows}


def test_a_precomputed_run_trains_as_a_live_one_and_reuses_its_cache(
    tiny_model, pairs_file, tmp_path, cache_dir, monkeypatch
):
    run_local(make_config(stepwise_run_values(tiny_model, pairs_file, tmp_path / "live", max_steps=5)))
    values = stepwise_run_values(tiny_model, pairs_file, tmp_path / "pre", max_steps=5, precompute_ref_logps=True)
    pre = run_local(make_config(values))
    assert isinstance(pre.module.reference, PrecomputedReference)
    assert sum(p.numel() for p in pre.module.parameters()) == sum(p.numel() for p in pre.module.policy.parameters())
    (cached,) = (cache_dir / "ref_logps").iterdir()
    expected, got = _reports(tmp_path / "live"), _reports(tmp_path / "pre")
    assert set(got) == set(expected) and ("validation", 3) in got
    for key, metrics in expected.items():
        names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "grad_norm")
        for name in (n for n in names if n in metrics):  # grad_norm: training reports only
            assert got[key][name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-6), (key, name)
    # a second run (here: a resumed one, to step 7) reads the file instead of running the reference again
    longer = stepwise_run_values(tiny_model, pairs_file, tmp_path / "pre", max_steps=7, precompute_ref_logps=True)
    before = cached.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran again")

    monkeypatch.setattr(references, "reference_pass", refuse)
    run_local(make_config(longer))
    assert cached.stat().st_mtime_ns == before
    assert ("training", 7) in _reports(tmp_path / "pre")


@pytest.mark.parametrize("precision, split", [("bf16-mixed", True), ("32", False)])
def test_the_cache_key_follows_the_reference_pass_autocast(tiny, tiny_model, pairs_file, tmp_path, precision, split):
    """Under bf16-mixed the pass autocasts with DDP and not under FSDP (its policy casts the shards), so their
    log-probs differ and must not share a file; in fp32 they are the same numbers and do."""
    from dpo_lightning.data.datamodule import DPODataModule

    model, tokenizer = tiny
    paths = {}
    for strategy in ("ddp", "fsdp"):
        values = dict(precompute_ref_logps=True, precision=precision, strategy=strategy)
        cfg = make_config(stepwise_run_values(tiny_model, pairs_file, tmp_path / strategy, **values))
        _, pending = references.make_reference(cfg, model, DPODataModule(cfg, tokenizer), model)
        paths[strategy] = pending.path
    assert (paths["ddp"] != paths["fsdp"]) is split
