"""The language-model story (`ffr-fast demo-lm`): a byte-level Hugging Face LlamaForCausalLM
trained on real text, made shallower by removing decoder layers, against today's
depth-pruning baselines.

    corpus   the running interpreter's standard library sources (or any folder of text),
             split into train / validation / test by a hash of each file's relative path
    arms     no regularizer, FFR (FFRLoss on the residual stream), LayerDrop, and models of
             the pruned depths trained from scratch on the tokens of training plus healing
    rules    Block Influence (ShortGPT), Gromov et al.'s angular distance (a contiguous
             run), and dropping the last n layers before the final norm
    healing  a short fine-tune on the LM loss, and distillation from the unpruned model (KL
             on the logits, as Minitron does); the same steps for every arm

Every arm gets the same training tokens and the same learning-rate grid; the learning rate,
FFR's weight and LayerDrop's rate are chosen by one rule for all: the lowest validation bits
per byte of the model as deployed at the 50% budget (cut by the rule best on validation
straight after removal, then fine-tune healed; healing every rule of every candidate would
not fit the time budget); a scratch-trained model, deployed as it is, by its own validation
bits per byte. The chosen model of each arm is then cut by every rule at both budgets and
healed both ways; the rule reported per arm and budget is the one best on validation after
fine-tune healing. Pruning goes
through the library (residual_branches, prune(remove_branches=...)), so every pruned model
is a real, smaller LlamaForCausalLM.

The package, one concept a module: corpus (the text and its splits), config (LMConfig, the
arms and budgets), model (the Llama, its training and measures), rules (the removal rules),
runs (one seed, several seeds) and results (table, summary, figures). Every public name is
importable from ffr_fast.study.lm itself.
"""
from ffr_fast.study.lm.config import (
    HEALINGS,
    REMOVED_FRACTIONS,
    SELECTION_FRACTION,
    Arm,
    LMConfig,
    arms,
    check_config,
    kept_depths,
    removed_count,
)
from ffr_fast.study.lm.corpus import (
    DATA_SOURCES,
    SPLIT_TENTHS,
    SPLITS,
    STDLIB_EXCLUDED,
    VOCAB,
    Corpus,
    check_corpus,
    evaluation_windows,
    load_corpus,
    split_of,
    stdlib_files,
    training_batches,
)
from ffr_fast.study.lm.model import (
    bits_per_byte,
    build_model,
    distillation_loss,
    import_transformers,
    tokens_per_second,
    train_lm,
)
from ffr_fast.study.lm.results import comparisons, frontier_plot, report, summarize
from ffr_fast.study.lm.rules import (
    RULES,
    angular_distance,
    flow,
    layers_to_remove,
    residual_stream,
)
from ffr_fast.study.lm.runs import SEED_FILENAME, Windows, run, run_seed

__all__ = [
    "DATA_SOURCES", "HEALINGS", "REMOVED_FRACTIONS", "RULES", "SEED_FILENAME",
    "SELECTION_FRACTION", "SPLITS", "SPLIT_TENTHS", "STDLIB_EXCLUDED", "VOCAB", "Arm",
    "Corpus", "LMConfig", "Windows", "angular_distance", "arms", "bits_per_byte",
    "build_model", "check_config", "check_corpus", "comparisons", "distillation_loss",
    "evaluation_windows", "flow", "frontier_plot", "import_transformers", "kept_depths",
    "layers_to_remove", "load_corpus", "removed_count", "report", "residual_stream", "run",
    "run_seed", "split_of", "stdlib_files", "summarize", "tokens_per_second",
    "train_lm", "training_batches",
]
