"""Role pools (drivers/pools.py) and typed batches (actors/batch.py): the one recovery path,
the elastic rollout pool on a real multi-node cluster, and build_batch against hand-computed rows."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.batch import GROUP_ID_STRIDE, Batch, Group, build_batch, group_uid
from actors.grpo import group_advantages
from drivers.pools import RunState

ROOT = Path(__file__).resolve().parents[1]


class _R:      # the Rollout / RewardResult fields build_batch reads
    def __init__(self, reward=0.0, status="ok", version=3, ids=(7, 8), finish="stop", versions=None):
        self.reward, self.status = reward, status
        self.prompt_ids, self.completion_ids, self.logprobs = [1, 2], list(ids), [-0.5] * len(ids)
        self.token_versions = list(versions or [version] * len(ids))
        self.policy_version = min(self.token_versions)
        self.finish_reason = finish


def _group(uid, rewards, **kw):
    return Group(uid, {"prompt": f"p{uid}", "answer": "1"}, [_R(**kw) for _ in rewards],
                 [_R(reward=r, status=kw.get("status", "ok")) for r in rewards])


def test_build_batch_keeps_group_ids_versions_and_drops_failed_stale_and_flat_groups():
    std = lambda r, g: group_advantages(r, g, "grpo")                                  # noqa: E731
    groups = [_group(group_uid(5, 0), [1.0, 0.0, 0.0, 1.0]),
              _group(group_uid(5, 1), [1.0, 1.0, 1.0, 1.0]),                         # flat
              _group(group_uid(5, 2), [1.0, 0.0, 0.0, 0.0], status="error"),         # a verifier failed
              _group(group_uid(5, 3), [0.0, 1.0, 0.0, 0.0], version=1)]              # 2 versions behind
    batch, m = build_batch(groups, version=3, max_staleness=1, advantage=std, dynamic_sampling=False)
    # group 0 by hand: mean 0.5, sample std sqrt(1/3) -> +-0.5 / 0.57735 = +-0.866; group 1: all 0
    assert batch.advantages == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025, 0, 0, 0, 0], abs=1e-5)
    assert batch.group_ids == [5 * GROUP_ID_STRIDE] * 4 + [5 * GROUP_ID_STRIDE + 1] * 4
    assert batch.policy_versions == [3] * 8 and batch.input_ids[0] == [1, 2, 7, 8] and batch.prompt_lens[0] == 2
    assert (m["train/failed_groups"], m["train/stale_groups"], m["train/zero_variance_groups"]) == (1, 1, 1)
    assert (m["train/rows"], m["train/groups"]) == (8, 2)
    dynamic, m = build_batch(groups, version=3, max_staleness=1, advantage=std, dynamic_sampling=True)
    assert dynamic.group_ids == [5 * GROUP_ID_STRIDE] * 4 and m["train/zero_variance_groups"] == 1


def test_build_batch_counts_staleness_from_a_partial_rollouts_oldest_token():
    """A partial rollout (tokens from versions 2 and 3) is 1 version old at version 3, 2 at 4."""
    adv = lambda r, g: group_advantages(r, g, "grpo")                                  # noqa: E731
    partial = Group(1, {"prompt": "p", "answer": "1"}, [_R(ids=(7, 8, 9, 10), versions=[2, 2, 2, 3]), _R()],
                    [_R(reward=1.0), _R(reward=0.0)])
    batch, m = build_batch([partial], version=3, max_staleness=1, advantage=adv, dynamic_sampling=False)
    assert batch.policy_versions == [2, 3] and m["train/stale_groups"] == 0
    assert m["async/partial_frac"] == 0.5 and m["async/staleness_max"] == 1
    assert m["async/token_staleness_mean"] == pytest.approx(3 / 6)           # tokens 1,1,1,0 and 0,0
    _, m = build_batch([partial], version=4, max_staleness=1, advantage=adv, dynamic_sampling=False)
    assert m["train/stale_groups"] == 1 and m["train/rows"] == 0


def test_batch_shards_balance_tokens_and_keep_every_row_once():
    b = Batch(input_ids=[[0] * n for n in (5, 9, 2, 7, 3)], prompt_lens=[1] * 5, advantages=[0.0] * 5,
              behavior_logp=[[0.0] * (n - 1) for n in (5, 9, 2, 7, 3)], group_ids=[10, 10, 11, 11, 12],
              policy_versions=[0] * 5)
    a, c = b.shard(2)
    assert [len(x) for x in a.input_ids] == [9, 5, 2] and [len(x) for x in c.input_ids] == [7, 3]
    assert sorted(a.group_ids + c.group_ids) == [10, 10, 11, 11, 12]
    # the rows the learner runs (advantage != 0) are dealt first: each rank gets its share of them
    b.advantages = [0.0, 0.0, 1.0, -1.0, 0.5]          # lengths 5, 9 flat; 2, 7, 3 not
    a, c = b.shard(2)
    assert [len(x) for x in a.input_ids] == [7, 2, 5] and [len(x) for x in c.input_ids] == [3, 9]
    assert RunState.from_dict({**RunState(step=4, tag="step4").to_dict(), "old_key": 1}) == RunState(step=4, tag="step4")


def test_a_dead_actor_is_refilled_prepared_and_its_share_redone_once(ray_session, kill_actor):
    from drivers.pools import Pool
    from drivers.ray_utils import ActorGroup

    class Echo:   # defined here: Ray ships it by value (tests/ is not on the workers' path)
        """A pool member: returns (item, its pid) per item; prepare() counts its calls."""

        def __init__(self):
            self.prepared = 0

        def work(self, items, slow=0.0):
            import os
            import time
            time.sleep(slow)
            return [(x, os.getpid()) for x in items]

        def prepare(self):
            self.prepared += 1
            return self.prepared

    state = RunState()
    group = ActorGroup(Echo, 2, num_cpus=0.25, kwargs_fn=lambda r, a, p: {}, name="echo")
    prepared = []
    pool = Pool("echo", group, state, counts_prompts=True,
                prepare=lambda actor: prepared.append(ray_session.get(actor.prepare.remote())))
    try:
        items = list(range(7))
        call = lambda chunk, idx: ((chunk,), {"slow": 5.0})     # long enough for the kill to land  # noqa: E731
        pending = pool.launch("work", items, call)
        dead = pool.actors[1]
        kill_actor(dead)                                        # dies holding items 1, 3, 5
        out = pool.gather(pending)
        assert [x for x, _ in out] == items                     # in order, each once
        assert len({pid for _, pid in out}) == 2 and pool.actors[1] is not dead
        assert (state.restarts, state.requeued_prompts, prepared) == (1, 3, [1])
        again = pool.map_sharded("work", items, lambda chunk, idx: ((chunk,), {}))
        assert [x for x, _ in again] == items and state.restarts == 1   # nothing more to recover
        gone = pool.actors[0]
        kill_actor(gone)                                                     # dead by now
        assert len(pool.broadcast("prepare")) == 2 and state.restarts == 2   # broadcast recovers too
        assert pool.actors[0] is not gone
    finally:
        pool.kill()


def test_elastic_rollout_pool_grows_with_a_node_and_shrinks_when_it_goes(tiny_model_path, tmp_path):
    """Training starts with 1 rollout worker; a node joins the cluster and the pool grows to 2
    (the newcomer is loaded with the current policy first); the node is removed while it holds
    half of a step's prompts, which the other worker answers: every prompt answered once."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests/elastic_scenario.py"), tiny_model_path,
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-5000:])
    ev = json.loads(lines[-1][len("RESULT "):])
    print({k: v for k, v in ev.items() if k != "steps"})
    steps = ev["steps"]
    sizes = [s["pool/rollout_workers"] for s in steps]
    assert sizes[:2] == [1, 1] and 2 in sizes and sizes[-1] == 1, sizes
    # loaded with the policy of the moment it joined (a worker not loaded would hold version 0)
    assert ev["newcomer_node_is_new"] and ev["newcomer_version"] == ev["version_when_joined"] >= 2
    assert ev["workers_holding_prompts"] == 2 and ev["workers_at_end"] == 1
    assert ev["requeued_prompts"] == 2 and ev["restarts"] == 0     # its 2 of 4 prompts, answered by the other
    for s in steps:     # every step: 4 prompts x G 4 answered once, all by the current policy
        assert (s["rollout/samples"], s["train/groups"], s["async/staleness_max"]) == (16, 4, 0), s
    assert [s["train/step"] for s in steps] == list(range(1, len(steps) + 1))
