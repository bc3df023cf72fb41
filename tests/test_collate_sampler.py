"""Tests for dpo_lightning.data.collate.PairCollator and dpo_lightning.data.sampler.ResumableSampler."""

import pytest
import torch
from torch.utils.data import DataLoader

from dpo_lightning.data.batch import PairBatch
from dpo_lightning.data.collate import PairCollator
from dpo_lightning.data.sampler import EvalShard, ResumableSampler
from dpo_lightning.dpo.logprobs import PairLogps, SequenceLogps
from dpo_lightning.dpo.metrics import PreferenceMetrics
from dpo_lightning.losses import compute_loss

EOS = 0

# ----------------------------------------------------------------------------- collate

# Two pairs whose completions end with EOS, padded with EOS: masks must come from lengths, not from ids.
ITEMS = [
    {"prompt_ids": [5, 6], "chosen_ids": [7, EOS], "rejected_ids": [8, 9, 10, EOS]},
    {"prompt_ids": [11], "chosen_ids": [12, EOS], "rejected_ids": [EOS]},
]


def test_collate_exact_tensors_with_pad_equal_to_eos():
    batch = PairCollator(pad_token_id=EOS)(ITEMS)
    # rows: chosen 0, chosen 1, rejected 0, rejected 1; width = longest (rejected 0: 2 + 4 = 6)
    expected_ids = [
        [5, 6, 7, EOS, EOS, EOS],
        [11, 12, EOS, EOS, EOS, EOS],
        [5, 6, 8, 9, 10, EOS],
        [11, EOS, EOS, EOS, EOS, EOS],
    ]
    expected_attention = [
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 0],
    ]
    expected_completion = [
        [0, 0, 1, 1, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1],
        [0, 1, 0, 0, 0, 0],
    ]
    assert {name for name, value in vars(batch).items() if value is not None} == {
        "input_ids",
        "attention_mask",
        "completion_mask",
    }
    for name, expected in [
        ("input_ids", expected_ids),
        ("attention_mask", expected_attention),
        ("completion_mask", expected_completion),
    ]:
        assert getattr(batch, name).dtype == torch.long, name
        assert torch.equal(getattr(batch, name), torch.tensor(expected)), name


def test_collate_uses_the_pad_id():
    batch = PairCollator(pad_token_id=99)(ITEMS)
    assert batch.input_ids[3].tolist() == [11, EOS, 99, 99, 99, 99]
    assert batch.completion_mask[3].tolist() == [0, 1, 0, 0, 0, 0]


@pytest.mark.parametrize(("multiple", "width"), [(None, 6), (1, 6), (3, 6), (4, 8), (5, 10)])
def test_collate_pad_to_multiple_of(multiple, width):
    batch = PairCollator(pad_token_id=EOS, pad_to_multiple_of=multiple)(ITEMS)
    for name in ("input_ids", "attention_mask", "completion_mask"):
        assert getattr(batch, name).shape == (4, width), name
    assert batch.attention_mask.sum(1).tolist() == [4, 3, 6, 2]  # padding never adds real tokens
    assert batch.completion_mask.sum(1).tolist() == [2, 2, 4, 1]
    assert (batch.input_ids[:, 6:] == EOS).all()


def test_collate_single_pair():
    item = {"prompt_ids": [1, 2, 3], "chosen_ids": [4], "rejected_ids": [5, 6]}
    batch = PairCollator(pad_token_id=EOS)([item])
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, EOS], [1, 2, 3, 5, 6]]
    assert batch.completion_mask.tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]


# ----------------------------------------------------------------------------- sampler


def epoch_order(num_samples: int, epoch: int = 0, **kwargs) -> list[int]:
    sampler = ResumableSampler(num_samples, **{"seed": 7, **kwargs})
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_is_a_seeded_permutation():
    first = epoch_order(50, epoch=2)
    assert sorted(first) == list(range(50))
    assert first == epoch_order(50, epoch=2)  # same seed and epoch: same order
    assert first != epoch_order(50, epoch=3)  # another epoch: another order
    assert first != epoch_order(50, epoch=2, seed=8)  # another seed: another order
    assert first != list(range(50))


def test_sampler_without_shuffle_is_in_order():
    assert epoch_order(10, epoch=4, shuffle=False) == list(range(10))


def test_sampler_iterating_twice_gives_the_same_epoch():
    sampler = ResumableSampler(30, seed=1)
    assert list(sampler) == list(sampler)


def test_two_ranks_even_are_disjoint_and_cover_everything():
    ranks = [epoch_order(40, epoch=1, num_replicas=2, rank=r) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 20
    assert set(ranks[0]).isdisjoint(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(40))
    for rank in range(2):
        assert len(ResumableSampler(40, seed=7, num_replicas=2, rank=rank)) == 20


def test_two_ranks_odd_have_equal_lengths_with_one_repeat():
    ranks = [epoch_order(41, epoch=1, num_replicas=2, rank=r) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 21
    assert set(ranks[0]) | set(ranks[1]) == set(range(41))
    assert len(ranks[0]) + len(ranks[1]) - len(set(ranks[0] + ranks[1])) == 1


def test_more_ranks_than_samples_still_equal_lengths():
    ranks = [epoch_order(3, num_replicas=8, rank=r) for r in range(8)]
    assert [len(r) for r in ranks] == [len(ResumableSampler(3, seed=7, num_replicas=8))] * 8 == [1] * 8


def test_invalid_rank():
    with pytest.raises(ValueError):
        ResumableSampler(10, seed=0, num_replicas=2, rank=2)


@pytest.mark.parametrize(("num_replicas", "rank", "k"), [(1, 0, 0), (1, 0, 13), (1, 0, 29), (2, 1, 6)])
def test_resume_mid_epoch_gives_the_exact_tail(num_replicas, rank, k):
    kwargs = {"seed": 3, "num_replicas": num_replicas, "rank": rank}
    full = epoch_order(30, epoch=5, **kwargs)

    sampler = ResumableSampler(30, **kwargs)
    sampler.set_epoch(5)
    it = iter(sampler)
    head = [next(it) for _ in range(k)]
    state = sampler.state_dict()
    assert state == {"epoch": 5, "position": k, "seed": 3, "num_replicas": num_replicas}

    fresh = ResumableSampler(30, **kwargs)
    fresh.load_state_dict(state)
    fresh.set_epoch(5)  # Lightning sets the (same) epoch again before iterating: the position must survive
    tail = list(fresh)
    assert head == full[:k]
    assert tail == full[k:]
    assert fresh.state_dict()["position"] == len(full)
    # After the resumed epoch ends, iterating the same epoch again starts from its beginning.
    assert list(fresh) == full


def test_resume_then_new_epoch_starts_from_zero():
    sampler = ResumableSampler(20, seed=0)
    sampler.load_state_dict({"epoch": 1, "position": 12, "seed": 0})
    sampler.set_epoch(2)
    assert list(sampler) == epoch_order(20, epoch=2, seed=0)


def test_load_state_with_another_seed():
    sampler = ResumableSampler(20, seed=0)
    with pytest.raises(ValueError, match="seed"):
        sampler.load_state_dict({"epoch": 0, "position": 3, "seed": 1})


def test_dataloader_resumed_at_a_batch_boundary():
    data = list(range(100, 120))  # 20 items: batches of 3, the last one of 2

    def loader(sampler):
        return DataLoader(data, batch_size=3, sampler=sampler)

    reference = ResumableSampler(len(data), seed=11)
    reference.set_epoch(1)
    full = [b.tolist() for b in loader(reference)]
    assert len(full) == 7 and len(full[-1]) == 2

    interrupted = ResumableSampler(len(data), seed=11)
    interrupted.set_epoch(1)
    it = iter(loader(interrupted))
    seen = [next(it).tolist() for _ in range(3)]
    state = interrupted.state_dict()
    assert state["position"] == 9

    resumed = ResumableSampler(len(data), seed=11)
    resumed.load_state_dict(state)
    rest = [b.tolist() for b in loader(resumed)]
    assert seen == full[:3]
    assert rest == full[3:]
    assert sorted(x for b in seen + rest for x in b) == data


def test_eval_shards_cover_every_row_once_and_weigh_padding_zero():
    data = [{"i": i} for i in range(5)]
    shards = [EvalShard(data, num_replicas=2, rank=r) for r in (0, 1)]
    assert [len(s) for s in shards] == [3, 3]  # equal lengths keep collective forwards in step
    real = [item["i"] for s in shards for item in (s[j] for j in range(len(s))) if item["weight"] == 1.0]
    assert sorted(real) == [0, 1, 2, 3, 4]
    assert [s[2]["weight"] for s in shards] == [1.0, 0.0]
    batch = PairCollator(0)([{**s, "prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]} for s in shards[1]])
    assert batch.pair_weight.tolist() == [1.0, 1.0, 0.0]


def _metrics_of(logps: torch.Tensor, ref: torch.Tensor, weight=None) -> dict[str, float]:
    """Metrics of pairs given as (2B,) policy and reference log-probs, chosen rows first."""
    b = logps.numel() // 2
    out = compute_loss("sigmoid", *logps.chunk(2), *ref.chunk(2), beta=0.1)
    ones = torch.ones(2 * b, 4, dtype=torch.long)
    batch = PairBatch(ones, ones, ones, pair_weight=weight)
    policy = SequenceLogps(logps, torch.full((2 * b,), 3.0), 2 * logps)  # logits sums follow their rows
    metrics = PreferenceMetrics()
    metrics.update(out, PairLogps.of(batch, policy), batch)
    values = metrics.report()
    values.pop("samples_per_second"), values.pop("tokens_per_second")
    return values


def test_zero_weight_pairs_count_in_no_metric():
    logps = torch.tensor([-1.0, -2.0, -9.0, -3.0, -1.5, -0.5])  # chosen: -1, -2, -9; rejected: -3, -1.5, -0.5
    ref = torch.tensor([-2.0, -2.0, -2.0, -2.0, -2.0, -2.0])
    padded = _metrics_of(logps, ref, torch.tensor([1.0, 1.0, 0.0]))
    alone = _metrics_of(logps[[0, 1, 3, 4]], ref[[0, 1, 3, 4]])
    assert padded == pytest.approx(alone, rel=1e-6)
    assert padded != pytest.approx(_metrics_of(logps, ref), rel=1e-3)  # the third pair would change them
