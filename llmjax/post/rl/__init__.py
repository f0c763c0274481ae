"""Reinforcement learning from feedback: reward models, PPO and GRPO (`llmjax.post.rl.losses`: the math)."""
