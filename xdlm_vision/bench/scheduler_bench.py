"""`bench scheduler`: the scheduler's step and loss against straightforward dense implementations."""

from __future__ import annotations

import logging

import torch

from xdlm_vision.bench.measure import measure
from xdlm_vision.scheduler import XDLMScheduler

logger = logging.getLogger(__name__)


def dense_step(scheduler: XDLMScheduler, logits, t: float, s: float, sample, generator):
    """Baseline step: build the dense float32 posterior `[B, L, N + 1]`, then draw from it."""
    n = scheduler.num_embeddings
    alpha_t, alpha_s = float(scheduler.alpha(t)), float(scheduler.alpha(s))
    a = alpha_t / alpha_s
    pi = scheduler.stationary_distribution(torch.float32).to(logits.device)  # (V,)
    p = torch.softmax(logits[..., :n].float(), dim=-1)  # (B, L, N)
    p = torch.cat([p, torch.zeros_like(p[..., :1])], dim=-1)  # (B, L, V)
    f_s = alpha_s * p + (1 - alpha_s) * pi  # (B, L, V)
    f_t = alpha_t * p + (1 - alpha_t) * pi  # (B, L, V)
    is_z = torch.nn.functional.one_hot(sample, n + 1).float()  # (B, L, V)
    posterior = (a * is_z + (1 - a) * pi[sample][..., None]) * f_s / f_t.gather(-1, sample[..., None])
    draws = torch.multinomial(posterior.view(-1, n + 1), 1, generator=generator)
    return draws.view(sample.shape)


def dense_loss(scheduler: XDLMScheduler, logits, noisy, tokens, t):
    """Baseline loss: the design formula with dense float32 tensors, differentiated by autograd."""
    n, k = scheduler.num_embeddings, scheduler.mixing_ratio
    alpha = scheduler.alpha(t).float()[:, None, None]  # (B, 1, 1)
    beta = 1 - alpha
    pi = scheduler.stationary_distribution(torch.float32).to(logits.device)  # (V,)
    p = torch.softmax(logits[..., :n].float(), dim=-1)  # (B, L, N)
    p = torch.cat([p, torch.zeros_like(p[..., :1])], dim=-1)  # (B, L, V)
    delta = torch.nn.functional.one_hot(tokens, n + 1).float()  # (B, L, V)
    f_delta, f_p = alpha * delta + beta * pi, alpha * p + beta * pi  # (B, L, V)

    def pick(f, index):
        return f.gather(-1, index[..., None]).squeeze(-1)  # (B, L)

    r = pi[noisy] / pick(f_delta, noisy)
    log_codebook = torch.log(f_delta[..., :n] / f_p[..., :n])  # (B, L, N)
    bracket = (
        ((noisy == tokens).float() - pick(p, noisy)) / pick(f_p, noisy)
        - torch.log(pick(f_delta, noisy) / pick(f_p, noisy)) / alpha[..., 0]
        + torch.log(pick(f_delta, tokens) / pick(f_p, tokens))
        + (beta / alpha)[..., 0] * (k / n) * log_codebook.sum(-1)
    )
    return -scheduler.alpha_derivative(t).float()[:, None] * r * bracket


def run_scheduler_bench(
    batch_size: int = 8, num_tokens: int = 256, num_embeddings: int = 16384, mixing_ratio: float = 0.1, repeats: int = 5
) -> dict:
    """Measure `step` and `loss` forward+backward against the dense baselines on the same inputs."""
    torch.manual_seed(0)
    scheduler = XDLMScheduler(num_embeddings=num_embeddings, mixing_ratio=mixing_ratio)
    scheduler.set_timesteps(8)
    vocab = scheduler.vocab_size
    logits = torch.randn(batch_size, num_tokens, vocab)  # (B, L, V)
    logits_bytes = logits.numel() * logits.element_size()
    generator = torch.Generator().manual_seed(0)

    # A mid-sampling state: the grid after three of eight steps (t = 5/8, s = 4/8).
    tokens = torch.randint(0, num_embeddings, (batch_size, num_tokens))
    t_step, s_step = float(scheduler.timesteps[3]), float(scheduler.timesteps[4])
    sample = scheduler.add_noise(tokens, t_step, generator=generator)

    logger.info("bench scheduler: B=%d L=%d N=%d, logits %.1f MiB", batch_size, num_tokens, num_embeddings, logits_bytes / 2**20)
    results: dict = {
        "shape": {"batch_size": batch_size, "num_tokens": num_tokens, "num_embeddings": num_embeddings},
        "mixing_ratio": mixing_ratio,
        "logits_bytes": logits_bytes,
        "threads": torch.get_num_threads(),
    }
    step_fast = measure(lambda: scheduler.step(logits, t_step, sample, generator=generator).prev_sample, repeats)
    step_dense = measure(lambda: dense_step(scheduler, logits, t_step, s_step, sample, generator), repeats)

    t_train = scheduler.sample_t(batch_size, generator=generator)
    noisy = scheduler.add_noise(tokens, t_train, generator=generator)
    trainable = logits.clone().requires_grad_(True)

    def loss_call(function):
        def call():
            function(trainable).sum().backward()
            trainable.grad = None

        return call

    loss_fast = measure(loss_call(lambda lg: scheduler.loss(lg, noisy, tokens, t_train)), repeats)
    loss_dense = measure(loss_call(lambda lg: dense_loss(scheduler, lg, noisy, tokens, t_train)), repeats)

    results["step"] = {"xdlm": step_fast.as_dict(logits_bytes), "dense": step_dense.as_dict(logits_bytes)}
    results["step"]["speedup"] = step_dense.median_s / step_fast.median_s
    results["loss_forward_backward"] = {"xdlm": loss_fast.as_dict(logits_bytes), "dense": loss_dense.as_dict(logits_bytes)}
    results["loss_forward_backward"]["speedup"] = loss_dense.median_s / loss_fast.median_s
    return results


def format_scheduler_table(results: dict) -> str:
    """Render the scheduler benchmark as a plain-text table."""
    lines = [f"{'operation':<24}{'impl':<8}{'median ms':>12}{'peak extra / logits':>22}"]
    for operation in ("step", "loss_forward_backward"):
        for impl in ("xdlm", "dense"):
            row = results[operation][impl]
            lines.append(f"{operation:<24}{impl:<8}{row['median_s'] * 1e3:>12.1f}{row['peak_extra_vs_reference']:>21.2f}x")
        lines.append(f"{operation:<24}{'speedup':<8}{results[operation]['speedup']:>11.1f}x")
    return "\n".join(lines)
