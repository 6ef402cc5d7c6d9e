"""Reinforcement learning: one agent, several observers, each driving its own environment.

worker0 is the agent and owns the policy; workers 1..N-1 are observers. The agent creates one
Observer on each through `remote()` and keeps the RRefs; each episode it asks every observer to
run one (`rpc_async` on the RRef proxy), and each observer steps its own environment, asking the
agent for an action at every step through the agent's RRef. The agent then makes one REINFORCE
update from all observers' rewards.

The environment is built in: a walker on a line of 9 cells that must reach the right end.

Run for real:   /usr/bin/python3 examples/reinforcement_learning.py [--world-size=3] [--episodes=30]
"""
from __future__ import annotations

import os
import sys
import threading

import torch
from torch import nn
from torch.distributions import Categorical

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import backend_options, init_method_from_env, launch, parse_world_size, rpc_module  # noqa: E402

rpc = rpc_module()

CELLS = 9
MAX_STEPS = 24
GAMMA = 0.95


class LineWalk:
    """Start in the middle; action 0 moves left, 1 moves right; reward 1 at the right end."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.position = CELLS // 2

    def reset(self) -> torch.Tensor:
        self.position = CELLS // 2
        return self.state()

    def state(self) -> torch.Tensor:
        s = torch.zeros(CELLS)
        s[self.position] = 1.0
        return s

    def step(self, action: int) -> tuple[torch.Tensor, float, bool]:
        # A slippery floor: one move in ten goes the other way.
        if torch.rand(1, generator=self.generator).item() < 0.1:
            action = 1 - action
        self.position = max(0, min(CELLS - 1, self.position + (1 if action == 1 else -1)))
        done = self.position == CELLS - 1
        return self.state(), (1.0 if done else -0.02), done


class Observer:
    def __init__(self, seed: int):
        self.id = rpc.get_worker_info().id
        self.env = LineWalk(seed)

    def run_episode(self, agent_rref) -> float:
        state = self.env.reset()
        total = 0.0
        for _ in range(MAX_STEPS):
            action = agent_rref.rpc_sync().select_action(self.id, state)
            state, reward, done = self.env.step(action)
            agent_rref.rpc_sync().report_reward(self.id, reward)
            total += reward
            if done:
                break
        return total


class Agent:
    def __init__(self, world_size: int):
        torch.manual_seed(0)
        self.policy = nn.Sequential(nn.Linear(CELLS, 32), nn.Tanh(), nn.Linear(32, 2))
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=0.03)
        self.lock = threading.Lock()
        self.agent_rref = rpc.RRef(self)
        self.observers = [
            rpc.remote(f"worker{r}", Observer, args=(r,)) for r in range(1, world_size)
        ]
        self.log_probs: dict[int, list[torch.Tensor]] = {}
        self.rewards: dict[int, list[float]] = {}

    def select_action(self, observer_id: int, state: torch.Tensor) -> int:
        with self.lock:
            dist = Categorical(logits=self.policy(state))
            action = dist.sample()
            self.log_probs.setdefault(observer_id, []).append(dist.log_prob(action))
            return int(action.item())

    def report_reward(self, observer_id: int, reward: float) -> None:
        with self.lock:
            self.rewards.setdefault(observer_id, []).append(reward)

    def run_episode(self) -> float:
        futs = [ob.rpc_async().run_episode(self.agent_rref) for ob in self.observers]
        returns = [f.wait() for f in futs]
        loss = torch.zeros(())
        for ob_id, rewards in self.rewards.items():
            discounted, running = [], 0.0
            for r in reversed(rewards):
                running = r + GAMMA * running
                discounted.insert(0, running)
            g = torch.tensor(discounted)
            g = (g - g.mean()) / (g.std() + 1e-6) if len(discounted) > 1 else g
            loss = loss - (torch.stack(self.log_probs[ob_id]) * g).sum()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.log_probs.clear()
        self.rewards.clear()
        return sum(returns) / len(returns)


def main(rank: int, world_size: int, episodes: int = 30, verbose: bool = True) -> None:
    rpc.init_rpc(
        f"worker{rank}",
        rank=rank,
        world_size=world_size,
        rpc_backend_options=backend_options(init_method_from_env()),
    )
    if rank == 0:
        agent = Agent(world_size)
        history = [agent.run_episode() for _ in range(episodes)]
        k = max(1, episodes // 5)
        early, late = sum(history[:k]) / k, sum(history[-k:]) / k
        if verbose:
            print(f"reinforcement learning: {episodes} episodes, return {early:.3f} -> {late:.3f}")
        assert len(history) == episodes
    rpc.shutdown()


if __name__ == "__main__":
    episodes = 30
    for a in sys.argv[1:]:
        if a.startswith("--episodes="):
            episodes = int(a.split("=", 1)[1])
    launch(main, parse_world_size(sys.argv[1:], 3), episodes=episodes)
