"""`tdreward train-critic`: learn the belief and value heads by TD(lambda) on a corpus."""

from __future__ import annotations

import argparse

from tdreward.commands import DEFAULT_MODEL, flag

ORDER = 20


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("train-critic", aliases=["train_critic"], parents=[common],
                       help="learn the belief and value heads by TD(lambda) on a corpus")
    flag(p, "--base_model", default=DEFAULT_MODEL, help="reference LM spec (frozen)")
    p.add_argument("--dataset", required=True, help="HF dataset name or local file/folder")
    flag(p, "--dataset_config", help="HF dataset config, e.g. wikitext-2-raw-v1")
    p.add_argument("--split", default="train", help="HF dataset split (default train)")
    flag(p, "--max_tokens", type=int, help="read at most this many corpus tokens")
    flag(p, "--output_dir", required=True, help="where the reward model is written")
    p.add_argument("--epochs", type=int, default=40)
    flag(p, "--batch_size", type=int, default=8, help="windows per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--gamma", type=float, default=0.99)
    flag(p, "--td_lambda", type=float, default=0.9)
    p.add_argument("--state", default="belief", help="belief, csc or hidden")
    p.add_argument("--window", type=int, default=256, help="tokens per LM window")
    p.add_argument("--patience", type=int, default=6, help="early-stopping patience")
    p.add_argument("--seed", type=int, default=0)
    flag(p, "--doc_end_terminal", action="store_true",
         help="treat each corpus document's end as terminal (default: only EOS is)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tdreward.training.critic_trainer import CriticTrainingConfig, train_critic

    cfg = CriticTrainingConfig(
        base_model=args.base_model, dataset=args.dataset, dataset_config=args.dataset_config,
        split=args.split, max_tokens=args.max_tokens, output_dir=args.output_dir,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, alpha=args.alpha,
        beta=args.beta, gamma=args.gamma, td_lambda=args.td_lambda, state=args.state,
        seed=args.seed, window=args.window, patience=args.patience,
        doc_end_terminal=args.doc_end_terminal,
    )
    from tdreward.display import fmt_num

    m = train_critic(cfg)
    v, u = m["validation"], m["untrained_validation"]
    print(f"held-out TD error (mean square): {v['td_mse']:.3f} trained vs {u['td_mse']:.3f} "
          f"untrained (ratio {m['td_mse_ratio_vs_untrained']:.2f}); explained variance of "
          f"the lambda-returns {fmt_num(v['explained_variance'], '.3f')}; best epoch "
          f"{m['best_epoch']}")
    print(f"reward model: {args.output_dir} (metrics.json, learning_curve.png)")
    return 0
