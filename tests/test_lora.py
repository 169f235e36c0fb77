"""`tdreward lora`: the TD-weighted loss, target modules, 4-bit training and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import TrainingArguments

from conftest import EMBEDDED, REPO, make_tiny_lm
from tdreward import RewardConfig, TDRewardModel
from tdreward.errors import TDRewardError
from tdreward.hardware import TrainingHardwareSettings
from tdreward.training.lora_setup import (
    IGNORE,
    PadCollator,
    encode_pair,
    load_training_data,
)
from tdreward.training.lora_trainer import (
    LoraTrainingConfig,
    TDRewardTrainer,
    default_target_modules,
    resolve_target_modules,
    run_lora,
    td_weights,
)

SAMPLE = REPO / "data" / "sample_training_data.jsonl"


def _peft(tokenizer, init_lora_weights=True):
    lm = make_tiny_lm(len(tokenizer))
    lm.config.pad_token_id = tokenizer.pad_token_id
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=default_target_modules(lm),
                     init_lora_weights=init_lora_weights, task_type="CAUSAL_LM")
    return get_peft_model(lm, cfg)


def _trainer(model, rm, tmp_path, **kw) -> TDRewardTrainer:
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to="none", use_cpu=True,
                             per_device_train_batch_size=2, remove_unused_columns=False,
                             label_names=["labels"])
    pad = rm.tokenizer.pad_token_id
    return TDRewardTrainer(model=model, args=args, reward_model=rm,
                           data_collator=PadCollator(pad), **kw)


def _batch(tokenizer, n=3):
    data = load_training_data(tokenizer, str(SAMPLE), max_length=64)
    return PadCollator(tokenizer.pad_token_id)(data.examples[:n])


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()
                      if p.requires_grad and p.grad is not None])


def test_pairs_put_the_loss_on_completion_tokens_only(tokenizer):
    enc = encode_pair(tokenizer, "What is 2+2?", "It is 4.", max_length=64)
    n_prompt = len(tokenizer("What is 2+2?\n")["input_ids"])
    assert enc["labels"][:n_prompt] == [IGNORE] * n_prompt
    targets = enc["labels"][n_prompt:]
    assert tokenizer.decode(targets) == "It is 4." + tokenizer.eos_token
    data = load_training_data(tokenizer, str(SAMPLE), max_length=256)
    assert data.kind == "pairs" and len(data.examples) == 67
    batch = PadCollator(tokenizer.pad_token_id)(data.examples[:4])
    # Padding carries no loss, and every row has both prompt (no loss) and completion tokens.
    assert ((batch["attention_mask"] == 0) <= (batch["labels"] == IGNORE)).all()
    assert ((batch["labels"] == IGNORE) & (batch["attention_mask"] == 1)).any(1).all()


def test_td_weights_formula():
    delta = torch.tensor([[-2.0, 0.0, 1.0, 10.0], [0.5, 0.5, -1.0, 3.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    w = td_weights(delta, mask, "token", temperature=2.0, w_max=4.0, baseline="none")
    expect = torch.minimum(torch.exp(delta / 2.0), torch.tensor(4.0)) * mask
    torch.testing.assert_close(w, expect)
    ws = td_weights(delta, mask, "sequence", temperature=1.0, w_max=100.0, baseline="none")
    row_mean = torch.tensor([9.0 / 4, 0.0])  # the masked 3.0 does not count
    torch.testing.assert_close(ws, torch.exp(row_mean)[:, None].expand(2, 4) * mask)
    # The batch baseline subtracts the mean delta of the targets (7 of them): an offset of the
    # critic changes nothing.
    wb = td_weights(delta, mask, "token", temperature=2.0, w_max=4.0)
    base = (9.0 + 0.0) / 7
    torch.testing.assert_close(wb, torch.minimum(torch.exp((delta - base) / 2.0),
                                                 torch.tensor(4.0)) * mask)
    torch.testing.assert_close(td_weights(delta - 5.0, mask, "token", 2.0, 4.0), wb)


def test_reward_scale_zero_is_plain_sft_exactly(tokenizer, tmp_path):
    model = _peft(tokenizer, init_lora_weights=False)
    rm = TDRewardModel.from_lm(model, tokenizer, "tiny")
    batch = _batch(tokenizer)
    sft_trainer = _trainer(model, rm, tmp_path, reward_scale=0.0)
    n = (batch["labels"][:, 1:] != IGNORE).sum()
    for items in (None, n):
        model.zero_grad()
        loss = sft_trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
        loss.backward()
        g = _grads(model)
        model.zero_grad()
        kw = {} if items is None else {"num_items_in_batch": items}
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"], **kw).loss
        ref.backward()
        assert torch.equal(loss, ref)
        assert torch.equal(g, _grads(model))
    # The TD-weighted loss is a different function, and a blend lies between the two.
    td = _trainer(model, rm, tmp_path, reward_scale=1.0).compute_loss(model, dict(batch))
    half = _trainer(model, rm, tmp_path, reward_scale=0.5).compute_loss(model, dict(batch))
    assert not torch.isclose(td, ref)
    torch.testing.assert_close(half, 0.5 * ref + 0.5 * td)


def test_two_rewards_give_two_gradients(tokenizer, tmp_path):
    model = _peft(tokenizer, init_lora_weights=False)
    rm_a = TDRewardModel.from_lm(model, tokenizer, "tiny", RewardConfig(alpha=0.1, beta=0.01))
    rm_b = TDRewardModel.from_lm(model, tokenizer, "tiny", RewardConfig(alpha=3.0, beta=1.0))
    rm_b.critic.load_state_dict(rm_a.critic.state_dict())  # same critic; only the reward differs
    batch = _batch(tokenizer)
    grads = []
    for rm in (rm_a, rm_b, rm_a):
        model.zero_grad()
        _trainer(model, rm, tmp_path, temperature=1.0, w_max=50.0).compute_loss(
            model, dict(batch)).backward()
        grads.append(_grads(model))
    assert torch.equal(grads[0], grads[2])  # deterministic: the difference is the reward's
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos < 0.999, cos  # a different direction, not just a different length


def test_reference_is_the_base_with_the_adapter_disabled(tokenizer, tmp_path):
    model = _peft(tokenizer, init_lora_weights=False)  # a non-zero adapter
    rm = TDRewardModel.from_lm(model, tokenizer, "tiny")
    batch = _batch(tokenizer)
    trainer = _trainer(model, rm, tmp_path)
    delta = trainer.reference_deltas(batch["input_ids"], batch["attention_mask"],
                                     batch["example_id"])
    base = make_tiny_lm(len(tokenizer))  # the same weights, never adapted
    base.config.pad_token_id = tokenizer.pad_token_id
    rm_base = TDRewardModel.from_lm(base, tokenizer, "tiny")
    rm_base.critic.load_state_dict(rm.critic.state_dict())
    # The reference pass has no terminal state (an EOS bootstraps too): compare like with like.
    done = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    expect = rm_base.score_batch(batch["input_ids"], batch["attention_mask"], done)["delta"]
    torch.testing.assert_close(delta, expect, atol=1e-5, rtol=1e-5)
    adapted = rm.score_batch(batch["input_ids"], batch["attention_mask"], done)["delta"]
    assert not torch.allclose(adapted, expect, atol=1e-3)  # the adapter does change delta
    cached = trainer.reference_deltas(batch["input_ids"], batch["attention_mask"],
                                      batch["example_id"])
    torch.testing.assert_close(cached, delta)


def _tiny_config_models():
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1)
    return {
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2,
                                           n_positions=32)),
        "llama": LlamaForCausalLM(LlamaConfig(**small)),
        "gemma": Gemma3ForCausalLM(Gemma3TextConfig(**small, head_dim=8)),
        "neox": GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16,
                                                 intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2)),
    }


def test_target_modules_per_architecture():
    models = _tiny_config_models()
    llama_names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert default_target_modules(models["gpt2"]) == ["c_attn", "c_proj", "c_fc"]
    assert default_target_modules(models["llama"]) == llama_names
    assert default_target_modules(models["gemma"]) == llama_names
    # Another architecture: its own linear layers, the output head left out.
    neox = default_target_modules(models["neox"])
    assert set(neox) == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    with pytest.raises(TDRewardError, match="not in the model"):
        resolve_target_modules(models["gpt2"], ["q_proj"])
    # LoRA on GPT-2 (where the original tool failed) trains: the adapted layers get gradients.
    for name in ("gpt2", "neox"):
        m = models[name]
        peft = get_peft_model(m, LoraConfig(r=2, target_modules=default_target_modules(m),
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
        ids = torch.randint(0, 64, (2, 8))
        peft(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0
                   for n, p in peft.named_parameters() if "lora_" in n)


def test_4bit_lora_trains_on_cpu(tokenizer, tmp_path):
    # bitsandbytes' CPU 4-bit kernel packs weights in blocks of 64 input features: real
    # models' widths are multiples of 64, the default tiny model's 32 is not.
    lm = make_tiny_lm(len(tokenizer), seed=3, hidden_size=64)
    with torch.no_grad():  # logits with some range: at init scale they are all ~0, and
        lm.model.embed_tokens.weight.mul_(25.0)  # LoRA cannot rescale the tied output head
    lm.config.pad_token_id = tokenizer.pad_token_id
    lm.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    data = tmp_path / "pairs.jsonl"
    lines = SAMPLE.read_text().splitlines()[:8]
    data.write_text("\n".join(lines) + "\n")
    cfg = LoraTrainingConfig(
        base_model=str(tmp_path / "tiny"), dataset=str(data), output_dir=str(tmp_path / "out"),
        hardware=TrainingHardwareSettings(load_in_4bit=True, device="cpu"), lora_r=8,
        lora_alpha=16, batch_size=4, max_steps=12, lr=2e-2, eval_examples=8, max_length=96,
    )
    m = run_lora(cfg)
    assert m["quantization"] == {"bits": 4, "quantized_layers": 14}  # 2 layers x 7 projections
    before, after = m["before"]["sft_loss"], m["after"]["sft_loss"]
    assert after < before - 1.0, (before, after)
    assert m["after"]["td_weighted_loss"] < m["before"]["td_weighted_loss"]
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"]


# ----------------------------------------------------------------------------- the CLI
# In-process `tdreward` (the same parser and commands as the console script) saves a fresh
# interpreter's imports per run; test_cli.py covers the entry point as a subprocess.
def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from tdreward.cli import main

    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.integration
def test_cli_lora_adapter_loads_merges_and_scores(tmp_path, smollm2, capsys):
    from tdreward.backends.hf import load_model

    out = tmp_path / "L"
    rc, stdout, err = _cli(
        capsys, "lora", "--base_model", EMBEDDED, "--dataset", str(SAMPLE), "--num_epochs", "1",
        "--batch_size", "2", "--output_dir", str(out), "--max_steps", "2", "--lr", "1e-3",
        "--max_length", "64", "--eval_examples", "2", "--merge")
    assert rc == 0, err
    assert "untrained" in err and "adapter:" in stdout
    meta = json.loads((out / "tdreward_lora.json").read_text())
    assert meta["global_steps"] == 2 and meta["data"]["kind"] == "pairs"
    assert f"on {meta['data']['examples']} prompt/completion pairs; LoRA on" in stdout
    assert meta["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"]
    base, tok = load_model(EMBEDDED)  # a fresh copy: peft edits the model it wraps
    peft = PeftModel.from_pretrained(base, str(out))
    lora_b = [p for n, p in peft.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained away from B = 0
    merged, _ = load_model(str(out / "merged"))
    ids = torch.tensor([tok("The hippocampus replays recent experience.")["input_ids"]])
    with torch.no_grad():
        a, b = peft(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = smollm2[0](input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)
    assert not torch.allclose(a, plain, atol=1e-4)  # the merged model is not the base
    # The adapter folder itself names a model anywhere a spec goes: its recorded base with the
    # adapter merged on the fly (export, ollama create, score).
    on_the_fly, _ = load_model(str(out))
    with torch.no_grad():
        c = on_the_fly(input_ids=ids).logits
    torch.testing.assert_close(c, b, atol=2e-3, rtol=1e-3)
    js = tmp_path / "s.json"
    rc, _, err = _cli(capsys, "score", "--model", str(out / "merged"),
                      "Dopamine signals prediction errors.", "--json", str(js))
    assert rc == 0, err
    assert json.loads(js.read_text())["texts"][0]["summary"]["n_tokens"] > 3


def test_cli_8bit_offline_names_the_real_cause(tmp_path, capsys):
    """An uncached hub model offline: the message says so, not "8-bit cannot run here"."""
    rc, _, err = _cli(capsys, "lora", "--base_model", "no-such-org/no-such-model", "--use_8bit",
                      "--dataset", str(SAMPLE), "--output_dir", str(tmp_path / "E"))
    assert rc == 2
    assert "not in the local Hugging Face cache" in err and "8-bit" not in err, err


@pytest.mark.integration
def test_cli_lora_4bit_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "Q"
    rc, _, err = _cli(
        capsys, "lora", "--base_model", EMBEDDED, "--dataset", str(SAMPLE), "--num_epochs", "1",
        "--batch_size", "2", "--output_dir", str(out), "--max_steps", "1", "--use_4bit",
        "--max_length", "48", "--eval_examples", "0")
    assert rc == 0, err
    meta = json.loads((out / "tdreward_lora.json").read_text())
    assert meta["quantization"]["bits"] == 4 and meta["quantization"]["quantized_layers"] == 210
    assert (out / "adapter_model.safetensors").is_file()


def test_config_reads_the_flags_as_before(tmp_path):
    """--num_epochs (the original spelling) beside --epochs; comma-separated target modules."""
    from tdreward.cli import build_parser
    from tdreward.flags import from_args

    args = build_parser().parse_args([
        "lora", "--dataset", str(SAMPLE), "--output_dir", str(tmp_path / "o"), "--num_epochs",
        "1.5", "--target_modules", "q_proj,k_proj", "v_proj", "--no_gradient_checkpointing"])
    cfg = from_args(LoraTrainingConfig, args)
    assert cfg.epochs == 1.5 and cfg.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert not cfg.gradient_checkpointing and cfg.cache_deltas
    with pytest.raises(TDRewardError, match="--use_8bit"):
        LoraTrainingConfig(dataset=str(SAMPLE), output_dir=str(tmp_path / "o"),
                           hardware=TrainingHardwareSettings(load_in_8bit=True, load_in_4bit=True))
    # The old flag names are aliases of the one hardware setting.
    args = build_parser().parse_args(["lora", "--dataset", str(SAMPLE), "--use_4bit",
                                      "--output_dir", str(tmp_path / "o")])
    assert from_args(LoraTrainingConfig, args).hardware.load_in_4bit


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    common = ["lora", "--base_model", EMBEDDED, "--output_dir", str(tmp_path / "bad")]
    for args, words in (
        (["--dataset", str(SAMPLE), "--reward_scale", "2"], "--reward_scale"),
        (["--dataset", str(SAMPLE), "--weighting", "sequence", "--temperature", "0"],
         "--temperature"),
        (["--dataset", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
    ):
        rc, _, err = _cli(capsys, *common, *args)
        assert rc == 2
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and words in errors[0] and "Traceback" not in err, err
