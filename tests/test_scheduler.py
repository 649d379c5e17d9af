"""XDLMScheduler against independent float64 references: transition matrices, Bayes' rule, KL limits."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from xdlm_vision import XDLMScheduler

MIXING_RATIOS = [0.0, 0.1, 0.5, 1.0, 0.37]  # the last one stands for an arbitrary k


# ---------------------------------------------------------------- independent references


def stationary(n: int, k: float) -> np.ndarray:
    pi = np.full(n + 1, k / n)
    pi[n] = 1.0 - k
    return pi


def alpha_of(t: float, schedule: str) -> float:
    if schedule == "log-linear":
        return 1.0 - t
    return 0.0 if t >= 1.0 else math.cos(0.5 * math.pi * t)


def alpha_derivative_of(t: float, schedule: str) -> float:
    if schedule == "log-linear":
        return -1.0
    return -0.5 * math.pi * math.sin(0.5 * math.pi * t)


def marginal_matrix(alpha: float, pi: np.ndarray) -> np.ndarray:
    """Rows x over all states, columns e: q(z = e | x) = alpha [x = e] + (1 - alpha) pi(e)."""
    v = pi.shape[0]
    return alpha * np.eye(v) + (1.0 - alpha) * np.outer(np.ones(v), pi)


def transition_matrix(alpha_s: float, alpha_t: float, pi: np.ndarray) -> np.ndarray:
    """Rows z_s, columns z_t: q(z_t | z_s) = a [z_s = z_t] + (1 - a) pi(z_t), a = alpha_t / alpha_s."""
    return marginal_matrix(alpha_t / alpha_s, pi)


def bayes_posterior(p: np.ndarray, z: int, alpha_s: float, alpha_t: float, pi: np.ndarray) -> np.ndarray:
    """p(z_s | z_t = z) by Bayes' rule over the explicit joint of x ~ p, z_s | x, z_t | z_s."""
    n = p.shape[0]
    m_s = marginal_matrix(alpha_s, pi)[:n]  # rows: clean codebook tokens x
    trans = transition_matrix(alpha_s, alpha_t, pi)
    joint = p[:, None] * m_s * trans[:, z][None, :]  # (x, z_s)
    marginal = joint.sum(axis=0)
    return marginal / marginal.sum()


def dense_loss_reference(p: np.ndarray, x: int, z: int, t: float, k: float, schedule: str) -> float:
    """The per-token NELBO of the design formula, written densely in float64."""
    n = p.shape[0]
    pi = stationary(n, k)
    alpha, beta = alpha_of(t, schedule), 1.0 - alpha_of(t, schedule)
    p_full = np.append(p, 0.0)
    delta = np.zeros(n + 1)
    delta[x] = 1.0
    f_delta = alpha * delta + beta * pi
    f_p = alpha * p_full + beta * pi
    r = pi[z] / f_delta[z]
    if r == 0.0:
        return 0.0
    codebook = slice(0, n)
    sum_term = np.sum(pi[codebook] * np.log(f_delta[codebook] / f_p[codebook])) if k > 0 else 0.0
    bracket = (
        (float(z == x) - p_full[z]) / f_p[z]
        - np.log(f_delta[z] / f_p[z]) / alpha
        + np.log(f_delta[x] / f_p[x])
        + beta / alpha * sum_term
    )
    return -alpha_derivative_of(t, schedule) * r * bracket


def kl_limit_reference(p: np.ndarray, x: int, z: int, t: float, k: float, schedule: str) -> float:
    """-alpha'_t * lim_{s -> t} KL(q(z_s | z_t, x) || p(z_s | z_t)) / (alpha_s - alpha_t), by Richardson."""
    n = p.shape[0]
    pi = stationary(n, k)
    delta = np.zeros(n)
    delta[x] = 1.0

    def ratio(h: float) -> float:
        s = t - h
        alpha_s, alpha_t = alpha_of(s, schedule), alpha_of(t, schedule)
        q = bayes_posterior(delta, z, alpha_s, alpha_t, pi)
        model = bayes_posterior(p, z, alpha_s, alpha_t, pi)
        support = q > 0
        kl = float(np.sum(q[support] * np.log(q[support] / model[support])))
        return kl / (alpha_s - alpha_t)

    h = 1e-4 * min(t, 1.0)
    return -alpha_derivative_of(t, schedule) * (2.0 * ratio(h / 2.0) - ratio(h))


def random_case(rng: np.random.Generator, n: int, k: float, t: float):
    """A random model distribution, clean token and a noised token that the forward process can produce."""
    logits = rng.normal(scale=2.0, size=n)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    x = int(rng.integers(n))
    z = int(rng.choice(n + 1, p=marginal_matrix(1.0 - t, stationary(n, k))[x]))
    return logits, p, x, z


# ---------------------------------------------------------------- 1. dense posterior vs Bayes


@pytest.mark.parametrize("k", MIXING_RATIOS)
@pytest.mark.parametrize("schedule", ["log-linear", "cosine"])
def test_posterior_matches_bayes_rule(k, schedule):
    rng = np.random.default_rng(1)
    for _ in range(6):
        n = int(rng.integers(2, 7))
        scheduler = XDLMScheduler(num_embeddings=n, mixing_ratio=k, noise_schedule=schedule)
        t = float(rng.uniform(0.05, 1.0))
        s = float(rng.uniform(0.0, t))
        logits = torch.tensor(rng.normal(size=(1, n + 1)), dtype=torch.float64)[None]  # (1, 1, V)
        p = torch.softmax(logits[0, 0, :n], -1).numpy()
        pi = stationary(n, k)
        for z in range(n + 1):
            if pi[z] == 0.0 and t == 1.0:
                continue
            if k == 1.0 and z == n:
                continue
            dense = scheduler.posterior(logits, torch.tensor([[z]]), t, s)[0, 0].numpy()
            expected = bayes_posterior(p, z, alpha_of(s, schedule), alpha_of(t, schedule), pi)
            np.testing.assert_allclose(dense, expected, rtol=1e-10, atol=1e-12)


def test_marginals_compose_through_transitions():
    pi = stationary(5, 0.3)
    composed = marginal_matrix(0.8, pi) @ transition_matrix(0.8, 0.3, pi)
    np.testing.assert_allclose(composed, marginal_matrix(0.3, pi), atol=1e-12)


# ---------------------------------------------------------------- 2. step draws vs dense posterior


def chi_square_pvalue(counts: np.ndarray, probabilities: np.ndarray) -> float:
    """Chi-square goodness of fit; bins with tiny expectation are merged, zero-probability bins must stay empty."""
    total = counts.sum()
    assert counts[probabilities == 0].sum() == 0, f"draws landed on impossible states: {counts}, {probabilities}"
    expected = probabilities * total
    order = np.argsort(expected)
    merged_counts, merged_expected = [], []
    acc_count, acc_expected = 0.0, 0.0
    for i in order:
        if probabilities[i] == 0:
            continue
        acc_count += counts[i]
        acc_expected += expected[i]
        if acc_expected >= 20:
            merged_counts.append(acc_count)
            merged_expected.append(acc_expected)
            acc_count, acc_expected = 0.0, 0.0
    if acc_expected > 0:
        if merged_counts:
            merged_counts[-1] += acc_count
            merged_expected[-1] += acc_expected
        else:
            merged_counts.append(acc_count)
            merged_expected.append(acc_expected)
    if len(merged_counts) < 2:
        return 1.0
    return float(stats.chisquare(merged_counts, merged_expected).pvalue)


@pytest.mark.parametrize("k", MIXING_RATIOS)
@pytest.mark.parametrize("step_index", [0, 2, 3], ids=["first", "middle", "last"])
def test_step_draws_match_posterior(k, step_index):
    n, repeats = 4, 6000
    scheduler = XDLMScheduler(num_embeddings=n, mixing_ratio=k)
    scheduler.set_timesteps(4)
    t = float(scheduler.timesteps[step_index])
    s = float(scheduler.timesteps[step_index + 1]) if step_index + 1 < 4 else 0.0
    pi = stationary(n, k)
    generator = torch.Generator().manual_seed(100 + step_index)

    # Every state that has positive probability at time t, each with its own random logits row.
    states = [z for z in range(n + 1) if (pi[z] > 0 or t < 1.0) and not (k == 1.0 and z == n)]
    if k == 0.0 and t < 1.0:
        states = list(range(n + 1))
    rows = torch.randn(len(states), n + 1, dtype=torch.float32, generator=torch.Generator().manual_seed(7))
    logits = rows.repeat_interleave(repeats, 0)[None]  # (1, S * R, V)
    sample = torch.tensor(states).repeat_interleave(repeats)[None]  # (1, S * R)

    out = scheduler.step(logits, scheduler.timesteps[step_index], sample, generator=generator)
    dense = scheduler.posterior(logits[:, ::repeats], sample[:, ::repeats], t, s)[0].numpy()
    for i, z in enumerate(states):
        draws = out.prev_sample[0, i * repeats : (i + 1) * repeats].numpy()
        counts = np.bincount(draws, minlength=n + 1)
        assert chi_square_pvalue(counts, dense[i]) > 1e-3, (z, counts, dense[i])
    if s == 0.0:
        assert not bool((out.prev_sample == n).any()), "a mask survived the final step"


def test_step_is_reproducible_with_seed():
    scheduler = XDLMScheduler(num_embeddings=16, mixing_ratio=0.1)
    scheduler.set_timesteps(8)
    logits = torch.randn(3, 10, 17)
    sample = scheduler.sample_prior((3, 10), generator=torch.Generator().manual_seed(0))
    first = scheduler.step(logits, scheduler.timesteps[0], sample, generator=torch.Generator().manual_seed(5))
    second = scheduler.step(logits, scheduler.timesteps[0], sample, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.prev_sample, second.prev_sample)
    assert torch.equal(first.pred_original_sample, logits[..., :16].argmax(-1))


def test_generator_list_gives_per_row_streams():
    scheduler = XDLMScheduler(num_embeddings=16, mixing_ratio=0.1)
    scheduler.set_timesteps(4)
    logits = torch.randn(2, 12, 17)
    sample = scheduler.sample_prior((2, 12), generator=torch.Generator().manual_seed(0))
    pair = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    both = scheduler.step(logits, 1.0, sample, generator=pair).prev_sample
    alone = scheduler.step(logits[1:], 1.0, sample[1:], generator=[torch.Generator().manual_seed(2)]).prev_sample
    assert torch.equal(both[1:], alone)


# ---------------------------------------------------------------- 3. loss vs the KL limit


@pytest.mark.parametrize("k", MIXING_RATIOS)
@pytest.mark.parametrize("schedule", ["log-linear", "cosine"])
def test_loss_equals_kl_limit(k, schedule):
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(12):
        n = int(rng.integers(2, 9))
        t = float(rng.uniform(0.05, 0.95))
        logits, p, x, z = random_case(rng, n, k, t)
        scheduler = XDLMScheduler(num_embeddings=n, mixing_ratio=k, noise_schedule=schedule)
        full_logits = torch.tensor(np.append(logits, -np.inf), dtype=torch.float64)[None, None]  # (1, 1, V)
        value = float(scheduler.loss(full_logits, torch.tensor([[z]]), torch.tensor([[x]]), t))
        reference = kl_limit_reference(p, x, z, t, k, schedule)
        assert value == pytest.approx(reference, rel=1e-5, abs=1e-9), (n, t, x, z)
        assert value == pytest.approx(dense_loss_reference(p, x, z, t, k, schedule), rel=1e-10, abs=1e-12)
        checked += 1
    assert checked == 12


def test_loss_gradient_matches_autograd_of_dense_reference():
    torch.manual_seed(0)
    for k in MIXING_RATIOS:
        n, batch, length = 6, 2, 5
        scheduler = XDLMScheduler(num_embeddings=n, mixing_ratio=k)
        tokens = torch.randint(0, n, (batch, length))
        t = torch.tensor([0.3, 0.8], dtype=torch.float64)
        noisy = scheduler.add_noise(tokens, t, generator=torch.Generator().manual_seed(1))
        logits = torch.randn(batch, length, n + 1, dtype=torch.float64, requires_grad=True)
        torch.autograd.gradcheck(lambda lg: scheduler.loss(lg, noisy, tokens, t), (logits,))

        # Independent reference: the dense formula through autograd.
        dense_logits = logits.detach().clone().requires_grad_(True)
        pi = torch.tensor(stationary(n, k))
        alpha = (1.0 - t)[:, None, None]
        p = torch.cat([torch.softmax(dense_logits[..., :n], -1), torch.zeros(batch, length, 1, dtype=torch.float64)], -1)
        delta = torch.nn.functional.one_hot(tokens, n + 1).double()
        f_delta, f_p = alpha * delta + (1 - alpha) * pi, alpha * p + (1 - alpha) * pi
        pick = lambda f, idx: f.gather(-1, idx[..., None]).squeeze(-1)  # noqa: E731
        r = pi[noisy] / pick(f_delta, noisy)
        log_codebook = torch.log(f_delta[..., :n] / f_p[..., :n]) if k > 0 else torch.zeros_like(f_p[..., :n])
        bracket = (
            ((noisy == tokens).double() - pick(p, noisy)) / pick(f_p, noisy)
            - torch.log(pick(f_delta, noisy) / pick(f_p, noisy)) / alpha[..., 0]
            + torch.log(pick(f_delta, tokens) / pick(f_p, tokens))
            + ((1 - alpha) / alpha)[..., 0] * (pi[:n] * log_codebook).sum(-1)
        )
        dense = torch.where(r == 0, torch.zeros_like(r), r * bracket)
        weights = torch.rand(batch, length, dtype=torch.float64)
        (dense * weights).sum().backward()
        (scheduler.loss(logits, noisy, tokens, t) * weights).sum().backward()
        torch.testing.assert_close(logits.grad, dense_logits.grad, rtol=1e-9, atol=1e-11)
        assert torch.all(logits.grad[..., n] == 0), "the mask logit must get no gradient"


# ---------------------------------------------------------------- 4. MDLM and UDLM limits


def test_mdlm_limit_loss_is_masked_cross_entropy():
    n = 11
    scheduler = XDLMScheduler(num_embeddings=n, mixing_ratio=0.0)
    tokens = torch.randint(0, n, (4, 30), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.4, 0.7, 0.99], dtype=torch.float64)
    noisy = scheduler.add_noise(tokens, t, generator=torch.Generator().manual_seed(1))
    logits = torch.randn(4, 30, n + 1, dtype=torch.float64)
    loss = scheduler.loss(logits, noisy, tokens, t)
    log_p = torch.log_softmax(logits[..., :n], -1).gather(-1, tokens[..., None]).squeeze(-1)
    mdlm = torch.where(noisy == n, -log_p / t[:, None], torch.zeros_like(log_p))  # -alpha'/beta = 1/t
    torch.testing.assert_close(loss, mdlm, rtol=1e-12, atol=1e-12)
    assert bool((noisy == n).any()), "the case needs masked tokens"
    assert bool((noisy != n).any()), "the case needs unmasked tokens"


def test_mdlm_limit_step_is_ancestral_unmasking():
    n, repeats = 5, 20000
    scheduler = XDLMScheduler(num_embeddings=n, mixing_ratio=0.0)
    scheduler.set_timesteps(4)
    t, s = 0.75, 0.5
    logits = torch.randn(1, 1, n + 1).expand(1, repeats, n + 1).contiguous()
    sample = torch.full((1, repeats), n)
    out = scheduler.step(logits, t, sample, generator=torch.Generator().manual_seed(3)).prev_sample[0]
    p = torch.softmax(logits[0, 0, :n].double(), -1).numpy()
    # MDLM: stay masked with probability (1 - alpha_s) / (1 - alpha_t) = s / t, else unmask to a draw from p.
    expected = np.append((1 - s / t) * p, s / t)
    assert chi_square_pvalue(np.bincount(out.numpy(), minlength=n + 1), expected) > 1e-3
    # Unmasked tokens are never changed.
    unmasked = torch.randint(0, n, (1, 50))
    kept = scheduler.step(torch.randn(1, 50, n + 1), t, unmasked, generator=torch.Generator().manual_seed(4))
    assert torch.equal(kept.prev_sample, unmasked)


def test_udlm_limit_never_uses_mask():
    n = 7
    scheduler = XDLMScheduler(num_embeddings=n, mixing_ratio=1.0)
    assert scheduler.mask_token_id is None
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, n, (8, 64), generator=generator)
    assert not bool((scheduler.add_noise(tokens, 0.999, generator=generator) == n).any())
    sample = scheduler.sample_prior((8, 64), generator=generator)
    assert not bool((sample == n).any())
    scheduler.set_timesteps(5)
    for timestep in scheduler.timesteps:
        sample = scheduler.step(torch.randn(8, 64, n + 1), timestep, sample, generator=generator).prev_sample
        assert not bool((sample == n).any())
    with pytest.raises(ValueError, match="allowed ids are 0..6"):
        scheduler.loss(torch.randn(1, 2, n + 1), torch.tensor([[n, 0]]), torch.tensor([[0, 0]]), 0.5)


# ---------------------------------------------------------------- 5. forward marginals


@pytest.mark.parametrize("k", MIXING_RATIOS)
def test_add_noise_matches_forward_marginal(k):
    n, count = 6, 30000
    scheduler = XDLMScheduler(num_embeddings=n, mixing_ratio=k, noise_schedule="cosine")
    tokens = torch.full((3, count), 2)
    t = torch.tensor([0.2, 0.6, 1.0])
    noisy = scheduler.add_noise(tokens, t, generator=torch.Generator().manual_seed(11))
    pi = stationary(n, k)
    for row in range(3):
        expected = marginal_matrix(alpha_of(float(t[row]), "cosine"), pi)[2]
        counts = np.bincount(noisy[row].numpy(), minlength=n + 1)
        assert chi_square_pvalue(counts, expected) > 1e-3, (row, counts, expected)


def test_prior_matches_stationary_distribution():
    scheduler = XDLMScheduler(num_embeddings=5, mixing_ratio=0.3)
    draws = scheduler.sample_prior((4, 10000), generator=torch.Generator().manual_seed(2))
    counts = np.bincount(draws.flatten().numpy(), minlength=6)
    assert chi_square_pvalue(counts, stationary(5, 0.3)) > 1e-3


def test_sample_t_is_stratified_within_bounds():
    scheduler = XDLMScheduler(num_embeddings=5, eps=1e-3)
    t = scheduler.sample_t(64, generator=torch.Generator().manual_seed(0))
    assert t.shape == (64,)
    assert float(t.min()) >= 1e-3
    assert float(t.max()) <= 1 - 1e-3
    # One draw per stratum of width 1/64.
    strata = torch.floor((t.double() - 1e-3) / (1 - 2e-3) * 64).long()
    assert sorted(strata.tolist()) == list(range(64))


# ---------------------------------------------------------------- 6. float32 against float64


@pytest.mark.parametrize("n", [16, 1024, 65536])
@pytest.mark.parametrize("k", [0.0, 0.1, 1.0])
def test_float32_loss_within_1e4_of_float64(n, k):
    batch, length = 6, 4
    scheduler = XDLMScheduler(num_embeddings=n, mixing_ratio=k)
    generator = torch.Generator().manual_seed(n)
    tokens = torch.randint(0, n, (batch, length), generator=generator)
    t = torch.tensor([1e-3, 0.01, 0.3, 0.7, 0.99, 1 - 1e-3], dtype=torch.float64)
    noisy = scheduler.add_noise(tokens, t, generator=generator)
    logits64 = torch.randn(batch, length, n + 1, dtype=torch.float64, generator=generator) * 3
    logits32 = logits64.float().requires_grad_(True)

    loss64 = scheduler.loss(logits64, noisy, tokens, t)
    loss32 = scheduler.loss(logits32, noisy, tokens, t.float())
    assert loss32.dtype == torch.float32
    relative = (loss32.detach().double() - loss64).abs() / loss64.abs().clamp_min(1e-30)
    nonzero = loss64 != 0
    assert float(relative[nonzero].detach().max()) < 1e-4
    assert torch.all(loss32[~nonzero] == 0)

    loss32.sum().backward()
    assert torch.isfinite(loss32).all()
    assert torch.isfinite(logits32.grad).all()


# ---------------------------------------------------------------- guidance, config and input checks


def test_guidance_scale_one_is_conditional():
    scheduler = XDLMScheduler(num_embeddings=9)
    cond, uncond = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    guided = scheduler.apply_guidance(cond, uncond, 1.0)
    torch.testing.assert_close(guided[..., :9], torch.log_softmax(cond[..., :9], -1))
    assert torch.all(guided[..., 9] == float("-inf"))


def test_guidance_matches_formula():
    scheduler = XDLMScheduler(num_embeddings=9)
    cond, uncond = torch.randn(2, 3, 10, dtype=torch.float64), torch.randn(2, 3, 10, dtype=torch.float64)
    w = 2.5
    mixed = w * torch.log_softmax(cond[..., :9], -1) + (1 - w) * torch.log_softmax(uncond[..., :9], -1)
    expected = mixed - torch.logsumexp(mixed, -1, keepdim=True)
    guided = scheduler.apply_guidance(cond, uncond, w)
    torch.testing.assert_close(guided[..., :9], expected, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(guided[..., :9]).all()


def test_config_round_trip(tmp_path):
    scheduler = XDLMScheduler(num_embeddings=300, mixing_ratio=0.25, noise_schedule="cosine", eps=1e-4)
    scheduler.save_pretrained(tmp_path)
    loaded = XDLMScheduler.from_pretrained(tmp_path)
    assert loaded.config.num_embeddings == 300
    assert loaded.config.mixing_ratio == 0.25
    assert loaded.config.noise_schedule == "cosine"
    assert loaded.mask_token_id == 300
    assert loaded.vocab_size == 301


def test_timesteps_are_evenly_spaced_from_one():
    scheduler = XDLMScheduler(num_embeddings=4)
    scheduler.set_timesteps(8)
    torch.testing.assert_close(scheduler.timesteps, torch.tensor([1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_embeddings": 8, "mixing_ratio": 1.5}, ValueError, "mixing_ratio"),
        ({"num_embeddings": 8, "mixing_ratio": -0.1}, ValueError, "mixing_ratio"),
        ({"num_embeddings": 0}, ValueError, "num_embeddings"),
        ({"num_embeddings": 8.0}, TypeError, "num_embeddings"),
        ({"num_embeddings": 8, "noise_schedule": "linear"}, ValueError, "noise_schedule"),
        ({"num_embeddings": 8, "eps": "a"}, TypeError, "eps"),
    ],
)
def test_invalid_config_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        XDLMScheduler(**kwargs)


def test_invalid_inputs_rejected():
    n = 8
    scheduler = XDLMScheduler(num_embeddings=n, mixing_ratio=0.1)
    tokens = torch.randint(0, n, (2, 5))
    logits = torch.randn(2, 5, n + 1)
    with pytest.raises(ValueError, match="token ids"):
        scheduler.add_noise(torch.full((2, 5), n), 0.5)
    with pytest.raises(ValueError, match="token ids"):
        scheduler.add_noise(torch.full((2, 5), -1), 0.5)
    with pytest.raises(TypeError, match="integer"):
        scheduler.add_noise(tokens.float(), 0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        scheduler.add_noise(tokens, 0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        scheduler.add_noise(tokens, torch.tensor([0.5, 1.2]))
    with pytest.raises(ValueError, match="shape"):
        scheduler.add_noise(tokens, torch.tensor([0.5, 0.2, 0.1]))
    with pytest.raises(ValueError, match="smaller than t"):
        scheduler.posterior(logits, tokens, 0.5, 0.5)
    with pytest.raises(ValueError, match="vocab_size"):
        scheduler.loss(torch.randn(2, 5, n), tokens, tokens, 0.5)
    with pytest.raises(ValueError, match="does not match"):
        scheduler.loss(torch.randn(2, 4, n + 1), tokens, tokens, 0.5)
    with pytest.raises(ValueError, match="t = 1"):
        scheduler.loss(logits, tokens, tokens, 1.0)
    with pytest.raises(ValueError, match="set_timesteps"):
        XDLMScheduler(num_embeddings=n).step(logits, 1.0, tokens)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="sampling times"):
        scheduler.step(logits, 0.6, tokens)
    with pytest.raises(ValueError, match=r"in \[1, 1000000\], got 0"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(10**20)
    with pytest.raises(TypeError, match="torch.Generator"):
        scheduler.add_noise(tokens, 0.5, generator=42)
    with pytest.raises(ValueError, match="NaN"):
        scheduler.step(torch.full_like(logits, float("nan")), 1.0, tokens)
    with pytest.raises(ValueError, match="guidance_scale"):
        scheduler.apply_guidance(logits, logits, -1.0)
    with pytest.raises(ValueError, match="cannot"):
        XDLMScheduler(num_embeddings=n, mixing_ratio=0.0).loss(logits, (tokens + 1) % n, tokens, 0.5)
