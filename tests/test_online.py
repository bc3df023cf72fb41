"""Online DPO's pieces (online/: sampling, pairing, metrics) and OnlineDPOModule's sampling step, on the
session's tiny random Qwen2: CPU, offline. Expected values are worked out here by hand or by an independent
re-implementation (a plain sampling loop without KV cache, our own EOS scan, our own log-prob sums), never by
calling the code under test again."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from dpo_lightning.config import make_config
from dpo_lightning.data.collate import PromptCollator
from dpo_lightning.dpo.reference import FrozenReference
from dpo_lightning.losses import LOSSES, compute_loss, weighted_mean
from dpo_lightning.models import ModelSource, load_policy, load_reference, load_tokenizer
from dpo_lightning.online.judges import FunctionJudge
from dpo_lightning.online.metrics import SampleMetrics
from dpo_lightning.online.pairing import apply_missing_eos_penalty, order_pairs
from dpo_lightning.online.sampling import SamplingRNG, cut_at_eos, sample_completions, sampling_config
from dpo_lightning.training.dpo_module import OnlineDPOModule

PAD = 0  # the tiny model's "<|endoftext|>": pad = EOS
# Extra stop ids (besides EOS) so that a random tiny model ends a fair share of its completions within a few
# tokens: about 60 of its 512 tokens stop a completion, as chat models stop at <|im_end|> beside <|endoftext|>.
EXTRA_STOPS = list(range(100, 160))
PROMPT_TEXTS = [
    "Describe the garden.\n",
    "Describe the old stone bridge.\n",
    "Describe the kitchen and the candle.\n",
    "Describe the river.\n",
]


# ----------------------------------------------------------------------------- helpers


def first_stop(row: list[int], stops: set[int]) -> int | None:
    return next((i for i, token in enumerate(row) if token in stops), None)


def cut_rows(rows: list[list[int]], stops: set[int]) -> tuple[list[list[int]], list[bool]]:
    """Each row up to and including its first stop id, and whether it had one (our own scan)."""
    cut, has_eos = [], []
    for row in rows:
        k = first_stop(row, stops)
        cut.append(row if k is None else row[: k + 1])
        has_eos.append(k is not None)
    return cut, has_eos


def prompt_items(tokenizer, texts: list[str], weights: list[float] | None = None) -> list[dict]:
    items = [{"prompt_ids": tokenizer(t)["input_ids"], "prompt_json": json.dumps(t)} for t in texts]
    for item, weight in zip(items, weights or [], strict=False):
        item["weight"] = weight
    return items


@torch.no_grad()
def reference_sampling(model, input_ids, attention_mask, *, samples, temperature, max_new_tokens, stops, pad_id):
    """Plain ancestral sampling from softmax(logits / temperature), no KV cache and no other processing: a full
    forward pass each step; like Hugging Face, it draws for every row every step (finished rows get pad) and
    stops once every row has stopped or max_new_tokens are drawn."""
    ids = input_ids.repeat_interleave(samples, dim=0)
    mask = attention_mask.repeat_interleave(samples, dim=0)
    stop_ids = torch.tensor(sorted(stops))
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    steps = []
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        probs = torch.softmax(logits[:, -1].float() / temperature, dim=-1)
        token = torch.multinomial(probs, 1).squeeze(1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        steps.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        finished |= torch.isin(token, stop_ids)
        if finished.all():
            break
    return torch.stack(steps, dim=1).tolist()


@torch.no_grad()
def completion_logp(model, prompt: list[int], completion: list[int]) -> float:
    """Sum of log p(completion token | everything before it), one unpadded sequence at a time."""
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].double(), dim=-1)
    return sum(float(logp[len(prompt) - 1 + j, token]) for j, token in enumerate(completion))


@pytest.fixture
def source(tiny_model) -> ModelSource:
    return ModelSource(str(tiny_model), True)


@pytest.fixture
def tokenizer(source):
    return load_tokenizer(source)


def online_module(tiny_model, source, tokenizer, fn, **overrides) -> OnlineDPOModule:
    """OnlineDPOModule on the tiny model, its policy stopping at EXTRA_STOPS too, attached to a one-device CPU
    Trainer (sample_pairs asks `self.trainer` whether it runs under FSDP)."""
    values = {
        "model_name": str(tiny_model),
        "mode": "online",
        "reward_model": "x.y:f",  # only the string is checked; the scorer is passed in directly
        "max_length": 64,
        "max_prompt_length": 16,
        "max_new_tokens": 8,
        "temperature": 1.0,
        **overrides,
    }
    cfg = make_config(values)
    policy = load_policy(cfg, source)
    policy.generation_config.eos_token_id = [tokenizer.eos_token_id, *EXTRA_STOPS]
    reference = FrozenReference(load_reference(cfg, source, initial_policy=policy))
    module = OnlineDPOModule(cfg, policy, reference, FunctionJudge(fn, "tests:fn"), tokenizer)
    module.trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return module


class GenerateSpy:
    """Records what `model.generate` returned, so that tests see the sampled ids themselves."""

    def __init__(self, model) -> None:
        self.inner = model.generate
        self.outputs: list[torch.Tensor] = []
        model.generate = self

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.outputs.append(out.clone())
        return out


def sampled_ids(spy: GenerateSpy, batch: dict, stops: set[int]) -> tuple[list[list[int]], list[bool]]:
    (out,) = spy.outputs
    return cut_rows(out[:, batch.input_ids.shape[1] :].tolist(), stops)


# ----------------------------------------------------------------------------- 1, 2: EOS cut, pair order


def test_cut_at_eos_by_hand():
    eos_ids = [0, 7]
    generated = torch.tensor(
        [
            [0, 5, 5, 5],  # EOS first: length 1
            [3, 4, 0, 0],  # EOS mid-row, then more EOS/pad: cut after the first
            [3, 7, 0, 7],  # the second EOS id comes first
            [3, 4, 5, 6],  # no EOS: the whole row
            [5, 6, 9, 7],  # EOS at the last position
        ]
    )
    lengths, has_eos = cut_at_eos(generated, eos_ids)
    assert lengths.tolist() == [1, 3, 2, 4, 4]
    assert has_eos.tolist() == [True, True, True, False, True]


def test_order_pairs_chooses_the_strictly_higher_score():
    scores = torch.tensor([[1.0, 2.0], [3.0, -1.0], [-2.0, -2.0], [0.0, 0.0], [-5.0, -4.5], [2.5, 2.5], [-0.1, -0.2]])
    chosen, rejected, tie = order_pairs(scores)
    assert tie.tolist() == [False, False, True, True, False, True, False]
    assert chosen[~tie].tolist() == [1, 0, 1, 0]
    assert rejected.tolist() == [1 - c for c in chosen.tolist()]
    assert chosen[tie].tolist() == [0, 0, 0] and rejected[tie].tolist() == [1, 1, 1]
    rows = torch.arange(len(scores))
    assert bool((scores[rows, chosen][~tie] > scores[rows, rejected][~tie]).all())


# ----------------------------------------------------------------------------- 3: what generate samples


def _prompt_batch(tokenizer, texts):
    batch = PromptCollator(tokenizer.pad_token_id)(prompt_items(tokenizer, texts))
    assert batch.attention_mask[0].sum() != batch.attention_mask[1].sum()  # left padding in play
    return batch


def _ours_and_reference(policy, tokenizer, batch, generation, stops, seed):
    """Our sampling and the plain reference loop (T = 0.7, 6 tokens, 2 samples), each from the same seed."""
    torch.manual_seed(seed)
    completions = sample_completions(policy, batch.input_ids, batch.attention_mask, generation)
    torch.manual_seed(seed)
    rows = reference_sampling(
        policy,
        batch.input_ids,
        batch.attention_mask,
        samples=2,
        temperature=0.7,
        max_new_tokens=6,
        stops=stops,
        pad_id=tokenizer.pad_token_id,
    )
    return completions, rows


def test_sampling_is_plain_softmax_over_temperature(source, tokenizer):
    cfg = make_config({"model_name": source.name_or_path})
    policy = load_policy(cfg, source)
    # knobs of the model's own generation_config that `generate` would apply if the config let them through
    policy.generation_config.top_k = 3
    policy.generation_config.repetition_penalty = 1.8
    policy.generation_config.temperature = 0.1
    stops = {tokenizer.eos_token_id, *EXTRA_STOPS}
    generation = sampling_config(
        max_new_tokens=6, temperature=0.7, top_p=1.0, eos_ids=sorted(stops), pad_id=tokenizer.pad_token_id
    )
    batch = _prompt_batch(tokenizer, PROMPT_TEXTS[:2])
    seen_eos, seen_open, seen_early = False, False, False
    for seed in (1, 2, 4):
        completions, rows = _ours_and_reference(policy, tokenizer, batch, generation, stops, seed)
        expected, expected_eos = cut_rows(rows, stops)
        assert completions.ids == expected, f"seed {seed}"
        assert completions.has_eos.tolist() == expected_eos
        for ids, ended in zip(completions.ids, completions.has_eos.tolist(), strict=True):
            assert 1 <= len(ids) <= 6
            assert (ids[-1] in stops) == ended
            assert not any(token in stops for token in ids[:-1])  # cut at the first EOS
            if not ended:
                assert len(ids) == 6
        seen_eos |= bool(completions.has_eos.any())
        seen_open |= bool((~completions.has_eos).any())
        seen_early |= any(len(ids) < 6 for ids in completions.ids) and not bool(completions.has_eos.all())
    # the seeds cover completions that stop, ones that run out of tokens, and rows finishing while others go on
    assert seen_eos and seen_open and seen_early


# Knobs of a model's generation_config whose neutral value is None, which `generate` would fill from the model's
# own generation_config (transformers' _prepare_generation_config fills only None values) if it could see it.
LEAKING_KNOBS = {
    "num_beams": 4,
    "suppress_tokens": list(range(200, 400)),
    "begin_suppress_tokens": list(range(200, 400)),
    "bad_words_ids": [[i] for i in range(200, 400)],
    "sequence_bias": {(i,): -100.0 for i in range(200, 400)},
    "forced_eos_token_id": 0,
    "exponential_decay_length_penalty": (0, 5.0),
    "guidance_scale": 3.0,
    "top_h": 0.3,
}


@pytest.mark.parametrize("knob", sorted(LEAKING_KNOBS))
def test_sampling_ignores_model_knobs_left_unset(source, tokenizer, knob):
    cfg = make_config({"model_name": source.name_or_path})
    policy = load_policy(cfg, source)
    setattr(policy.generation_config, knob, LEAKING_KNOBS[knob])
    stops = {tokenizer.eos_token_id, *EXTRA_STOPS}
    generation = sampling_config(
        max_new_tokens=6, temperature=0.7, top_p=1.0, eos_ids=sorted(stops), pad_id=tokenizer.pad_token_id
    )
    batch = _prompt_batch(tokenizer, PROMPT_TEXTS[:2])
    completions, rows = _ours_and_reference(policy, tokenizer, batch, generation, stops, 3)
    assert completions.ids == cut_rows(rows, stops)[0]


# ----------------------------------------------------------------------------- 4: the sampling stream


def _draw(rng: SamplingRNG) -> list[int]:
    with rng.active(torch.device("cpu")):
        return torch.randint(0, 2**30, (64,)).tolist()


def test_sampling_rng_is_its_own_stream():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    rng = SamplingRNG(7)
    first = _draw(rng)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator did not move

    torch.manual_seed(999)  # a different global state changes nothing in a fresh stream
    assert _draw(SamplingRNG(7)) == first

    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in rng.state_dict().items()}
    continued = _draw(rng)
    assert continued != first  # the stream goes on rather than restarting at its seed
    restored = SamplingRNG(0)
    restored.load_state_dict(saved)
    assert restored.seed == 7
    assert _draw(restored) == continued

    assert _draw(SamplingRNG(8)) != first


def test_sampling_rng_keeps_generation_apart_from_the_global_generator(source, tokenizer):
    cfg = make_config({"model_name": source.name_or_path})
    policy = load_policy(cfg, source)
    generation = sampling_config(
        max_new_tokens=8, temperature=1.0, top_p=1.0, eos_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id
    )
    batch = _prompt_batch(tokenizer, PROMPT_TEXTS[:2])

    def sample(rng: SamplingRNG):
        with rng.active(torch.device("cpu")):
            return sample_completions(policy, batch.input_ids, batch.attention_mask, generation).ids

    torch.manual_seed(5)
    before = torch.get_rng_state()
    rng = SamplingRNG(11)
    first = sample(rng)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(6)
    assert sample(SamplingRNG(11)) == first
    assert sample(SamplingRNG(12)) != first  # 4 x 8 tokens over a 512-token vocabulary


# ----------------------------------------------------------------------------- 5, 6: sample_pairs


def text_length(prompts, completions):
    return [float(len(c)) for c in completions]


def test_sample_pairs_orders_scored_samples(tiny_model, source, tokenizer):
    module = online_module(tiny_model, source, tokenizer, text_length)
    stops = {tokenizer.eos_token_id, *EXTRA_STOPS}
    items = prompt_items(tokenizer, PROMPT_TEXTS)
    batch = PromptCollator(tokenizer.pad_token_id)(items)
    spy = GenerateSpy(module.policy)
    sampled = module.sample_pairs(batch, module.sampling_rng, module.train_samples)
    pairs = sampled.pairs

    samples, has_eos = sampled_ids(spy, batch, stops)
    assert sampled.has_eos.tolist() == has_eos
    assert sampled.lengths.tolist() == [len(ids) for ids in samples]
    scores = [float(len(tokenizer.decode(ids, skip_special_tokens=True))) for ids in samples]
    assert sampled.scores.tolist() == scores

    P = len(items)
    assert pairs.input_ids.shape[0] == 2 * P
    width = pairs.input_ids.shape[1]
    ties = 0
    for i, item in enumerate(items):
        prompt = list(item["prompt_ids"])
        first, second = samples[2 * i], samples[2 * i + 1]
        s0, s1 = scores[2 * i], scores[2 * i + 1]
        rows = {}
        for role, row in (("chosen", i), ("rejected", P + i)):
            length = int(pairs.attention_mask[row].sum())
            ids = pairs.input_ids[row].tolist()
            assert ids[: len(prompt)] == prompt  # the prompt unpadded
            completion = ids[len(prompt) : length]
            assert ids[length:] == [tokenizer.pad_token_id] * (width - length)
            assert pairs.attention_mask[row].tolist() == [1] * length + [0] * (width - length)
            assert pairs.completion_mask[row].tolist() == (
                [0] * len(prompt) + [1] * len(completion) + [0] * (width - length)
            )
            rows[role] = completion
        if s0 == s1:
            ties += 1
            assert {tuple(rows["chosen"]), tuple(rows["rejected"])} == {tuple(first), tuple(second)}
            assert pairs.pair_weight[i].item() == 0.0
        else:
            better, worse = (first, second) if s0 > s1 else (second, first)
            assert rows["chosen"] == better and rows["rejected"] == worse  # the sampled ids themselves
            assert pairs.pair_weight[i].item() == 1.0
        chosen_score, rejected_score = sampled.pair_scores[0][i].item(), sampled.pair_scores[1][i].item()
        assert chosen_score == max(s0, s1) and rejected_score == min(s0, s1)
        assert sampled.tie[i].item() == (s0 == s1)
    assert pairs.pair_weight.tolist().count(0.0) == ties
    # the check "sampled ids, not re-tokenized text" has teeth: some sample does not survive decode + encode
    retokenized = [tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] for ids in samples]
    assert any(r != list(ids) for r, ids in zip(retokenized, samples, strict=True))


def test_apply_missing_eos_penalty_by_hand():
    scores = torch.tensor([1.0, -2.0, 0.5, 3.0])
    has_eos = torch.tensor([True, False, False, True])
    assert apply_missing_eos_penalty(scores, has_eos, 5.0).tolist() == [1.0, -7.0, -4.5, 3.0]
    assert apply_missing_eos_penalty(scores, has_eos, 0.0).tolist() == scores.tolist()


def constant_reward(prompts, completions):
    return [1.0] * len(completions)


def test_missing_eos_penalty_orders_pairs_through_the_module(tiny_model, source, tokenizer):
    module = online_module(tiny_model, source, tokenizer, constant_reward, missing_eos_penalty=5.0, max_new_tokens=4)
    stops = {tokenizer.eos_token_id, *EXTRA_STOPS}
    items = prompt_items(tokenizer, PROMPT_TEXTS, weights=[1.0, 1.0, 1.0, 0.0])
    batch = PromptCollator(tokenizer.pad_token_id)(items)
    spy = GenerateSpy(module.policy)
    sampled = module.sample_pairs(batch, module.sampling_rng, module.train_samples)
    pairs = sampled.pairs
    samples, has_eos = sampled_ids(spy, batch, stops)
    assert True in has_eos and False in has_eos  # max_new_tokens 4 leaves some completions without EOS
    assert sampled.scores.tolist() == [1.0 if ended else -4.0 for ended in has_eos]
    P = len(items)
    mixed = 0
    for i in range(P):
        e0, e1 = has_eos[2 * i], has_eos[2 * i + 1]
        chosen = pairs.input_ids[i, : int(pairs.attention_mask[i].sum())].tolist()
        if e0 != e1:
            mixed += 1
            ended = samples[2 * i] if e0 else samples[2 * i + 1]
            assert chosen[len(items[i]["prompt_ids"]) :] == ended  # the sample with an EOS is chosen
        expected_weight = items[i]["weight"] * float(e0 != e1)
        assert pairs.pair_weight[i].item() == expected_weight
    assert mixed > 0


# ----------------------------------------------------------------------------- 7, 8: all ties, weighted_mean


def test_all_tie_batch_gives_zero_loss_and_zero_gradients(tiny_model, source, tokenizer):
    module = online_module(tiny_model, source, tokenizer, constant_reward)
    module.train()
    batch = PromptCollator(tokenizer.pad_token_id)(prompt_items(tokenizer, PROMPT_TEXTS))
    loss = module.online_step(batch, module.train_metrics, module.train_samples, module.sampling_rng)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    module.policy.zero_grad(set_to_none=True)
    loss.backward()
    for name, param in module.policy.named_parameters():
        assert param.grad is not None, f"{name} not in the graph"
        assert torch.count_nonzero(param.grad) == 0, name
    assert all(p.grad is None for p in module.reference.parameters())
    report = module.train_samples.report(with_time=False)
    assert report["objective/tie_rate"] == 1.0 and report["objective/ties"] == len(PROMPT_TEXTS)


def test_weighted_mean_by_hand():
    losses = torch.tensor([1.0, 2.0, 3.0, 6.0], requires_grad=True)
    assert weighted_mean(losses, None).item() == 3.0
    assert weighted_mean(losses, torch.tensor([1.0, 0.0, 1.0, 0.0])).item() == 2.0
    assert weighted_mean(losses, torch.tensor([0.0, 0.0, 0.0, 1.0])).item() == 6.0
    zero = weighted_mean(losses, torch.zeros(4))
    assert zero.item() == 0.0 and zero.grad_fn is not None
    zero.backward()
    assert losses.grad.tolist() == [0.0, 0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- 9: objective metrics


def test_sample_metrics_by_hand():
    metrics = SampleMetrics()
    metrics.update(  # two prompts, the second a tie
        scores=torch.tensor([1.0, 3.0, 2.0, 2.0]),
        pair_scores=(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 2.0])),
        kl=torch.tensor([0.1, 0.2, 0.3, 0.4]),
        has_eos=torch.tensor([True, False, True, True]),
        lengths=torch.tensor([4.0, 8.0, 2.0, 6.0]),
        tie=torch.tensor([False, True]),
        prompt_weight=torch.tensor([1.0, 1.0]),
        logp_diff=torch.tensor([0.1, 0.3]),
        judge_cut=torch.tensor([True, False, False, False]),
    )
    metrics.update(  # the second prompt is evaluation padding (weight 0): it counts nowhere
        scores=torch.tensor([-1.0, 5.0, 100.0, -100.0]),
        pair_scores=(torch.tensor([5.0, 100.0]), torch.tensor([-1.0, -100.0])),
        kl=torch.tensor([0.5, 0.7, 9.0, 9.0]),
        has_eos=torch.tensor([False, False, True, True]),
        lengths=torch.tensor([8.0, 8.0, 1.0, 1.0]),
        tie=torch.tensor([False, True]),
        prompt_weight=torch.tensor([1.0, 0.0]),
        logp_diff=torch.tensor([0.2]),
        judge_cut=torch.tensor([True, True, True, True]),
    )
    report = metrics.report(with_time=False)
    expected = {
        "objective/scores": (1 + 3 + 2 + 2 - 1 + 5) / 6,
        "objective/kl": (0.1 + 0.2 + 0.3 + 0.4 + 0.5 + 0.7) / 6,
        "objective/eos_rate": 3 / 6,
        "objective/completion_length": (4 + 8 + 2 + 6 + 8 + 8) / 6,
        "objective/tie_rate": 1 / 3,
        "objective/ties": 1.0,
        "objective/sampler_logp_diff": (0.1 + 0.3 + 0.2) / 3,  # per token
        "objective/scores_chosen": (3 + 5) / 2,
        "objective/scores_rejected": (1 - 1) / 2,
        "objective/scores_margin": (2 + 6) / 2,
        "objective/judge_cut_rate": 3 / 6,  # the padding prompt's samples count nowhere
    }
    assert set(report) == set(expected)
    for name, value in expected.items():
        assert report[name] == pytest.approx(value, rel=1e-6), name
    assert not any(name.startswith("time/") for name in report)


# ----------------------------------------------------------------------------- 10, 11: KL estimate


def scripted_reward(prompts, completions):
    """Per prompt (in order): sample 1 wins, sample 0 wins, a tie, sample 1 wins."""
    return [0.0, 1.0, 3.0, 2.0, 4.0, 4.0, 5.0, 6.0][: len(completions)]


def test_kl_is_zero_and_loss_is_ln2_at_the_reference(tiny_model, source, tokenizer):
    module = online_module(tiny_model, source, tokenizer, scripted_reward)
    module.train()
    batch = PromptCollator(tokenizer.pad_token_id)(prompt_items(tokenizer, PROMPT_TEXTS))
    loss = module.online_step(batch, module.train_metrics, module.train_samples, module.sampling_rng)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    samples = module.train_samples.report(with_time=False)
    assert abs(samples["objective/kl"]) < 1e-6
    assert samples["objective/ties"] == 1.0 and samples["objective/tie_rate"] == 0.25
    assert samples["objective/scores_margin"] == pytest.approx(1.0)
    assert samples["objective/scores"] == pytest.approx(sum(scripted_reward([], [0] * 8)) / 8)
    metrics = module.train_metrics.report()
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_kl_per_sample_follows_the_samples(tiny_model, source, tokenizer):
    """With the policy moved off the reference, each sample's KL estimate is its own sum of log-ratios, in
    prompt-major sample order whichever sample was chosen."""
    module = online_module(tiny_model, source, tokenizer, scripted_reward)
    module.train()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for param in module.policy.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    stops = {tokenizer.eos_token_id, *EXTRA_STOPS}
    items = prompt_items(tokenizer, PROMPT_TEXTS)
    batch = PromptCollator(tokenizer.pad_token_id)(items)
    spy = GenerateSpy(module.policy)
    updates = []
    update = module.train_samples.update
    module.train_samples.update = lambda **kwargs: (updates.append(kwargs), update(**kwargs))[1]
    module.online_step(batch, module.train_metrics, module.train_samples, module.sampling_rng)
    samples, _ = sampled_ids(spy, batch, stops)
    expected = [
        completion_logp(module.policy, list(items[n // 2]["prompt_ids"]), ids)
        - completion_logp(module.reference.model, list(items[n // 2]["prompt_ids"]), ids)
        for n, ids in enumerate(samples)
    ]
    (kwargs,) = updates
    assert kwargs["kl"].tolist() == pytest.approx(expected, abs=1e-4)
    assert max(abs(x) for x in expected) > 1e-2  # the perturbation is large enough for the order to matter
    assert len({round(x, 3) for x in expected}) == len(expected)


ONLINE_LOSSES = [name for name, spec in LOSSES.items() if spec.reference == "needed"]


@pytest.mark.parametrize("loss_type", ONLINE_LOSSES)
def test_online_dpo_trains_every_pairwise_loss_on_the_sampled_pairs(tiny_model, source, tokenizer, loss_type):
    """At the reference each loss has its value at zero log-ratio on the three counted pairs (the tie counts
    nowhere, not even in aot's sort); once the policy has moved, the loss is finite, differs, and has a gradient."""
    smoothing = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1}.get(loss_type, 0.0)
    module = online_module(
        tiny_model, source, tokenizer, scripted_reward, loss_type=loss_type, label_smoothing=smoothing
    )
    module.train()
    batch = PromptCollator(tokenizer.pad_token_id)(prompt_items(tokenizer, PROMPT_TEXTS))
    zeros, lengths = torch.zeros(3), torch.ones(3)
    at_zero = compute_loss(
        loss_type, zeros, zeros, zeros, zeros, beta=0.1, label_smoothing=smoothing, discopop_tau=0.05,
        chosen_lengths=lengths, rejected_lengths=lengths,
    ).losses[0].item()  # fmt: skip
    loss = module.online_step(batch, module.train_metrics, module.train_samples, module.sampling_rng)
    assert module.train_samples.report(with_time=False)["objective/ties"] == 1.0
    assert loss.item() == pytest.approx(at_zero, abs=1e-5)
    assert module.train_metrics.report()["loss"] == pytest.approx(at_zero, abs=1e-5)

    with torch.no_grad():
        for param in module.policy.parameters():
            param.add_(0.02 * torch.randn_like(param))
    loss = module.online_step(batch, module.train_metrics, module.train_samples, module.sampling_rng)
    assert torch.isfinite(loss) and loss.item() != pytest.approx(at_zero, abs=1e-6)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.policy.parameters())
