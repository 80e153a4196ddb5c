"""The runs of the language-model story: every arm on one seed (its candidates, the one
chosen, that one's cuts and healings), and several seeds, each written to its own JSON and
read back when its settings have not changed."""
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

import ffr_fast
from ffr_fast.study import checkpoint
from ffr_fast.study.lm.config import (
    HEALINGS,
    REMOVED_FRACTIONS,
    SELECTION_FRACTION,
    LMConfig,
    arms,
    check_config,
    removed_count,
)
from ffr_fast.study.lm.corpus import Corpus, check_corpus, evaluation_windows, load_corpus
from ffr_fast.study.lm.model import (
    bits_per_byte,
    build_model,
    import_transformers,
    tokens_per_second,
    train_lm,
)
from ffr_fast.study.lm.results import report
from ffr_fast.study.lm.rules import RULES, flow, layers_to_remove

SEED_FILENAME = "seed{}.json"


@dataclass
class Windows:
    probe: torch.Tensor  # validation windows the removal rules measure on
    val: torch.Tensor
    test: torch.Tensor


def _cuts(model, config: LMConfig, corpus: Corpus, windows: Windows, seed: int, fractions,
          healings, teacher, done: Optional[Dict[str, dict]] = None,
          heal_best_only: bool = False) -> Dict[str, dict]:
    """For each budget and rule: the layers removed and the bits per byte (validation and
    test) straight after removal and after each healing; rules that remove the same layers
    share one cut and one healing. `heal_best_only` heals only the rule best on validation
    straight after removal (how candidates are scored); what `done` holds is not redone.
    The healed models come along under "_models" (left out of the JSON)."""
    results: Dict[str, dict] = dict(done or {})
    for fraction in fractions:
        keys = {rule: f"{fraction:g}/{rule}" for rule in RULES}
        plan = ({rule: results[key]["removed"] for rule, key in keys.items()}
                if all(key in results for key in keys.values()) else
                layers_to_remove(model, windows.probe, removed_count(config.layers, fraction)))
        by_layers: Dict[Tuple[str, ...], dict] = {}
        for rule, key in keys.items():
            names = tuple(plan[rule])
            if key not in results and names in by_layers:
                results[key] = by_layers[names]
            elif key not in results:
                pruned = ffr_fast.prune(model, windows.probe, remove_branches=list(names)).model
                results[key] = {"removed": list(names), "_models": {"pruned": pruned},
                                "pruned": {"val": bits_per_byte(pruned, windows.val),
                                           "test": bits_per_byte(pruned, windows.test)}}
            by_layers[names] = results[key]
        entries = list(by_layers.values())
        if heal_best_only:
            entries = [min(entries, key=lambda e: e["pruned"]["val"])]
        for entry in entries:
            for healing in healings:
                if healing in entry:
                    continue
                healed = copy.deepcopy(entry["_models"]["pruned"])
                train_lm(healed, corpus.splits["train"], config, config.heal_steps,
                         config.heal_lr, seed + 1000,
                         teacher=teacher if healing == "distill" else None)
                entry[healing] = {"val": bits_per_byte(healed, windows.val),
                                  "test": bits_per_byte(healed, windows.test)}
                entry["_models"][healing] = healed
    return results


def _selection_score(cuts: Dict[str, dict]) -> float:
    """The lowest validation bits per byte at the selection budget after fine-tune healing."""
    return min(cuts[f"{SELECTION_FRACTION:g}/{rule}"].get("finetune", {"val": math.inf})["val"]
               for rule in RULES)


def run_seed(config: LMConfig, corpus: Corpus, seed: int, progress=print) -> dict:
    """Every arm on one seed: the candidates of each arm, the chosen one, its cuts."""
    torch.set_num_threads(config.threads)
    windows = Windows(evaluation_windows(corpus.splits["val"], config.window, 8),
                      evaluation_windows(corpus.splits["val"], config.window, config.eval_windows),
                      evaluation_windows(corpus.splits["test"], config.window,
                                         config.eval_windows))
    train_tokens = corpus.splits["train"]
    record = {"seed": seed, "arms": {}}
    chosen_models = {}
    for arm in arms(config):
        started = time.perf_counter()
        candidates = []
        for lr in config.lrs:
            for weight in arm.weights:
                depth = arm.layers or config.layers
                # a scratch model trains on the tokens of training plus healing
                steps = config.steps + (config.heal_steps if arm.layers else 0)
                model = build_model(config, depth, seed)
                history = train_lm(model, train_tokens, config, steps, lr, seed,
                                   arm.regularizer, weight)
                candidate = {"lr": lr, "weight": weight, "history": history,
                             "unpruned": {"val": bits_per_byte(model, windows.val),
                                          "test": bits_per_byte(model, windows.test)}}
                if arm.layers:
                    candidate["score"] = candidate["unpruned"]["val"]
                else:
                    candidate["cuts"] = _cuts(model, config, corpus, windows, seed,
                                              [SELECTION_FRACTION], ("finetune",), None,
                                              heal_best_only=True)
                    candidate["score"] = _selection_score(candidate["cuts"])
                candidates.append((candidate, model))
                progress(f"seed {seed} {arm.name} lr {lr:g} weight {weight:g}: val bpb "
                         f"{candidate['unpruned']['val']:.3f}, score {candidate['score']:.3f} "
                         f"({time.process_time() / config.threads:.0f} CPU s per thread)")
        best, model = min(candidates, key=lambda pair: pair[0]["score"])
        if not arm.layers:  # the chosen model's remaining budgets and distillation
            more = _cuts(model, config, corpus, windows, seed, REMOVED_FRACTIONS, HEALINGS,
                         teacher=model, done=best["cuts"])
            best["cuts"] = more
            best["best_rule"] = {f"{f:g}": min(RULES, key=lambda r: more[f"{f:g}/{r}"]
                                               ["finetune"]["val"]) for f in REMOVED_FRACTIONS}
            best["flow"] = flow(model, windows.test[:32])
        chosen_models[arm.name] = (model, best)
        record["arms"][arm.name] = {
            "chosen": {k: v for k, v in best.items() if k != "cuts"} | {
                "cuts": _public(best.get("cuts", {}))},
            "candidates": [{k: v for k, v in c.items() if k not in ("cuts", "history")}
                           | {"cuts": _public(c.get("cuts", {}))} for c, _ in candidates],
            "seconds": time.perf_counter() - started}
    record["generate_tokens_per_s"] = _throughput(config, chosen_models, windows)
    return record


def _public(cuts: Dict[str, dict]) -> Dict[str, dict]:
    return {key: {k: v for k, v in entry.items() if k != "_models"}
            for key, entry in cuts.items()}


def _throughput(config: LMConfig, chosen, windows: Windows) -> Dict[str, float]:
    """Greedy tokens/s of the FFR arm's unpruned model and its fine-tuned pruned models."""
    model, best = chosen["ffr"]
    prompt = windows.test[:1, :16]
    speeds = {str(config.layers): tokens_per_second(model, prompt, config.generate_tokens)}
    for fraction in REMOVED_FRACTIONS:
        entry = best["cuts"][f"{fraction:g}/{best['best_rule'][f'{fraction:g}']}"]
        pruned = entry["_models"]["finetune"]
        speeds[str(pruned.config.num_hidden_layers)] = tokens_per_second(
            pruned, prompt, config.generate_tokens)
    return speeds


def _settings(config: LMConfig, corpus: Corpus) -> dict:
    return {"config": asdict(config), "corpus": corpus.describe(),
            "torch": torch.__version__, "transformers": import_transformers().__version__}


def run(config: LMConfig, out: Optional[str] = None, seeds: Sequence[int] = (0,),
        progress: bool = True) -> dict:
    """Each seed in `seeds` (a seed whose JSON in `out` was written with the same settings
    and corpus is read back, not rerun), then the table and figures over them."""
    check_config(config)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError("--seed needs at least one seed, each once")
    out = Path(out or "results/demo-lm")
    corpus = load_corpus(config.data, config.data_root)
    check_corpus(corpus, config.window)
    settings = json.loads(json.dumps(_settings(config, corpus)))
    say = print if progress else (lambda *_: None)
    records = []
    for seed in seeds:
        path = out / SEED_FILENAME.format(seed)
        if path.exists():
            stored = json.loads(path.read_text())
            if stored.get("settings") == settings:
                say(f"seed {seed}: read back from {path} (same settings and corpus)")
                records.append(stored)
                continue
        started, cpu_started = time.perf_counter(), time.process_time()
        record = run_seed(config, corpus, seed, say)
        record["settings"] = settings
        record["seconds"] = time.perf_counter() - started
        # the CPU time over the threads: the wall time on cores nothing else shares
        record["cpu_seconds_per_thread"] = (time.process_time() - cpu_started) / config.threads
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_json(path, record)
        records.append(record)
    return report(config, records, out)
