"""Learned composition weights recover a known mixture of two adapters."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from compositor.adapters import read_adapter
from compositor.learned import encode_pairs, learn_weights, weighted_adapters
from test_compose import make_adapter, one_thread  # noqa: F401  (autouse: one torch thread)

TRUE_WEIGHTS = [0.8, 0.3]


@pytest.fixture(scope="module")
def mixture(tiny_model_dir, tmp_path_factory):
    """Two adapters (lm_head included, so that they shape the output distribution strongly) and
    sequences sampled from base + 0.8·ΔW₁ + 0.3·ΔW₂."""
    root = tmp_path_factory.mktemp("mixture")
    targets = ["q_proj", "v_proj", "lm_head"]
    adapters = [read_adapter(make_adapter(tiny_model_dir, root / f"m{i}", seed=50 + i, b_std=1.0, r=4, lora_alpha=8, target_modules=targets)) for i in range(2)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad(), weighted_adapters(model, adapters, init=TRUE_WEIGHTS):
        start = torch.randint(0, 400, (24, 1))
        samples = model.generate(
            start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0, top_p=1.0,
            max_new_tokens=32, min_new_tokens=32, pad_token_id=0,
        )
    labels = samples.clone()
    labels[:, 0] = -100
    return model, adapters, [{"input_ids": samples, "labels": labels}]


def test_learned_weights_recover_a_known_mixture(mixture):
    model, adapters, batches = mixture
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable_before = [p.requires_grad for p in model.parameters()]
    result = learn_weights(model, adapters, batches, steps=60, lr=0.05, l1=1e-3, init=[0.5, 0.5])
    assert result.weights == [pytest.approx(w, abs=0.1) for w in TRUE_WEIGHTS]
    assert result.final_loss < result.initial_loss - 0.3
    # The fit trained nothing but w, and left no hook behind.
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert [p.requires_grad for p in model.parameters()] == trainable_before
    ids = batches[0]["input_ids"][:2]
    with torch.no_grad():
        assert not any(m._forward_hooks for m in model.modules())
        plain = model(ids).logits
    assert torch.isfinite(plain).all()


def test_per_layer_weights_and_the_l1_penalty(mixture):
    model, adapters, batches = mixture
    per_layer = learn_weights(model, adapters, batches, steps=60, lr=0.05, l1=1e-3, init=[0.5, 0.5], per_layer=True)
    assert set(per_layer.per_layer) == {"layer.0", "layer.1", "other"}
    # lm_head ("other") shapes the output most, so its weights are the best determined.
    assert per_layer.per_layer["other"] == [pytest.approx(w, abs=0.1) for w in TRUE_WEIGHTS]
    # A strong L1 penalty pulls the weights towards zero, at a cost in loss.
    sparse = learn_weights(model, adapters, batches, steps=60, lr=0.05, l1=10.0, init=[0.5, 0.5])
    assert sum(abs(w) for w in sparse.weights) < 0.5 * sum(abs(w) for w in TRUE_WEIGHTS)
    assert sparse.final_loss > per_layer.final_loss


def test_the_fit_loss_averages_over_examples_or_over_tokens(mixture):
    from compositor.learned import _mean_nll

    model, _, batches = mixture
    ids = batches[0]["input_ids"][:2]
    labels = ids.clone()
    labels[0, :1] = -100  # a long answer: 32 labelled tokens
    labels[1, :-2] = -100  # a one-word label: 2 labelled tokens
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
        token_nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").view(2, -1)
        long_mean, short_mean = token_nll[0].mean(), token_nll[1, -2:].mean()
        by_example = _mean_nll(model, [{"input_ids": ids, "labels": labels}], torch.device("cpu"), "example")
        by_token = _mean_nll(model, [{"input_ids": ids, "labels": labels}], torch.device("cpu"), "token")
    assert by_example.item() == pytest.approx(((long_mean + short_mean) / 2).item(), rel=1e-5)
    assert by_token.item() == pytest.approx(((token_nll[0].sum() + token_nll[1, -2:].sum()) / 34).item(), rel=1e-5)
    with pytest.raises(ValueError, match="average"):
        _mean_nll(model, batches, torch.device("cpu"), "batch")


def test_encode_pairs_labels_only_the_responses(tiny_model_dir):
    from trainer.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    batch = encode_pairs(tokenizer, ["Q: What is 1 plus 2? A:", "Q: 3?"], [" 3", " the answer is 19"])
    for row, response in enumerate([" 3", " the answer is 19"]):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labelled == tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert batch["attention_mask"].sum(1).tolist() == [int((batch["input_ids"][r] != tokenizer.pad_token_id).sum()) for r in range(2)]
