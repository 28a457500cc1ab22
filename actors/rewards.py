"""Rule-based rewards of DeepSeek-R1 and a verifier pool that never hangs.

Pure scoring functions (no Ray): `extract_answer`, `accuracy_reward`, `format_reward`,
`language_consistency`, `score_one` (the weighted sum). `score_batch` runs `score_one` in a
pool of child processes with a per-item deadline: an item past its deadline has its process
killed and replaced and comes back with status "timeout"; an exception comes back as "error".
Neither is ever a silent 0: `RewardResult.reward` is None unless status == "ok". A child that
dies on an item (e.g. killed for memory) is replaced and the item tried once more; only a second
death is an "error". Children that keep dying at start-up raise `VerifierStartupError`, which
names the likely cause (a script without an `if __name__ == "__main__":` guard, an import error).

`RewardWorker` is the plain class the driver runs as Ray actors (one pool per actor).
All string handling is linear-time (no backtracking regexes on model output).
"""
from __future__ import annotations

import ast
import logging
import multiprocessing as mp
import os
import pickle
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from multiprocessing.connection import wait

from actors.grpo import overlong_penalty

STATUSES = ("ok", "timeout", "error")
THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"
SPECIAL = "|special_token|"


@dataclass
class RewardResult:
    """The reward of one completion: None unless status == "ok"; components always explained."""

    reward: float | None
    components: dict[str, float] = field(default_factory=dict)
    status: str = "ok"          # ok | timeout | error
    error: str | None = None
    seconds: float = 0.0


# ----------------------------------------------------------------------------- extraction
def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion or reference, or None.

    Order: the last `<answer>…</answer>` (a `\\boxed{}` inside it wins), then a GSM8K `#### n`
    line, then the last `\\boxed{…}` anywhere.
    """
    end = text.rfind(ANSWER_END)
    if end >= 0:
        start = text.rfind(ANSWER, 0, end)
        if start >= 0:
            inner = text[start + len(ANSWER):end]
            return (_last_boxed(inner) or inner).strip()
    hashes = text.rfind("####")
    if hashes >= 0:
        return text[hashes + 4:].strip().split("\n", 1)[0].strip()
    boxed = _last_boxed(text)
    return boxed.strip() if boxed is not None else None


_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def _as_number(text: str) -> Fraction | None:
    """A plain number ('1,000', '$18', '18.', '-3.5', '1e5', '25%') as an exact Fraction, or None."""
    s = text.strip().replace(",", "").replace("$", "").removesuffix(".").strip()
    if s.endswith("%"):
        s = s[:-1]
    match = _NUMBER.fullmatch(s) if len(s) <= 400 else None
    if not match or (match.group(3) and abs(int(match.group(3)[1:])) > 400):
        return None  # not a plain number, or an exponent too large to expand exactly
    return Fraction(s)


def answers_match(answer: str, reference: str) -> bool:
    """Exact numeric equality when both are plain numbers ('18.0' == '18'), else math-verify."""
    a, r = _as_number(answer), _as_number(reference)
    if a is not None and r is not None:
        return a == r
    from math_verify import parse, verify

    def _parse(s: str):
        # Our own deadline (the pool) bounds this; math-verify's signal timeouts are off.
        return parse(s, parsing_timeout=None) or parse(f"${s}$", parsing_timeout=None)

    gold, pred = _parse(reference), _parse(answer)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=None))


_LAST_NUMBER = re.compile(r"(?<!\d)-?\d[\d,]*(?:\.\d+)?")   # "2-12": 12, not -12


def last_number(text: str) -> str | None:
    """The last number written in `text` ("... so 7 * 8 = 56." -> "56"), or None."""
    found = None
    for found in _LAST_NUMBER.finditer(text):
        pass
    return found.group(0).rstrip(",") if found else None


def final_answer(completion: str, extraction: str = "tags") -> str | None:
    """The answer a completion gives, or None.

    extraction "tags": read only from <answer>, `####` or `\\boxed{}` (`extract_answer`);
    "last_number": when none of those is there, the last number of the text (the "flexible
    extract" of GSM8K harnesses: for a model that has not learned the tags yet, e.g. R1-Zero
    from a chat model).
    """
    if extraction not in ("tags", "last_number"):
        raise ValueError(f"extraction must be 'tags' or 'last_number', got {extraction!r}")
    answer = extract_answer(completion)
    if answer is None and extraction == "last_number":
        answer = last_number(completion)
    return answer


def accuracy_reward(completion: str, reference: str, extraction: str = "tags") -> float:
    """1.0 when the completion's final answer (`final_answer`) equals the reference's, else 0.0."""
    answer = final_answer(completion, extraction)
    gold = extract_answer(reference)
    gold = gold if gold is not None else reference.strip()
    if not answer or not gold:
        return 0.0
    return 1.0 if answers_match(answer, gold) else 0.0


def format_reward(completion: str, layout: str = "r1") -> float:
    """1.0 when the completion has exactly the layout, nothing else around it but whitespace.

    layout "r1":         <think>…</think> <answer>…</answer>   (each tag exactly once)
    layout "cold_start": |special_token|<reasoning>|special_token|<summary>  (both non-empty)
    """
    s = completion.strip()
    if layout == "cold_start":
        if not s.startswith(SPECIAL) or s.count(SPECIAL) != 2:
            return 0.0
        _, reasoning, summary = s.split(SPECIAL)
        return 1.0 if reasoning.strip() and summary.strip() else 0.0
    if layout != "r1":
        raise ValueError(f"layout must be 'r1' or 'cold_start', got {layout!r}")
    if not (s.startswith(THINK) and s.endswith(ANSWER_END)):
        return 0.0
    if any(s.count(tag) != 1 for tag in (THINK, THINK_END, ANSWER, ANSWER_END)):
        return 0.0
    close_think, open_answer = s.find(THINK_END), s.find(ANSWER)
    if open_answer < close_think or s[close_think + len(THINK_END):open_answer].strip():
        return 0.0
    return 1.0


def chain_of_thought(completion: str) -> str:
    """The reasoning part: inside <think>…</think>, or the cold-start reasoning, else all text."""
    start, end = completion.find(THINK), completion.find(THINK_END)
    if 0 <= start < end:
        return completion[start + len(THINK):end]
    parts = completion.split(SPECIAL)
    return parts[1] if len(parts) >= 3 else completion


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df]")
_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f"  # incl. accented letters (café)
_LATIN_WORD = re.compile(f"[{_LATIN}]+(?:'[{_LATIN}]+)?")
_OTHER_WORD = re.compile(f"[^\\W\\d_{_LATIN}\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def language_consistency(text: str, target: str = "en") -> float:
    """Share of the words of `text` that are in the target language ("en" or "zh").

    Words: every CJK character counts as one Chinese word (Chinese has no spaces; R1 counts
    words, and a character is the closest unit); a run of Latin letters (accents included) is one English word;
    a run of other letters (Cyrillic, Arabic…) is one word of neither language. Numbers,
    symbols and LaTeX commands' punctuation are not words. No words at all: 1.0 (nothing mixed).
    """
    if target not in ("en", "zh"):
        raise ValueError(f"target language must be 'en' or 'zh', got {target!r}")
    zh = len(_CJK.findall(text))
    en = len(_LATIN_WORD.findall(text))
    other = len(_OTHER_WORD.findall(text))
    total = zh + en + other
    if total == 0:
        return 1.0
    return (en if target == "en" else zh) / total


DEFAULT_WEIGHTS = {"accuracy": 1.0, "format": 0.0, "language": 0.0, "overlong": 0.0}


def score_one(completion: str, reference: str, length: int | None = None, *,
              weights: dict | None = None, layout: str = "r1", target_language: str = "en",
              max_len: int | None = None, cache_len: int | None = None, extraction: str = "tags") -> RewardResult:
    """All components of one completion and their weighted sum (status "ok").

    Components with weight 0 are still computed (cheap) and reported, except accuracy (the
    costly one) and overlong (needs `length`, `max_len` and `cache_len`). reference None: a
    general prompt with no verifiable answer (all-scenario RL): no accuracy component.
    """
    weights = {**DEFAULT_WEIGHTS, **(weights or {})}
    unknown = set(weights) - set(DEFAULT_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown reward components {sorted(unknown)}; allowed {sorted(DEFAULT_WEIGHTS)}")
    comps = {"format": format_reward(completion, layout),
             "language": language_consistency(chain_of_thought(completion), target_language)}
    if weights["accuracy"] and reference is not None:
        comps["accuracy"] = accuracy_reward(completion, reference, extraction)
    if length is not None and max_len and cache_len:
        comps["overlong"] = float(overlong_penalty(length, max_len, cache_len))
    reward = sum(weights[k] * v for k, v in comps.items())
    return RewardResult(reward=float(reward), components=comps)


# ----------------------------------------------------------------------------- the pool
READY = "ready"        # a child's first message, (READY, its clock): it started (imports done) and takes items
STARTUP_DEATHS = 3     # children dying before READY, in a row, before the pool gives up
STARTUP_S = 60.0       # a child's start-up (imports) may take this long; an item's deadline starts at READY


class VerifierStartupError(RuntimeError):
    """The verifier pool's child processes keep dying before they can score anything."""


def _child_loop(conn) -> None:
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    conn.send((READY, time.monotonic()))    # CLOCK_MONOTONIC: the parent's clock too
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        args, kwargs = msg
        t0 = time.perf_counter()
        try:
            res = score_one(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - every failure becomes an explicit status
            res = RewardResult(None, status="error", error=f"{type(err).__name__}: {str(err)[:300]}")
        res.seconds = time.perf_counter() - t0
        conn.send(res)


def _importing_main_in_a_child() -> bool:
    # multiprocessing sets this while a child process imports the parent's main script
    # (multiprocessing.spawn._main); starting processes then fails.
    return bool(getattr(mp.current_process(), "_inheriting", False))


def _unguarded_main_message() -> str:
    main = sys.modules.get("__mp_main__") or sys.modules.get("__main__")   # a child runs it as __mp_main__
    script = getattr(main, "__file__", None) or "the main script"
    return (f"the verifier pool was started while {script} was being imported by one of the pool's "
            "child processes: verifier children (multiprocessing 'forkserver') import the main script "
            "again, so a script that scores at its top level starts a pool in every child and each "
            "child dies. Put the script's top-level code under `if __name__ == \"__main__\":`.")


_DIAGNOSE = """
import pickle, sys
from multiprocessing import current_process, spawn
data = pickle.load(sys.stdin.buffer)
current_process()._inheriting = True   # as a child's start-up does (multiprocessing.spawn._main)
try:
    spawn.prepare(data)                # sys.path, working dir, the main script imported again
    import actors.rewards              # what the child's target needs
except BaseException as err:
    print("CAUSE " + repr(f"{type(err).__name__}: {err}"), flush=True)
"""


def startup_cause(timeout_s: float = 60.0) -> str | None:
    """Repeat a verifier child's start-up (import the main script as a child does, then this
    module) in a fresh interpreter; the exception it raises as "Type: message", or None."""
    from multiprocessing import spawn

    data = spawn.get_preparation_data("verifier-start-up-check")
    data.pop("authkey", None)   # not picklable outside a process start, and not needed here
    try:
        out = subprocess.run([sys.executable, "-c", _DIAGNOSE], input=pickle.dumps(data),
                             capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"(the start-up check did not finish within {timeout_s:.0f} s)"
    for line in out.stdout.decode(errors="replace").splitlines():
        if line.startswith("CAUSE "):
            return ast.literal_eval(line[len("CAUSE "):])
    return None


class VerifierPool:
    """`num_procs` child processes scoring items with a per-item deadline of `timeout_s`.

    An item still running at its deadline gets status "timeout"; its process (ours, by PID)
    is killed and a fresh one takes its place, so the rest of the batch never waits on it. An
    item's deadline starts when its process is ready (imports done, up to STARTUP_S), so a slow
    start on a loaded machine does not time items out.
    A child that dies on an item is replaced and the item sent once more (to the fresh
    process); a second death is status "error". STARTUP_DEATHS children in a row that die
    before they start taking items raise VerifierStartupError naming the likely cause.
    """

    def __init__(self, num_procs: int = 2, timeout_s: float = 5.0):
        if num_procs < 1 or timeout_s <= 0:
            raise ValueError("need num_procs >= 1 and timeout_s > 0")
        if _importing_main_in_a_child():
            raise RuntimeError(_unguarded_main_message())
        self.num_procs, self.timeout_s = num_procs, timeout_s
        # forkserver: children fork from a clean single-threaded server with math-verify
        # preloaded (fast to replace, safe inside a threaded Ray actor).
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(["actors.rewards", "math_verify"])
        self._procs: list = [None] * num_procs
        self._ready = [False] * num_procs
        self._startup_exits: list = []   # exit codes of children that died before READY, in a row
        self.restarts = 0

    def pids(self) -> list[int]:
        """PIDs of the live child processes."""
        return [entry[0].pid for entry in self._procs if entry is not None and entry[0].is_alive()]

    def _start(self, slot: int):
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_child_loop, args=(child,), daemon=True)
        proc.start()
        child.close()
        self._procs[slot], self._ready[slot] = (proc, parent), False
        return self._procs[slot]

    def _kill(self, slot: int):
        """Stop the child of `slot`; returns its exit code."""
        proc, conn = self._procs[slot]
        proc.kill()
        proc.join(timeout=5)
        conn.close()
        self._procs[slot] = None
        return proc.exitcode

    def _startup_error(self) -> VerifierStartupError:
        codes = self._startup_exits
        cause = startup_cause()
        if cause is None:
            signals = [-c for c in codes if c is not None and c < 0]
            cause = (f"killed by signal {signals[0]} (out of memory?)" if signals else
                     "their start-up runs cleanly in a fresh process; see the children's traceback on stderr")
        elif not cause.startswith("RuntimeError: the verifier pool was started while"):
            cause = f"starting one fails with {cause}"
        return VerifierStartupError(
            f"{len(codes)} verifier child processes in a row died while starting, before scoring "
            f"anything (exit codes {codes}): {cause}")

    def _send(self, slot: int, item) -> None:
        proc, conn = self._procs[slot] or self._start(slot)
        if not proc.is_alive():      # died while idle: replace it
            self._kill(slot)
            proc, conn = self._start(slot)
        try:
            conn.send(item)
        except OSError:              # already dead: map() sees the closed pipe and handles it
            pass

    def map(self, items: list[tuple[tuple, dict]]) -> list[RewardResult]:
        """Score [(args, kwargs)] of score_one; results in input order, each within its deadline."""
        results: list[RewardResult | None] = [None] * len(items)
        pending = list(range(len(items)))[::-1]
        running: dict[int, tuple[int, float]] = {}  # slot -> (item, start time)
        retried: set[int] = set()
        while pending or running:
            for slot in range(self.num_procs):
                if slot not in running and pending:
                    item = pending.pop()
                    self._send(slot, items[item])
                    running[slot] = (item, time.monotonic())
            next_deadline = min(t0 + self._limit(s) for s, (_, t0) in running.items())
            ready = wait([self._procs[s][1] for s in running],
                         timeout=max(0.0, next_deadline - time.monotonic()))
            for slot in list(running):
                item, t0 = running[slot]
                conn = self._procs[slot][1]
                if conn in ready:
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError) as err:  # the child died (e.g. out of memory)
                        del running[slot]
                        self._died(slot, item, err, t0, results, pending, retried)
                        continue
                    if isinstance(msg, tuple) and msg[0] == READY:
                        # the item's deadline starts when the child was ready (its own clock: a
                        # parent slow to read the message gives it no extra time), not at the send
                        self._ready[slot], self._startup_exits = True, []
                        running[slot] = (item, max(t0, msg[1]))
                        continue
                    results[item] = msg
                    del running[slot]
                elif time.monotonic() - t0 >= self._limit(slot):
                    error = (f"no result within {self.timeout_s} s" if self._ready[slot] else
                             f"the verifier process did not start within {STARTUP_S:g} s")
                    results[item] = RewardResult(None, status="timeout", seconds=time.monotonic() - t0,
                                                 error=error)
                    self._kill(slot)
                    self.restarts += 1
                    del running[slot]
        return results  # type: ignore[return-value]

    def _limit(self, slot: int) -> float:
        return self.timeout_s if self._ready[slot] else max(self.timeout_s, STARTUP_S)

    def _died(self, slot, item, err, t0, results, pending, retried) -> None:
        """A child died with `item` in hand: retry the item once (not counting deaths at start-up)."""
        started = self._ready[slot]
        code = self._kill(slot)
        self.restarts += 1
        if not started:                  # not the item's fault: it goes again, its retry kept
            self._startup_exits.append(code)
            if len(self._startup_exits) >= STARTUP_DEATHS:
                error = self._startup_error()
                self.close()
                raise error from None
            pending.append(item)
        elif item not in retried:
            retried.add(item)
            pending.append(item)
        else:
            results[item] = RewardResult(None, status="error", seconds=time.monotonic() - t0,
                                         error=f"verifier died twice on this item (exit code {code}): {err!r}")

    def close(self) -> None:
        """Stop the child processes this pool started (a later map starts fresh ones)."""
        for slot, entry in enumerate(self._procs):
            if entry is not None:
                self._kill(slot)
        self._startup_exits = []

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


_DEFAULT_POOLS: dict[tuple, VerifierPool] = {}


def score_batch(completions: list[str], references: list[str], lengths: list[int] | None = None,
                *, timeout_s: float = 5.0, num_procs: int = 2, pool: VerifierPool | None = None,
                **score_config) -> list[RewardResult]:
    """Score completions against references in a deadline-bounded process pool.

    score_config: weights, layout, target_language, max_len, cache_len, extraction (see score_one).
    One RewardResult per completion, in order, with status ok / timeout / error.
    """
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")
    if lengths is not None and len(lengths) != len(completions):
        raise ValueError(f"{len(lengths)} lengths for {len(completions)} completions")
    if pool is None:
        key = (num_procs, timeout_s, os.getpid())
        pool = _DEFAULT_POOLS.get(key) or _DEFAULT_POOLS.setdefault(key, VerifierPool(num_procs, timeout_s))
    lengths = lengths if lengths is not None else [None] * len(completions)
    return pool.map([((c, r, n), score_config) for c, r, n in zip(completions, references, lengths)])


def summarize(results: list[RewardResult]) -> dict[str, float]:
    """Metrics of a scored batch: status counts, mean reward and mean components over ok items."""
    ok = [r for r in results if r.status == "ok"]
    out: dict[str, float] = {f"reward/{s}": float(sum(r.status == s for r in results)) for s in STATUSES}
    out["reward/mean"] = sum(r.reward for r in ok) / len(ok) if ok else float("nan")
    for name in sorted({k for r in ok for k in r.components}):
        vals = [r.components[name] for r in ok if name in r.components]
        out[f"reward/{name}"] = sum(vals) / len(vals)
    return out


class RewardWorker:
    """A Ray-placeable scorer: one VerifierPool, config fixed at construction."""

    def __init__(self, *, timeout_s: float = 5.0, num_procs: int = 1, **score_config):
        self.pool = VerifierPool(num_procs, timeout_s)
        self.score_config = score_config

    def score(self, completions: list[str], references: list[str],
              lengths: list[int] | None = None) -> list[RewardResult]:
        """score_batch on this worker's pool."""
        return score_batch(completions, references, lengths, pool=self.pool, **self.score_config)

    def info(self) -> dict:
        """pid, number of child restarts (one per timeout or crash)."""
        return {"pid": os.getpid(), "restarts": self.pool.restarts}
