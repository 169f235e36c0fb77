"""PPO (`tdreward train`): the maths, a toy problem it must solve, NaN handling, resume after
SIGKILL, two processes under `accelerate launch`, and the CLI on the embedded SmolLM2."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import EMBEDDED, assert_one_line_error, make_tiny_lm
from tdreward.errors import TDRewardError
from tdreward.training.ppo_checkpoint import flatten_optimizer, unflatten_optimizer
from tdreward.training.ppo_trainer import PPOConfig, gae, train_ppo, whiten
from tdreward.training.rollout import kl_penalty, repetition_rate, response_mask

WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", *"abcdefghijklmnop"]  # Llama's ids: bos 1, eos 2
TIMING = ("tokens_per_s", "step_time_s", "elapsed_s")
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def tiny_policy(seed: int = 0):
    tok = tiny_tokenizer()
    lm = make_tiny_lm(len(tok), seed=seed, max_positions=128)
    lm.config.pad_token_id = tok.pad_token_id
    lm.generation_config.pad_token_id = tok.pad_token_id
    return lm, tok


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama + word tokenizer saved as a model directory, and a critic for it."""
    from tdreward.reward_model import TDRewardModel

    root = tmp_path_factory.mktemp("tiny")
    lm, tok = tiny_policy()
    lm.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    TDRewardModel.from_lm(lm, tok, str(root / "model")).save_pretrained(root / "critic")
    return root / "model", root / "critic"


def prompt_file(path: Path, long: bool = False) -> Path:
    lines = ["a b c", "d e f g", "h i", "j k l m n", "o p a", "b d f h"]
    if long:
        lines.append(" ".join("abcdefghijklmnop" * 3))  # 48 tokens
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tdreward.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **ENV))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_line_error(p: subprocess.CompletedProcess, *words: str) -> None:
    assert_one_line_error(p, *words)


# --------------------------------------------------------------------------- maths
def test_gae_matches_its_definition_and_whitening():
    torch.manual_seed(0)
    r, v = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5], dtype=torch.float)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(r, v, mask, gamma, lam)
    for b in range(3):
        n = int(mask[b].sum())
        vb = torch.cat([v[b, :n], torch.zeros(1)])  # V = 0 after the last token
        d = r[b, :n] + gamma * vb[1:] - vb[:-1]
        for t in range(n):
            want = sum((gamma * lam) ** k * d[t + k] for k in range(n - t))
            assert adv[b, t] == pytest.approx(float(want), abs=1e-5)
        assert (adv[b, n:] == 0).all()
    assert torch.allclose(ret, (adv + v) * mask)
    w = whiten(adv, mask, lambda t: t)
    vals = w[mask.bool()]
    assert float(vals.mean()) == pytest.approx(0, abs=1e-5)
    assert float(vals.pow(2).mean()) == pytest.approx(1, abs=1e-3)


def test_kl_estimators_repetition_and_response_mask():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    exact = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    k1 = kl_penalty(p.log()[x], q.log()[x], "k1")
    k3 = kl_penalty(p.log()[x], q.log()[x], "k3")
    assert float(k1.mean()) == pytest.approx(exact, rel=0.03)
    assert float(k3.mean()) == pytest.approx(exact, rel=0.03)
    assert (k3 >= 0).all() and (k1 < 0).any()  # k3 never negative per token, k1 can be
    with pytest.raises(TDRewardError):
        kl_penalty(p, q, "k2")
    assert repetition_rate([1, 2, 3, 1, 2, 3, 1, 2, 3]) == pytest.approx(1 - 3 / 7)
    assert repetition_rate([1, 2, 3, 4, 5]) == 0.0
    resp = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])
    assert response_mask(resp, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_optimizer_state_flattens_to_tensors_and_json():
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = flatten_optimizer(opt.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    meta = json.loads(json.dumps(meta))  # JSON-safe
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    opt2.load_state_dict(unflatten_optimizer(tensors, meta))
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(opt2.state_dict()["state"][0][k], v)
    assert opt2.param_groups[0]["lr"] == 0.1


def test_a_config_saved_by_an_older_version_reads_back(tmp_path):
    """ppo_config.json / state.json of older runs: `lam` and flat reward settings."""
    from tdreward.training.ppo_checkpoint import config_dict
    from tdreward.training.ppo_config import PPOConfig

    old = {"prompts": "p.txt", "output_dir": str(tmp_path / "o"), "lam": 0.8, "alpha": 0.2,
           "beta": None, "gamma": 0.9, "reward_model_path": None, "critic_updates": False,
           "epochs": 1, "num_processes": 2}
    cfg = PPOConfig.from_dict(old)
    assert cfg.gae_lambda == 0.8 and cfg.epochs == 1 and not cfg.critic_updates
    assert (cfg.reward.alpha, cfg.reward.gamma) == (0.2, 0.9)
    assert PPOConfig.from_dict(json.loads(json.dumps(config_dict(cfg)))) == cfg


# --------------------------------------------------------------------------- toy problem
def _p_token(lm, tok, prompts: list[str], token_id: int) -> float:
    """Mean probability of `token_id` as the first token after each prompt."""
    with torch.no_grad():
        ps = [torch.softmax(lm(torch.tensor([tok(p)["input_ids"]])).logits[0, -1], -1)[token_id]
              for p in prompts]
    return float(torch.stack(ps).mean())


def test_toy_reward_raises_the_favoured_token(tmp_path):
    """A reward of +1 for every `k` in the response: PPO must make `k` more likely."""
    torch.manual_seed(0)
    lm, tok = tiny_policy(seed=3)
    k = tok.convert_tokens_to_ids("k")
    prompts = ["a b c", "d e f g", "h i", "j k l m n"]
    before = _p_token(lm, tok, prompts, k)

    def reward(ro):
        return (ro.response == k).float() * ro.response_mask

    cfg = PPOConfig(prompts=str(prompt_file(tmp_path / "p.txt")), output_dir=str(tmp_path / "o"),
                    epochs=1, steps_per_epoch=12, batch_size=16, mini_batch_size=8, ppo_epochs=4,
                    max_new_tokens=6, lr=3e-3, kl_coef=0.0, ent_coef=0.0, progress=False)
    res = train_ppo(cfg, reward_fn=reward, lm=lm, tokenizer=tok)
    after = _p_token(res.model.policy, tok, prompts, k)
    assert before < 0.1 and after > 0.3, (before, after)  # about 0.05 -> 0.9 in practice
    rows = res.metrics
    assert rows[-1]["reward"] > 2 * rows[0]["reward"]
    assert {"reward", "kl", "entropy", "value_loss", "clip_fraction", "explained_variance",
            "tokens_per_s"} <= set(rows[0])
    assert (tmp_path / "o" / "model_epoch_1" / "value_head.safetensors").is_file()
    assert (tmp_path / "o" / "training_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_nan_loss_is_skipped_then_stops_with_a_clear_error(tmp_path, caplog):
    lm, tok = tiny_policy()

    def nan_reward(ro):
        return torch.full(ro.response.shape, math.nan)

    cfg = PPOConfig(prompts=str(prompt_file(tmp_path / "p.txt")), output_dir=str(tmp_path / "o"),
                    steps_per_epoch=5, batch_size=4, mini_batch_size=2, ppo_epochs=1,
                    max_new_tokens=3, max_nan_streak=3, progress=False)
    with pytest.raises(TDRewardError, match="NaN/inf in 3 minibatches in a row"):
        train_ppo(cfg, reward_fn=nan_reward, lm=lm, tokenizer=tok)
    assert "minibatch skipped (1 in a row)" in caplog.text
    # Step 1 finished (its 2 minibatches skipped and logged) before step 2 hit the limit.
    rows = metrics(tmp_path / "o")
    assert len(rows) == 1 and rows[0]["nan_skipped"] == 2 and rows[0]["policy_loss"] is None


# --------------------------------------------------------------------------- CLI
def _train_args(model: Path, critic: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--base_model", str(model), "--reward_model_path", str(critic),
            "--prompts", str(prompts), "--output_dir", str(out), "--batch_size", "4",
            "--mini_batch_size", "2", "--ppo_epochs", "2", "--max_new_tokens", "6",
            "--no_progress", *extra]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_dir):
    model, critic = tiny_dir
    prompts = prompt_file(tmp_path / "p.txt", long=True)
    args = ["--epochs", "2", "--steps_per_epoch", "5", "--save_steps", "2", "--use_lora",
            "--lora_dropout", "0.1", "--max_length", "12", "--seed", "7"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    env = dict(os.environ, **ENV)
    cmd = [sys.executable, "-m", "tdreward.cli"]
    # Both runs at once: the uninterrupted reference and the one we kill.
    ref = subprocess.Popen([*cmd, *_train_args(model, critic, prompts, full, *args)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([*cmd, *_train_args(model, critic, prompts, killed, *args)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 200
    # Kill after step 5 (an epoch end, checkpointed), mid-way through step 6 or 7.
    while not (killed / "checkpoints" / "step_000004").is_dir() or len(_lines(killed)) < 5:
        assert victim.poll() is None and time.monotonic() < deadline, "victim ended early"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    n_before = len(_lines(killed))
    assert victim.returncode == -signal.SIGKILL and n_before < 10
    out, err = ref.communicate(timeout=200)
    assert ref.returncode == 0, err
    assert "truncated from the left" in err  # the 48-token prompt vs --max_length 12
    p = cli(*_train_args(model, critic, prompts, killed, *args, "--resume_from_checkpoint",
                         "latest"))
    assert p.returncode == 0, p.stderr
    a, b = metrics(full), metrics(killed)
    assert [r["step"] for r in b] == list(range(1, 11))
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in TIMING} == \
            {k: v for k, v in rb.items() if k not in TIMING}
    for d in ("model_epoch_1", "model_epoch_2", "reward_model_epoch_2"):
        assert (killed / d).is_dir()
    ckpts = sorted(x.name for x in (killed / "checkpoints").iterdir())
    assert ckpts == ["step_000008", "step_000010"]  # --save_total_limit 2, no temp dirs left
    assert {f.name for f in (killed / "checkpoints" / "step_000010").iterdir()} >= {
        "policy.safetensors", "optimizer.safetensors", "optimizer.json", "critic.safetensors",
        "critic_optimizer.safetensors", "rng_rank0.safetensors", "state.json"}
    from safetensors.torch import load_file

    fa = load_file(str(full / "model_epoch_2" / "adapter_model.safetensors"))
    fb = load_file(str(killed / "model_epoch_2" / "adapter_model.safetensors"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def _lines(out: Path) -> list[str]:
    f = out / "metrics.jsonl"
    return f.read_text().splitlines() if f.is_file() else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_cpu_processes(tmp_path, tiny_dir):
    """DDP over 2 CPU processes (gloo), full fine-tuning, prompts from windows of a corpus."""
    model, critic = tiny_dir
    out = tmp_path / "ddp"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join("abcdefghijklmnop"[i % 16] for i in range(7 * 60)) + "\n")
    args = _train_args(model, critic, corpus, out, "--epochs", "1", "--steps_per_epoch", "2",
                       "--prompt_tokens", "16")
    args[args.index("--prompts")] = "--dataset"
    accelerate = Path(sys.executable).with_name("accelerate")
    p = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
         str(_free_port()), "-m", "tdreward.cli", *args],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, **ENV))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert json.loads((out / "ppo_config.json").read_text())["num_processes"] == 2
    # Both processes generated: more tokens than one process's 4 prompts x 6 can give.
    assert any(r["n_tokens"] > 24 for r in rows), rows
    ck = out / "checkpoints" / "step_000002"
    assert (ck / "rng_rank0.safetensors").is_file() and (ck / "rng_rank1.safetensors").is_file()
    assert (out / "model_epoch_1" / "model.safetensors").is_file()
    assert (out / "reward_model_epoch_1" / "critic.safetensors").is_file()


def test_bad_input_gives_one_line_errors(tmp_path, tiny_dir):
    model, critic = tiny_dir
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    base = ["train", "--base_model", str(model), "--output_dir", str(tmp_path / "o")]
    one_line_error(cli(*base, "--prompts", str(empty)), "empty")
    one_line_error(cli(*base, "--dataset", str(empty)), "empty")
    one_line_error(cli(*base), "--prompts")
    one_line_error(cli(*base, "--prompts", str(prompt_file(tmp_path / "p.txt")),
                       "--batch_size", "2", "--mini_batch_size", "3"), "--mini_batch_size")
    assert not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.integration
def test_cli_on_embedded_smollm2_with_lora(tmp_path, smollm2):
    """The issue's check: LoRA PPO on the embedded SmolLM2 with a saved critic."""
    from tdreward.reward_model import TDRewardModel

    lm, tok = smollm2
    crit = tmp_path / "critic"
    TDRewardModel.from_lm(lm, tok, EMBEDDED).save_pretrained(crit)
    out = tmp_path / "O"
    repo = Path(__file__).resolve().parents[1]
    p = cli("train", "--base_model", EMBEDDED, "--use_lora", "--reward_model_path", str(crit),
            "--prompts", str(repo / "data" / "eval_prompts.jsonl"), "--epochs", "1",
            "--steps_per_epoch", "2", "--batch_size", "2", "--output_dir", str(out),
            "--max_new_tokens", "4", "--ppo_epochs", "1", "--no_progress", timeout=400)
    assert p.returncode == 0, p.stderr
    assert "PPO: 2 steps" in p.stdout
    assert (out / "model_epoch_1" / "adapter_config.json").is_file()
    assert (out / "model_epoch_1" / "adapter_model.safetensors").is_file()
    assert (out / "reward_model_epoch_1" / "critic.safetensors").is_file()
    rows = metrics(out)
    assert len(rows) == 2
    for key in ("reward", "kl", "entropy", "value_loss", "clip_fraction", "explained_variance",
                "tokens_per_s"):
        assert key in rows[0]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # step 1: policy == reference
    reloaded = TDRewardModel.from_pretrained(out / "reward_model_epoch_1", lm=lm, tokenizer=tok)
    assert reloaded.training_info["ppo_online_steps"] == 2
