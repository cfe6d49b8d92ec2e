"""Memory training (LoRA): item expansion, loss going down, export round trip, the base model untouched.

Everything runs on the tiny random Llama (tests/tiny_llama.py); the real
SmolLM2 numbers come from scripts/eval_memory_training.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_llama import save_tiny_llama

from memosd.runtime import LoadedModel, ModelSpec, load_model
from memosd.runtime.lora_train import (
    AdapterExport,
    LoraTrainer,
    TrainSettings,
    attached_adapter,
    build_examples,
    expand_item,
    key_spans,
    parse_qa,
    tokenize_example,
)

ITEMS = [
    "The capital of France is Paris.",
    "Memory cubes hold plaintext, activations and adapters.",
    "Q: What is a KV cache?\nA: A reusable exact token prefix.",
]
# Small and fast: a few steps are enough to see the loss move on 2 CPU cores. No KL/replay here
# (test_kl_and_replay covers them). The random tiny model's tied 0.02-scale embeddings cap its
# logits near 1, so its loss cannot go much below ~4.8 whatever the adapter: "decreases" is modest.
FAST = TrainSettings(
    rank=8, alpha=16, lr=1e-2, epochs=8, batch_size=4, max_len=64, warmup_steps=0, early_stop_loss=0,
    kl_weight=0, replay_samples=0, views=("text", "cloze", "about", "recall"),
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    return load_model(ModelSpec(source=str(path), device="cpu"), tmp_path_factory.mktemp("cache"))


def _probe(lm: LoadedModel) -> torch.Tensor:
    ids = torch.tensor([lm.tokenizer("The capital of France is a KV cache.")["input_ids"]])
    with torch.no_grad():
        logits: torch.Tensor = lm.model(input_ids=ids).logits.clone()
    return logits


def _params(lm: LoadedModel) -> dict[str, torch.Tensor]:
    """The model's parameters by their base names.

    Deleting the last adapter leaves peft's (empty) LoRA wrappers in place, so a
    base weight may now be named ``...q_proj.base_layer.weight``: same tensor.
    """
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in lm.model.named_parameters()}


def _flags(lm: LoadedModel) -> dict[str, bool]:
    return {n.replace(".base_layer", ""): p.requires_grad for n, p in lm.model.named_parameters()}


def _no_lora_weights(lm: LoadedModel) -> bool:
    return not any("lora_" in n for n, _ in lm.model.named_parameters())


# --- items -> examples -----------------------------------------------------------------------------


def test_parse_qa_and_key_spans() -> None:
    assert parse_qa("Q: Who?\nA: Me.") == ("Who?", "Me.")
    assert parse_qa("Question: Who  is it?\n Answer:  Vell  Mora") == ("Who is it?", "Vell Mora")
    assert parse_qa("The capital of France is Paris.") is None
    assert key_spans("The Stili River flows through Vellmora in 1645.") == ["Stili River", "Vellmora", "1645"]
    assert key_spans("The flag of Vellmora is teal.") == ["Vellmora", "teal"]


def test_expand_item_views_and_determinism() -> None:
    sentence = "The capital of Vellmora is Quistarn."
    examples = expand_item(sentence)
    assert examples == expand_item(sentence)  # deterministic
    assert examples[0].text == sentence and not examples[0].is_chat
    chats = [e for e in examples if e.is_chat]
    # cloze x2, about x2, recall x1; every reply is the sentence, no prompt contains it whole.
    assert len(chats) == 5
    assert all(e.messages[-1] == ("assistant", sentence) for e in chats)
    assert all(sentence not in e.messages[0][1] for e in chats)
    assert any("___" in e.messages[0][1] and "Quistarn" not in e.messages[0][1] for e in chats)
    assert [e.text for e in expand_item(sentence, views=("text",))] == [sentence]
    qa = expand_item("Q: Who founded Vellmora?\nA: Oren Halvecki")
    assert [e.messages for e in qa] == [(("user", "Who founded Vellmora?"), ("assistant", "Oren Halvecki"))]
    assert expand_item("   ") == []
    assert len(build_examples(ITEMS)) == sum(len(expand_item(i)) for i in ITEMS)


def test_tokenize_example_masks_the_prompt(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    chat = expand_item("Q: What is it?\nA: Paris")[0]
    ids, labels = tokenize_example(tok, chat, 64)
    assert len(ids) == len(labels)
    n_prompt = labels.count(-100)
    assert n_prompt > 0 and all(x == -100 for x in labels[:n_prompt])
    reply = str(tok.decode(ids[n_prompt:]))
    assert reply.startswith("Paris") and reply.endswith("<|im_end|>")
    text_ids, text_labels = tokenize_example(tok, expand_item("Paris is nice.", views=("text",))[0], 64)
    assert text_ids == text_labels
    short, _ = tokenize_example(tok, chat, 8)
    assert len(short) == 8


def test_settings_validate() -> None:
    with pytest.raises(ValueError):
        TrainSettings(rank=0)
    with pytest.raises(ValueError):
        TrainSettings(views=("nope",))
    with pytest.raises(ValueError):
        TrainSettings(epochs=0)


# --- training --------------------------------------------------------------------------------------


def test_loss_decreases_and_base_model_is_restored(tiny: LoadedModel) -> None:
    before_logits = _probe(tiny)
    before_params = _params(tiny)
    flags = _flags(tiny)
    with LoraTrainer(tiny, ITEMS, FAST) as trainer:
        assert trainer.total_steps == trainer.steps_per_epoch * FAST.epochs
        # Between steps the LoRA layers are off: the shared model computes exactly the base logits.
        first = trainer.step()
        assert torch.equal(_probe(tiny), before_logits)
        results = [first, *trainer.run()]
        assert trainer.done and len(results) == trainer.total_steps
        assert [r.step for r in results] == list(range(1, trainer.total_steps + 1))
        assert all(r.seconds > 0 for r in results)
        per_epoch = trainer.steps_per_epoch
        first_epoch = sum(r.loss for r in results[:per_epoch]) / per_epoch
        last_epoch = sum(r.loss for r in results[-per_epoch:]) / per_epoch
        assert last_epoch < 0.9 * first_epoch
        assert torch.equal(_probe(tiny), before_logits)
        with trainer.adapter_enabled() as model, torch.no_grad():
            ids = torch.tensor([tiny.tokenizer("The capital of France is a KV cache.")["input_ids"]])
            assert not torch.allclose(model(input_ids=ids).logits, before_logits)
        with pytest.raises(RuntimeError):
            trainer.step()
    assert not trainer.model.training
    # Closed: no LoRA weight left, same parameter values and flags, eval mode, same logits.
    assert _no_lora_weights(tiny)
    after = _params(tiny)
    assert after.keys() == before_params.keys()
    assert all(torch.equal(after[n], before_params[n]) for n in after)
    assert _flags(tiny) == flags
    assert not tiny.model.training
    assert torch.equal(_probe(tiny), before_logits)
    with pytest.raises(RuntimeError):
        trainer.step()
    trainer.close()  # idempotent


def test_export_round_trips_through_peft(tiny: LoadedModel) -> None:
    base_logits = _probe(tiny)
    trainer = LoraTrainer(tiny, ITEMS, FAST)
    try:
        for _ in range(5):
            trainer.step()
        with trainer.adapter_enabled() as model, torch.no_grad():
            ids = torch.tensor([tiny.tokenizer("The capital of France is a KV cache.")["input_ids"]])
            trained_logits = model(input_ids=ids).logits.clone()
        adapter = trainer.export()
    finally:
        trainer.close()
    assert isinstance(adapter, AdapterExport)
    assert adapter.state_dict and all("lora_" in k for k in adapter.state_dict)
    assert all(t.device.type == "cpu" for t in adapter.state_dict.values())
    assert adapter.n_params == trainer.describe()["trainable_params"] > 0
    cfg = adapter.config
    assert cfg["peft_type"] == "LORA" and cfg["r"] == FAST.rank and cfg["lora_alpha"] == FAST.alpha
    assert sorted(cfg["target_modules"]) == sorted(FAST.target_modules)
    import json

    json.dumps(cfg)  # adapter_config.json must be plain JSON

    # Loaded back through peft, the adapter reproduces the trained logits; removed, the base ones.
    from peft import LoraConfig

    LoraConfig.from_peft_type(**cfg)  # type: ignore[no-untyped-call]  # as PeftConfig.from_pretrained reads the file
    with attached_adapter(tiny, adapter) as model, torch.no_grad():
        ids = torch.tensor([tiny.tokenizer("The capital of France is a KV cache.")["input_ids"]])
        assert torch.allclose(model(input_ids=ids).logits, trained_logits, atol=1e-5)
    assert _no_lora_weights(tiny)
    assert torch.equal(_probe(tiny), base_logits)


def test_saved_adapter_loads_with_peft_from_pretrained(tiny: LoadedModel, tmp_path: Path) -> None:
    import json

    from peft import PeftModel
    from safetensors.torch import save_file

    with LoraTrainer(tiny, ITEMS, FAST) as trainer:
        for _ in range(3):
            trainer.step()
        adapter = trainer.export()
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter.config))
    # As PeftModel.save_pretrained names the keys (memosd.parametric.jobs writes them so).
    prefixed = {k if k.startswith("base_model.model.") else "base_model.model." + k: v
                for k, v in adapter.state_dict.items()}  # fmt: skip
    save_file(prefixed, str(tmp_path / "adapter_model.safetensors"))
    base_logits = _probe(tiny)
    peft_model = PeftModel.from_pretrained(tiny.model, str(tmp_path))
    try:
        loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
        assert len(loaded) == len(adapter.state_dict)
    finally:
        peft_model.unload()
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in vars(tiny.model):
                delattr(tiny.model, attr)
    assert torch.equal(_probe(tiny), base_logits)


def test_same_seed_same_run(tiny: LoadedModel) -> None:
    def losses(seed: int) -> tuple[list[float], dict[str, torch.Tensor]]:
        s = TrainSettings(**{**FAST.__dict__, "seed": seed, "max_steps": 4})
        with LoraTrainer(tiny, ITEMS, s) as trainer:
            out = [r.loss for r in trainer.run()]
            return out, trainer.export().state_dict

    a, sa = losses(1)
    b, sb = losses(1)
    c, _ = losses(2)
    assert a == b and len(a) == 4
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a != c


def test_early_stop(tiny: LoadedModel) -> None:
    s = TrainSettings(**{**FAST.__dict__, "epochs": 50, "early_stop_loss": 10.0})
    with LoraTrainer(tiny, ITEMS, s) as trainer:
        trainer.run()
        assert trainer.stopped_early and trainer.done
        assert trainer.step_count == trainer.steps_per_epoch  # stopped after the first full epoch


def test_kl_and_replay(tiny: LoadedModel) -> None:
    """The KL regularizer and its replay text: deterministic, cached, and the global RNG left alone."""
    s = TrainSettings(**{**FAST.__dict__, "kl_weight": 1.0, "replay_samples": 4, "replay_tokens": 8,
                         "replay_per_step": 2, "epochs": 3})  # fmt: skip
    base_logits = _probe(tiny)

    def run() -> tuple[list[float], list[list[int]], int]:
        rng = torch.get_rng_state()
        with LoraTrainer(tiny, ITEMS, s) as trainer:
            losses = [r.loss for r in trainer.run()]
            replay = [list(r) for r in trainer._replay]
            teachers = len(trainer._teacher)
        assert torch.equal(torch.get_rng_state(), rng)  # sampling the replay forks the RNG
        return losses, replay, teachers

    a = run()
    b = run()
    assert a == b
    losses, replay, teachers = a
    assert len(replay) == 4 and all(len(r) > 8 for r in replay)
    # One cached teacher per example and per replay text, however many epochs ran.
    assert teachers == len(build_examples(ITEMS, s.views)) + len(replay)
    assert all(x == x for x in losses)  # no NaN
    assert torch.equal(_probe(tiny), base_logits)


def test_replay_seeds_skip_names() -> None:
    from memosd.runtime.lora_train import replay_seeds

    seeds = replay_seeds(["The capital of Vellmora is Quistarn.", "Vellmora was founded by Oren Halvecki.",
                          "The capital of Dravia is Olm.", "Q: Who?\nA: Me."])  # fmt: skip
    assert seeds == ["The capital of"]
    assert replay_seeds(["Q: Who?\nA: Me."]) == ["The"]


def test_the_kl_weight_keeps_the_adapted_model_near_the_base_on_the_replay_text(tiny: LoadedModel) -> None:
    """The regularizer acts: a heavier KL weight gives other losses and less divergence from the base model on
    the replay text. Both runs have kl_weight > 0, so they draw the same batches and the same replay."""
    settings = {**FAST.__dict__, "replay_samples": 4, "replay_tokens": 8, "replay_per_step": 2, "epochs": 3,
                "lr": 3e-2}

    def train(kl_weight: float) -> tuple[list[float], list[list[int]], float]:
        with LoraTrainer(tiny, ITEMS, TrainSettings(**{**settings, "kl_weight": kl_weight})) as trainer:
            losses = [r.loss for r in trainer.run()]
            replay = [list(r) for r in trainer._replay]
            ids = torch.tensor([token for text in replay for token in text])[None]
            with torch.no_grad():
                base = torch.log_softmax(tiny.model(input_ids=ids).logits.float(), -1)
                with trainer.adapter_enabled() as adapted:
                    tuned = torch.log_softmax(adapted(input_ids=ids).logits.float(), -1)
            divergence = float((base.exp() * (base - tuned)).sum(-1).mean())  # KL(base || adapted) per token
        return losses, replay, divergence

    light_losses, light_replay, light_divergence = train(1e-6)
    heavy_losses, heavy_replay, heavy_divergence = train(20.0)
    assert light_replay == heavy_replay  # the same text, so the divergences compare
    assert light_losses[0] == heavy_losses[0]  # the first loss is measured before any update
    assert light_losses[1:] != heavy_losses[1:]
    # Deterministic (seeded); the tiny random model drifts little from its base either way, hence no ratio.
    assert heavy_divergence < light_divergence, (heavy_divergence, light_divergence)
