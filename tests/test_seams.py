"""The seams the steps are built on: the pair batch's layout, the reference, the sampler, the loss registry.

Expected values are written out by hand or computed by an independent path (a plain forward pass, a plain
`generate` call), never by the code under test again.
"""

from __future__ import annotations

import json

import pytest
import torch

from dpo_lightning import config, losses
from dpo_lightning.data.batch import PairBatch, PromptBatch
from dpo_lightning.data.collate import PromptCollator
from dpo_lightning.dpo.logprobs import PairLogps, SequenceLogps
from dpo_lightning.dpo.reference import FrozenReference
from dpo_lightning.errors import ConfigError
from dpo_lightning.models import ModelSource, load_causal_lm, load_tokenizer
from dpo_lightning.online.sampling import HFSampler, SamplingRNG, SamplingSettings, sample_completions, sampling_config

# ----------------------------------------------------------------------------- the pair batch


def test_pair_batch_rows_are_the_chosen_then_the_rejected_sequences():
    batch = PairBatch.from_pairs([[1, 2], [3]], [[4], [5, 6]], [[7, 8, 9], [10]], pad_token_id=0)
    assert batch.num_pairs == 2 and batch.num_rows == 4
    assert batch.input_ids.tolist() == [[1, 2, 4, 0, 0], [3, 5, 6, 0, 0], [1, 2, 7, 8, 9], [3, 10, 0, 0, 0]]
    assert batch.completion_mask.tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    chosen, rejected = batch.split(torch.tensor([10.0, 11.0, 20.0, 21.0]))
    assert chosen.tolist() == [10.0, 11.0] and rejected.tolist() == [20.0, 21.0]
    with pytest.raises(ValueError, match="3 rows for a batch of 4 rows"):
        batch.split(torch.zeros(3))


def test_pair_batch_weights_spread_over_both_rows_of_a_pair():
    plain = PairBatch.from_pairs([[1], [2]], [[3], [4]], [[5], [6]], pad_token_id=0)
    assert plain.pair_weight is None and plain.weights().tolist() == [1.0, 1.0]
    weighted = PairBatch.from_pairs([[1], [2]], [[3], [4]], [[5], [6]], pad_token_id=0, weight=torch.tensor([1.0, 0.0]))
    assert weighted.row_weight().tolist() == [1.0, 0.0, 1.0, 0.0]


def test_pair_logps_split_every_field_by_role():
    batch = PairBatch.from_pairs([[1]], [[2]], [[3]], pad_token_id=0)
    rows = SequenceLogps(torch.tensor([-1.0, -2.0]), torch.tensor([3.0, 4.0]), torch.tensor([5.0, 6.0]))
    pair = PairLogps.of(batch, rows)
    assert pair.chosen == SequenceLogps(torch.tensor([-1.0]), torch.tensor([3.0]), torch.tensor([5.0]))
    assert pair.rejected.logps.tolist() == [-2.0] and pair.rejected.logits_sum.tolist() == [6.0]


def test_prompt_batch_left_pads_and_gives_each_prompt_back():
    batch = PromptBatch.from_prompts([[5, 6, 7], [8]], ["a", [{"role": "user", "content": "b"}]], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.prompt_ids() == [[5, 6, 7], [8]]
    assert batch.weights().tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------- the reference


@pytest.fixture(scope="module")
def tiny(tiny_model):
    source = ModelSource(str(tiny_model), True)
    model = load_causal_lm(source, dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=False)
    return model, load_tokenizer(source)


def test_frozen_reference_stays_frozen_and_scores_as_its_model(tiny):
    model, tokenizer = tiny
    reference = FrozenReference(model)
    reference.train()  # what Lightning does to every submodule at fit start
    assert not reference.training and not reference.model.training
    assert not any(p.requires_grad for p in reference.parameters())
    prompt, completion = tokenizer("Describe the garden.")["input_ids"], tokenizer(" It is warm.")["input_ids"]
    batch = PairBatch.from_pairs([prompt], [completion], [completion[:2]], pad_token_id=tokenizer.pad_token_id)
    got = reference.logps(batch).logps
    assert not got.requires_grad
    with torch.no_grad():  # independently: one unpadded sequence, log-softmax in float64
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    expected = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(completion))
    assert got[0].item() == pytest.approx(expected, rel=1e-5)
    with reference.sampling_model() as sampling:
        assert sampling is model


# ----------------------------------------------------------------------------- the sampler


def test_hf_sampler_draws_what_generate_draws_from_its_stream(tiny):
    model, tokenizer = tiny
    items = [{"prompt_ids": tokenizer(t)["input_ids"], "prompt_json": json.dumps(t)} for t in ("Hi.", "Describe it.")]
    prompts = PromptCollator(tokenizer.pad_token_id)(items)
    settings = SamplingSettings(
        max_new_tokens=6, temperature=0.8, top_p=0.9, stop_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id
    )
    rng = SamplingRNG(7)
    first = HFSampler(model).sample(prompts, 2, settings, rng)
    second = HFSampler(model).sample(prompts, 2, settings, rng)  # the stream moved on
    config_ = sampling_config(
        max_new_tokens=6, temperature=0.8, top_p=0.9, eos_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id
    )
    with torch.random.fork_rng():
        torch.manual_seed(7)
        direct = sample_completions(model, prompts.input_ids, prompts.attention_mask, config_)
        direct_next = sample_completions(model, prompts.input_ids, prompts.attention_mask, config_)
    assert first.ids == direct.ids and first.has_eos.tolist() == direct.has_eos.tolist()
    assert second.ids == direct_next.ids and len(first.ids) == 4
    assert first.ids != second.ids


# ----------------------------------------------------------------------------- the loss registry


def test_the_configuration_takes_its_loss_choices_and_their_options_from_the_registry():
    for name, spec in losses.LOSSES.items():
        smoothing = 0.1 if spec.label_smoothing != "unused" else 0.0
        assert config.make_config({"loss_type": name, "label_smoothing": smoothing}).loss_type == name
        if spec.label_smoothing == "unused":
            with pytest.raises(ConfigError, match=f"loss_type '{name}' would ignore it"):
                config.make_config({"loss_type": name, "label_smoothing": 0.1})
        if spec.label_smoothing == "required":
            with pytest.raises(ConfigError, match=f"loss_type {name} needs label_smoothing > 0"):
                config.make_config({"loss_type": name})
    with pytest.raises(ConfigError, match="valid choices: " + ", ".join(losses.LOSS_TYPES)):
        config.make_config({"loss_type": "kto"})
