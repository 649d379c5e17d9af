"""VQ image tokenizer: images in [-1, 1] to grids of codebook indices and back.

The backbone is diffusers' VQ-VAE encoder and decoder (the blocks of `diffusers.VQModel`), with a
vector quantizer whose codebook can be l2-normalised. The same class loads three kinds of weights:

- tokenizers trained with `xdlm-vision train-tokenizer` (small, l2-normalised low-dimensional codebook);
- a diffusers `VQModel` folder (`VQTokenizer.from_vqmodel`), with its plain Euclidean codebook;
- LlamaGen's published VQ-16 ImageNet tokenizer `vq_ds16_c2i.pt` (`VQTokenizer.from_llamagen_checkpoint`):
  the same layer graph, reached through an explicit key map.

Submodule names equal those of `diffusers.VQModel` (encoder, quant_conv, quantize.embedding,
post_quant_conv, decoder), so a VQModel state dict loads without renaming.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

logger = logging.getLogger(__name__)

# Images may leave [-1, 1] by float rounding after a resize or a normalisation; more than this is a bug.
_RANGE_TOLERANCE = 1e-3


@dataclass
class VQTokenizerOutput:
    """Result of `VQTokenizer.forward`: the reconstruction, the tokens and the two quantizer losses."""

    sample: torch.Tensor  # (B, C, H, W) reconstruction, not clamped
    tokens: torch.Tensor  # (B, h * w) long
    latents: torch.Tensor  # (B, D, h, w) encoder output before quantization (l2-normalised if the codebook is)
    codebook_loss: torch.Tensor  # scalar: moves codes towards encoder outputs
    commitment_loss: torch.Tensor  # scalar: moves encoder outputs towards their codes (not yet scaled by beta)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient.

    With `l2_norm` both the encoder outputs and the codes are projected onto the unit sphere before the
    lookup, so the nearest code is the one of largest cosine similarity (as in LlamaGen and ViT-VQGAN).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, l2_norm: bool):
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.normal_(self.embedding.weight)

    def codebook(self) -> torch.Tensor:
        """Return the codes as used by the lookup: (N, D), unit norm when `l2_norm`."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Return encoder outputs (B, D, h, w) in the space of the lookup (unit norm when `l2_norm`)."""
        return F.normalize(z, dim=1) if self.l2_norm else z

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Return the index of the nearest code for each position of projected latents (B, D, h, w)."""
        batch, dim, height, width = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, dim)  # (B*h*w, D)
        codebook = self.codebook()  # (N, D)

        # |z - e|^2 = |z|^2 - 2 z.e + |e|^2; |z|^2 is the same for every code, so it is left out.
        distances = codebook.pow(2).sum(dim=1) - 2.0 * flat @ codebook.t()  # (B*h*w, N)
        return distances.argmin(dim=1).view(batch, height * width)  # (B, h*w)

    def lookup(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Return the codes of tokens (B, h*w) as a latent grid (B, D, h, w)."""
        codes = self.codebook()[tokens]  # (B, h*w, D)
        return codes.view(tokens.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize latents (B, D, h, w); returns straight-through codes, tokens and the two losses."""
        z = self.project(z)  # (B, D, h, w)
        tokens = self.nearest(z)  # (B, h*w)
        quantized = self.lookup(tokens, z.shape[2], z.shape[3])  # (B, D, h, w)

        codebook_loss = F.mse_loss(quantized, z.detach())
        commitment_loss = F.mse_loss(z, quantized.detach())

        # Straight-through estimator: the decoder receives the codes, the encoder receives the decoder's gradient.
        quantized = z + (quantized - z).detach()  # (B, D, h, w)
        return quantized, tokens, codebook_loss, commitment_loss


class VQTokenizer(ModelMixin, ConfigMixin):
    """VQ-VAE image tokenizer: `encode` maps images to token grids, `decode` maps them back.

    Args:
        num_embeddings (`int`, defaults to 512): codebook size N; tokens are in [0, N).
        embedding_dim (`int`, defaults to 8): dimension of each code.
        codebook_l2_norm (`bool`, defaults to True): compare l2-normalised latents with l2-normalised codes.
        image_size (`int`, defaults to 32): side of the square training images; `grid_size` follows from it.
        in_channels (`int`, defaults to 3): image channels.
        block_out_channels (`tuple[int]`): channels of each encoder level; each level after the first
            halves the resolution, so `downsample_factor = 2 ** (len(block_out_channels) - 1)`.
        down_block_types, up_block_types (`tuple[str]`, optional): diffusers block names, one per level
            ("DownEncoderBlock2D" / "AttnDownEncoderBlock2D", "UpDecoderBlock2D" / "AttnUpDecoderBlock2D");
            plain resnet blocks at every level by default.
        layers_per_block (`int`): resnet blocks per encoder level (the decoder has one more).
        latent_channels (`int`): channels between encoder and `quant_conv`.
        norm_num_groups (`int`): groups of every GroupNorm.
        act_fn, mid_block_add_attention, norm_type: as in `diffusers.VQModel`.
        grid_size, downsample_factor (`int`, optional): derived from the above; accepted so that a saved
            config loads, and checked against the derived values.
    """

    @register_to_config
    def __init__(
        self,
        num_embeddings: int = 512,
        embedding_dim: int = 8,
        codebook_l2_norm: bool = True,
        image_size: int = 32,
        in_channels: int = 3,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        down_block_types: tuple[str, ...] | None = None,
        up_block_types: tuple[str, ...] | None = None,
        layers_per_block: int = 1,
        latent_channels: int = 64,
        norm_num_groups: int = 16,
        act_fn: str = "silu",
        mid_block_add_attention: bool = True,
        norm_type: str = "group",
        grid_size: int | None = None,
        downsample_factor: int | None = None,
    ):
        super().__init__()
        levels = len(block_out_channels)
        down_block_types = tuple(down_block_types or ("DownEncoderBlock2D",) * levels)
        up_block_types = tuple(up_block_types or ("UpDecoderBlock2D",) * levels)
        if len(down_block_types) != levels or len(up_block_types) != levels:
            raise ValueError(
                f"block_out_channels has {levels} levels but down_block_types has {len(down_block_types)} "
                f"and up_block_types {len(up_block_types)}; give one block type per level"
            )
        if num_embeddings < 2:
            raise ValueError(f"num_embeddings must be at least 2, got {num_embeddings}")
        derived_factor = 2 ** (levels - 1)
        if image_size % derived_factor != 0:
            raise ValueError(f"image_size {image_size} is not divisible by the downsample factor {derived_factor}")
        derived_grid = image_size // derived_factor
        if downsample_factor is not None and downsample_factor != derived_factor:
            raise ValueError(
                f"downsample_factor {downsample_factor} does not match {levels} levels (factor {derived_factor})"
            )
        if grid_size is not None and grid_size != derived_grid:
            raise ValueError(f"grid_size {grid_size} does not match image_size {image_size} / {derived_factor}")
        self.register_to_config(grid_size=derived_grid, downsample_factor=derived_factor,
                                down_block_types=down_block_types, up_block_types=up_block_types)

        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=down_block_types,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            double_z=False,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.quant_conv = nn.Conv2d(latent_channels, embedding_dim, 1)
        self.quantize = VectorQuantizer(num_embeddings, embedding_dim, codebook_l2_norm)
        self.post_quant_conv = nn.Conv2d(embedding_dim, latent_channels, 1)
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=in_channels,
            up_block_types=up_block_types,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            norm_type=norm_type,
            mid_block_add_attention=mid_block_add_attention,
        )

    # ----------------------------------------------------------------------------------------------
    # Input checks

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ValueError/TypeError unless images are a float batch (B, C, H, W) in [-1, 1] fitting the grid."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(
                f"images must be a float tensor in [-1, 1], got dtype {images.dtype}; "
                "convert uint8 pixels with images.float() / 127.5 - 1"
            )
        if images.ndim != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got shape {tuple(images.shape)}")
        channels = self.config.in_channels
        if images.shape[1] != channels:
            raise ValueError(
                f"images have {images.shape[1]} channels but the tokenizer expects {channels}; "
                "repeat a grayscale channel with images.expand(-1, 3, -1, -1) for RGB tokenizers"
            )
        factor = self.config.downsample_factor
        height, width = images.shape[2], images.shape[3]
        if height % factor != 0 or width % factor != 0:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the downsample factor {factor}; "
                f"resize or crop to a multiple of {factor} (trained at {self.config.image_size})"
            )
        if images.numel() > 0:
            low, high = images.min().item(), images.max().item()
            if low < -1.0 - _RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
                raise ValueError(
                    f"images must be in [-1, 1], got values in [{low:.3f}, {high:.3f}]; "
                    "map pixels in [0, 1] with 2 * x - 1 or uint8 pixels with x / 127.5 - 1"
                )

    def _grid_side(self, tokens: torch.Tensor) -> int:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of shape (B, L), got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (B, L) with L = h * w, got shape {tuple(tokens.shape)}")
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"tokens must form a square grid, got L = {tokens.shape[1]} which is not a square")
        if tokens.numel() > 0:
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.config.num_embeddings:
                raise ValueError(
                    f"tokens must be in [0, {self.config.num_embeddings}), got values in [{low}, {high}]"
                )
        return side

    # ----------------------------------------------------------------------------------------------
    # Encoding and decoding

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Return the unquantized latents (B, D, h, w) of images (B, C, H, W) in [-1, 1]."""
        h = self.encoder(images)  # (B, latent_channels, h, w)
        return self.quant_conv(h)  # (B, D, h, w)

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """Return images (B, C, H, W), not clamped, from quantized latents (B, D, h, w)."""
        h = self.post_quant_conv(quantized)  # (B, latent_channels, h, w)
        spatial = quantized if self.config.norm_type == "spatial" else None
        return self.decoder(h, spatial)  # (B, C, H, W)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Map images (B, C, H, W) in [-1, 1] to tokens (B, h * w) long, row-major over the grid."""
        self.check_images(images)
        images = images.to(device=self.device, dtype=self.dtype).clamp(-1.0, 1.0)
        latents = self.quantize.project(self.encode_latents(images))  # (B, D, h, w)
        return self.quantize.nearest(latents)  # (B, h*w)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map tokens (B, h * w) of a square grid to images (B, C, H, W) clamped to [-1, 1]."""
        side = self._grid_side(tokens)
        quantized = self.quantize.lookup(tokens.to(device=self.device, dtype=torch.long), side, side)  # (B, D, h, w)
        return self.decode_latents(quantized.to(self.dtype)).clamp(-1.0, 1.0)  # (B, C, H, W)

    def forward(self, images: torch.Tensor) -> VQTokenizerOutput:
        """Reconstruct images (B, C, H, W) through the quantizer, with gradients; used for training."""
        self.check_images(images)
        latents = self.encode_latents(images)  # (B, D, h, w)
        quantized, tokens, codebook_loss, commitment_loss = self.quantize(latents)
        sample = self.decode_latents(quantized)  # (B, C, H, W)
        return VQTokenizerOutput(
            sample=sample,
            tokens=tokens,
            latents=self.quantize.project(latents),
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
        )

    # ----------------------------------------------------------------------------------------------
    # Foreign weights

    @classmethod
    def from_vqmodel(cls, vqmodel, image_size: int | None = None) -> VQTokenizer:
        """Wrap a `diffusers.VQModel` (an instance or a saved folder) as a tokenizer with its weights.

        A VQModel compares latents with a plain Euclidean codebook, so `codebook_l2_norm` is False.
        `image_size` defaults to the VQModel's `sample_size`.
        """
        from diffusers import VQModel

        if isinstance(vqmodel, (str, os.PathLike)):
            if not os.path.isdir(vqmodel):
                raise ValueError(f"VQModel folder not found: {vqmodel}; pass a folder written by save_pretrained")
            vqmodel = VQModel.from_pretrained(vqmodel)
        if not isinstance(vqmodel, VQModel):
            raise TypeError(f"expected a diffusers.VQModel or a path to one, got {type(vqmodel).__name__}")
        config = vqmodel.config
        if config.out_channels != config.in_channels:
            raise ValueError(
                f"VQModel has in_channels={config.in_channels} but out_channels={config.out_channels}; "
                "a tokenizer decodes to the channels it encodes"
            )
        if config.lookup_from_codebook:
            logger.warning("VQModel has lookup_from_codebook=True; the tokenizer always decodes from the codebook")
        tokenizer = cls(
            num_embeddings=config.num_vq_embeddings,
            embedding_dim=config.vq_embed_dim if config.vq_embed_dim is not None else config.latent_channels,
            codebook_l2_norm=False,
            image_size=image_size if image_size is not None else config.sample_size,
            in_channels=config.in_channels,
            block_out_channels=tuple(config.block_out_channels),
            down_block_types=tuple(config.down_block_types),
            up_block_types=tuple(config.up_block_types),
            layers_per_block=config.layers_per_block,
            latent_channels=config.latent_channels,
            norm_num_groups=config.norm_num_groups,
            act_fn=config.act_fn,
            mid_block_add_attention=config.mid_block_add_attention,
            norm_type=config.norm_type,
        )
        load_state_dict_strict(tokenizer, vqmodel.state_dict(), source="VQModel")
        return tokenizer.to(dtype=vqmodel.dtype).eval()

    @classmethod
    def from_llamagen_checkpoint(cls, path: str | os.PathLike, image_size: int = 256) -> VQTokenizer:
        """Load LlamaGen's VQ-16 tokenizer checkpoint (`vq_ds16_c2i.pt`) exactly.

        The file is a `torch.save` dictionary whose "model" entry is the state dict of LlamaGen's
        `VQ_16` (16384 codes of dimension 8, l2-normalised, 16x downsampling, 256 px -> 16 x 16 tokens).
        It is read with `torch.load(weights_only=True)`; every key must map onto this architecture.
        """
        state_dict = read_llamagen_state_dict(path)
        config = llamagen_vq16_config(state_dict, image_size=image_size)
        converted = convert_llamagen_state_dict(state_dict)

        # Build on the meta device and take the checkpoint's tensors as parameters: a random init of 70M
        # parameters would be thrown away anyway. Every parameter is assigned because the load is strict.
        with torch.device("meta"):
            tokenizer = cls(**config)
        load_state_dict_strict(tokenizer, converted, source=f"LlamaGen checkpoint {os.fspath(path)}", assign=True)
        return tokenizer.eval()


# --------------------------------------------------------------------------------------------------
# LlamaGen VQ-16: configuration and key map


def llamagen_vq16_config(state_dict: dict[str, torch.Tensor], image_size: int = 256) -> dict:
    """Return `VQTokenizer` arguments for LlamaGen's VQ-16 (channel multipliers 1, 1, 2, 2, 4 of 128).

    The codebook size and dimension are read from `quantize.embedding.weight`, so VQ-16 checkpoints
    trained with another codebook size or code dimension load too.
    """
    embedding = state_dict.get("quantize.embedding.weight")
    if embedding is None or embedding.ndim != 2:
        raise ValueError("LlamaGen checkpoint has no 2-D 'quantize.embedding.weight'; is this a VQ tokenizer?")
    num_embeddings, embedding_dim = embedding.shape
    return dict(
        num_embeddings=int(num_embeddings),
        embedding_dim=int(embedding_dim),
        codebook_l2_norm=True,
        image_size=image_size,
        in_channels=3,
        block_out_channels=(128, 128, 256, 256, 512),
        # LlamaGen adds self-attention after every resnet block of the lowest-resolution level only.
        down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=256,
        norm_num_groups=32,
        act_fn="silu",
        mid_block_add_attention=True,
        norm_type="group",
    )


# LlamaGen keeps a rolling buffer of recently used code indices for its training logs; it is not a weight.
LLAMAGEN_IGNORED_KEYS = ("quantize.codebook_used",)

_LLAMAGEN_RESNET_NAMES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                          "nin_shortcut": "conv_shortcut"}
_LLAMAGEN_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _map_llamagen_block(rest: str) -> str | None:
    """Map `res.J.<name>`, `attn.J.<name>` or `downsample/upsample.conv` inside one level."""
    match = re.fullmatch(r"res\.(\d+)\.(\w+)\.(weight|bias)", rest)
    if match and match.group(2) in _LLAMAGEN_RESNET_NAMES:
        return f"resnets.{match.group(1)}.{_LLAMAGEN_RESNET_NAMES[match.group(2)]}.{match.group(3)}"
    match = re.fullmatch(r"attn\.(\d+)\.(\w+)\.(weight|bias)", rest)
    if match and match.group(2) in _LLAMAGEN_ATTENTION_NAMES:
        return f"attentions.{match.group(1)}.{_LLAMAGEN_ATTENTION_NAMES[match.group(2)]}.{match.group(3)}"
    match = re.fullmatch(r"(downsample|upsample)\.conv\.(weight|bias)", rest)
    if match:
        return f"{match.group(1)}rs.0.conv.{match.group(2)}"
    return None


def _map_llamagen_mid(rest: str) -> str | None:
    """Map `mid.0` (resnet), `mid.1` (attention), `mid.2` (resnet) to diffusers' mid block."""
    match = re.fullmatch(r"(\d+)\.(\w+)\.(weight|bias)", rest)
    if not match:
        return None
    index, name, kind = match.groups()
    if index in ("0", "2") and name in _LLAMAGEN_RESNET_NAMES:
        return f"mid_block.resnets.{int(index) // 2}.{_LLAMAGEN_RESNET_NAMES[name]}.{kind}"
    if index == "1" and name in _LLAMAGEN_ATTENTION_NAMES:
        return f"mid_block.attentions.0.{_LLAMAGEN_ATTENTION_NAMES[name]}.{kind}"
    return None


def map_llamagen_key(key: str) -> str | None:
    """Return the `VQTokenizer` key of a LlamaGen VQ key, or None when the key is unknown.

    Both use the same level order: LlamaGen's `decoder.conv_blocks.0` is the lowest-resolution level,
    as is diffusers' `decoder.up_blocks.0`.
    """
    if key in ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias",
               "quantize.embedding.weight"):
        return key
    match = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not match:
        return None
    part, rest = match.groups()
    if re.fullmatch(r"(conv_in|conv_out)\.(weight|bias)", rest):
        return key
    match = re.fullmatch(r"norm_out\.(weight|bias)", rest)
    if match:
        return f"{part}.conv_norm_out.{match.group(1)}"
    match = re.fullmatch(r"mid\.(.+)", rest)
    if match:
        mapped = _map_llamagen_mid(match.group(1))
        return f"{part}.{mapped}" if mapped else None
    match = re.fullmatch(r"conv_blocks\.(\d+)\.(.+)", rest)
    if match:
        mapped = _map_llamagen_block(match.group(2))
        blocks = "down_blocks" if part == "encoder" else "up_blocks"
        return f"{part}.{blocks}.{match.group(1)}.{mapped}" if mapped else None
    return None


def convert_llamagen_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a LlamaGen VQ state dict to `VQTokenizer` keys; raise ValueError listing unknown keys."""
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in LLAMAGEN_IGNORED_KEYS:
            continue
        new_key = map_llamagen_key(key)
        if new_key is None:
            unknown.append(key)
            continue
        # LlamaGen's attention projections are 1x1 convolutions (C, C, 1, 1); diffusers uses nn.Linear (C, C).
        if re.search(r"attentions\.\d+\.to_(q|k|v|out\.0)\.weight$", new_key) and value.ndim == 4:
            value = value[:, :, 0, 0].contiguous()
        converted[new_key] = value
    if unknown:
        raise ValueError(
            f"LlamaGen checkpoint has {len(unknown)} unexpected keys: {_list_keys(unknown)}; "
            "only the VQ tokenizer (VQ-16 layout) is supported"
        )
    return converted


def read_llamagen_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the model state dict from a LlamaGen checkpoint with `torch.load(weights_only=True)`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"LlamaGen checkpoint not found: {path}; download vq_ds16_c2i.pt and pass its path")
    try:
        # LlamaGen's training script also saves its argparse.Namespace under "args"; allow that one class.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as error:
        raise ValueError(
            f"cannot read LlamaGen checkpoint {path}: {error}; the file is truncated or damaged, or it contains "
            "objects other than tensors (download it again)"
        ) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"LlamaGen checkpoint {path} contains a {type(checkpoint).__name__}, expected a dict")

    # LlamaGen's sampling scripts read checkpoint["model"]; accept a bare state dict as well.
    for entry in ("model", "state_dict"):
        if entry in checkpoint and isinstance(checkpoint[entry], dict):
            checkpoint = checkpoint[entry]
            break
    tensors = {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError(f"LlamaGen checkpoint {path} has no tensors under 'model'; entries: {_list_keys(checkpoint)}")
    return tensors


def load_state_dict_strict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, assign: bool = False
) -> None:
    """Load every tensor of `state_dict` into `model`; raise ValueError listing missing, unexpected or misshaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = [
        f"{key} {tuple(state_dict[key].shape)} != {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if state_dict[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_list_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_list_keys(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} keys of the wrong shape: {_list_keys(misshaped)}")
    if problems:
        raise ValueError(f"{source} does not match the tokenizer: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True, assign=assign)


def _list_keys(keys, limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(str(key) for key in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_tokenizer(spec: str | os.PathLike) -> VQTokenizer:
    """Load a tokenizer from a saved VQTokenizer folder, a diffusers VQModel folder or a LlamaGen `.pt` file."""
    path = os.fspath(spec)
    if os.path.isfile(path) and path.endswith((".pt", ".pth", ".ckpt")):
        return VQTokenizer.from_llamagen_checkpoint(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(
            f"tokenizer not found: {path} is neither a folder with config.json nor a LlamaGen .pt checkpoint"
        )
    with open(config_path) as file:
        try:
            class_name = json.load(file).get("_class_name")
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    if class_name == "VQModel":
        return VQTokenizer.from_vqmodel(path)
    if class_name != "VQTokenizer":
        raise ValueError(f"{config_path} describes a {class_name!r}; expected a VQTokenizer or a VQModel")
    return VQTokenizer.from_pretrained(path)
