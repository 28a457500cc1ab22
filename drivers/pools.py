"""Role pools: the actors of one role, called item-sharded, with one recovery path.

    pool = Pool("reward", group, state)                    # group: an ActorGroup
    results = pool.map_sharded("score", items, call)      # = pool.gather(pool.launch(...))

`launch` deals items round-robin to the pool's slots; `call(chunk, indices)` turns an actor's
share into the method's (args, kwargs), and the method returns one result per item. `gather`
returns the results in item order. The recovery path, the only one: when an actor is found dead
(or its result was lost with its node), its slot is refilled (a fresh actor in the same place,
`prepare`d: engine up and loaded with the current policy version) and its share is redone with
the same arguments; no item is lost or counted twice. With per-item seeds and the same weights
the redone share is the lost one; in async mode the refilled worker holds the current version,
which its rollouts carry (staleness is accounted per sample). An elastic slot is dropped instead
(its node may be gone), and its share is redone on the others.

RolloutPool adds elasticity (rollout.max_workers > rollout.num_workers): it keeps one
placement-group request for another worker pending; when the cluster has room (resources
appeared, or the autoscaler added a node for that very request) the worker starts, is loaded
with the current policy version, and joins at the next step. Workers whose node died (Ray marks
it not alive) or that died themselves leave the pool.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable


@dataclass
class RunState:
    """What a run checkpoints besides the learner (state.json)."""

    step: int = 0                 # RL steps done
    version: int = 0              # policy version the rollout workers hold
    sft_done: bool = False
    samples: int = 0              # completions generated for training
    stale_dropped: int = 0        # groups dropped for staleness (async)
    restarts: int = 0             # actors replaced after a death
    requeued_prompts: int = 0     # prompts generated or judged again after a death
    tag: str = ""                 # the checkpoint tag this state belongs to
    dtype: str = ""               # model.dtype as resolved when the run started (auto: by its machine)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(eq=False)       # slots are compared by identity
class Slot:
    """One place of a pool: its actor, how to make a fresh one there, and where it runs."""

    actor: Any
    make: Callable[[], Any]
    node_id: str = ""
    elastic: bool = False         # joined while running; leaves when it or its node dies
    pg: Any = None                # its own placement group (elastic slots)
    joined_version: int = -1      # elastic: the policy version it held when it joined


@dataclass
class _Share:
    slot: Slot
    actor: Any                    # the actor the share was sent to
    indices: list[int]
    args: tuple
    kwargs: dict
    ref: Any


@dataclass
class Pending:
    """A launched map: gather() it."""

    method: str
    n_items: int
    items: list
    call: Callable
    shares: list[_Share] = field(default_factory=list)
    uids: list = field(default_factory=list)   # the caller's ids of the items (e.g. group ids)

    def ready(self) -> bool:
        """Every share has its result (or its error): gather() will not wait on a running call."""
        import ray

        refs = [s.ref for s in self.shares]
        return not refs or len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs)


def slots_of(group) -> list[Slot]:
    """The slots of an ActorGroup (a refill restarts the actor in the same bundle)."""
    return [Slot(actor=a, make=lambda i=i: group.restart(i)) for i, a in enumerate(group.actors)]


def alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def _lost():
    """What a get raises when the actor died or its result died with its node."""
    import ray

    return ray.exceptions.RayActorError, ray.exceptions.ObjectLostError


class Pool:
    """Actors of one role (see the module docstring). `counts_prompts`: a redone share adds its
    item count to RunState.requeued_prompts (rollout and judge pools: their items are prompts)."""

    def __init__(self, name: str, group, state: RunState, *,
                 prepare: Callable[[Any], None] | None = None, counts_prompts: bool = False):
        self.name, self.group, self.slots, self.state = name, group, slots_of(group), state
        self.prepare = prepare or (lambda actor: None)
        self.counts_prompts = counts_prompts

    @property
    def actors(self) -> list:
        return [s.actor for s in self.slots]

    # ------------------------------------------------------------------ map
    def launch(self, method: str, items: list, call: Callable[[list, list[int]], tuple[tuple, dict]],
               indices: list[int] | None = None) -> Pending:
        """Send `items` (or only items[indices]) to the pool's actors, round-robin."""
        indices = list(range(len(items))) if indices is None else indices
        pending = Pending(method, len(items), items, call)
        k = len(self.slots)
        if not k:
            raise RuntimeError(f"the {self.name} pool has no workers left")
        for slot, mine in zip(self.slots, [indices[i::k] for i in range(k)]):
            if mine:
                args, kwargs = call([items[j] for j in mine], mine)
                ref = getattr(slot.actor, method).remote(*args, **kwargs)
                pending.shares.append(_Share(slot, slot.actor, mine, args, kwargs, ref))
        return pending

    def gather(self, pending: Pending, timeout_s: float | None = None, what: str = "") -> list:
        """Results in item order; dead actors are refilled and their shares redone (see module doc)."""
        t0 = time.perf_counter()
        out: list = [None] * pending.n_items
        for share in pending.shares:
            try:
                got = self._get(share.ref, t0, timeout_s, what)
            except _lost():
                got = self._redo(pending, share, t0, timeout_s, what)
            for j, r in zip(share.indices, got):
                out[j] = r
        return out

    def map_sharded(self, method: str, items: list, call, timeout_s: float | None = None, what: str = "") -> list:
        """launch + gather."""
        return self.gather(self.launch(method, items, call), timeout_s, what)

    def broadcast(self, method: str, *args, timeout_s: float | None = None, what: str = "", **kwargs) -> list:
        """The same call on every actor (e.g. update_weights); a dead one is refilled and called again."""
        items = list(range(len(self.slots)))
        pending = Pending(method, len(items), items, lambda chunk, idx: (args, kwargs))
        for i, slot in enumerate(self.slots):
            pending.shares.append(_Share(slot, slot.actor, [i], args, kwargs,
                                         getattr(slot.actor, method).remote(*args, **kwargs)))
        return self._gather_each(pending, timeout_s, what)

    def _gather_each(self, pending: Pending, timeout_s, what) -> list:
        t0 = time.perf_counter()
        out = []
        for share in pending.shares:
            try:
                out.append(self._get(share.ref, t0, timeout_s, what))
            except _lost():
                actor = self.refill(share.slot, share.actor)
                if actor is not None:
                    out.append(self._get(getattr(actor, pending.method).remote(*share.args, **share.kwargs),
                                         t0, timeout_s, what))
        return out

    @staticmethod
    def _get(ref, t0: float, timeout_s: float | None, what: str):
        import ray

        if timeout_s is None:
            return ray.get(ref)
        try:
            return ray.get(ref, timeout=max(0.0, timeout_s - (time.perf_counter() - t0)))
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"{what or 'a call'} did not finish within {timeout_s} s") from None

    def _redo(self, pending: Pending, share: _Share, t0, timeout_s, what):
        """The one recovery path: refill the dead actor's slot and redo its share there, or, when
        the slot is gone with its node, on the remaining actors (results written into place)."""
        if self.counts_prompts:
            self.state.requeued_prompts += len(share.indices)
        actor = self.refill(share.slot, share.actor)
        if actor is not None:
            return self._get(getattr(actor, pending.method).remote(*share.args, **share.kwargs), t0, timeout_s, what)
        again = self.launch(pending.method, pending.items, pending.call, indices=share.indices)
        redone = self.gather(again, timeout_s, what)
        return [redone[j] for j in share.indices]

    # ------------------------------------------------------------------ recovery
    def refill(self, slot: Slot, dead) -> Any | None:
        """A live actor for `slot` whose actor `dead` died: the one already there if someone
        replaced it meanwhile; else a fresh, prepared one in the same place. None: the slot left
        the pool (an elastic worker)."""
        if slot not in self.slots:
            return None
        if slot.actor is not dead:
            return slot.actor
        if slot.elastic:        # opportunistic: not restarted in place (its node may be gone); the
            self.drop(slot)     # pool grows again at a refresh if the cluster still has room
            return None
        print(f"{self.name} worker {self.slots.index(slot)} died: restarting it", flush=True)
        slot.actor = slot.make()
        self.state.restarts += 1
        self.prepare(slot.actor)
        return slot.actor

    def drop(self, slot: Slot) -> None:
        """Remove an elastic slot (dead, or its node gone) and give back its placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        print(f"{self.name}: an elastic worker left ({len(self.slots) - 1} left)", flush=True)
        self.slots.remove(slot)
        try:
            ray.kill(slot.actor)
        except Exception:  # noqa: BLE001 - gone with its node
            pass
        if slot.pg is not None:
            remove_placement_group(slot.pg)

    def kill(self) -> None:
        """Kill this pool's actors and give back its placement groups (nothing else)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for s in self.slots:
            ray.kill(s.actor)
            if s.pg is not None:
                remove_placement_group(s.pg)
        self.slots = []
        remove_placement_group(self.group.pg)


START_TIMEOUT_S = 600.0   # an elastic worker not up by then is dropped (and another asked for)


class JudgePool(Pool):
    """AGSER judges (actors/agser.py) from the config's judge section: they score general
    prompts' answers for the reward (all-scenario RL; blocking) and monitor a share of each
    step's answers. The monitor never holds a step up: a launch is collected at a later step once
    it is done, and while it still runs the new steps' answers are not judged (counted as
    skipped); only the end of train() waits for the last launch."""

    def __init__(self, group, state: RunState, judge, *, prepare):
        super().__init__("judge", group, state, prepare=prepare, counts_prompts=True)
        self.cfg, self._monitor = judge, None     # _monitor: (of step, Pending) of the last launch
        self.skipped = 0                          # steps whose answers were not judged (judge busy)
        self._deferred = None                     # a policy judge's weights held until it is idle
        self._held: dict = {}                     # monitor metrics collected early (by a reward call)
        self._reward_wait_s = 0.0                 # what reward calls spent waiting for a monitor launch

    def sync(self, handles, version: int, **kwargs) -> None:
        """A policy judge's weights: loaded now when no monitor launch runs; else kept (the newest
        only) and loaded before the next launch or reward call, so a push never waits on judging."""
        self._deferred = (handles, version, kwargs)
        if self._monitor is None or self._monitor[1].ready():
            self._load_deferred()

    def _load_deferred(self) -> None:
        if self._deferred is not None:
            (handles, version, kwargs), self._deferred = self._deferred, None
            self.broadcast("update_weights", handles, version, **kwargs)

    def _call(self, chunk, idx):
        return ([q for q, _ in chunk], [a for _, a in chunk], (self.cfg.variant,)), {}

    def scores(self, answers: list[tuple[str, str]]) -> list[float]:
        """The AGSER score (the configured variant) of each (question, answer), by the current policy
        (a monitor launch still running is waited for: the reward needs the judge's current weights)."""
        if self._monitor is not None:
            t0 = time.perf_counter()
            self._held = self.collect()
            self._reward_wait_s += time.perf_counter() - t0
        self._load_deferred()
        return [j[self.cfg.variant]["score"] for j in self.map_sharded("score", answers, self._call)]

    def monitor(self, step: int, answers: list[tuple[str, str]]) -> dict:
        """Launch the judging of step `step`'s sampled answers unless the last launch still runs
        (then these are skipped); returns the last launch's metrics when it has finished."""
        if self._monitor is not None and not self._monitor[1].ready():
            self.skipped += 1
            return {"agser/skipped_steps": self.skipped}
        metrics = self.collect()
        self._monitor = (step + 1, self.launch("score", answers, self._call))
        waited, self._reward_wait_s = self._reward_wait_s, 0.0
        return {**metrics, "agser/skipped_steps": self.skipped, "agser/reward_wait_seconds": waited}

    def collect(self) -> dict:
        """Wait for the last monitor launch (if any), load weights held meanwhile (policy judge)
        and summarise the launch as agser/* metrics (with any a reward call collected earlier)."""
        held, self._held = self._held, {}
        if self._monitor is None:
            self._load_deferred()
            return held
        (of_step, pending), self._monitor = self._monitor, None
        results = self.gather(pending)
        self._load_deferred()
        judged = [j[self.cfg.variant] for j in results]
        n = len(judged)
        if not n:
            return {"agser/judged": 0, "agser/of_step": of_step}
        # throughput while judging: each judge's call took n_share x its per-question seconds
        busy = sum(j["seconds"] for j in results) / max(1, len(pending.shares))
        return {"agser/queries_per_s": n / busy if busy > 0 else 0.0,
                "agser/score_mean": sum(j["score"] for j in judged) / n,
                "agser/r_att_mean": sum(j["r_att"] for j in judged) / n,
                "agser/r_non_att_mean": sum(j["r_non_att"] for j in judged) / n,
                "agser/low_score_frac": sum(j["score"] <= 0 for j in judged) / n,
                "agser/judged": n, "agser/of_step": of_step}


class RolloutPool(Pool):
    """The rollout workers: `num_workers` in one SPREAD placement group, plus up to
    `max_workers - num_workers` elastic ones started when the cluster has room (module doc)."""

    def __init__(self, group, state: RunState, *, prepare, max_workers: int, new_worker: Callable[[Any], Any]):
        super().__init__("rollout", group, state, prepare=prepare, counts_prompts=True)
        self.max_workers, self.new_worker = max_workers, new_worker
        self._asked = None                      # a placement group waiting for room
        self._starting: list[tuple] = []        # (pg, actor, info ref, start time) of workers starting up
        infos = group.get([a.info.remote() for a in group.actors])
        for slot, info in zip(self.slots, infos):
            slot.node_id = info.get("node_id", "")

    def refresh(self) -> dict:
        """Between steps, never blocking on a start-up: drop elastic workers whose node is gone,
        let started workers join (loaded with the current policy first), start one more where
        the cluster has room. Returns pool metrics."""
        import ray
        from ray.util.placement_group import placement_group

        alive = alive_nodes()
        for slot in [s for s in self.slots if s.elastic and s.node_id not in alive]:
            self.drop(slot)
        for pg, actor, info, since in list(self._starting):
            ready, _ = ray.wait([info], timeout=0)
            if not ready and time.time() - since < START_TIMEOUT_S:
                continue
            self._starting.remove((pg, actor, info, since))
            try:
                if not ready:
                    raise TimeoutError(f"not up after {START_TIMEOUT_S:g} s")
                node = ray.get(info)["node_id"]
                self.prepare(actor)
                version = ray.get(actor.info.remote())["policy_version"]
            except Exception as err:  # noqa: BLE001 - died starting (its node went), or failed to load
                print(f"rollout: a starting worker failed ({type(err).__name__}: {str(err)[:200]}); "
                      "it is dropped and another is asked for", flush=True)
                ray.kill(actor)
                ray.util.remove_placement_group(pg)
                continue
            self.slots.append(Slot(actor=actor, make=lambda: None, node_id=node, elastic=True, pg=pg,
                                   joined_version=version))
            print(f"rollout: a worker joined on node {node[:8]} holding policy version {version} "
                  f"({len(self.slots)} now)", flush=True)
        if len(self.slots) + len(self._starting) < self.max_workers:
            if self._asked is None:
                self._asked = placement_group([dict(self.group.bundle)])
            ready, _ = ray.wait([self._asked.ready()], timeout=0)
            if ready:
                actor = self.new_worker(self._asked)
                self._starting.append((self._asked, actor, actor.info.remote(), time.time()))
                self._asked = None
        return {"pool/rollout_workers": len(self.slots), "pool/rollout_starting": len(self._starting)}

    def kill(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for pg, actor, _, _ in self._starting:
            ray.kill(actor)
            remove_placement_group(pg)
        if self._asked is not None:
            remove_placement_group(self._asked)
        self._starting, self._asked = [], None
        super().kill()
