"""Seeded closed-loop rollouts shared by demonstration recording and evaluation."""

import time

import numpy as np


def run_episodes(task, policy, episodes: int, seed: int, record: bool = False):
    """Runs `episodes` episodes with reset seeds seed, seed+1, ...; `policy(obs, env)` returns an
    action. Returns per-episode dicts (return, steps, success, and the trajectory if `record`)
    and the wall-clock steps per second."""
    env = task.make_env()
    low, high = env.action_space.low, env.action_space.high
    out, steps, t0 = [], 0, time.perf_counter()
    for i in range(episodes):
        obs, info = env.reset(seed=seed + i)
        if hasattr(policy, "reset"):
            policy.reset()
        ep = {"seed": seed + i, "return": 0.0, "steps": 0}
        flagged = False
        traj = {"observations": [], "actions": [], "rewards": []}
        while True:
            if not isinstance(obs, dict):
                obs = np.asarray(obs, dtype=np.float32)
            act = np.asarray(policy(obs, env), dtype=np.float32).reshape(-1)
            act = np.clip(act, low, high)
            nxt, r, term, trunc, info = env.step(act)
            if record:
                traj["observations"].append(obs)
                traj["actions"].append(act)
                traj["rewards"].append(np.float32(r))
            ep["return"] += float(r)
            flagged = flagged or bool(info.get("success", False))
            ep["steps"] += 1
            obs = nxt
            if term or trunc:
                break
        ep["success"] = task.success(ep["return"], flagged)
        if record:
            ep["trajectory"] = traj
        steps += ep["steps"]
        out.append(ep)
    env.close()
    return out, steps / max(time.perf_counter() - t0, 1e-9)


def wilson(successes: int, n: int, z: float = 1.96):
    """95% Wilson score interval of a success rate."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def run_in_blocks(fn, args, episodes: int, seed: int, jobs: int):
    """`fn((*args, n, first_seed))` (a module-level function returning `run_episodes`' pair) over
    `jobs` processes, each a contiguous block of the seeds `seed, seed + 1, ...`, episodes kept in
    seed order. Each process makes its own environment: where an episode depends on more than its
    reset seed (Meta-World's task draw follows the environment's history), results repeat only at
    the same `jobs`. Returns (episodes, steps per second summed over processes, processes used)."""
    jobs = max(1, min(jobs, episodes))
    if jobs == 1:
        eps, sps = fn((*args, episodes, seed))
        return eps, sps, 1
    from concurrent.futures import ProcessPoolExecutor

    sizes = [episodes // jobs + (1 if j < episodes % jobs else 0) for j in range(jobs)]
    starts = np.cumsum([0] + sizes[:-1])
    with ProcessPoolExecutor(jobs) as ex:
        parts = list(ex.map(fn, [(*args, n, seed + int(s0)) for n, s0 in zip(sizes, starts)]))
    return [e for p, _ in parts for e in p], sum(s for _, s in parts), jobs
