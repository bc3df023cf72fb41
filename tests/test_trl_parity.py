"""The same inputs through TRL 1.16's DPOTrainer and through ours give the same tokens, loss and metrics.

TRL is a test-only dependency (requirements-dev.txt); without it these tests skip.
"""

from __future__ import annotations

import pytest
import torch
from contract import PREFERENCE_METRICS
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_lightning.builtin import build_tiny_model
from dpo_lightning.config import make_config
from dpo_lightning.data.collate import PairCollator
from dpo_lightning.data.tokenize import tokenize_pair
from dpo_lightning.dpo.reference import FrozenReference
from dpo_lightning.training.dpo_module import DPOModule

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

ROWS = [
    {"prompt": "Describe the garden.\n", "chosen": "The garden is warm.", "rejected": "The garden is cold and dark."},
    {"prompt": "Describe the river.\n", "chosen": "The river is calm and kind.", "rejected": "The river is grim."},
    {"prompt": "Q: 2 + 2?\nA:", "chosen": " 4", "rejected": " 5, or maybe 22."},
    {"prompt": "Say something nice about the bakery", "chosen": ", it smells sweet!", "rejected": "."},
]
CHAT_ROWS = [
    {
        "prompt": [{"role": "user", "content": "Describe the harbor."}],
        "chosen": [{"role": "assistant", "content": "The harbor is bright and calm."}],
        "rejected": [{"role": "assistant", "content": "The harbor is grim."}],
    },
    {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! What should I describe?"},
            {"role": "user", "content": "The meadow."},
        ],
        "chosen": [{"role": "assistant", "content": "The meadow is sunny."}],
        "rejected": [{"role": "assistant", "content": "The meadow is cold and noisy."}],
    },
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("parity-model"), seed=3)


def _perturbed_policy(model_dir) -> torch.nn.Module:
    """A policy that differs from its reference, so that the loss is not just ln 2."""
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return policy


def _trl_trainer(model_dir, rows, tmp_path, loss_type: str, label_smoothing: float, **options):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(rows),
        report_to=[],
        beta=0.2,
        loss_type=loss_type.split(","),
        label_smoothing=label_smoothing,
        max_length=None,
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 autocast; the comparison is in fp32
        **options,
    )
    return trl.DPOTrainer(
        model=_perturbed_policy(model_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )


@pytest.mark.parametrize("rows", [ROWS, CHAT_ROWS], ids=["text", "chat"])
def test_tokenization_matches_trl(model_dir, tmp_path, rows):
    trainer = _trl_trainer(model_dir, rows, tmp_path, "sigmoid", 0.0)
    tokenizer = trainer.processing_class
    for row, theirs in zip(rows, trainer.train_dataset, strict=True):
        ours = tokenize_pair(
            tokenizer, row["prompt"], row["chosen"], row["rejected"], max_prompt_length=None, max_length=None
        )
        assert ours == {k: theirs[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}


# TRL's sigmoid has no label smoothing, so conservative DPO is checked against the reference formula in
# test_losses.py; here every loss runs at a setting TRL implements.
PAIRWISE = [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2), ("exo_pair", 1e-3), ("nca_pair", 0.0)]
PAIRWISE += [("bco_pair", 0.0), ("sppo_hard", 0.0), ("apo_zero", 0.0), ("apo_down", 0.0), ("sigmoid_norm", 0.0)]
PAIRWISE += [("discopop", 0.0)]  # at TRL's default discopop_tau, 0.05, ours too


PAIRWISE += [("aot", 0.1), ("aot_unpaired", 0.0), ("sft", 0.0)]
# the options TRL's DPOConfig and ours share, by the same names: f-DPO, lists of losses, WPO, LD-DPO
OPTIONS = {
    "forward_kl": ("sigmoid", 0.0, {"f_divergence_type": "forward_kl"}),
    "js_divergence": ("hinge", 0.0, {"f_divergence_type": "js_divergence"}),
    "alpha_divergence": ("ipo", 0.0, {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    "robust_forward_kl": ("robust", 0.2, {"f_divergence_type": "forward_kl"}),
    "mpo_list": ("sigmoid,bco_pair,sft", 0.0, {"loss_weights": [0.8, 0.2, 1.0]}),
    "wpo": ("sigmoid", 0.0, {"use_weighting": True}),
    # (TRL 1.16 cannot weight an sft term: it multiplies its expanded batch loss in place, which torch refuses)
    "wpo_list": ("ipo,sigmoid", 0.0, {"use_weighting": True, "loss_weights": [1.0, 0.5]}),
    "ld_dpo": ("sigmoid", 0.0, {"ld_alpha": 0.5}),
    "ld_dpo_f": ("sigmoid_norm", 0.0, {"ld_alpha": 0.0, "f_divergence_type": "js_divergence"}),
}
CASES = [pytest.param(name, smoothing, {}, id=name) for name, smoothing in PAIRWISE]
CASES += [pytest.param(*case, id=case_id) for case_id, case in OPTIONS.items()]


@pytest.mark.parametrize(("loss_type", "label_smoothing", "options"), CASES)
def test_loss_and_metrics_match_trl(model_dir, tmp_path, loss_type, label_smoothing, options):
    trainer = _trl_trainer(model_dir, ROWS, tmp_path, loss_type, label_smoothing, **options)
    trainer.model.train()
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    cfg = make_config({"loss_type": loss_type, "beta": 0.2, "label_smoothing": label_smoothing, **options})
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    module = DPOModule(cfg, _perturbed_policy(model_dir), FrozenReference(reference))
    items = [{k: trainer.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(4)]
    batch = PairCollator(trainer.processing_class.pad_token_id)(items)
    loss = module.shared_step(batch, module.train_metrics)
    ours = module.train_metrics.report()

    assert abs(trl_loss.item() - 0.6931) > 1e-3 or loss_type != "sigmoid"  # the policy really differs
    torch.testing.assert_close(loss.detach(), trl_loss.detach(), rtol=1e-4, atol=1e-6)
    # TRL's logps/* are LD-DPO's weighted sums; ours stay the completions' log-probs (rewards are weighted in both)
    names = [n for n in PREFERENCE_METRICS if not ("ld_alpha" in options and n.startswith("logps/"))]
    for name in names:
        assert ours[name] == pytest.approx(trl_metrics[name], rel=1e-4, abs=1e-6), name


# The reference-free losses against TRL 1.16's experimental CPOTrainer (cpo: its loss_type sigmoid; simpo) and
# ORPOTrainer, on their own tokenization of the same rows. TRL's logits/* there average every position of the
# padded rows (prompt and padding too), and its logps/* are per-token means for simpo and orpo; the metrics that
# mean the same in both are compared.
FREE = {
    "cpo": ("cpo", {"loss_type": "sigmoid", "cpo_alpha": 0.7}, {"cpo_alpha": 0.7}, ("logps/chosen", "logps/rejected")),
    "simpo": (
        "cpo",
        {"loss_type": "simpo", "simpo_gamma": 0.3, "cpo_alpha": 0.0},
        {"simpo_gamma": 0.3, "cpo_alpha": 0.0},
        (),
    ),
    "cpo_simpo": ("cpo", {"loss_type": "simpo", "label_smoothing": 0.1}, {"label_smoothing": 0.1}, ()),
    "orpo": ("orpo", {}, {}, ("log_odds_ratio", "log_odds_chosen")),
}


def _free_trainer(model_dir, tmp_path, kind: str, options: dict):
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    config, trainer = (CPOConfig, CPOTrainer) if kind == "cpo" else (ORPOConfig, ORPOTrainer)
    args = config(
        output_dir=str(tmp_path / kind), per_device_train_batch_size=len(ROWS), report_to=[], beta=0.2,
        use_cpu=True, bf16=False, max_length=256, **options,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train = datasets.Dataset.from_list(ROWS)
    return trainer(model=_perturbed_policy(model_dir), args=args, train_dataset=train, processing_class=tokenizer)


def _pairs_of(batch) -> tuple[list, list, list]:
    """(prompts, chosen, rejected) token lists of a CPO/ORPO batch: a row's prompt is its tokens labelled -100,
    its completion the labelled ones (padding has attention 0)."""
    out = {}
    for role in ("chosen", "rejected"):
        ids, labels, mask = (batch[f"{role}_{k}"] for k in ("input_ids", "labels", "attention_mask"))
        rows = [(i[m.bool()], label[m.bool()]) for i, label, m in zip(ids, labels, mask, strict=True)]
        out[role] = [(i[lab == -100].tolist(), i[lab != -100].tolist()) for i, lab in rows]
    assert [p for p, _ in out["chosen"]] == [p for p, _ in out["rejected"]]
    return [p for p, _ in out["chosen"]], [c for _, c in out["chosen"]], [r for _, r in out["rejected"]]


@pytest.mark.parametrize("case", sorted(FREE))
def test_reference_free_losses_match_trl_cpo_and_orpo_trainers(model_dir, tmp_path, case):
    from dpo_lightning.data.batch import PairBatch
    from dpo_lightning.dpo.reference import NoReference

    kind, theirs, ours, extra = FREE[case]
    trainer = _free_trainer(model_dir, tmp_path, kind, theirs)
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(trainer.model, batch)

    loss_type = theirs.get("loss_type", "orpo") if kind == "cpo" else "orpo"
    cfg = make_config({"loss_type": "cpo" if loss_type == "sigmoid" else loss_type, "beta": 0.2, **ours})
    module = DPOModule(cfg, _perturbed_policy(model_dir), NoReference())
    prompts, chosen, rejected = _pairs_of(batch)
    loss = module.shared_step(PairBatch.from_pairs(prompts, chosen, rejected, pad_token_id=0), module.train_metrics)
    metrics = module.train_metrics.report()

    names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "nll_loss", *extra)
    if kind == "orpo":
        # TRL's ORPOTrainer takes its NLL over the prompt tokens too; ours, as the paper's L_SFT, over the response
        # (test_loss_family checks it by hand): the odds-ratio terms are compared
        loss, trl_loss = loss - metrics["nll_loss"], trl_loss - float(trl_metrics["nll_loss"])
        names = tuple(name for name in names if name != "nll_loss")
    if ours.get("cpo_alpha") == 0.0:  # TRL logs nll_loss 0 when it leaves the NLL out; ours still reports it
        names = tuple(name for name in names if name != "nll_loss")
    torch.testing.assert_close(loss.detach(), trl_loss.detach(), rtol=1e-4, atol=1e-6)
    for name in names:
        assert metrics[name] == pytest.approx(float(trl_metrics[name]), rel=1e-4, abs=1e-6), name
