"""Evaluation: score texts, compare and evaluate models by TD reward, statistics, reports and dopamine traces."""
