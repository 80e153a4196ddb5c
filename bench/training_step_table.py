"""What FFRLoss adds to a training step (forward, loss, backward, optimizer step) without a
regularizer, with FFRLoss on the fused op (all chains in one call), and with FFRLoss on the
eager plain-PyTorch reference, for one of three models (`--model`):

    resnet56    CIFAR ResNet-56 (32x32 inputs, cross-entropy, SGD); FFRLoss on its blocks
    demo-lm     the LM demo's byte-level LlamaForCausalLM (8 layers, width 64, 128 bytes)
    gpt2-small  a GPT-2-small-shaped GPT2LMHeadModel (12 layers, width 768, 256 tokens)
The language models train with AdamW on their LM loss, FFRLoss with no layer list (the
residual stream: embedding output and every layer's output, found on the warm-up step).
Targets (the README's measured-speed table): on ResNet-56 FFRLoss (op) adds <= 2% at batch
128 and <= 5% at batch 8; on the language models <= 3%.

The three steps are timed in interleaved rounds, so slow drift of a shared machine hits them
alike (each round's time is the median of 5 steps when one step is short); the table gives
each median and, per round, the ratio to the unregularized step.

    .venv/bin/python bench/training_step_table.py [--model resnet56] [--rounds 7]
        [--batch 128] [--threads N]

writes bench/results/training_step[_MODEL][_bBATCH].json and .md (ResNet-56 at batch 128:
training_step).
"""
import os
import platform
import statistics

import torch
import torch.nn.functional as F

from ffr_fast import FFRLoss, models
from ffr_fast.flow import ops, reference
from ffr_fast.torchvision_loader import load_torchvision

from results_io import publish_results
from timing import interleaved_medians, table_parser

# name -> (whether FFRLoss is on, its penalty_fn: None is the shipped one-call op)
VARIANTS = {
    "no regularizer": (False, None),
    "FFRLoss (fused op)": (True, None),
    "FFRLoss (eager reference)": (True, reference.flow_penalty),
}
# The README's targets, by model and batch size (any batch for the language models).
TARGET_OVERHEAD = {("resnet56", 128): 0.02, ("resnet56", 8): 0.05,
                   ("demo-lm", None): 0.03, ("gpt2-small", None): 0.03}
LM_SEQUENCE = {"demo-lm": 128, "gpt2-small": 256}
MODEL_LABELS = {"resnet56": "CIFAR ResNet-56 (32x32)",
                "demo-lm": "LM demo's LlamaForCausalLM (8 x 64, 128 bytes)",
                "gpt2-small": "GPT-2-small-shaped GPT2LMHeadModel (12 x 768, 256 tokens)"}


def target_overhead(model: str, batch: int):
    return TARGET_OVERHEAD.get((model, batch), TARGET_OVERHEAD.get((model, None)))


def _language_model(name: str) -> torch.nn.Module:
    load_torchvision()  # before transformers, on a CPU-only torch
    import transformers

    if name == "gpt2-small":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=12, n_embd=768, n_head=12, n_positions=1024))
    from ffr_fast.study import lm

    return lm.build_model(lm.LMConfig(), lm.LMConfig().layers, seed=0)


def make_training_step(variant: str, batch: int = 128, seed: int = 0, device="cpu",
                       model_name: str = "resnet56"):
    """A closure running one full training step of a fresh `model_name` on a fixed batch
    (gpu_check.py times the ResNet-56 step on CUDA)."""
    torch.manual_seed(seed)
    regularized, penalty_fn = VARIANTS[variant]
    if model_name == "resnet56":
        model = models.resnet56().to(device).train()
        x = torch.randn(batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def task_loss():
            return F.cross_entropy(model(x), y)
    else:
        model = _language_model(model_name).to(device).train()
        ids = torch.randint(0, model.config.vocab_size, (batch, LM_SEQUENCE[model_name]),
                            device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def task_loss():
            return model(input_ids=ids, labels=ids).loss
    ffr = FFRLoss(model, penalty_fn=penalty_fn) if regularized else None

    def step() -> None:
        loss = task_loss()
        if ffr is not None:
            loss = loss + ffr()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def steps_per_round(model_name: str, batch: int) -> int:
    short = batch < 64 if model_name == "resnet56" else model_name == "demo-lm"
    return 5 if short else 1  # a short step is noisier


def measure(model_name: str, rounds: int, batch: int) -> dict:
    steps = {name: make_training_step(name, batch, model_name=model_name) for name in VARIANTS}
    for step in steps.values():  # warm-up: allocator, kernels, lazy imports, layer discovery
        step()
    seconds = interleaved_medians(steps, rounds, steps_per_round(model_name, batch))
    baseline = seconds["no regularizer"]
    return {
        name: {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "times_s": times,
            "median_ratio_to_no_regularizer": statistics.median(
                t / b for t, b in zip(times, baseline)),
        }
        for name, times in seconds.items()
    }


def markdown(report: dict) -> str:
    lines = [
        f"# {report['model_label']} training step, batch {report['batch']}, CPU",
        "",
        f"Rerun: `{report['command']}`",
        "",
        f"Machine: {report['machine']}; torch {report['torch']}, {report['threads']} threads; "
        f"compiled CPU kernel: {report['compiled_cpu_kernel']}; load average before/after "
        f"{report['load_before']} / {report['load_after']} (a shared machine: read ratios "
        f"within a few percent as noise). {report['rounds']} interleaved rounds after one "
        f"warm-up step each; a round's time is the median of {report['steps_per_round']} "
        "step(s).",
        "",
        "| step | median (s) | min (s) | median ratio to no regularizer |",
        "|---|---|---|---|",
    ]
    for name, row in report["variants"].items():
        lines.append(f"| {name} | {row['median_s']:.3f} | {row['min_s']:.3f} | "
                     f"{row['median_ratio_to_no_regularizer']:.3f} |")
    target = report["target_overhead"]
    if target is not None:
        lines += ["", f"Target: FFRLoss (fused op) adds <= {target:.0%} to the step at batch "
                      f"{report['batch']}: {'met' if report['target_met'] else 'NOT met'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = table_parser(__doc__, threads=None, batch=128)
    parser.add_argument("--model", default="resnet56", choices=MODEL_LABELS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = [round(x, 2) for x in os.getloadavg()]
    variants = measure(args.model, args.rounds, args.batch)
    report = {
        "command": f".venv/bin/python bench/training_step_table.py --model {args.model} "
                   f"--rounds {args.rounds} --batch {args.batch} --threads {args.threads}",
        "model": args.model,
        "model_label": MODEL_LABELS[args.model],
        "batch": args.batch,
        "rounds": args.rounds,
        "steps_per_round": steps_per_round(args.model, args.batch),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "compiled_cpu_kernel": ops.has_compiled_kernel("cpu"),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "variants": variants,
        "target_overhead": target_overhead(args.model, args.batch),
    }
    overhead = variants["FFRLoss (fused op)"]["median_ratio_to_no_regularizer"] - 1
    report["target_met"] = (None if report["target_overhead"] is None
                            else overhead <= report["target_overhead"])
    table = markdown(report)
    name = "training_step" + ("" if args.model == "resnet56" else f"_{args.model}")
    publish_results(name if (args.model, args.batch) == ("resnet56", 128)
                    else f"{name}_b{args.batch}", report, table)


if __name__ == "__main__":
    main()
