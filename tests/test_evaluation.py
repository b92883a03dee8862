"""Evaluation on a tiny random Llama (4-bit, bitsandbytes): batched generation, task metrics against
independent computations, forgetting metrics, the adapter matrix and `lorafleet eval`."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import write_jsonl
from peft import LoraConfig, PeftModel, get_peft_model
from typer.testing import CliRunner

from schema.job import QuantConfig
from schema.tasks import TasksFile
from trainer.evaluation.tasks import build_base_reference, evaluate_tasks
from trainer.evaluation.matrix import evaluate_matrix
from trainer.evaluation.generation import cut_at_stop, generate
from trainer.checks import load_tasks_file
from data_pipeline.encoding import render_prompt
from trainer.models import load_base_model, load_tokenizer

PROMPTS = ["Q: What is 12 plus 7? A:", "the", "what is the answer to the question of the sum of a number", "reverse the word"]
FP32 = torch.float32


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_base_model(str(tiny_model_dir), QuantConfig(bits=4), dtype=FP32, device=torch.device("cpu"))
    return model, load_tokenizer(str(tiny_model_dir))


def lora_model(base, seed: int | None):
    """A LoRA on `base`; with a seed its B matrices are random (a trained-looking adapter), without it B = 0."""
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def test_batched_greedy_generation_matches_one_by_one_and_stops(tiny):
    model, tokenizer = tiny
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=4)
    single = [generate(model, tokenizer, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == single
    # Greedy decoding by hand, exactly max_new_tokens argmax steps (no EOS in this short run).
    ids = torch.tensor([tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, model.eval()(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    new_ids = ids[0, -10:].tolist()
    assert tokenizer.eos_token_id not in new_ids
    assert batched[2] == tokenizer.decode(new_ids, skip_special_tokens=True)
    # A stop string cuts the output just before it; text before the stop is unchanged.
    stop = batched[0][3:5]
    stopped = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=10, stop=[stop])[0]
    assert stopped == batched[0][: batched[0].index(stop)]
    assert len(generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2)[0]) < len(batched[0])


def test_finished_rows_leave_the_batch_and_every_answer_equals_hf_generate(tiny, tiny_model_dir):
    tokenizer = tiny[1]
    model = lora_model(load_base_model(str(tiny_model_dir), QuantConfig(bits=4), dtype=FP32), seed=1)  # peft, NF4, a nonzero adapter
    stop = generate(model, tokenizer, PROMPTS[1:2], max_new_tokens=12)[0][2:4]  # ends the second prompt's answer early
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        answers = generate(model, tokenizer, PROMPTS, max_new_tokens=12, stop=[stop], batch_size=len(PROMPTS))
    finally:
        hook.remove()
    # HF's generate, one prompt at a time (no padding), greedy, cut at the same stop string.
    model.eval()
    for prompt, answer in zip(PROMPTS, answers):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**ids, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=tokenizer.eos_token_id)
        assert answer == cut_at_stop(tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True), [stop])
    # One prefill of the whole batch, then one forward per step; the stopped row stops costing forwards.
    assert batch_sizes[0] == len(PROMPTS) and len(batch_sizes) <= 12
    assert min(batch_sizes) < len(PROMPTS), batch_sizes
    assert stop not in answers[1] and len(answers[1]) < 4


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tiny):
    model, tokenizer = tiny
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, seed=5) == first
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=1.0, seed=6) != first


def test_task_metrics_against_independent_computation(tiny, tmp_path):
    model, tokenizer = tiny
    outputs = generate(model, tokenizer, PROMPTS, max_new_tokens=6)
    # References equal to the model's own greedy outputs for the first half, wrong for the rest.
    rows = [{"prompt": p, "completion": out if i < 2 else "zzz"} for i, (p, out) in enumerate(zip(PROMPTS, outputs))]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    label_rows = [{"prompt": p, "completion": out.strip().split(" ")[0] or "x" if i != 1 else "nolabel"} for i, (p, out) in enumerate(zip(PROMPTS, outputs))]
    labels = write_jsonl(tmp_path / "labels.jsonl", label_rows)
    tasks = TasksFile.model_validate({"tasks": [
        {"name": "em", "path": data, "metric": "exact_match", "max_new_tokens": 6, "template": "none", "seed": None},
        {"name": "has", "path": data, "metric": "contains", "max_new_tokens": 6, "template": "none", "seed": None},
        {"name": "nll", "path": data, "metric": "loss", "template": "none", "seed": None},
        {"name": "cls", "path": labels, "metric": "label", "max_new_tokens": 6, "template": "none", "seed": None},
    ]})
    model.train()
    metrics = evaluate_tasks(model, tokenizer, tasks)
    assert model.training  # the caller's mode comes back
    assert metrics["eval/em/exact_match"] == 0.5
    assert metrics["eval/has/contains"] == 0.5
    # Label: rows 0, 2, 3 name their own first word; row 1's gold is not in the output.
    assert metrics["eval/cls/accuracy"] == pytest.approx(3 / 4)
    # Loss: token-mean cross-entropy of the completions, computed here without the evaluation code.
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + answer_ids])
            logits = model.eval()(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
            total += F.cross_entropy(logits.float(), torch.tensor(answer_ids), reduction="sum").item()
            count += len(answer_ids)
    assert metrics["eval/nll/loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["eval/nll/ppl"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def forgetting_tasks(tmp_path) -> TasksFile:
    general = write_jsonl(tmp_path / "general.jsonl", [
        {"instruction": "Write a number", "instances": [{"input": "", "output": "7"}]},
        {"instruction": "What is the sum", "instances": [{"input": "12 and 7", "output": "19"}]},
        {"instruction": "reverse the word", "instances": [{"input": "abc", "output": "cba"}]},
    ])
    labelled = write_jsonl(tmp_path / "labelled.jsonl", [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, ["1", "2", "3", "4"])])
    return TasksFile.model_validate({
        "tasks": [{"name": "gen", "path": labelled, "metric": "contains", "general": True, "max_new_tokens": 4, "template": "none"}],
        "forgetting": {"prompts": general, "n": 3, "template": "chat", "max_new_tokens": 8},
    })


def drift_by_hand(model, teacher, tokenizer, reference) -> float:
    """Mean per-token KL(p_teacher || p_model) over the reference's responses, one example at a time."""
    kl_sum, count = 0.0, 0
    with torch.no_grad():
        for prompt, response in zip(reference.prompts, reference.responses):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + tokenizer(response, add_special_tokens=False)["input_ids"]])
            start = len(prompt_ids) - 1
            student = F.log_softmax(model.eval()(input_ids=ids).logits[0, start:-1].float(), -1)
            base_lp = F.log_softmax(teacher.eval()(input_ids=ids).logits[0, start:-1].float(), -1)
            kl_sum += F.kl_div(student, base_lp, log_target=True, reduction="sum").item()
            count += ids.shape[1] - 1 - start
    return kl_sum / count


def test_forgetting_metrics_zero_for_a_zero_adapter_and_exact_for_a_trained_one(tiny_model_dir, tmp_path):
    base = load_base_model(str(tiny_model_dir), QuantConfig(bits=4), dtype=FP32, device=torch.device("cpu"))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tasks = forgetting_tasks(tmp_path)
    reference = build_base_reference(base, tokenizer, tasks)
    assert len(reference.prompts) == 3 and reference.prompts[0] == render_prompt(tokenizer, "chat", "Write a number")
    base_metrics = evaluate_tasks(base, tokenizer, tasks, base_reference=reference)
    assert base_metrics["eval/forgetting/drift_kl"] == 0.0
    assert base_metrics["eval/forgetting/response_nll_increase"] == 0.0

    model = lora_model(base, seed=None)  # B = 0: the adapted model is the base
    zero = evaluate_tasks(model, tokenizer, tasks, base_reference=reference)
    assert zero["eval/forgetting/drift_kl"] == pytest.approx(0.0, abs=1e-7)
    assert zero["eval/forgetting/response_nll"] == pytest.approx(reference.response_nll, rel=1e-6)
    assert zero["eval/forgetting/accuracy_drop"] == 0.0

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    trained = evaluate_tasks(model, tokenizer, tasks, base_reference=reference)
    assert trained["eval/forgetting/drift_kl"] > 1e-4
    # The KL over the base responses, recomputed with a second, separately loaded copy of the base.
    teacher = load_base_model(str(tiny_model_dir), QuantConfig(bits=4), dtype=FP32, device=torch.device("cpu"))
    assert trained["eval/forgetting/drift_kl"] == pytest.approx(drift_by_hand(model, teacher, tokenizer, reference), rel=1e-4)
    assert trained["eval/forgetting/response_nll_increase"] == pytest.approx(
        trained["eval/forgetting/response_nll"] - reference.response_nll
    )
    assert trained["eval/forgetting/gen_drop"] == pytest.approx(reference.general_scores["gen"] - trained["eval/gen/contains"])


def test_adapter_matrix_and_cli(tiny_model_dir, tmp_path):
    tasks = forgetting_tasks(tmp_path)
    tasks_yaml = tmp_path / "tasks.yaml"
    tasks_yaml.write_text(json.dumps(tasks.model_dump(mode="json")))  # JSON is YAML
    assert load_tasks_file(tasks_yaml) == tasks
    # Two adapters as jobs leave them: <job>/adapter next to <job>/config.yaml.
    dirs = []
    for job, seed in (("zero", None), ("trained", 2)):
        base = load_base_model(str(tiny_model_dir), QuantConfig(bits=4), dtype=FP32, device=torch.device("cpu"))
        lora_model(base, seed).save_pretrained(tmp_path / job / "adapter")
        (tmp_path / job / "config.yaml").write_text(f"model: {tiny_model_dir}\nquant: {{bits: 4}}\n")
        dirs.append(tmp_path / job / "adapter")

    from launch.cli import app

    result = CliRunner().invoke(app, ["eval", "--tasks", str(tasks_yaml), "--out", str(tmp_path / "out"), "--adapters", str(dirs[0]), str(dirs[1])], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "drift_kl" in result.output and "trained" in result.output
    matrix = json.loads((tmp_path / "out" / "matrix.json").read_text())["rows"]
    assert list(matrix) == ["base", "zero", "trained"]
    assert matrix["base"]["eval/forgetting/drift_kl"] == 0.0
    assert matrix["zero"]["eval/forgetting/drift_kl"] == pytest.approx(0.0, abs=1e-7)
    assert matrix["trained"]["eval/forgetting/drift_kl"] > 1e-4
    with (tmp_path / "out" / "matrix.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["model"] for row in table] == ["base", "zero", "trained"]
    assert float(table[2]["eval/forgetting/drift_kl"]) == pytest.approx(matrix["trained"]["eval/forgetting/drift_kl"])

    # A row of the matrix is the same as evaluating that adapter alone on a fresh base.
    base = load_base_model(str(tiny_model_dir), QuantConfig(bits=4), dtype=FP32, device=torch.device("cpu"))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    alone = evaluate_matrix(base, tokenizer, [dirs[1]], tasks)
    assert alone["trained"] == pytest.approx(matrix["trained"], rel=1e-5)

    bad = CliRunner().invoke(app, ["eval", "--tasks", str(tasks_yaml), "--adapters", str(tmp_path)])
    assert bad.exit_code == 2 and "no adapter_config.json" in bad.output


def test_matrix_forgetting_against_another_reference_model(tiny_model_dir, tmp_path):
    """With reference_model, every row drifts from that model (its answers, its distributions) rather than
    from the base the adapters sit on, as PLR compares adapters on NF4 with the 16-bit base. A copy of
    the base as the reference gives the default rows."""
    tasks = forgetting_tasks(tmp_path)
    tokenizer = load_tokenizer(str(tiny_model_dir))

    def load(bits: int):
        return load_base_model(str(tiny_model_dir), QuantConfig(bits=bits), dtype=FP32, device=torch.device("cpu"))

    adapter = tmp_path / "trained" / "adapter"
    lora_model(load(4), seed=2).save_pretrained(adapter)
    own = evaluate_matrix(load(4), tokenizer, [adapter], tasks)
    copy = evaluate_matrix(load(4), tokenizer, [adapter], tasks, reference_model=load(4))
    for row in own:
        assert copy[row] == pytest.approx(own[row], rel=1e-6, abs=1e-7)

    full = load(16)
    against_full = evaluate_matrix(load(4), tokenizer, [adapter], tasks, reference_model=full)
    reference = build_base_reference(full, tokenizer, tasks)
    # The NF4 base alone drifts from the 16-bit one; the adapter's row is measured against the 16-bit base too.
    assert against_full["base"]["eval/forgetting/drift_kl"] > 1e-4
    assert against_full["base"]["eval/forgetting/drift_kl"] == pytest.approx(drift_by_hand(load(4), full, tokenizer, reference), rel=1e-4)
    restored = PeftModel.from_pretrained(load(4), str(adapter))
    assert against_full["trained"]["eval/forgetting/drift_kl"] == pytest.approx(drift_by_hand(restored, full, tokenizer, reference), rel=1e-4)
    assert against_full["trained"]["eval/forgetting/response_nll_increase"] == pytest.approx(
        against_full["trained"]["eval/forgetting/response_nll"] - reference.response_nll
    )
    # Without the base's own row, the adapter's row is the same.
    adapter_only = evaluate_matrix(load(4), tokenizer, [adapter], tasks, reference_model=full, base_row=False)
    assert list(adapter_only) == ["trained"]
    assert adapter_only["trained"] == pytest.approx(against_full["trained"], rel=1e-6, abs=1e-7)


def test_dequantized_4bit_forward_matches_bitsandbytes(tiny):
    import bitsandbytes as bnb

    from trainer.evaluation.generation import dequantized_4bit

    model, tokenizer = tiny
    ids = torch.tensor([tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"]])
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    with torch.no_grad():
        model.eval()
        reference = model(input_ids=ids).logits
        with dequantized_4bit(model):
            assert all("forward" in vars(layer) for layer in layers)
            dense = model(input_ids=ids).logits
        assert not any("forward" in vars(layer) for layer in layers)  # bnb's forward is back
        assert torch.equal(model(input_ids=ids).logits, reference)
    assert torch.allclose(dense, reference, rtol=1e-5, atol=1e-5)
    assert not torch.equal(dense, torch.zeros_like(dense))


def test_evaluating_between_training_steps_changes_nothing_in_training(tiny_model_dir, tmp_path):
    """What a job does every eval.every steps: the next training loss (dropout on, same RNG) is bit-identical
    whether or not an evaluation ran in between, and the model is back in train mode with bnb's forward."""
    from trainer.adapters import attach_adapter
    from schema.job import ForgettingConfig
    from schema.job import LoraConfig as JobLoraConfig
    from trainer.losses import compute_loss

    base = load_base_model(str(tiny_model_dir), QuantConfig(bits=4), dtype=FP32, device=torch.device("cpu"))
    model = attach_adapter(base, JobLoraConfig(r=4, dropout=0.2, targets="qv"), max_steps=4, grad_checkpointing=True)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tasks = forgetting_tasks(tmp_path)
    reference = build_base_reference(model, tokenizer, tasks)
    ids = torch.tensor([tokenizer(PROMPTS[2] + " 19", add_special_tokens=False)["input_ids"]])
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(ids.shape[1])[None]}
    model.train()

    def loss_after(evaluate: bool) -> torch.Tensor:
        torch.manual_seed(0)
        if evaluate:
            evaluate_tasks(model, tokenizer, tasks, base_reference=reference)
        return compute_loss(model, batch, float(ids.shape[1] - 1), ForgettingConfig()).total.detach()

    assert torch.equal(loss_after(evaluate=True), loss_after(evaluate=False))
    assert model.training
    import bitsandbytes as bnb

    assert not any("forward" in vars(module) for module in model.modules() if isinstance(module, bnb.nn.Linear4bit))
