"""Learner: one DeepSpeed ZeRO rank computing GRPO (or SFT) updates.

A plain class; the driver places N of them as Ray actors (one per rank) and calls every
method on all ranks at once (the collectives need all of them). gloo on CPU, NCCL on GPU.

Batches are dicts of lists (one row per sequence; `actors.batch.Batch.as_dict()` for GRPO),
split across ranks by the driver:
    input_ids        prompt + completion token ids
    prompt_lens      number of prompt tokens of each row
    advantages       one float per row                                 (GRPO)
    behavior_logp    the rollout engine's logprob per completion token (GRPO)
    group_ids        the row's group (its prompt) in the run            (GRPO)
    policy_versions  the weights version that sampled the row          (GRPO)
Losses are normalised over the *global* batch (all ranks, all micro-batches), so the update
equals one full-batch step of `actors.grpo.grpo_loss` whatever the micro-batching.

Shared prompts (share_prefix, on by default): the G rows of a GRPO group repeat one prompt.
Micro-batches then hold whole groups; each prompt runs once (its KV cache, with gradients, is
taken by its completions), and the tokens all the prompts start with (a system prompt) run once
for the micro-batch: the same logits and gradients for far fewer tokens when prompts are long
next to completions.

Rows that cannot move the loss (skip_zero_advantage, on by default): with beta 0 every policy
loss multiplies each token by its row's advantage, so a row whose advantage is exactly 0 (every
row of a GRPO group whose rewards are all equal) adds exactly 0 to the loss and its gradient.
Those rows are not run; they still count in the aggregation's denominator, so the update is
the one the full batch gives.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from actors.grpo import grpo_loss, token_entropy, token_logprobs
from actors.weight_sync import DEFAULT_BUCKET_BYTES, ObjectStoreTransport

if TYPE_CHECKING:
    from drivers.config import AlgoConfig, LearnerConfig


def pack_micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Greedy, order-keeping split of rows into micro-batches of at most `token_budget`
    padded tokens (rows * longest row). A row longer than the budget goes alone."""
    if token_budget <= 0:
        raise ValueError("token_budget must be positive")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, n) > token_budget:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


# a row that keeps a rank's forward passes in step with the others' when it has no rows left
PAD_ROW = {"input_ids": [[0, 0, 0]], "prompt_lens": [2]}


def pack_prompt_groups(input_ids: list[list[int]], prompt_lens: list[int], token_budget: int,
                       group_ids: list[int] | None = None) -> list[list[int]]:
    """Micro-batches for the shared-prefix forward: runs of whole prompt groups.

    Rows are grouped by group id (GRPO rows of one group share their prompt; without ids, by the
    prompt's tokens), in first appearance order. A micro-batch runs its prompts once, as one
    padded batch, then all its rows as another, so it costs prompts * (longest prompt - 1) +
    rows * (longest completion + 1) padded tokens. Groups join the current micro-batch in order
    while that stays within the budget; a group over the budget alone is split into parts that fit.
    """
    keys = group_ids if group_ids is not None else [tuple(ids[:p]) for ids, p in zip(input_ids, prompt_lens)]
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    parts = []
    for rows in groups.values():
        plen = prompt_lens[rows[0]]
        budget = max(token_budget - (plen - 1), 1)
        lengths = [len(input_ids[i]) - plen + 1 for i in rows]
        parts += [[rows[j] for j in part] for part in pack_micro_batches(lengths, budget)]

    def cost(batch_parts: list[list[int]]) -> int:
        rows = [i for part in batch_parts for i in part]
        prefix = max(prompt_lens[part[0]] - 1 for part in batch_parts)
        return len(batch_parts) * prefix + len(rows) * max(len(input_ids[i]) - prompt_lens[i] + 1 for i in rows)

    batches: list[list[list[int]]] = []
    for part in parts:
        if batches and cost(batches[-1] + [part]) <= token_budget:
            batches[-1].append(part)
        else:
            batches.append([part])
    return [[i for part in b for i in part] for b in batches]


def common_prefix_len(prefixes: list[list[int]]) -> int:
    """Leading tokens that all of (two or more) prompt prefixes share, leaving each at least one
    token of its own; 0 for a single prefix. (The R1 system prompt is shared by every prompt.)"""
    if len(prefixes) < 2:
        return 0
    limit = min(len(x) for x in prefixes) - 1
    n = 0
    while n < limit and all(x[n] == prefixes[0][n] for x in prefixes):
        n += 1
    return n


def subset(batch: dict, rows: list[int]) -> dict:
    """The batch restricted to `rows` (its per-row lists; other values are dropped)."""
    return {k: [v[i] for i in rows] for k, v in batch.items() if isinstance(v, list)}


def _skip_shm_build() -> None:
    # DeepSpeed JIT-builds a shm comm op (~50 s) on CPU that ZeRO never uses. Note the trap:
    # `import deepspeed.comm.torch as m` gives the *torch* package, hence sys.modules.
    import deepspeed.comm  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def attention_backend(requested: str, dtype: torch.dtype, cuda: bool) -> str:
    """transformers' attn_implementation for the learner's models (`learner.attn_implementation`).

    auto: on a CPU in bf16, eager (matmul + softmax, whose backward is two matmuls); PyTorch's CPU
    flash-attention backward in bf16 took 38% of a tiny-model train step on its own. sdpa elsewhere
    (fp32 on CPU: the two are equal; GPUs: fused kernels). Eager keeps each layer's attention map
    ([rows, heads, tokens, tokens]) for the backward: long rows need a smaller micro_batch_tokens.
    """
    if requested != "auto":
        return requested
    return "eager" if not cuda and dtype == torch.bfloat16 else "sdpa"


class Learner:
    """One rank: a DeepSpeed engine around an HF causal LM, plus a frozen reference if beta > 0."""

    def __init__(self, model_path: str, learner: "LearnerConfig | None" = None, algo: "AlgoConfig | None" = None, *,
                 rank: int = 0, world_size: int = 1, master_addr: str = "127.0.0.1", master_port: int = 29500,
                 dtype: str = "float32", seed: int = 0, cpu_threads: int = 1, temperature: float = 1.0,
                 max_len: int | None = None, attention_dropout: float | None = None, decay_steps: int = 0):
        """learner / algo: the config's sections (None: their defaults); the rest is per rank or per run.

        temperature: the rollout's sampling temperature (logprobs are of the sampled distribution);
        max_len: the generation budget (Dr. GRPO's aggregation constant); attention_dropout: an SFT
        regulariser (None: the model's own); decay_steps: the first phase's linear-decay horizon (0: none).
        """
        from drivers.config import AlgoConfig, LearnerConfig

        opt = learner if learner is not None else LearnerConfig()
        algo = algo if algo is not None else AlgoConfig()
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world_size))
        torch.set_num_threads(cpu_threads)
        import deepspeed
        from transformers import AutoConfig, AutoModelForCausalLM

        self.cuda = torch.cuda.is_available()
        if not self.cuda:
            _skip_shm_build()
        deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo")
        self.rank, self.world_size, self.zero_stage = rank, world_size, opt.zero_stage
        self.model_path = str(model_path)
        self.dtype = getattr(torch, dtype)
        self.loss_kw = dict(eps_low=algo.eps_low, eps_high=algo.eps_high, beta=algo.beta, agg=algo.agg,
                            policy_loss=algo.policy_loss, max_len=max_len, rollout_correction=algo.rollout_correction,
                            is_cap=algo.is_cap, mis_low=algo.mis_low, mis_high=algo.mis_high)
        self.old_logp_source, self.temperature = algo.old_logp, temperature
        self.micro_batch_tokens, self.mini_batches = opt.micro_batch_tokens, algo.mini_batches
        self.share_prefix = opt.share_prefix
        # a row of advantage 0 moves the loss only through the KL term
        self.skip_zero_advantage = opt.skip_zero_advantage and algo.beta == 0
        torch.manual_seed(seed)
        # attention_dropout: a training-time regulariser (SFT); save_hf writes the config's own value
        self._saved_attention_dropout = getattr(AutoConfig.from_pretrained(model_path), "attention_dropout", 0.0)
        overrides = {} if attention_dropout is None else {"attention_dropout": attention_dropout}
        self.attn_implementation = attention_backend(opt.attn_implementation, self.dtype, self.cuda)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype,
                                                     attn_implementation=self.attn_implementation, **overrides)
        model.config.use_cache = False
        optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=tuple(opt.adam_betas), eps=opt.adam_eps,
                                      weight_decay=opt.weight_decay)
        self.ds_config = {
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            # the number of micro-batches varies per step (token-budget packing): step() is
            # the accumulation boundary, backward() only accumulates
            "managed_gradient_accumulation": False,
            "zero_optimization": {"stage": opt.zero_stage},
            "gradient_clipping": opt.grad_clip, "steps_per_print": 10**9, "wall_clock_breakdown": False,
            "bf16": {"enabled": dtype == "bfloat16"},
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config)
        self.device = self.engine.device
        self.ref = None
        if algo.beta > 0:  # a frozen reference, sharded like the policy under ZeRO-3
            ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype,
                                                       attn_implementation=self.attn_implementation).eval()
            ref.requires_grad_(False)
            if opt.zero_stage == 3:
                ref = deepspeed.initialize(model=ref, config={**self.ds_config, "gradient_clipping": 0.0})[0]
            self.ref = ref.to(self.device)
        self.steps = 0
        self.skipped_steps = 0
        self.base_lr, self.warmup_steps, self.phase_steps = opt.lr, opt.warmup_steps, 0
        self.decay_steps = decay_steps
        self.scheduler = None       # DeepSpeed's WarmupLR / WarmupDecayLR of the current phase (made at its first step)

    # ------------------------------------------------------------------ helpers
    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def _pad(self, rows: list[list], value, dtype) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=dtype)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r, dtype=dtype)
        return out.to(self.device)

    def _shifted(self, batch: dict, idx: list[int]) -> dict:
        """Tensors for rows idx, aligned to next-token positions [B, L-1]."""
        ids = self._pad([batch["input_ids"][i] for i in idx], 0, torch.long)
        lens = torch.tensor([len(batch["input_ids"][i]) for i in idx], device=self.device)
        plens = torch.tensor([batch["prompt_lens"][i] for i in idx], device=self.device)
        pos = torch.arange(ids.shape[1] - 1, device=self.device)[None]
        # position t predicts token t+1: completion tokens are t+1 in [prompt_len, len)
        mask = ((pos >= plens[:, None] - 1) & (pos < lens[:, None] - 1)).float()
        attn = (torch.arange(ids.shape[1], device=self.device)[None] < lens[:, None]).long()
        out = {"ids": ids, "attn": attn, "targets": ids[:, 1:], "mask": mask, "starts": (plens - 1).tolist()}
        for key in ("behavior_logp", "old_logp", "ref_logp"):
            if key in batch:  # per-completion-token values placed at their positions
                full = torch.zeros_like(mask)
                for r, i in enumerate(idx):
                    vals = torch.tensor(batch[key][i], dtype=torch.float32, device=self.device)
                    start = int(plens[r]) - 1
                    full[r, start:start + len(vals)] = vals
                out[key] = full
        if "advantages" in batch:
            out["adv"] = torch.tensor([batch["advantages"][i] for i in idx], dtype=torch.float32,
                                      device=self.device)
        return out

    def _logits(self, model, mb: dict) -> torch.Tensor:
        # call the DeepSpeed engine, not engine.module: its forward advances ZeRO-3's micro-step
        # (without it, each backward overwrites the previous micro-batch's gradients)
        return model(input_ids=mb["ids"], attention_mask=mb["attn"]).logits[:, :-1]

    def _plan(self, batch: dict, share: bool) -> tuple[list[list[int]], bool, list[bool]]:
        """Micro-batches (the same count on every rank; [] pads), whether they all run the
        shared-prompt forward, and for each whether its prompts' common start runs on its own.

        Sharing: only when prompts repeat (>= 2 rows per prompt on average over all ranks; with one
        row per prompt the separate prompt pass saves nothing and costs a forward). The common start:
        where the prompts of that micro-batch start alike on every rank. Every rank must take the
        same path: ZeRO reduces gradients in the order they become ready, which differs between the
        forwards, and ZeRO-3 gathers parameters in each."""
        want = share and self.share_prefix
        if want:     # the ranks agree on sharing first
            ids = batch.get("group_ids")
            groups = pack_prompt_groups(batch["input_ids"], batch["prompt_lens"], self.micro_batch_tokens, ids)
            ok = all(p >= 2 for p in batch["prompt_lens"])     # a prompt of one token has no prefix to share
            prompts = len(set(ids) if ids is not None else
                          {tuple(x[:p]) for x, p in zip(batch["input_ids"], batch["prompt_lens"])})
            not_ok, rows, prompts = self._all_reduce([0.0 if ok else 1.0, len(batch["input_ids"]), prompts])
            want = not not_ok and rows >= 2 * prompts
        local = groups if want else pack_micro_batches([len(x) for x in batch["input_ids"]], self.micro_batch_tokens)
        n_micro = int(self._all_reduce([len(local)], "max")[0])
        local += [[] for _ in range(n_micro - len(local))]
        split = [False] * n_micro
        if want and n_micro:
            starts = [float(bool(common_prefix_len(self._prefixes(batch, idx)[0]))) for idx in local]
            split = [n == self.world_size for n in self._all_reduce(starts)]
        return local, want, split

    @staticmethod
    def _prefixes(batch: dict, idx: list[int]) -> tuple[list[list[int]], list[int]]:
        """The distinct prompts of rows idx (consecutive rows with the same prompt) minus their last
        token, and the index into them of each row."""
        prefixes: list[list[int]] = []
        row_prompt = []
        for i in idx:
            prefix = batch["input_ids"][i][:batch["prompt_lens"][i] - 1]
            if not prefixes or prefixes[-1] != prefix:
                prefixes.append(prefix)
            row_prompt.append(len(prefixes) - 1)
        return prefixes, row_prompt

    def _forward(self, model, batch: dict, idx: list[int], share: bool, split: bool = False
                 ) -> tuple[dict, torch.Tensor]:
        """(tensors, next-token logits) of rows idx. share: each prompt runs once (see _plan).

        The micro-batch's distinct prompts minus their last token fill a KV cache, with gradients,
        as one right-padded batch; split: the tokens all of them start with (a system prompt) run
        once before, on their own. Each row takes its prompt's cache entry and continues from the
        prompt's last token, the padding masked. Tensors are then laid out as if each row's prompt
        were that one token (the same logits, fewer positions)."""
        if not share:
            mb = self._shifted(batch, idx)
            return mb, self._logits(model, mb)
        prefixes, row_prompt = self._prefixes(batch, idx)
        rows = {k: [v[i] for i in idx] for k, v in batch.items() if isinstance(v, list)}
        rows["input_ids"] = [x[p - 1:] for x, p in zip(rows["input_ids"], rows["prompt_lens"])]
        rows["prompt_lens"] = [1] * len(idx)
        mb = self._shifted(rows, list(range(len(idx))))
        dev, n = self.device, len(prefixes)
        common = common_prefix_len(prefixes) if split else 0
        # the prompts run through the module, not the engine: one engine forward per micro-batch
        module = getattr(model, "module", model)
        cache = None
        if common:
            cache = module(input_ids=torch.tensor([prefixes[0][:common]], device=dev), use_cache=True,
                           logits_to_keep=1).past_key_values      # the cache is what counts, not the logits
            cache.batch_repeat_interleave(n)
        tail_ids = self._pad([x[common:] for x in prefixes], 0, torch.long)
        tail_lens = torch.tensor([len(x) - common for x in prefixes], device=dev)
        tail_mask = (torch.arange(tail_ids.shape[1], device=dev)[None] < tail_lens[:, None]).long()
        ones = torch.ones(n, common, dtype=tail_mask.dtype, device=dev)
        cache = module(input_ids=tail_ids, attention_mask=torch.cat([ones, tail_mask], 1), past_key_values=cache,
                       position_ids=common + torch.arange(tail_ids.shape[1], device=dev)[None].expand(n, -1),
                       use_cache=True, logits_to_keep=1).past_key_values
        which = torch.tensor(row_prompt, device=dev)
        cache.batch_select_indices(which)
        width = mb["ids"].shape[1]
        attn = torch.cat([ones[which], tail_mask[which], mb["attn"]], 1)
        pos = (common + tail_lens[which])[:, None] + torch.arange(width, device=dev)[None]
        logits = model(input_ids=mb["ids"], attention_mask=attn, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits[:, :-1]
        return mb, logits

    # ------------------------------------------------------------------ GRPO
    def _rows_to_run(self, batch: dict) -> list[int]:
        """Indices of the rows the loss depends on: all of them, or (skip_zero_advantage)
        those whose advantage is not exactly 0."""
        rows = range(len(batch["input_ids"]))
        if not self.skip_zero_advantage or "advantages" not in batch:
            return list(rows)
        return [i for i in rows if batch["advantages"][i] != 0.0]

    @torch.no_grad()
    def _fill_old_and_ref(self, batch: dict) -> dict:
        """old_logp from the current weights (when mini_batches > 1) and ref_logp (when beta > 0),
        for the rows that run (the others get zeros: the loss never reads them)."""
        # one optimizer step per batch: the proximal policy is the weights of the update's own
        # forward, whose logprobs (detached) are the old ones; no pass of their own (_update)
        need_old = self.mini_batches > 1
        if not need_old and self.ref is None:
            return batch
        batch = dict(batch)
        olds = [[0.0] * (len(x) - p) for x, p in zip(batch["input_ids"], batch["prompt_lens"])]
        refs = [list(o) for o in olds]
        run = self._rows_to_run(batch)
        sub = subset(batch, run)
        micro, share, split = self._plan(sub, share=True)
        for idx, split_common in zip(micro, split):
            if not idx:     # ZeRO-3 gathers parameters in every forward: all ranks run as many
                for model in [self.engine] * need_old + [self.ref] * (self.ref is not None):
                    self._forward(model, PAD_ROW, [0], share)
                continue
            if need_old:
                mb, logits = self._forward(self.engine, sub, idx, share, split_common)
                old_lp = token_logprobs(logits, mb["targets"], self.temperature)
            if self.ref is not None:
                mb, logits = self._forward(self.ref, sub, idx, share, split_common)
                ref_lp = token_logprobs(logits, mb["targets"], self.temperature)
            for r, i in enumerate(idx):
                start = mb["starts"][r]
                sl = slice(start, start + len(sub["input_ids"][i]) - sub["prompt_lens"][i])
                if need_old:
                    olds[run[i]] = old_lp[r, sl].tolist()
                if self.ref is not None:
                    refs[run[i]] = ref_lp[r, sl].tolist()
        if need_old:
            batch["old_logp"] = olds
        if self.ref is not None:
            batch["ref_logp"] = refs
        return batch

    def train_step(self, batch: dict) -> dict:
        """One GRPO update (or `mini_batches` of them) on this rank's shard of the batch.

        Returns metrics averaged over the global batch (identical on every rank). A non-finite
        loss on any rank skips the update on all ranks (weights unchanged, skipped=1).
        """
        t0 = time.perf_counter()
        self.engine.train()
        batch = self._fill_old_and_ref(batch)
        if "old_logp" not in batch and self.old_logp_source == "rollout":
            batch = {**batch, "old_logp": batch["behavior_logp"]}
        rows = list(range(len(batch["input_ids"])))
        splits = [rows[k::self.mini_batches] for k in range(self.mini_batches)]
        totals = {"loss": 0.0, "skipped": 0.0, "train/rows_not_run": 0.0, "train/tokens": 0.0}
        reported: dict[str, list[float]] = {}
        for split in splits:
            metrics = self._update(subset(batch, split))
            totals["loss"] += metrics.pop("loss") / len(splits)
            for key in ("skipped", "train/rows_not_run", "train/tokens"):   # counts: summed over updates
                totals[key] += metrics.pop(key)
            for k, v in metrics.items():
                reported.setdefault(k, []).append(v)
        # the mean over the updates that measured it (one that ran no row has no entropy, ratio, ...)
        means = {k: statistics.fmean(f) if (f := [x for x in v if math.isfinite(x)]) else math.nan
                 for k, v in reported.items()}
        self.steps += 1
        return {**means, **totals, "lr": self.engine.optimizer.param_groups[0]["lr"],
                "step_seconds": time.perf_counter() - t0,
                "learner_step": float(self.steps)}

    def _dummy_loss(self, share: bool) -> torch.Tensor:
        """A zero loss through a real forward of the same kind as the other ranks': keeps every
        rank's backward passes (and ZeRO's collectives) aligned when this rank has fewer micro-batches."""
        _, logits = self._forward(self.engine, PAD_ROW, [0], share)
        return logits.sum() * 0.0

    def _apply_step(self, losses_finite: bool) -> tuple[bool, float]:
        """Optimizer step unless the loss or the gradient norm is non-finite on any rank.

        ZeRO 1-3 skip a non-finite gradient norm themselves (and clear the gradients); stage 0
        has no such guard, so the gradients are checked here. Returns (stepped, grad_norm).
        """
        all_finite = self._all_reduce([0.0 if losses_finite else 1.0], "max")[0] == 0.0
        self._warm_lr()
        if self.zero_stage == 0:
            sq = sum(float(p.grad.double().pow(2).sum()) for p in self.engine.module.parameters()
                     if p.grad is not None)
            if not (all_finite and math.isfinite(self._all_reduce([sq])[0])):
                self.engine.zero_grad()
                return False, math.nan
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return True, float(norm) if norm is not None else math.nan
        if not all_finite:  # make sure ZeRO sees it: the norm of NaN gradients is NaN
            for p in self.engine.module.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        return all_finite and math.isfinite(norm), norm

    def _update(self, batch: dict) -> dict:
        per_token = self.loss_kw["agg"] == "token-mean"
        local_tokens = sum(len(x) - p for x, p in zip(batch["input_ids"], batch["prompt_lens"]))
        g_tokens, g_rows = self._all_reduce([local_tokens, len(batch["input_ids"])])
        denominator = g_tokens if per_token else g_rows
        run = self._rows_to_run(batch)
        batch = subset(batch, run)      # the rows left out add exactly 0 (they stay in the denominator)
        micro, share, split = self._plan(batch, share=True)
        if not micro:                   # no row to run on any rank: a zero gradient still steps (Adam's moments)
            micro, split = [[]], [False]
        # the engine's logprobs are always passed (the mismatch is measured); the correction acts
        # only against the learner's own proximal logprobs (old_logp="rollout": old == behavior)
        loss_kw = self.loss_kw if self.old_logp_source == "learner" else {**self.loss_kw, "rollout_correction": "none"}
        has_behavior = "behavior_logp" in batch
        # the same keys on every rank (one all-reduce); those of the correction are 0 without behavior_logp
        correction_keys = ["mismatch_abs_mean", "correction_weight_mean", "correction_masked_frac"]
        keys = ["policy_loss", "kl", "clip_frac_low", "clip_frac_high", "ratio_mean", "entropy"] + correction_keys
        sums = dict.fromkeys(keys, 0.0)
        total_loss, ratio_max, mismatch_max, finite = 0.0, 1.0, 0.0, True
        for k, idx in enumerate(micro):
            if not idx:
                self.engine.backward(self._dummy_loss(share), scale_wrt_gas=False)
                continue
            mb, logits = self._forward(self.engine, batch, idx, share, split[k])
            logp = token_logprobs(logits, mb["targets"], self.temperature)
            old = mb["old_logp"] if "old_logp" in mb else logp.detach()   # see _fill_old_and_ref
            loss, metrics = grpo_loss(logp, old, mb["adv"], mb["mask"], mb.get("ref_logp"),
                                      behavior_logp=mb.get("behavior_logp"), **loss_kw)
            count = metrics["n_tokens"] if per_token else len(idx)
            loss = loss * (count / denominator) * self.world_size  # DeepSpeed averages over ranks
            with torch.no_grad():
                metrics["entropy"] = float((token_entropy(logits, self.temperature) * mb["mask"]).sum()
                                           / mb["mask"].sum().clamp(min=1))
            self.engine.backward(loss, scale_wrt_gas=False)
            finite = finite and math.isfinite(float(loss.detach()))
            total_loss += float(loss.detach()) / self.world_size
            ratio_max = max(ratio_max, metrics["ratio_max"])
            mismatch_max = max(mismatch_max, metrics.get("mismatch_abs_max", 0.0))
            for key in keys:
                sums[key] += metrics.get(key, 0.0) * metrics["n_tokens"]
        stepped, grad_norm = self._apply_step(finite)
        if not stepped:
            self.skipped_steps += 1
        run_tokens = sum(len(x) - p for x, p in zip(batch["input_ids"], batch["prompt_lens"]))
        totals = self._all_reduce([sums[k] for k in keys] + [total_loss, run_tokens, len(run)])
        g_run_tokens, g_run_rows = totals[-2:]
        maxes = self._all_reduce([ratio_max, mismatch_max], "max")
        # policy_loss over every token (a row not run adds exactly 0); the rest are means over the
        # rows run (the others have no logprobs): NaN when none ran (logged as null, not as 0)
        ran = g_run_tokens > 0
        out = {"loss": totals[-3], "skipped": 0.0 if stepped else 1.0, "train/tokens": g_tokens,
               "train/grad_norm": grad_norm, "train/rows_not_run": g_rows - g_run_rows,
               "train/policy_loss": totals[keys.index("policy_loss")] / max(g_tokens, 1),
               "train/ratio_max": maxes[0] if ran else math.nan}
        out.update({f"train/{k}": v / g_run_tokens if ran else math.nan for k, v in zip(keys, totals[:-3])
                    if k != "policy_loss" and (has_behavior or k not in correction_keys)})
        if has_behavior:
            out["train/mismatch_abs_max"] = maxes[1] if ran else math.nan
        return out

    # ------------------------------------------------------------------ SFT
    def sft_step(self, batch: dict) -> dict:
        """One masked next-token (cross-entropy) update on completion tokens, token-mean."""
        t0 = time.perf_counter()
        self.engine.train()
        local_tokens = sum(len(x) - p for x, p in zip(batch["input_ids"], batch["prompt_lens"]))
        g_tokens = self._all_reduce([local_tokens])[0]
        micro, _, _ = self._plan(batch, share=False)   # SFT rows rarely share prompts
        total, finite = 0.0, True
        for k, idx in enumerate(micro):
            if not idx:
                self.engine.backward(self._dummy_loss(share=False), scale_wrt_gas=False)
                continue
            mb = self._shifted(batch, idx)
            logp = token_logprobs(self._logits(self.engine, mb), mb["targets"])
            loss = -(logp * mb["mask"]).sum() / g_tokens * self.world_size
            self.engine.backward(loss, scale_wrt_gas=False)
            total += float(loss.detach()) / self.world_size
            finite = finite and math.isfinite(total)
        stepped, grad_norm = self._apply_step(finite)
        self.steps += 1
        return {"sft/nll": self._all_reduce([total])[0], "sft/tokens": g_tokens,
                "sft/grad_norm": grad_norm, "skipped": 0.0 if stepped else 1.0,
                "step_seconds": time.perf_counter() - t0, "learner_step": float(self.steps)}

    # ------------------------------------------------------------------ weights and checkpoints
    def _gathered(self):
        """Context in which every parameter is whole on every rank (collective under ZeRO-3)."""
        import contextlib

        import deepspeed

        if self.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def export_weights(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, release_cache: bool = False):
        """Full-precision (name, tensor) buckets in the object store; rank 0 returns the
        handles, other ranks None. Collective: call on all ranks. release_cache (colocated on a
        GPU): hand the allocator's cached blocks back to the device afterwards, so that the
        engine waking up next can take them for its KV cache."""
        handles = None
        with self._gathered():
            if self.rank == 0:
                named = [(n, p.detach().float() if p.dtype != torch.float32 else p.detach())
                         for n, p in self.engine.module.named_parameters()]
                handles = ObjectStoreTransport.publish(named, bucket_bytes)
                del named       # fp32 copies (bf16 model) or gathered ZeRO-3 views: not cached below
        if release_cache and self.cuda:
            torch.cuda.empty_cache()
        return handles

    def set_lr(self, lr: float, decay_steps: int = 0) -> None:
        """Start a phase (e.g. SFT, then RL) at `lr`: the linear warmup starts again, and with
        decay_steps > 0 the lr then falls linearly towards 0 at the phase's step decay_steps."""
        self.base_lr, self.decay_steps, self.phase_steps, self.scheduler = lr, decay_steps, 0, None

    def _warm_lr(self) -> None:
        """This step's lr (steps are optimizer steps). Step t of the phase (from 0) is DeepSpeed's
        scheduler stepped to t + 1: WarmupLR gives base_lr * min(1, (t + 1) / W) (W = warmup_steps);
        with decay_steps D > 0, WarmupDecayLR (horizon D + 1, so the last step keeps a small lr)
        gives the same warmup, then base_lr * (D - t) / (D + 1 - W); DeepSpeed's warmup is at
        least 2 steps there (W <= 1: half the lr at step 0). No warmup, no decay: base_lr throughout."""
        from deepspeed.runtime.lr_schedules import WarmupDecayLR, WarmupLR

        if self.warmup_steps <= 1 and not self.decay_steps:
            for group in self.engine.optimizer.param_groups:
                group["lr"] = self.base_lr
        else:
            if self.scheduler is None:
                common = dict(warmup_min_lr=0.0, warmup_max_lr=self.base_lr, warmup_type="linear",
                              warmup_num_steps=max(2, self.warmup_steps), last_batch_iteration=self.phase_steps)
                self.scheduler = (WarmupDecayLR(self.engine.optimizer, total_num_steps=self.decay_steps + 1, **common)
                                  if self.decay_steps else WarmupLR(self.engine.optimizer, **common))
            self.scheduler.step(self.phase_steps + 1)
        self.phase_steps += 1

    def peak_memory_mb(self) -> float:
        """Peak resident memory of this rank's process (MB)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def get_state_dict(self) -> dict:
        """A CPU copy of the full parameters (tests and tools; collective)."""
        with self._gathered():
            return {n: p.detach().float().cpu().clone() for n, p in self.engine.module.named_parameters()}

    def save_checkpoint(self, directory: str, tag: str = "latest", client_state: dict | None = None) -> str:
        """DeepSpeed state (optimizer, partitions) under directory/tag, and an HF export of the
        same weights under directory/tag/hf, written atomically (collective).

        directory/hf, the export users load, moves to this tag only in publish_checkpoint, which
        the driver calls once its state.json names the tag."""
        directory = Path(directory)
        self.engine.save_checkpoint(str(directory), tag=tag,
                                    client_state={"steps": self.steps, "phase_steps": self.phase_steps,
                                                  "base_lr": self.base_lr, **(client_state or {})})
        self.save_hf(str(directory / tag / "hf"))
        return str(directory / tag)

    def publish_checkpoint(self, directory: str, tag: str, keep: int | None = None) -> list[str]:
        """After the driver's state names `tag`: point directory/hf at tag's export (rank 0) and
        keep the newest `keep` step<N> tags (every rank, on its own disk). Returns the tags deleted."""
        import torch.distributed as dist

        if self.rank == 0:
            point_link(Path(directory) / "hf", Path(tag) / "hf")
        dist.barrier()          # no rank deletes the tag `hf` pointed at before the link moved
        deleted = prune_checkpoints(directory, keep, tag) if keep else []
        dist.barrier()
        return deleted

    def save_hf(self, directory: str) -> str:
        """The current weights + the tokenizer as an HF model directory (collective; rank 0 writes).

        Written into a temporary sibling folder and renamed into place: a crash mid-write never
        leaves a half-written model at `directory`."""
        import torch.distributed as dist

        with self._gathered():
            if self.rank == 0:
                write_dir_atomically(Path(directory), self._write_hf)
        dist.barrier()
        return directory

    def _write_hf(self, directory: Path) -> None:
        from transformers import AutoTokenizer

        module = self.engine.module
        training_dropout = getattr(module.config, "attention_dropout", 0.0)
        module.config.attention_dropout = self._saved_attention_dropout
        try:
            module.save_pretrained(directory, safe_serialization=True)
        finally:
            module.config.attention_dropout = training_dropout
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(directory)

    def load_checkpoint(self, directory: str, tag: str = "latest") -> dict:
        """Restore DeepSpeed state saved by save_checkpoint; returns its client state."""
        if not (Path(directory) / tag).is_dir():
            raise FileNotFoundError(f"no checkpoint '{tag}' under {directory}")
        path, client = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise RuntimeError(f"checkpoint {directory}/{tag} could not be loaded")
        self.steps = int(client.get("steps", 0))
        self.phase_steps = int(client.get("phase_steps", 0))
        saved_lr = float(client.get("base_lr", self.base_lr))
        if saved_lr != self.base_lr and self.rank == 0:   # the config's lr wins (a resume may change it)
            print(f"resume: learning rate {self.base_lr:g} from the config (the checkpoint's was {saved_lr:g})",
                  flush=True)
        return client


# ---------------------------------------------------------------------- checkpoint files
STEP_TAG = re.compile(r"step(\d+)")


def _rmtree(path: Path) -> None:
    """Delete a folder; one another rank (same shared disk) deleted first is not an error."""
    def gone_already(func, p, exc_info):
        if not issubclass(exc_info[0], FileNotFoundError):
            raise exc_info[1]
    shutil.rmtree(path, onerror=gone_already)


def holds_other_files(folder: Path) -> bool:
    """True when `folder` is a non-empty directory that is not an HF model folder (no config.json):
    a model is never written over it."""
    folder = Path(folder)
    return folder.is_dir() and any(folder.iterdir()) and not (folder / "config.json").exists()


def write_dir_atomically(final: Path, write) -> Path:
    """write(folder) into `final`.tmp, then rename it to `final`. An existing `final` (an HF model
    folder: anything else is refused, not deleted) is renamed aside first and deleted after, so
    `final` is the old folder or the new one, never a half-written one. A process crash leaves
    at most a stale .tmp (removed by the next call) or, between the two renames, only .old (put
    back by the next call)."""
    final = Path(final)
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    if old.exists() and not final.exists():
        old.rename(final)
    if holds_other_files(final):
        raise FileExistsError(f"{final} holds files that are not an HF model folder: not replacing it "
                              "(give an empty or new folder)")
    for stale in (tmp, old):
        if stale.exists():
            _rmtree(stale)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    write(tmp)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        _rmtree(old)
    return final


def point_link(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target` (relative to the link's folder), atomically: a new link
    is renamed over the old one. A real folder there (an older layout) is deleted first."""
    link = Path(link)
    tmp = link.with_name(link.name + ".tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    if link.is_dir() and not link.is_symlink():
        _rmtree(link)
    os.replace(tmp, link)


def prune_checkpoints(directory: str | Path, keep: int, current: str) -> list[str]:
    """Delete step<N> tag folders under `directory` except `current` and the `keep` - 1 newest
    older ones; tags newer than `current` (left by a run that crashed before naming them in its
    state) go too. Other names are never touched. Returns the deleted tags."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    match = STEP_TAG.fullmatch(current)
    if match is None:
        raise ValueError(f"checkpoint tag {current!r} is not step<N>")
    now = int(match.group(1))
    tags = sorted(((int(m.group(1)), p) for p in Path(directory).iterdir()
                   if p.is_dir() and not p.is_symlink() and (m := STEP_TAG.fullmatch(p.name))), reverse=True)
    kept = [n for n, _ in tags if n <= now][:keep]
    doomed = [p for n, p in tags if n not in kept]
    for path in doomed:
        _rmtree(path)
    return [p.name for p in doomed]
