"""The XDLM noise kernel: forward noising, the continuous-time NELBO and the ancestral sampler.

States are the `N` codebook tokens `0..N-1` and one mask token `m = N`. With mixing ratio `k` the
stationary distribution is `pi(e) = k / N` on codebook tokens and `pi(m) = 1 - k`, so `k = 0` is MDLM
(pure masking) and `k = 1` is UDLM (pure uniform replacement, the mask never appears). The signal
schedule `alpha_t` falls from `alpha_0 = 1` to `alpha_1 = 0`, and `beta_t = 1 - alpha_t`. For a
distribution `y` over the states, `f_t(y, e) = alpha_t * y(e) + beta_t * pi(e)`.

- Forward marginal: `q(z_t = e | x) = f_t(delta_x, e)`.
- Reverse step from `t` to `s < t`, with `a = alpha_t / alpha_s` and model probabilities `p`:
  `p(z_s = e | z_t = z) = [a [z = e] + (1 - a) pi(z)] * f_s(p, e) / f_t(p, z)`, which is a mixture of
  keeping `z` (weight `a f_s(p, z)`), copying a draw from `p` (weight `(1 - a) pi(z) alpha_s`) and
  re-noising from `pi` (weight `(1 - a) pi(z) beta_s`).
- Loss: the continuous-time limit of the reverse KL divergences, per token (see `loss`).

The model's logits cover `N + 1` entries. The mask entry is never a prediction, so every function here
reads only the first `N` logits and ignores the last one, whatever its value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

NOISE_SCHEDULES = ("log-linear", "cosine")

# Far more steps than any sampler needs; a larger count is taken as a typo.
MAX_INFERENCE_STEPS = 1_000_000

# Rows of logits processed at once by the chunked reductions, sized so each temporary of one chunk
# stays near this many elements (4 MiB in float32) whatever the vocabulary size.
_CHUNK_ELEMENTS = 1 << 20

# Below this magnitude `y - log1p(y)` is evaluated by its Taylor series, because the direct
# difference loses all significant digits in float32 as y -> 0 (alpha_t -> 0 in the loss).
_SERIES_LIMIT = 0.1

Generator = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class XDLMSchedulerOutput(BaseOutput):
    """Output of `XDLMScheduler.step`.

    Args:
        prev_sample (`torch.LongTensor` of shape `(batch_size, num_tokens)`):
            The token grid at the next (earlier) time of the sampling loop.
        pred_original_sample (`torch.LongTensor` of shape `(batch_size, num_tokens)`):
            The model's most likely clean token at every position (argmax over the codebook).
    """

    prev_sample: torch.LongTensor
    pred_original_sample: torch.LongTensor


def _y_minus_log1p(y: torch.Tensor) -> torch.Tensor:
    """Evaluate `y - log1p(y)` for `y > -1` without cancellation near 0."""
    small = y.abs() < _SERIES_LIMIT
    y_small = torch.where(small, y, torch.zeros_like(y))
    # Taylor series y^2/2 - y^3/3 + ... + y^16/16; the first dropped term is below 1e-15 * y^2 here.
    series = torch.full_like(y, 1.0 / 16.0)
    for n in range(15, 1, -1):
        series = 1.0 / n - y_small * series
    series = series * y_small * y_small
    direct = y - torch.log1p(torch.where(small, torch.zeros_like(y), y))
    return torch.where(small, series, direct)


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """Float64 logits are computed in float64 (tests, gradcheck); all other dtypes in float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _rows_in_chunk(num_columns: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(num_columns, 1))


def _uniform(shape: tuple[int, ...], generator: Generator, device: torch.device) -> torch.Tensor:
    """Draw float64 uniforms on `device`; a list of generators draws row `i` from generator `i`.

    Draws are made on the generator's device and moved, so a CPU generator gives the same numbers
    whatever device the model runs on (as diffusers' `randn_tensor` does).
    """
    if generator is not None and not isinstance(generator, (torch.Generator, list, tuple)):
        raise TypeError(
            f"generator must be a torch.Generator, a list of them or None, got {type(generator).__name__}; "
            "for a seed pass torch.Generator().manual_seed(seed)"
        )
    if isinstance(generator, (list, tuple)):
        if not all(isinstance(item, torch.Generator) for item in generator):
            raise TypeError("every entry of a generator list must be a torch.Generator")
        if len(generator) != shape[0]:
            raise ValueError(
                f"got {len(generator)} generators for a batch of {shape[0]}; pass one generator per batch row"
            )
        rows = [torch.rand(shape[1:], generator=g, device=g.device, dtype=torch.float64) for g in generator]
        return torch.stack(rows).to(device)
    if generator is None:
        return torch.rand(shape, device=device, dtype=torch.float64)
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64).to(device)


class XDLMScheduler(SchedulerMixin, ConfigMixin):
    """Mixed discrete diffusion (XDLM) scheduler over `num_embeddings` codebook tokens and one mask token.

    Args:
        num_embeddings (`int`):
            Codebook size `N` of the VQ tokenizer. The model vocabulary has `N + 1` entries.
        mixing_ratio (`float`, defaults to 0.1):
            The ratio `k` in [0, 1] of uniform replacement in the noise: 0 is MDLM, 1 is UDLM.
        noise_schedule (`str`, defaults to `"log-linear"`):
            `"log-linear"` (`alpha_t = 1 - t`) or `"cosine"` (`alpha_t = cos(pi t / 2)`).
        eps (`float`, defaults to 1e-3):
            Training times are drawn from `[eps, 1 - eps]`. Sampling is not affected.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_embeddings: int,
        mixing_ratio: float = 0.1,
        noise_schedule: str = "log-linear",
        eps: float = 1e-3,
    ):
        if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, int):
            raise TypeError(f"num_embeddings must be an int, got {type(num_embeddings).__name__}")
        if num_embeddings < 1:
            raise ValueError(f"num_embeddings must be at least 1, got {num_embeddings}")
        if not isinstance(mixing_ratio, (int, float)) or isinstance(mixing_ratio, bool):
            raise TypeError(f"mixing_ratio must be a float, got {type(mixing_ratio).__name__}")
        if not 0.0 <= mixing_ratio <= 1.0:
            raise ValueError(f"mixing_ratio must be in [0, 1] (0 = MDLM, 1 = UDLM), got {mixing_ratio}")
        if noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {noise_schedule!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"eps must be a float, got {type(eps).__name__}")
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"eps must be in [0, 0.5), got {eps}")

        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0)

    # ------------------------------------------------------------------ kernel parts

    @property
    def num_embeddings(self) -> int:
        return self.config.num_embeddings

    @property
    def mixing_ratio(self) -> float:
        return float(self.config.mixing_ratio)

    @property
    def mask_token_id(self) -> int | None:
        """Id of the mask token, `N`, or None for `mixing_ratio = 1`, where the mask never occurs."""
        return self.num_embeddings if self.mixing_ratio < 1.0 else None

    @property
    def vocab_size(self) -> int:
        """Size `N + 1` of the model vocabulary, mask entry included (it is unused for `mixing_ratio = 1`)."""
        return self.num_embeddings + 1

    def stationary_distribution(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Return `pi` over all `N + 1` states, shape `(N + 1,)`."""
        pi = torch.full((self.vocab_size,), self.mixing_ratio / self.num_embeddings, dtype=dtype)
        pi[-1] = 1.0 - self.mixing_ratio
        return pi

    def _pi_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """`pi(z)` for each token id, float64."""
        k = self.mixing_ratio
        codebook_pi = torch.full(tokens.shape, k / self.num_embeddings, dtype=torch.float64, device=tokens.device)
        mask_pi = torch.full_like(codebook_pi, 1.0 - k)
        return torch.where(tokens == self.num_embeddings, mask_pi, codebook_pi)

    def alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        """Return the signal level `alpha_t` (float64) for times in [0, 1]."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.config.noise_schedule == "log-linear":
            return 1.0 - t
        # cos(pi / 2) is 6e-17 in floating point; alpha_1 must be exactly 0 so the prior has no signal.
        return torch.where(t >= 1.0, torch.zeros_like(t), torch.cos(0.5 * math.pi * t))

    def alpha_derivative(self, t: torch.Tensor | float) -> torch.Tensor:
        """Return `alpha'_t`, the time derivative of the signal level (float64, negative)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.config.noise_schedule == "log-linear":
            return -torch.ones_like(t)
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    # ------------------------------------------------------------------ input checks

    def _check_tokens(self, tokens: torch.Tensor, name: str, allow_mask: bool) -> None:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"{name} must hold integer token ids, got dtype {tokens.dtype}")
        if tokens.dim() != 2:
            raise ValueError(f"{name} must have shape [batch, num_tokens], got {tuple(tokens.shape)}")
        if tokens.numel() == 0:
            return
        low, high = int(tokens.min()), int(tokens.max())
        limit = self.num_embeddings if allow_mask and self.mask_token_id is not None else self.num_embeddings - 1
        if low < 0 or high > limit:
            allowed = f"0..{limit}" + (" (the mask token is the last id)" if limit == self.num_embeddings else "")
            raise ValueError(f"{name} contains token ids in [{low}, {high}]; allowed ids are {allowed}")

    def _check_logits(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise TypeError(f"logits must be a floating-point torch.Tensor, got {getattr(logits, 'dtype', type(logits))}")
        if logits.dim() != 3 or logits.shape[-1] != self.vocab_size:
            raise ValueError(
                f"logits must have shape [batch, num_tokens, {self.vocab_size}] (vocab_size = num_embeddings + 1), "
                f"got {tuple(logits.shape)}"
            )
        if logits.shape[:2] != tokens.shape:
            raise ValueError(
                f"logits shape {tuple(logits.shape)} does not match token shape {tuple(tokens.shape)}"
            )

    def _time_tensor(self, t, batch_size: int, device, name: str, allow_zero: bool = False) -> torch.Tensor:
        """Broadcast a float or a [B] tensor of times to float64 [B], checking the range."""
        if isinstance(t, bool) or not isinstance(t, (int, float, torch.Tensor)):
            raise TypeError(f"{name} must be a float or a tensor of shape [batch], got {type(t).__name__}")
        t = torch.as_tensor(t, dtype=torch.float64, device=device)
        if t.dim() == 0:
            t = t.expand(batch_size)
        if t.shape != (batch_size,):
            raise ValueError(f"{name} must be a scalar or have shape [{batch_size}], got {tuple(t.shape)}")
        low_ok = (t >= 0.0) if allow_zero else (t > 0.0)
        if not bool((low_ok & (t <= 1.0)).all()):
            interval = "[0, 1]" if allow_zero else "(0, 1]"
            raise ValueError(f"{name} must lie in {interval}, got values in [{float(t.min())}, {float(t.max())}]")
        return t

    # ------------------------------------------------------------------ forward process

    def add_noise(self, tokens: torch.LongTensor, t, generator: Generator = None) -> torch.LongTensor:
        """Draw `z_t ~ q(z_t | x)`: keep each token with probability `alpha_t`, else draw it from `pi`.

        Args:
            tokens (`torch.LongTensor` of shape `(batch_size, num_tokens)`): clean codebook tokens `x`.
            t (`float` or `torch.Tensor` of shape `(batch_size,)`): times in (0, 1].
            generator (`torch.Generator` or a list of them, *optional*): source of randomness.

        Returns:
            `torch.LongTensor` of the same shape: the noised tokens `z_t` (mask id `N` where masked).
        """
        self._check_tokens(tokens, "tokens", allow_mask=False)
        batch_size, num_tokens = tokens.shape
        alpha_t = self.alpha(self._time_tensor(t, batch_size, tokens.device, "t"))[:, None]  # (B, 1)

        u_keep = _uniform((batch_size, num_tokens), generator, tokens.device)  # (B, L)
        u_noise = _uniform((batch_size, num_tokens), generator, tokens.device)  # (B, L)
        noise = self._draw_from_pi(u_noise)
        return torch.where(u_keep < alpha_t, tokens.long(), noise)

    def _draw_from_pi(self, u: torch.Tensor) -> torch.LongTensor:
        """Map uniforms in [0, 1) to draws from `pi`: mask below `1 - k`, else a uniform codebook token."""
        k, n = self.mixing_ratio, self.num_embeddings
        if k == 0.0:
            return torch.full(u.shape, n, dtype=torch.long, device=u.device)
        # Rescale the part of [0, 1) above 1 - k to [0, N) to pick the codebook token.
        codebook = ((u - (1.0 - k)) / k * n).floor().clamp(0, n - 1).long()
        return torch.where(u < 1.0 - k, torch.full_like(codebook, n), codebook)

    def sample_prior(self, shape: tuple[int, int], generator: Generator = None, device=None) -> torch.LongTensor:
        """Draw a token grid from the prior `pi` (the forward process at `t = 1`).

        Args:
            shape (`tuple[int, int]`): `(batch_size, num_tokens)`.
            generator (`torch.Generator` or a list of them, *optional*): source of randomness.
            device (*optional*): device of the result.
        """
        if len(shape) != 2 or any(int(size) < 0 for size in shape):
            raise ValueError(f"shape must be (batch_size, num_tokens) with sizes >= 0, got {tuple(shape)}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        return self._draw_from_pi(_uniform(tuple(int(size) for size in shape), generator, device))

    def sample_t(self, batch_size: int, generator: torch.Generator | None = None, device=None, antithetic: bool = True):
        """Draw training times in `[eps, 1 - eps]`, float32 `[batch_size]`.

        With `antithetic=True` the batch is stratified (low-discrepancy): one uniform offset `u` gives
        `t_i = (u + i / B) mod 1`, which lowers the variance of the batch-mean loss.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if antithetic:
            offset = _uniform((1,), generator, device)
            u = (offset + torch.arange(batch_size, device=device, dtype=torch.float64) / batch_size) % 1.0
        else:
            u = _uniform((batch_size,), generator, device)
        eps = self.config.eps
        return (eps + (1.0 - 2.0 * eps) * u).float()

    # ------------------------------------------------------------------ model probabilities

    def _row_statistics(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor]:
        """Logsumexp (float32) and argmax over the codebook entries of each row, both [B, L].

        Rows are processed in chunks, so the temporaries stay small whatever the logits' size.
        """
        batch_size, num_tokens, vocab = logits.shape
        rows = logits.reshape(-1, vocab)
        log_normalizer = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
        argmax = torch.empty(rows.shape[0], dtype=torch.long, device=logits.device)
        step = _rows_in_chunk(vocab)
        for start in range(0, rows.shape[0], step):
            chunk = rows[start : start + step, : self.num_embeddings]  # (R, N)
            maximum, argmax[start : start + step] = chunk.max(dim=-1)
            maximum = maximum.float()[:, None]  # (R, 1)
            # torch.logsumexp is several times slower on small row blocks; this is the same computation.
            shifted = chunk.float() - maximum  # (R, N), a new tensor whatever the input dtype
            log_normalizer[start : start + step] = (shifted.exp_().sum(-1).log_() + maximum.squeeze(-1))
        return log_normalizer.view(batch_size, num_tokens), argmax.view(batch_size, num_tokens)

    def model_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the dense model distribution `p` over all `N + 1` states (mask entry 0), float64."""
        p = torch.softmax(logits[..., : self.num_embeddings].double(), dim=-1)
        return torch.cat([p, torch.zeros_like(p[..., :1])], dim=-1)

    def apply_guidance(self, cond_logits: torch.Tensor, uncond_logits: torch.Tensor, guidance_scale: float):
        """Combine conditional and unconditional predictions by classifier-free guidance.

        `log p = w * log p_cond + (1 - w) * log p_uncond`, renormalized over the codebook; `w = 1`
        returns the conditional log-probabilities. The result contains log-probabilities with the mask
        entry at `-inf`, so it can be passed wherever logits are expected.
        """
        if cond_logits.shape != uncond_logits.shape:
            raise ValueError(
                f"conditional and unconditional logits differ in shape: {tuple(cond_logits.shape)} "
                f"vs {tuple(uncond_logits.shape)}"
            )
        if cond_logits.shape[-1] != self.vocab_size:
            raise ValueError(f"logits must have {self.vocab_size} entries in the last dimension, got {cond_logits.shape[-1]}")
        if not guidance_scale >= 0.0:
            raise ValueError(f"guidance_scale must be >= 0 (1 means no guidance), got {guidance_scale}")

        n = self.num_embeddings
        # The mixture is built in one float32 buffer of N + 1 entries whose mask entry is -inf, so one
        # log_softmax over whole rows normalizes it, and no tensor is concatenated afterwards.
        mixed = torch.empty(cond_logits.shape, dtype=torch.float32, device=cond_logits.device)  # (..., N + 1)
        mixed[..., n] = float("-inf")
        cond = cond_logits[..., :n].float()  # (..., N), a view for float32 input
        if guidance_scale == 1.0:
            mixed[..., :n] = cond
        else:
            # w log p_cond + (1 - w) log p_uncond differs from w cond + (1 - w) uncond by a constant per
            # row, which the final log_softmax removes, so the two inner normalizations are skipped.
            # The mask entry is excluded before mixing: with w > 1, (1 - w) * (-inf) would be +inf.
            torch.lerp(uncond_logits[..., :n].float(), cond, guidance_scale, out=mixed[..., :n])
        return torch.log_softmax(mixed, dim=-1).to(cond_logits.dtype)  # (..., N + 1)

    # ------------------------------------------------------------------ reverse process

    def posterior(self, logits: torch.Tensor, noisy: torch.LongTensor, t, s) -> torch.Tensor:
        """Return the dense reverse distribution `p(z_s | z_t)`, float64 `[B, L, N + 1]`.

        This materializes several tensors of the logits' size. It is meant for tests and analysis;
        `step` draws from the same distribution without building it.

        Args:
            logits (`torch.Tensor` of shape `(batch_size, num_tokens, N + 1)`): model output; the mask entry is ignored.
            noisy (`torch.LongTensor` of shape `(batch_size, num_tokens)`): the current tokens `z_t`.
            t (`float` or `torch.Tensor` of shape `(batch_size,)`): current time in (0, 1].
            s (`float` or `torch.Tensor` of shape `(batch_size,)`): target time in [0, t).
        """
        self._check_tokens(noisy, "noisy", allow_mask=True)
        self._check_logits(logits, noisy)
        batch_size = noisy.shape[0]
        t = self._time_tensor(t, batch_size, noisy.device, "t")
        s = self._time_tensor(s, batch_size, noisy.device, "s", allow_zero=True)
        if not bool((s < t).all()):
            raise ValueError("s must be smaller than t for every batch row (the reverse step goes back in time)")

        alpha_t, alpha_s = self.alpha(t)[:, None, None], self.alpha(s)[:, None, None]  # (B, 1, 1)
        beta_t, beta_s = 1.0 - alpha_t, 1.0 - alpha_s
        a = alpha_t / alpha_s
        pi = self.stationary_distribution().to(noisy.device)  # (V,)
        p = self.model_probabilities(logits)  # (B, L, V)

        f_s = alpha_s * p + beta_s * pi  # (B, L, V)
        f_t_z = (alpha_t * p + beta_t * pi).gather(-1, noisy[..., None])  # (B, L, 1)
        pi_z = pi[noisy][..., None]  # (B, L, 1)
        is_z = torch.nn.functional.one_hot(noisy, self.vocab_size).double()  # (B, L, V)
        return (a * is_z + (1.0 - a) * pi_z) * f_s / f_t_z

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Set the sampling times `1, 1 - 1/n, ..., 1/n`; the step at the last one lands on 0.

        Args:
            num_inference_steps (`int`): number of reverse steps `n >= 1`.
            device (*optional*): device of `self.timesteps`.
        """
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
        if not 1 <= num_inference_steps <= MAX_INFERENCE_STEPS:
            raise ValueError(
                f"num_inference_steps must be in [1, {MAX_INFERENCE_STEPS}], got {num_inference_steps}"
            )
        self.num_inference_steps = num_inference_steps
        steps = torch.arange(num_inference_steps, 0, -1, dtype=torch.float64) / num_inference_steps
        self.timesteps = steps.to(device=device, dtype=torch.float32)

    def _step_times(self, timestep) -> tuple[float, float]:
        """Return `(t, s)`: the time `timestep` and the time its step lands on (the next entry, or 0)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        t = float(timestep)
        distances = (self.timesteps.double().cpu() - t).abs()
        index = int(distances.argmin())
        if float(distances[index]) > 1e-6:
            raise ValueError(
                f"timestep {t} is not one of the {self.num_inference_steps} sampling times set by set_timesteps"
            )
        if index + 1 < self.num_inference_steps:
            return t, float(self.timesteps[index + 1].double())
        return t, 0.0

    def step(
        self,
        logits: torch.Tensor,
        timestep,
        sample: torch.LongTensor,
        generator: Generator = None,
        return_dict: bool = True,
    ) -> XDLMSchedulerOutput | tuple:
        """Take one exact ancestral step from `t = timestep` to the next sampling time `s`.

        Each position chooses among keeping its token, copying a draw from the model and re-noising
        from `pi`, with the weights of the three-component mixture. Only the positions that copy read
        their full row of logits, so the step needs no second tensor of the logits' size.

        Args:
            logits (`torch.Tensor` of shape `(batch_size, num_tokens, N + 1)`): model output at `t`.
            timestep (`float` or 0-d tensor): an entry of `self.timesteps`.
            sample (`torch.LongTensor` of shape `(batch_size, num_tokens)`): the tokens `z_t`.
            generator (`torch.Generator` or a list of them, *optional*): source of randomness.
            return_dict (`bool`, defaults to True): return an `XDLMSchedulerOutput` instead of a tuple.

        Returns:
            `XDLMSchedulerOutput` or `(prev_sample, pred_original_sample)`.
        """
        self._check_tokens(sample, "sample", allow_mask=True)
        self._check_logits(logits, sample)
        t, s = self._step_times(timestep)
        batch_size, num_tokens = sample.shape
        device = sample.device
        n = self.num_embeddings

        alpha_t, alpha_s = float(self.alpha(t)), float(self.alpha(s))
        beta_t, beta_s = 1.0 - alpha_t, 1.0 - alpha_s
        a = alpha_t / alpha_s

        # p(z) at each position: 0 for the mask, softmax over the codebook otherwise.
        is_mask = sample == n  # (B, L)
        z_codebook = sample.clamp(max=n - 1)
        logit_z = logits.gather(-1, z_codebook[..., None]).squeeze(-1).float()  # (B, L)
        log_normalizer, pred_original_sample = self._row_statistics(logits)  # (B, L), (B, L)
        if bool(torch.isnan(log_normalizer).any()):
            raise ValueError("logits contain NaN (or +inf) in a codebook entry; check the model's output")
        p_z = torch.exp(logit_z - log_normalizer).double()  # (B, L)
        p_z = torch.where(is_mask, torch.zeros_like(p_z), p_z)
        pi_z = self._pi_of(sample)  # (B, L)

        # Mixture weights; they sum to f_t(p, z).
        w_keep = a * (alpha_s * p_z + beta_s * pi_z)  # (B, L)
        w_copy = (1.0 - a) * pi_z * alpha_s  # (B, L)
        w_total = alpha_t * p_z + beta_t * pi_z  # (B, L)

        u_component = _uniform((batch_size, num_tokens), generator, device) * w_total  # (B, L)
        u_copy = _uniform((batch_size, num_tokens), generator, device)  # (B, L)
        u_noise = _uniform((batch_size, num_tokens), generator, device)  # (B, L)
        # A zero total only arises for a token the model gives probability 0 where pi(z) = 0; keep it.
        keep = (u_component < w_keep) | (w_total <= 0.0)
        copy = ~keep & (u_component < w_keep + w_copy)

        prev_sample = torch.where(keep, sample.long(), self._draw_from_pi(u_noise))
        copy_index = copy.flatten().nonzero().squeeze(-1)
        if copy_index.numel() > 0:
            drawn = self._draw_from_model(logits, copy_index, u_copy.flatten()[copy_index])
            prev_sample.view(-1)[copy_index] = drawn

        if not return_dict:
            return prev_sample, pred_original_sample
        return XDLMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _draw_from_model(self, logits: torch.Tensor, row_index: torch.Tensor, u: torch.Tensor) -> torch.LongTensor:
        """Draw one codebook token from `p` for each listed row by inverting its CDF at `u`."""
        rows = logits.reshape(-1, logits.shape[-1])
        drawn = torch.empty(row_index.shape[0], dtype=torch.long, device=logits.device)
        step = _rows_in_chunk(logits.shape[-1])
        for start in range(0, row_index.shape[0], step):
            index = row_index[start : start + step]
            weights = rows[index, : self.num_embeddings].float()  # (R, N), a copy of the chosen rows
            weights.sub_(weights.amax(dim=-1, keepdim=True)).exp_()  # unnormalized probabilities
            cdf = weights.cumsum_(dim=-1)  # (R, N)
            # Scale u by the row total instead of normalizing the row; each token's CDF step is exact
            # to float32 rounding (about 6e-8 of the total).
            target = (u[start : start + step] * cdf[:, -1].double()).float().unsqueeze(-1)  # (R, 1)
            drawn[start : start + step] = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=self.num_embeddings - 1)
        return drawn

    # ------------------------------------------------------------------ training loss

    def loss(self, logits: torch.Tensor, noisy: torch.LongTensor, tokens: torch.LongTensor, t) -> torch.Tensor:
        """Compute the per-token continuous-time NELBO, `[B, L]` (not reduced).

        The result is float32, or float64 for float64 logits (bfloat16 logits are computed in float32).

        With `r = pi(z) / f_t(delta_x, z)` the loss of a token is

            -alpha'_t * r * [ ([z = x] - p(z)) / f_t(p, z) - log(f_t(delta_x, z) / f_t(p, z)) / alpha_t
                              + log(f_t(delta_x, x) / f_t(p, x))
                              + (beta_t / alpha_t) * sum_e pi(e) log(f_t(delta_x, e) / f_t(p, e)) ],

        the limit of `KL(q(z_s | z_t, x) || p(z_s | z_t)) / (alpha_s - alpha_t)` as `s -> t`, times
        `-alpha'_t`. With `mixing_ratio = 0` it is MDLM's `-alpha'_t / beta_t * (-log p(x))` on masked
        tokens and 0 elsewhere. The value and its gradient are computed in chunks of rows, so the
        memory beyond the logits stays near one gradient tensor of the logits' size.

        Args:
            logits (`torch.Tensor` of shape `(batch_size, num_tokens, N + 1)`): model output; the mask entry is ignored.
            noisy (`torch.LongTensor` of shape `(batch_size, num_tokens)`): the noised tokens `z_t`.
            tokens (`torch.LongTensor` of shape `(batch_size, num_tokens)`): the clean tokens `x`.
            t (`float` or `torch.Tensor` of shape `(batch_size,)`): the times used for noising.
        """
        self._check_tokens(noisy, "noisy", allow_mask=True)
        self._check_tokens(tokens, "tokens", allow_mask=False)
        if noisy.shape != tokens.shape:
            raise ValueError(f"noisy shape {tuple(noisy.shape)} does not match tokens shape {tuple(tokens.shape)}")
        self._check_logits(logits, noisy)
        t = self._time_tensor(t, noisy.shape[0], noisy.device, "t")
        if self.mixing_ratio == 0.0 and bool(((noisy != self.num_embeddings) & (noisy != tokens)).any()):
            raise ValueError(
                "noisy contains an unmasked token that differs from tokens, which the forward process cannot "
                "produce with mixing_ratio = 0; pass the output of add_noise(tokens, t)"
            )
        if bool((t >= 1.0).any()):
            raise ValueError("the loss is undefined at t = 1 (alpha_t = 0); draw training times with sample_t")
        return _XDLMLoss.apply(logits, noisy.long(), tokens.long(), t, self)

    def _loss_coefficients(self, noisy: torch.Tensor, tokens: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token scalars of the loss that do not depend on the model, float64 [B, L] or [B, 1]."""
        k, n = self.mixing_ratio, self.num_embeddings
        alpha = self.alpha(t)[:, None]  # (B, 1)
        beta = 1.0 - alpha
        weight = -self.alpha_derivative(t)[:, None]  # (B, 1)
        pi_z = self._pi_of(noisy)  # (B, L)
        same = (noisy == tokens).double()  # (B, L)
        r = pi_z / (alpha * same + beta * pi_z)  # (B, L)
        return {
            "alpha": alpha,
            "beta": beta,
            "c": beta * (k / n),  # beta_t * pi(e) for a codebook token e, (B, 1)
            "weight_r": weight * r,  # (B, L)
            "pi_z": pi_z,
            "same": same,
            "is_mask": (noisy == n),
            "sum_coefficient": beta / alpha * (k / n),  # (B, 1)
        }


class _XDLMLoss(torch.autograd.Function):
    """The XDLM loss with a hand-written backward, so autograd keeps no tensors of the logits' size.

    Notation per row (position): `lp` the log-softmax over the codebook, `p = exp(lp)`,
    `y_e = alpha p_e / c` with `c = beta k / N`. The O(N) part of the loss,
    `sum_e pi(e) log(f(delta_x, e) / f(p, e))`, has two exact forms. For `alpha / c < 1` it is
    `(k / N) [sum_e phi(y_e) - phi(alpha / c)]` with `phi(y) = y - log1p(y)`. Otherwise it is
    `(k / N) [log1p(alpha / c) - sum_e log1p(y_e)]`. Each form avoids the cancellation of the other.
    """

    @staticmethod
    def forward(ctx, logits, noisy, tokens, t, scheduler: XDLMScheduler):
        n = scheduler.num_embeddings
        coefficients = scheduler._loss_coefficients(noisy, tokens, t)
        batch_size, num_tokens, vocab = logits.shape
        rows = logits.reshape(-1, vocab)
        flat = {name: _flat_rows(value, batch_size, num_tokens) for name, value in coefficients.items()}
        z_flat, x_flat = noisy.reshape(-1), tokens.reshape(-1)

        loss = torch.empty(rows.shape[0], dtype=torch.float64, device=logits.device)
        step = _rows_in_chunk(vocab)
        for start in range(0, rows.shape[0], step):
            end = min(start + step, rows.shape[0])
            part = {name: value[start:end] for name, value in flat.items()}
            lp = torch.log_softmax(rows[start:end, :n].to(_compute_dtype(logits)), dim=-1)  # (R, N)
            loss[start:end] = _loss_rows(lp, z_flat[start:end], x_flat[start:end], part, scheduler.mixing_ratio, n)

        ctx.save_for_backward(logits, noisy, tokens, t)
        ctx.scheduler = scheduler
        return loss.view(batch_size, num_tokens).to(_compute_dtype(logits))

    @staticmethod
    def backward(ctx, grad_output):
        logits, noisy, tokens, t = ctx.saved_tensors
        scheduler: XDLMScheduler = ctx.scheduler
        n, k = scheduler.num_embeddings, scheduler.mixing_ratio
        coefficients = scheduler._loss_coefficients(noisy, tokens, t)
        batch_size, num_tokens, vocab = logits.shape
        rows = logits.reshape(-1, vocab)
        flat = {name: _flat_rows(value, batch_size, num_tokens) for name, value in coefficients.items()}
        upstream = grad_output.reshape(-1).double()
        z_flat, x_flat = noisy.reshape(-1), tokens.reshape(-1)

        grad = torch.empty_like(logits).view(-1, vocab)
        grad[:, n:] = 0.0  # the mask logit does not enter the loss
        step = _rows_in_chunk(vocab)
        for start in range(0, rows.shape[0], step):
            end = min(start + step, rows.shape[0])
            part = {name: value[start:end] for name, value in flat.items()}
            lp = torch.log_softmax(rows[start:end, :n].to(_compute_dtype(logits)), dim=-1)  # (R, N)
            z, x = z_flat[start:end], x_flat[start:end]
            alpha, c, weight_r = part["alpha"], part["c"], part["weight_r"] * upstream[start:end]  # (R,)

            # dL/dlogit_j = a_z (d_zj - p_j) + a_x (d_xj - p_j) + g_s (q_j - p_j Q), with
            # q_j = alpha p_j / (alpha p_j + c) and Q = sum_j q_j (the derivative of sum_e log(alpha p_e + c)).
            lp_x = lp.gather(-1, x[:, None]).squeeze(-1).double()  # (R,)
            p_x = lp_x.exp()
            q_x = alpha * p_x / (alpha * p_x + c)
            a_x = -weight_r * q_x  # (R,)

            z_codebook = z.clamp(max=n - 1)
            p_z = lp.gather(-1, z_codebook[:, None]).squeeze(-1).double().exp()  # (R,)
            f_z = alpha * p_z + part["beta"] * part["pi_z"]
            safe_f_z = torch.where(f_z > 0, f_z, torch.ones_like(f_z))
            a_z = -weight_r * alpha * (part["same"] - p_z) * p_z / safe_f_z**2
            a_z = torch.where(part["is_mask"] | (weight_r == 0), torch.zeros_like(a_z), a_z)  # (R,)

            # Written as g_s q_j - p_j (a_z + a_x + g_s Q), with q computed before lp is turned into p in place.
            dtype = lp.dtype
            scale = (a_z + a_x).to(dtype)[:, None]  # (R, 1)
            if k > 0.0:
                g_s = (-weight_r * part["sum_coefficient"]).to(dtype)[:, None]  # (R, 1)
                log_ratio = (torch.log(alpha) - torch.log(c)).to(dtype)[:, None]  # (R, 1)
                q = torch.sigmoid(lp + log_ratio)  # (R, N)
                scale = scale + g_s * q.sum(dim=-1, keepdim=True)
                chunk_grad = q.mul_(g_s).sub_(lp.exp_().mul_(scale))  # (R, N)
            else:
                chunk_grad = lp.exp_().mul_(-scale)  # (R, N)
            chunk_grad.scatter_add_(-1, z_codebook[:, None], a_z.to(dtype)[:, None])
            chunk_grad.scatter_add_(-1, x[:, None], a_x.to(dtype)[:, None])
            grad[start:end, :n] = chunk_grad.to(grad.dtype)

        return grad.view_as(logits), None, None, None, None


def _flat_rows(value: torch.Tensor, batch_size: int, num_tokens: int) -> torch.Tensor:
    return value.expand(batch_size, num_tokens).reshape(-1)


def _loss_rows(lp, z, x, part, k: float, n: int) -> torch.Tensor:
    """Loss of each row of a chunk, float64 [R]; `lp` is the float32 log-softmax over the codebook."""
    alpha, beta, c = part["alpha"], part["beta"], part["c"]  # (R,)
    lp_x = lp.gather(-1, x[:, None]).squeeze(-1).double()  # (R,)
    p_x = lp_x.exp()

    # [z = x] - p(z) over f_t(p, z), minus log(f_t(delta_x, z) / f_t(p, z)) / alpha:
    # with y = alpha ([z = x] - p(z)) / f_t(p, z) the two terms are (y - log1p(y)) / alpha.
    z_codebook = z.clamp(max=n - 1)
    p_z = lp.gather(-1, z_codebook[:, None]).squeeze(-1).double().exp()
    p_z = torch.where(part["is_mask"], torch.zeros_like(p_z), p_z)
    f_z = alpha * p_z + beta * part["pi_z"]
    safe_f_z = torch.where(f_z > 0, f_z, torch.ones_like(f_z))
    y = alpha * (part["same"] - p_z) / safe_f_z
    z_terms = _y_minus_log1p(y) / alpha

    # log(f_t(delta_x, x) / f_t(p, x)) = log(alpha + c) - log(alpha p(x) + c), in log space so p(x) may underflow.
    log_f_x = torch.logaddexp(torch.log(alpha) + lp_x, torch.log(c)) if k > 0.0 else torch.log(alpha) + lp_x
    x_term = torch.log(alpha + c) - log_f_x

    sum_term = torch.zeros_like(x_term)
    if k > 0.0:
        # sum_e log(f(delta_x, e) / f(p, e)) over the codebook, in the form that is exact for the
        # row's ratio alpha / c (see _XDLMLoss). The small form is needed only for alpha < c, that is
        # t within about k / N of 1, so it runs on those rows alone.
        ratio = alpha / c  # (R,) alpha / c = y_e / p_e
        log_ratio = torch.log(ratio).to(lp.dtype)[:, None]  # (R, 1)
        small = ratio < 1.0
        large_rows = (~small).nonzero().squeeze(-1)
        small_rows = small.nonzero().squeeze(-1)
        # log1p(y_e) = softplus(log y_e) in one pass; above softplus's threshold of 20 the two differ by < 3e-9.
        if small_rows.numel() == 0:
            log1p_y = torch.nn.functional.softplus(lp + log_ratio)  # (R, N)
            sum_term = torch.log1p(ratio) - log1p_y.sum(-1).double()
        elif large_rows.numel() > 0:
            log1p_y = torch.nn.functional.softplus(lp[large_rows] + log_ratio[large_rows])  # (R_large, N)
            sum_term[large_rows] = torch.log1p(ratio[large_rows]) - log1p_y.sum(-1).double()
        if small_rows.numel() > 0:
            y_e = (lp[small_rows] + log_ratio[small_rows]).exp()  # (R_small, N)
            sum_term[small_rows] = _y_minus_log1p(y_e).sum(-1).double() - _y_minus_log1p(ratio[small_rows])
        sum_term = part["sum_coefficient"] * sum_term

    total = part["weight_r"] * (z_terms + x_term + sum_term)
    # r = 0 where pi(z) = 0 (an unmasked token with k = 0): the loss is exactly 0 there.
    return torch.where(part["weight_r"] == 0, torch.zeros_like(total), total)
