"""Depth and width pruning of a TinyLlama-1.1B-shaped LlamaForCausalLM (22 layers, hidden
2048, 32 heads, 4 KV heads, intermediate 5632; random init, float32) in one prune() call: the
4 layers of lowest Block Influence (residual_branches()) removed and, with `--ratio 0.25`, a
quarter of every MLP's channels, of every layer's KV groups and of the hidden size cut
(scope="layer", L2), with
the time each call takes, the process's peak memory against the model's own size, and
greedy generate() tokens/s of the pruned model against the unpruned one, timed in
interleaved rounds. With `--inplace` the model itself is pruned (prune(inplace=True): no
second copy, which is what the peak memory shows); the unpruned model is then timed before
the call, the pruned one after, not interleaved.

    .venv/bin/python bench/depth_llm.py --threads 2             # depth and width
    .venv/bin/python bench/depth_llm.py --threads 2 --ratio 0   # depth only
    .venv/bin/python bench/depth_llm.py --threads 2 --inplace   # depth and width, in place

Writes bench/results/depth_llm.json and .md (depth_llm_inplace.* with --inplace).
"""
import resource
import time

import torch

import ffr_fast
from ffr_fast.torchvision_loader import load_torchvision

from results_io import publish_results
from timing import interleaved_medians, table_parser

load_torchvision()
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402  (after the loader)

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                 num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main():
    parser = table_parser(__doc__, threads=2, rounds=3)
    parser.add_argument("--remove", type=int, default=4, help="layers removed")
    parser.add_argument("--ratio", type=float, default=0.25,
                        help="fraction of each channel group cut: MLP, KV groups, hidden size "
                             "(0: none)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--inplace", action="store_true",
                        help="prune the model itself, not a copy")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA)).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    baseline = peak_rss_bytes()
    ids = torch.randint(0, TINYLLAMA["vocab_size"], (1, args.prompt),
                        generator=torch.Generator().manual_seed(0))

    start = time.perf_counter()
    branches = ffr_fast.residual_branches(model, ids)
    listing = time.perf_counter() - start
    removed = [b.name for b in sorted(branches, key=lambda b: b.influence)[:args.remove]]
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    def generate_seconds(steps):
        with torch.no_grad():
            return {name: min(times) for name, times in
                    interleaved_medians(steps, args.rounds, 1).items()}

    # in place, the unpruned model is gone after the call: it is timed before
    seconds = generate_seconds({"unpruned": lambda: model.generate(ids, **settings)}) \
        if args.inplace else {}
    start = time.perf_counter()
    width = dict(ratio=args.ratio, scope="layer") if args.ratio else {}
    result = ffr_fast.prune(model, ids, remove_branches=removed, inplace=args.inplace,
                            **width)
    pruning = time.perf_counter() - start
    peak = peak_rss_bytes()
    steps = {"pruned": lambda: result.model.generate(ids, **settings)}
    if not args.inplace:
        steps["unpruned"] = lambda: model.generate(ids, **settings)
    seconds.update(generate_seconds(steps))
    tokens_per_s = {name: args.new_tokens / s for name, s in seconds.items()}
    report = result.report
    data = dict(
        model=TINYLLAMA, threads=args.threads, removed=removed, ratio=args.ratio,
        inplace=args.inplace,
        config_after={k: getattr(result.model.config, k) for k in (
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "hidden_size")},
        seconds_residual_branches=listing, seconds_prune=pruning,
        model_gib=model_bytes / 2**30, peak_rss_gib=peak / 2**30,
        rss_before_pruning_gib=baseline / 2**30, peak_over_model=peak / model_bytes,
        params=[report.params_before, report.params_after],
        flops=[report.flops_before, report.flops_after], relative_diff=report.relative_diff,
        generate_tokens_per_s=tokens_per_s,
        speedup=tokens_per_s["pruned"] / tokens_per_s["unpruned"],
        rerun="python bench/depth_llm.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if not isinstance(v, bool)) + (" --inplace" if args.inplace else ""))
    call = f"prune(remove_branches=..., ratio={args.ratio}" + (
        ", inplace=True)" if args.inplace else ")")
    markdown = "\n".join([
        "# Depth and width pruning of a TinyLlama-1.1B-shaped LlamaForCausalLM", "",
        f"{args.threads} threads, random init, float32; removed (lowest Block Influence on a "
        f"{args.prompt}-token prompt): {', '.join(removed)}; ratio {args.ratio} of each "
        f"channel group (every layer's MLP channels and KV groups, and the hidden size); "
        f"config after: {data['config_after']}", "",
        "| | value |", "|---|---:|",
        f"| residual_branches() | {listing:.1f} s |",
        f"| {call} | {pruning:.1f} s |",
        f"| model size | {data['model_gib']:.2f} GiB |",
        f"| peak process memory (model included) | {data['peak_rss_gib']:.2f} GiB "
        f"({data['peak_over_model']:.2f}x the model) |",
        f"| params | {report.params_before:,} -> {report.params_after:,} |",
        f"| FLOPs (prompt forward) | {report.flop_ratio:.2f}x fewer |",
        f"| relative difference to the zeroed original | {report.relative_diff:.2g} |",
        f"| greedy generate(), {args.new_tokens} new tokens | unpruned "
        f"{tokens_per_s['unpruned']:.2f} tok/s, pruned {tokens_per_s['pruned']:.2f} tok/s "
        f"({data['speedup']:.2f}x)"
        + (" (timed before and after the call, not interleaved)" if args.inplace else "")
        + " |", "",
        f"Rerun: `{data['rerun']}`", ""])
    publish_results("depth_llm_inplace" if args.inplace else "depth_llm", data, markdown)


if __name__ == "__main__":
    main()
