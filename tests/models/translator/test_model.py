"""The translator network: seed 002's freezing policies shown by which parameters get
gradients, parameter counts per module, padding invariance, position encodings,
label smoothing, and loading a local pretrained T5 directory."""

from __future__ import annotations

import pytest
import torch
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

from models.translator.config import TranslatorConfig
from models.translator.data import TranslationDataset, collate, read_split
from models.translator.model import MODULE_GROUPS, module_group, parameter_counts, sentence_loss
from models.translator.task import TranslatorTask, build_translator
from raylab.config import ConfigError, validate_config
from raylab.task import TaskContext


def config(tiny_translator, **extra) -> TranslatorConfig:
    return TranslatorConfig(**tiny_translator(**extra))


def one_batch(cfg: TranslatorConfig, n: int = 4) -> dict:
    tok = ByT5Tokenizer()
    data = TranslationDataset(read_split(cfg.data_dir, "train"), lambda t: tok(t).input_ids, "train",
                              cfg.max_length, cfg.max_target_length, train=True)
    return collate([data[i] for i in range(n)])


def gradients_after_one_backward(cfg: TranslatorConfig) -> dict[str, torch.Tensor | None]:
    torch.manual_seed(0)
    model = build_translator(cfg, ByT5Tokenizer())
    batch = one_batch(cfg)
    loss, _ = sentence_loss(model(batch["parts"], batch["mask"], batch["labels"]), batch["labels"], 0.1)
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def has_grad(g: torch.Tensor | None) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


def test_seed_fixed_policy_gradients(tiny_translator):
    """Encoder trains, first decoder block frozen, head + final norm train."""
    grads = gradients_after_one_backward(config(tiny_translator, freeze_encoder=False, frozen_decoder_blocks=1))
    assert all(has_grad(g) for n, g in grads.items() if n.startswith("t5.encoder.block."))
    assert all(g is None for n, g in grads.items() if n.startswith("t5.decoder.block.0."))
    assert all(has_grad(g) for n, g in grads.items() if n.startswith("t5.decoder.block.1.") and "relative_attention_bias" not in n)
    assert has_grad(grads["t5.lm_head.weight"]) and has_grad(grads["t5.decoder.final_layer_norm.weight"])
    assert all(has_grad(g) for n, g in grads.items() if n.startswith("frontend.") and "learned_positions" not in n)


def test_seed_bug_policy_frozen_encoder_gets_no_gradients(tiny_translator):
    grads = gradients_after_one_backward(config(tiny_translator, freeze_encoder=True, frozen_decoder_blocks=1))
    encoder = [n for n in grads if n.startswith("t5.encoder.")]
    assert encoder and all(grads[n] is None for n in encoder)
    # The front end below the frozen encoder still learns, through it.
    assert has_grad(grads["frontend.project.weight"])
    assert has_grad(grads["t5.lm_head.weight"]) and has_grad(grads["t5.decoder.final_layer_norm.weight"])


def test_parameter_counts_per_module_in_metadata(tiny_translator):
    cfg = config(tiny_translator, freeze_encoder=True, frozen_decoder_blocks=2)
    parts = TranslatorTask().build(cfg, TaskContext())
    counts = parts.metadata["parameters"]
    assert set(counts) == set(MODULE_GROUPS)
    assert counts["encoder"]["trainable"] == 0 < counts["encoder"]["total"]
    assert counts["decoder"]["trainable"] == 0 < counts["decoder"]["total"]  # both decoder blocks frozen
    for group in ("frontend", "decoder_final_norm", "lm_head", "token_embeddings"):
        assert counts[group]["trainable"] == counts[group]["total"] > 0, group
    model = parts.model
    assert sum(c["total"] for c in counts.values()) == sum(p.numel() for p in model.parameters())
    assert sum(c["trainable"] for c in counts.values()) == sum(p.numel() for g in parts.optimizer.param_groups for p in g["params"])
    assert parts.metadata["tokenizer"] == "byt5" and parts.metadata["truncation"]["train"]["clips"] == 64
    assert any("encoder 0/" in notice for notice in parts.metadata["notices"])
    assert "encoder frozen, 2 decoder blocks frozen" in TranslatorTask().describe(cfg)
    assert TranslatorTask().num_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_every_parameter_has_a_module_group_and_the_head_is_separate(tiny_translator):
    model = build_translator(config(tiny_translator), ByT5Tokenizer())
    assert {module_group(n) for n, _ in model.named_parameters()} == set(MODULE_GROUPS)
    assert model.t5.lm_head.weight is not model.t5.shared.weight
    tied = build_translator(config(tiny_translator, tie_embeddings=True), ByT5Tokenizer())
    assert tied.t5.lm_head.weight is tied.t5.shared.weight
    assert parameter_counts(tied)["lm_head"]["total"] == 0  # counted once, as token embeddings


def test_too_many_frozen_blocks_is_a_config_error(tiny_translator):
    with pytest.raises(ConfigError, match="frozen_decoder_blocks \\(3\\) exceeds decoder_layers \\(2\\)"):
        validate_config(TranslatorConfig, tiny_translator(frozen_decoder_blocks=3), "test")
    with pytest.raises(ConfigError, match="bleu_tokenize zh"):
        validate_config(TranslatorConfig, {"synthetic_language": "zh"}, "test")


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_padding_does_not_change_a_clips_outputs(tiny_translator, norm):
    cfg = config(tiny_translator, gcn_norm=norm)
    torch.manual_seed(0)
    model = build_translator(cfg, ByT5Tokenizer()).eval()
    batch = one_batch(cfg, 4)
    lengths = batch["mask"].sum(1).long()
    i = int(lengths.argmin())
    alone = collate([{"id": "x", "labels": batch["labels"][i][batch["labels"][i] != -100],
                      "parts": {k: v[i, : lengths[i]] for k, v in batch["parts"].items()}}])
    assert alone["mask"].shape[1] < batch["mask"].shape[1]  # the batch padded this clip
    with torch.no_grad():
        padded = model(batch["parts"], batch["mask"], batch["labels"])[i]
        single = model(alone["parts"], alone["mask"], alone["labels"])[0]
    n = single.shape[0]
    torch.testing.assert_close(padded[:n], single, atol=1e-4, rtol=1e-4)


def test_position_encodings_are_a_switch(tiny_translator):
    outputs = {}
    for kind in ("none", "sinusoidal", "learned"):
        cfg = config(tiny_translator, position_encoding=kind)
        torch.manual_seed(0)
        model = build_translator(cfg, ByT5Tokenizer()).eval()
        batch = one_batch(cfg, 2)
        with torch.no_grad():
            outputs[kind] = model.frontend(batch["parts"], batch["mask"])
        learned = [n for n, _ in model.named_parameters() if "learned_positions" in n]
        assert bool(learned) == (kind == "learned")
    assert not torch.allclose(outputs["none"], outputs["sinusoidal"])
    assert not torch.allclose(outputs["none"], outputs["learned"])


def test_sentence_loss_label_smoothing_and_accumulation_identity():
    torch.manual_seed(0)
    logits = torch.randn(8, 5, 11)
    labels = torch.randint(0, 11, (8, 5))
    labels[0, 3:] = -100
    labels[5, 1:] = -100
    whole, _ = sentence_loss(logits, labels, 0.0)
    quarters = sum(sentence_loss(logits[k:k + 2], labels[k:k + 2], 0.0)[0] for k in range(0, 8, 2)) / 4
    torch.testing.assert_close(whole, quarters)
    # A confident, correct prediction: smoothing adds loss (it spreads target mass to other tokens).
    sharp = torch.full((1, 2, 11), -20.0)
    target = torch.tensor([[3, 7]])
    sharp[0, 0, 3] = sharp[0, 1, 7] = 20.0
    plain, acc = sentence_loss(sharp, target, 0.0)
    smoothed, _ = sentence_loss(sharp, target, 0.2)
    assert float(plain) < 1e-6 < float(smoothed) and float(acc) == 1.0


def test_pretrained_dir_loads_a_saved_model_and_its_tokenizer(tmp_path, tiny_translator):
    tok = ByT5Tokenizer()
    saved = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=24, d_kv=6, d_ff=48, num_layers=1,
                                                num_decoder_layers=3, num_heads=4, decoder_start_token_id=0))
    saved.save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    cfg = config(tiny_translator, pretrained_dir=str(tmp_path / "t5"), frozen_decoder_blocks=3)
    parts = TranslatorTask().build(cfg, TaskContext())
    t5 = parts.model.t5
    assert t5.config.d_model == 24 and len(t5.decoder.block) == 3  # the directory's sizes, not the config's
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(t5.state_dict()[name], tensor, msg=name)
    assert parts.model.frontend.project.out_features == 24
    assert parts.metadata["tokenizer"] == f"pretrained:{tmp_path / 't5'}"
    assert parts.metadata["parameters"]["decoder"]["trainable"] == 0
    with pytest.raises(ValueError, match="pretrained_dir .* (is not a directory|no usable)"):
        TranslatorTask().build(config(tiny_translator, pretrained_dir=str(tmp_path / "missing")), TaskContext())


def test_mt5_gated_gelu_model_trains_and_translates(tiny_translator):
    cfg = config(tiny_translator, t5_class="mt5", feed_forward="gated-gelu", vocab_size=512, num_beams=2)
    model = build_translator(cfg, ByT5Tokenizer())
    assert type(model.t5).__name__ == "MT5ForConditionalGeneration" and model.t5.config.vocab_size == 512
    batch = one_batch(cfg, 2)
    loss, _ = sentence_loss(model(batch["parts"], batch["mask"], batch["labels"]), batch["labels"], 0.1)
    loss.backward()
    assert torch.isfinite(loss) and model.frontend.project.weight.grad is not None
    model.eval()
    ids = model.translate(batch["parts"], batch["mask"], num_beams=2, max_new_tokens=5)
    assert ids.shape[0] == 2 and ids.shape[1] <= 6


def test_a_global_batch_below_seed_002s_32_is_noticed(tiny_translator):
    def notices(ctx: TaskContext, **values) -> list[str]:
        return TranslatorTask().build(config(tiny_translator, **values), ctx).metadata["notices"]

    small = [n for n in notices(TaskContext(), per_worker_batch_size=4, grad_accum_steps=4) if n.startswith("global batch")]
    assert small == ["global batch 16 (per_worker_batch_size 4 x 1 worker(s) x grad_accum_steps 4) is below 32: seed 002 learned "
                     "only with batch x accumulation >= 32; raise grad_accum_steps"]
    # Workers count: 4 x 2 workers x 4 = 32 meets the rule.
    assert not [n for n in notices(TaskContext(world_size=2), per_worker_batch_size=4, grad_accum_steps=4) if n.startswith("global batch")]
