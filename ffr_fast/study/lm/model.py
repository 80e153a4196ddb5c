"""The model of the language-model story: a byte-level Hugging Face LlamaForCausalLM, its
training (the LM loss plus a regularizer, or distillation from a teacher), and what is
measured of it: bits per byte and greedy generation speed."""
import math
import time
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ffr_fast.modes import evaluating
from ffr_fast.study import regularizers
from ffr_fast.study.lm.config import LMConfig
from ffr_fast.study.lm.corpus import VOCAB, training_batches
from ffr_fast.torchvision_loader import load_torchvision


def import_transformers():
    load_torchvision()  # before transformers, on a CPU-only torch
    import transformers

    return transformers


def build_model(config: LMConfig, layers: int, seed: int) -> nn.Module:
    transformers = import_transformers()
    torch.manual_seed(seed)
    settings = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=layers, num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads, max_position_embeddings=config.window +
        config.generate_tokens, bos_token_id=None, eos_token_id=None, pad_token_id=0,
        # eager attention: on CPU, with heads this small, sdpa's backward is slower
        attn_implementation="eager")
    return transformers.LlamaForCausalLM(settings)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) on the next-byte distributions, averaged over positions."""
    vocab = student_logits.shape[-1]
    return F.kl_div(F.log_softmax(student_logits.reshape(-1, vocab).float(), -1),
                    F.log_softmax(teacher_logits.reshape(-1, vocab).float(), -1),
                    log_target=True, reduction="batchmean")


def train_lm(model: nn.Module, tokens: torch.Tensor, config: LMConfig, steps: int, lr: float,
             seed: int, regularizer: str = "none", weight: float = 0.0,
             teacher: Optional[nn.Module] = None) -> List[float]:
    """AdamW with a linear warm-up and a cosine decay; the LM loss (plus the regularizer),
    or, with a `teacher`, the distillation loss alone. Returns the loss every 10 steps."""
    penalty = regularizers.build(model, regularizer, weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps))))
    torch.manual_seed(seed)  # LayerDrop's draws
    history = []
    model.train()
    try:
        batches = training_batches(tokens, config.window, config.batch_size, steps, seed)
        for step, ids in enumerate(batches):
            if teacher is None:
                loss = model(input_ids=ids, labels=ids).loss + penalty()
            else:
                with torch.no_grad():
                    target = teacher(input_ids=ids).logits
                loss = distillation_loss(model(input_ids=ids).logits, target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the training loss is {loss.item()} at step {step} "
                                         f"(lr {lr}): lower the learning rates")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % 10 == 0:
                history.append(loss.item())
    finally:
        penalty.remove()
    model.eval()
    return history


def bits_per_byte(model: nn.Module, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-byte cross-entropy in bits over the windows (every byte is one token)."""
    total, count = 0.0, 0
    with evaluating(model), torch.no_grad():
        for ids in windows.split(batch_size):
            logits = model(input_ids=ids).logits[:, :-1]
            total += float(F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1),
                                           reduction="sum"))
            count += ids[:, 1:].numel()
    return total / count / math.log(2)


def tokens_per_second(model: nn.Module, prompt: torch.Tensor, new_tokens: int,
                      repeats: int = 3) -> float:
    """Greedy generate() throughput, batch 1, the best of `repeats` runs."""
    settings = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    best = math.inf
    with evaluating(model), torch.no_grad():
        model.generate(prompt, **settings)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(prompt, **settings)
            best = min(best, time.perf_counter() - start)
    return new_tokens / best
