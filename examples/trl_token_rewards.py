"""Token-level and step-level TD rewards for TRL (README, Integrations): run `python examples/trl_token_rewards.py`."""

from transformers import AutoTokenizer

from tdreward.integrations.token_rewards import ReducedReward
from tdreward.integrations.trl import TDRewardFunction
from tdreward.training.lora_trainer import resolve_model_dir

SPEC = "embedded:smollm2-135m-instruct"
td = TDRewardFunction.from_pretrained(base_model=SPEC)  # untrained critic: a warning
# The policy's tokenizer, loaded apart (as examples/trl_grpo.py does): another object,
# the same token -> id map, so TRL's completion_ids are read as they are.
policy_tok = AutoTokenizer.from_pretrained(resolve_model_dir(SPEC))
print("shares vocabulary:", td.shares_vocabulary(policy_tok))

prompt = [{"role": "user", "content": "What is 12 + 30? Think step by step."}]
answer = "12 + 30 = 42.\n\nSo the answer is 42."
completion = [{"role": "assistant", "content": answer}]
ids = policy_tok(answer, add_special_tokens=False)["input_ids"] + [policy_tok.eos_token_id]

print("mean    :", td([prompt], [completion]))
td.policy_tokenizer = policy_tok
print("ids     :", td([prompt], [completion], completion_ids=[ids]), td.last_source)
tokens = TDRewardFunction(td.reward_model, per_token=True, policy_tokenizer=policy_tok)
print("per_tok :", [round(v, 3) for v in tokens([prompt], [completion], completion_ids=[ids])[0]])
steps = TDRewardFunction(td.reward_model, step_separator="\n\n", policy_tokenizer=policy_tok)
print("steps   :", steps([prompt], [completion], completion_ids=[ids]))
grpo_ready = ReducedReward(steps, reduce="min")  # one float per completion, for GRPOTrainer
print("min step:", grpo_ready([prompt], [completion], completion_ids=[ids]), grpo_ready.__name__)
