"""Seed 002's two policies through the real loop, and the quick stage's BLEU.

The seed blamed its failure (loss 7, accuracy 0%) on a frozen mT5 encoder. Here the encoder is a tiny T5 that
the test pretrains on text and saves (the seed's situation: a text encoder fed pose features, loaded through
`pretrained_dir`); the frozen-encoder run and the seed's fix run on the same data from the same weights. The
test checks what each policy trains, read off the weights the runs end with, and that both learn. It does not
assert that the frozen one learns markedly less: at this size it does not (measured: see the report of
models/translator), because the front end learns to drive the frozen encoder through its residual path.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

from models.translator.synthetic import vocabulary, write_synthetic
from raylab.config import LaunchConfig
from raylab.launch import train


def text_pretrained_t5(directory: Path, steps: int = 300) -> Path:
    """A tiny T5 trained to copy English sentences (its encoder reads byte embeddings), saved with its tokenizer."""
    tokenizer = ByT5Tokenizer()
    torch.manual_seed(0)
    rng = random.Random(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    words = vocabulary("en")
    for _ in range(steps):
        text = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 7))) for _ in range(16)]
        enc = tokenizer(text, return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.input_ids == tokenizer.pad_token_id, -100)
        loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def signs(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("signs") / "s", words=8, train=160, val=16, seed=0)


def test_freezing_policies_in_real_runs_from_a_text_pretrained_t5(tmp_path, signs):
    pretrained = text_pretrained_t5(tmp_path / "t5")
    common = {
        "data_dir": str(signs), "pretrained_dir": str(pretrained), "frozen_decoder_blocks": 1, "gcn_channels": 8,
        "gcn_blocks": 1, "max_length": 48, "max_target_length": 64, "num_beams": 1, "eval_batch_size": 16,
        "per_worker_batch_size": 8, "max_epochs": 10, "lr": 3e-3, "warmup_steps": 0, "lr_schedule": "constant",
        "num_samples": 0, "log_every_steps": 20, "keep_checkpoints": 1,
    }
    runs = {policy: train("translator", "quick", {**common, "freeze_encoder": policy == "frozen"},
                          LaunchConfig(num_workers=0, storage_path=str(tmp_path), name=policy))
            for policy in ("fixed", "frozen")}
    start = safetensors.torch.load_file(str(pretrained / "model.safetensors"))
    encoder = {k for k in start if k.startswith("encoder.block.") or k == "encoder.final_layer_norm.weight"}
    for policy, run in runs.items():
        evals = run.metrics.dropna(subset=["val_loss"])
        assert evals["val_loss"].iloc[-1] < evals["val_loss"].iloc[0] - 0.05, (policy, evals)
        assert evals["val_token_accuracy"].iloc[-1] > evals["val_token_accuracy"].iloc[0], (policy, evals)
        end = safetensors.torch.load_file(str(Path(run.latest_checkpoint) / "model.safetensors"))
        changed = {k for k in start if f"t5.{k}" in end and not torch.equal(start[k], end[f"t5.{k}"])}
        if policy == "frozen":
            assert not encoder & changed  # every encoder tensor exactly as pretrained
        else:
            assert encoder <= changed
        assert not any(k.startswith("decoder.block.0.") for k in changed), policy  # first decoder block frozen
        assert "decoder.final_layer_norm.weight" in changed, policy
        # The LM head, tied to the token embeddings: the checkpoint stores the tensor once, under one of its names.
        head = next(end[f"t5.{name}"] for name in ("lm_head.weight", "shared.weight", "decoder.embed_tokens.weight",
                                                   "encoder.embed_tokens.weight") if f"t5.{name}" in end)
        assert not torch.equal(head, start["shared.weight"]), policy
        assert any(k.startswith("decoder.block.1.") for k in changed), policy


def test_quick_stage_reaches_bleu_10(tmp_path):
    """The quick stage as a user runs it (synthetic 10-word language, ~240K-parameter T5 from scratch)."""
    summary = train("translator", "quick", {"num_samples": 0}, LaunchConfig(num_workers=0, storage_path=str(tmp_path), name="quick"))
    evals = summary.metrics.dropna(subset=["val_bleu"])
    assert evals["val_bleu"].max() >= 10, evals[["step", "val_loss", "val_token_accuracy", "val_bleu"]]
    assert evals["val_sentences"].iloc[-1] == 80
    assert evals["val_loss"].iloc[-1] < evals["val_loss"].iloc[0]
