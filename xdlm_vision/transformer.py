"""The XDLM denoiser: a bidirectional transformer over a VQ token grid, class-conditioned by adaptive layer norm.

The model reads a noised `grid_size x grid_size` grid of token ids (codebook ids `0..N-1` plus the mask id `N`)
and a class label, and returns logits over the `N + 1` vocabulary entries for every position. The mask entry
is always `-inf`, so a softmax over the logits is a distribution over codebook tokens only.

The layout follows DiT (Peebles and Xie, 2023): token and fixed 2-D sin-cos position embeddings, blocks of
self-attention and an MLP modulated by the conditioning vector (adaLN-Zero), then a modulated final layer.
Size presets (`MODEL_PRESETS`, mirrored by `configs/model/*.yaml`) sit at the end of the file.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from diffusers.models.modeling_utils import ModelMixin
from timm.layers import Mlp
from torch import nn

logger = logging.getLogger(__name__)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Apply an adaptive layer-norm shift and scale, one pair per batch row, to every position."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                          Conditioning embedders                               #
#################################################################################


class LabelEmbedder(nn.Module):
    """Class-label embedding with an extra "no class" row, and label dropout for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        # Row `num_classes` is the unconditional ("no class") embedding used by guidance.
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def drop_labels(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None) -> torch.Tensor:
        """Replace labels by the "no class" id: at random in training mode, and wherever `force_drop_ids` is set."""
        if force_drop_ids is not None:
            drop = force_drop_ids.to(device=labels.device, dtype=torch.bool)  # (B,)
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob  # (B,)
        else:
            return labels
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        labels = self.drop_labels(labels, force_drop_ids)  # (B,)
        return self.embedding_table(labels)  # (B, D)


class TimeEmbedder(nn.Module):
    """Embedding of the continuous diffusion time t in [0, 1]: sinusoidal features, then an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.time_proj = Timesteps(frequency_embedding_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(frequency_embedding_size, hidden_size)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # The sinusoid frequencies (max period 10000) suit step indices in [0, 1000), as in DDPM and DiT, so t is scaled.
        features = self.time_proj(t * 1000)  # (B, F) in float32
        features = features.to(self.time_embedding.linear_1.weight.dtype)
        return self.time_embedding(features)  # (B, D)


#################################################################################
#                              Transformer blocks                               #
#################################################################################


class SelfAttention(nn.Module):
    """Multi-head bidirectional self-attention computed by PyTorch's scaled-dot-product attention."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, length, hidden_size = x.shape
        head_dim = hidden_size // self.num_heads

        qkv = self.qkv(x).reshape(batch_size, length, 3, self.num_heads, head_dim)  # (B, L, 3, H, Dh)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, Dh)
        x = F.scaled_dot_product_attention(query, key, value)  # (B, H, L, Dh), no causal mask
        x = x.transpose(1, 2).reshape(batch_size, length, hidden_size)  # (B, L, D)
        return self.proj(x)  # (B, L, D)


class XDLMBlock(nn.Module):
    """A transformer block whose layer norms are shifted, scaled and gated by the conditioning (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        approximate_gelu = functools.partial(nn.GELU, approximate="tanh")
        self.mlp = Mlp(hidden_size, hidden_features=int(hidden_size * mlp_ratio), act_layer=approximate_gelu)
        self.adaln_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        modulation = self.adaln_modulation(c)  # (B, 6 * D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)  # 6 x (B, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, L, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, L, D)
        return x


class FinalLayer(nn.Module):
    """The modulated last layer norm and the linear map to logits over the vocabulary."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.adaln_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        x = modulate(self.norm_final(x), shift, scale)  # (B, L, D)
        return self.linear(x)  # (B, L, V)


#################################################################################
#                                 The model                                     #
#################################################################################


class XDLMTransformer(ModelMixin, ConfigMixin):
    """Class-conditional bidirectional transformer that predicts codebook logits for a noised token grid.

    Args:
        num_embeddings (`int`): codebook size `N` of the VQ tokenizer. The vocabulary adds the mask id `N`.
        grid_size (`int`): side of the square token grid, so a sequence has `grid_size ** 2` tokens.
        num_classes (`int`): number of classes. The extra id `num_classes` means "no class" (guidance).
        hidden_size (`int`): width of the residual stream.
        depth (`int`): number of transformer blocks.
        num_heads (`int`): attention heads per block; must divide `hidden_size`.
        mlp_ratio (`float`, defaults to 4.0): MLP hidden width as a multiple of `hidden_size`.
        class_dropout_prob (`float`, defaults to 0.1): probability that a label is replaced by "no class"
            in training mode, which trains the unconditional model for classifier-free guidance.
        time_conditioning (`bool`, defaults to `False`): add an embedding of the diffusion time to the
            conditioning. The published XDLM image model runs without it.
        vocab_size (`int`, *optional*): stored so that `config.vocab_size` exists; must equal `num_embeddings + 1`.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["XDLMBlock"]

    @register_to_config
    def __init__(
        self,
        num_embeddings: int = 16384,
        grid_size: int = 16,
        num_classes: int = 1000,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        time_conditioning: bool = False,
        vocab_size: int | None = None,
    ):
        super().__init__()
        _check_positive_ints(num_embeddings=num_embeddings, grid_size=grid_size, num_classes=num_classes,
                             hidden_size=hidden_size, depth=depth, num_heads=num_heads)
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}; "
                             "choose a head count that divides the width")
        if hidden_size % 4 != 0:
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of 4 for the 2-D sin-cos position embedding")
        if not 0.0 <= class_dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob={class_dropout_prob} is outside [0, 1]")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio={mlp_ratio} must be positive")
        if vocab_size is not None and vocab_size != num_embeddings + 1:
            raise ValueError(f"vocab_size={vocab_size} must equal num_embeddings + 1 = {num_embeddings + 1} "
                             "(the codebook plus the mask token); leave it unset")
        self.register_to_config(vocab_size=num_embeddings + 1)
        vocab_size = num_embeddings + 1

        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        # Fixed 2-D sin-cos positions on integer grid coordinates; rebuilt from the config, so not saved.
        pos_embed = get_2d_sincos_pos_embed(hidden_size, grid_size, base_size=grid_size, output_type="pt")
        self.register_buffer("pos_embed", pos_embed.float().unsqueeze(0), persistent=False)  # (1, L, D)
        self.label_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.time_embedder = TimeEmbedder(hidden_size) if time_conditioning else None
        self.blocks = nn.ModuleList([XDLMBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, vocab_size)
        self.gradient_checkpointing = False

        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Initialize so that every block starts as the identity and the first predictions are near uniform."""
        hidden_size = self.config.hidden_size

        # Xavier-uniform linear layers with zero biases, as in ViT and DiT.
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)

        # Token embeddings at the scale of the sin-cos positions (RMS 1/sqrt(2) per channel),
        # so that neither drowns the other in the first layer norm.
        nn.init.normal_(self.token_embedding.weight, std=0.5**0.5)
        nn.init.normal_(self.label_embedder.embedding_table.weight, std=0.02)

        # Time-embedding MLP, as in DiT.
        if self.time_embedder is not None:
            nn.init.normal_(self.time_embedder.time_embedding.linear_1.weight, std=0.02)
            nn.init.normal_(self.time_embedder.time_embedding.linear_2.weight, std=0.02)

        # Zero-out adaLN modulation layers: each block starts as the identity map (adaLN-Zero).
        for block in self.blocks:
            nn.init.zeros_(block.adaln_modulation[-1].weight)
            nn.init.zeros_(block.adaln_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaln_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaln_modulation[-1].bias)

        # Small output head: initial logits have a standard deviation near 0.02, so the first predictions
        # are almost uniform, yet (unlike a zero head) the adaLN gates and embeddings get gradient at step 0.
        nn.init.normal_(self.final_layer.linear.weight, std=0.02 / hidden_size**0.5)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def mask_token_id(self) -> int:
        """Vocabulary id of the mask token (`num_embeddings`)."""
        return self.config.num_embeddings

    @property
    def sequence_length(self) -> int:
        """Number of tokens per grid, `grid_size ** 2`."""
        return self.config.grid_size**2

    def check_inputs(
        self,
        tokens: torch.Tensor,
        class_labels: torch.Tensor,
        timestep: float | torch.Tensor | None,
        force_drop_ids: torch.Tensor | None,
    ) -> None:
        """Raise `ValueError`/`TypeError` for tokens, labels or times that the model cannot take."""
        config = self.config
        if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point or tokens.dtype.is_complex \
                or tokens.dtype == torch.bool:
            found = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise TypeError(f"tokens must be an integer tensor of shape [batch, {self.sequence_length}], got {found}")
        if tokens.ndim != 2 or tokens.shape[1] != self.sequence_length:
            raise ValueError(
                f"tokens have shape {list(tokens.shape)}, expected [batch, {self.sequence_length}] "
                f"(a {config.grid_size}x{config.grid_size} grid flattened row by row)"
            )
        if not isinstance(class_labels, torch.Tensor) or class_labels.dtype.is_floating_point \
                or class_labels.dtype == torch.bool:
            found = class_labels.dtype if isinstance(class_labels, torch.Tensor) else type(class_labels).__name__
            raise TypeError(f"class_labels must be an integer tensor of shape [batch], got {found}")
        if class_labels.shape != tokens.shape[:1]:
            raise ValueError(f"class_labels have shape {list(class_labels.shape)}, expected [{tokens.shape[0]}] "
                             "(one label per row of tokens)")
        if force_drop_ids is not None and force_drop_ids.shape != tokens.shape[:1]:
            raise ValueError(f"force_drop_ids have shape {list(force_drop_ids.shape)}, expected [{tokens.shape[0]}]")
        if config.time_conditioning and timestep is None:
            raise ValueError("this model has time_conditioning=True, so forward needs a timestep in [0, 1]")

        # Value checks read the data back from the device; they are skipped while torch.compile traces.
        if torch.compiler.is_compiling() or tokens.numel() == 0:
            return
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high > config.num_embeddings:
            raise ValueError(f"token ids span [{low}, {high}], outside [0, {config.num_embeddings}] "
                             f"(codebook ids 0..{config.num_embeddings - 1} and the mask id {config.num_embeddings})")
        low, high = int(class_labels.min()), int(class_labels.max())
        if low < 0 or high > config.num_classes:
            raise ValueError(f"class labels span [{low}, {high}], outside [0, {config.num_classes}] "
                             f"(classes 0..{config.num_classes - 1} and the 'no class' id {config.num_classes})")

    def forward(
        self,
        tokens: torch.Tensor,
        class_labels: torch.Tensor,
        timestep: float | torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict logits over the vocabulary for every position of a noised token grid.

        Args:
            tokens (`torch.LongTensor` of shape `[B, L]`): noised token ids in `[0, num_embeddings]`,
                the grid flattened row by row (`L = grid_size ** 2`).
            class_labels (`torch.LongTensor` of shape `[B]`): class ids in `[0, num_classes]`;
                `num_classes` is the unconditional label.
            timestep (`float` or `torch.Tensor` of shape `[B]`, *optional*): diffusion time in `[0, 1]`.
                Required when `time_conditioning=True`, ignored otherwise.
            force_drop_ids (`torch.Tensor` of shape `[B]`, *optional*): rows whose nonzero entry replaces the
                label by "no class", in any mode. Without it, labels are dropped at random in training mode only.

        Returns:
            `torch.Tensor` of shape `[B, L, num_embeddings + 1]`: logits, with the mask entry at `-inf`.
        """
        self.check_inputs(tokens, class_labels, timestep, force_drop_ids)

        x = self.token_embedding(tokens.long()) + self.pos_embed.to(self.token_embedding.weight.dtype)  # (B, L, D)
        c = self.label_embedder(class_labels.long(), force_drop_ids)  # (B, D)
        if self.time_embedder is not None:
            t = torch.as_tensor(timestep, dtype=torch.float32, device=x.device).reshape(-1)
            t = t.expand(x.shape[0]) if t.numel() == 1 else t  # (B,)
            c = c + self.time_embedder(t)  # (B, D)

        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c)  # (B, L, D)
            else:
                x = block(x, c)  # (B, L, D)
        logits = self.final_layer(x, c)  # (B, L, V)

        # The model never predicts the mask: its entry is -inf, so softmax puts all mass on the codebook.
        logits[..., self.mask_token_id] = float("-inf")
        return logits

    @classmethod
    def from_preset(
        cls,
        preset: str | os.PathLike,
        *,
        num_embeddings: int,
        grid_size: int,
        num_classes: int,
        **overrides: Any,
    ) -> XDLMTransformer:
        """Build a randomly initialized model of a named size (`tiny`, `small`, `base`) or a preset YAML file.

        Args:
            preset (`str` or `os.PathLike`): a key of `MODEL_PRESETS`, or the path of a YAML file with the same keys.
            num_embeddings, grid_size, num_classes (`int`): data sizes, which presets leave open.
            overrides: further `XDLMTransformer` arguments, e.g. `class_dropout_prob=0.0`; they win over the preset.
        """
        config = load_model_preset(preset)
        config.update(overrides)
        return cls(num_embeddings=num_embeddings, grid_size=grid_size, num_classes=num_classes, **config)


def _check_positive_ints(**values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


#################################################################################
#                                 Size presets                                  #
#################################################################################

# Architecture sizes only; the data sizes (codebook, grid, classes) come from the tokenizer and data set.
# configs/model/<name>.yaml holds the same values for recipes, and a test keeps the two in sync.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # For training on CPU: one forward and backward pass on 64 grids of 8x8 tokens took about 1 s on 2 shared cores.
    "tiny": {"hidden_size": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0},
    # The published XDLM image model: 12 layers, 768 wide, 12 heads.
    "small": {"hidden_size": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0},
    # The next size up, as in GPT-2 medium and DiT-L: 24 layers, 1024 wide, 16 heads.
    "base": {"hidden_size": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0},
}

_PRESET_KEYS = {"hidden_size", "depth", "num_heads", "mlp_ratio", "class_dropout_prob", "time_conditioning"}


def load_model_preset(preset: str | os.PathLike) -> dict[str, Any]:
    """Return the `XDLMTransformer` arguments of a named preset, or of a YAML file that sets the same keys."""
    if isinstance(preset, str) and preset in MODEL_PRESETS:
        return dict(MODEL_PRESETS[preset])

    if not os.path.isfile(preset):
        raise ValueError(f"unknown model preset {str(preset)!r}: use one of {sorted(MODEL_PRESETS)} "
                         "or the path of a YAML file")
    with open(preset, encoding="utf-8") as file:
        config = yaml.safe_load(file)
    if not isinstance(config, dict):
        raise ValueError(f"model preset file {str(preset)!r} must contain a mapping of XDLMTransformer arguments")
    unknown = sorted(set(config) - _PRESET_KEYS)
    if unknown:
        raise ValueError(f"model preset file {str(preset)!r} sets unknown keys {unknown}; "
                         f"allowed keys are {sorted(_PRESET_KEYS)}")
    return config
