"""Tests of VQTokenizer: shapes and ranges, input checks, training, the shipped tokenizer, foreign weights."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from xdlm_vision.data.images import FashionMNISTSource
from xdlm_vision.tokenizer import VQTokenizer, load_tokenizer, map_llamagen_key
from xdlm_vision.training import tokenizer_trainer

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "tokenizers" / "fashion-mnist-vq512"


def tiny_tokenizer(**overrides) -> VQTokenizer:
    torch.manual_seed(0)
    arguments = dict(num_embeddings=64, embedding_dim=4, image_size=32, block_out_channels=(8, 16, 16),
                     latent_channels=16, norm_num_groups=4)
    arguments.update(overrides)
    return VQTokenizer(**arguments).eval()


@pytest.fixture(scope="module")
def fashion_test_images():
    images, labels = FashionMNISTSource(split="test").load_batch(range(512))
    return images, labels


# --------------------------------------------------------------------------------------------------
# Shapes, ranges and input checks


def test_encode_decode_shapes_and_ranges(fashion_test_images):
    tokenizer = tiny_tokenizer()
    images = fashion_test_images[0][:16]
    tokens = tokenizer.encode(images)
    assert tokens.shape == (16, 64)
    assert tokens.dtype == torch.long
    assert int(tokens.min()) >= 0
    assert int(tokens.max()) < 64

    decoded = tokenizer.decode(tokens)
    assert decoded.shape == (16, 3, 32, 32)
    assert float(decoded.min()) >= -1.0
    assert float(decoded.max()) <= 1.0

    assert tokenizer.config.grid_size == 8
    assert tokenizer.config.downsample_factor == 4
    assert tokenizer.config.image_size == 32
    assert tokenizer.config.in_channels == 3


def test_encode_other_size_gives_larger_grid():
    tokenizer = tiny_tokenizer()
    tokens = tokenizer.encode(torch.zeros(2, 3, 48, 64))
    assert tokens.shape == (2, 12 * 16)


def test_tokenizer_save_load_roundtrip(tmp_path, fashion_test_images):
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = VQTokenizer.from_pretrained(tmp_path)
    images = fashion_test_images[0][:8]
    assert torch.equal(loaded.encode(images), tokenizer.encode(images))
    assert loaded.config.grid_size == 8
    assert torch.equal(load_tokenizer(tmp_path).encode(images), tokenizer.encode(images))


@pytest.mark.parametrize(
    "images, error, words",
    [
        (torch.full((2, 3, 32, 32), 255.0), ValueError, "[-1, 1]"),
        (torch.zeros(2, 1, 32, 32), ValueError, "channels"),
        (torch.zeros(2, 3, 30, 32), ValueError, "not divisible"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, "float"),
        (torch.zeros(3, 32, 32), ValueError, "(B, C, H, W)"),
    ],
)
def test_encode_rejects_bad_images(images, error, words):
    with pytest.raises(error) as raised:
        tiny_tokenizer().encode(images)
    assert words in str(raised.value)


@pytest.mark.parametrize(
    "tokens, error, words",
    [
        (torch.full((1, 64), 64), ValueError, "[0, 64)"),
        (torch.zeros(1, 60, dtype=torch.long), ValueError, "square"),
        (torch.zeros(1, 64), TypeError, "integer"),
        (torch.zeros(64, dtype=torch.long), ValueError, "(B, L)"),
    ],
)
def test_decode_rejects_bad_tokens(tokens, error, words):
    with pytest.raises(error) as raised:
        tiny_tokenizer().decode(tokens)
    assert words in str(raised.value)


def test_config_rejects_mismatched_grid():
    with pytest.raises(ValueError, match="grid_size 7"):
        VQTokenizer(image_size=32, block_out_channels=(8, 8, 8), norm_num_groups=4, latent_channels=8, grid_size=7)


# --------------------------------------------------------------------------------------------------
# Training


def test_training_steps_lower_reconstruction_loss(tmp_path, fashion_test_images):
    options = dict(tokenizer_trainer.DEFAULTS)
    options.update(num_embeddings=64, embedding_dim=4, block_out_channels=[8, 16, 16], latent_channels=16,
                   norm_num_groups=4, steps=30, batch_size=16, warmup_steps=5, log_every=10,
                   checkpoint_every=15, restart_every=10, eval_images=64, threads=1)
    images = fashion_test_images[0][:64]
    torch.manual_seed(options["seed"])
    initial = tokenizer_trainer.build_tokenizer(options, 32).eval()
    with torch.no_grad():
        initial_mse = F.mse_loss(initial(images).sample, images).item()

    metrics = tokenizer_trainer.train_tokenizer(options, tmp_path)
    trained = VQTokenizer.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        trained_mse = F.mse_loss(trained(images).sample, images).item()

    assert trained_mse < 0.5 * initial_mse
    assert metrics["steps"] == 30
    assert metrics["num_images"] == 64
    assert (tmp_path / "checkpoint" / "training_state.pt").is_file()
    assert (tmp_path / "metrics.json").is_file()


def test_training_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    options = dict(tokenizer_trainer.DEFAULTS)
    options.update(num_embeddings=32, embedding_dim=4, block_out_channels=[8, 8], latent_channels=8,
                   norm_num_groups=4, steps=8, batch_size=16, warmup_steps=2, log_every=4,
                   checkpoint_every=4, restart_every=3, eval_images=0, threads=1, horizontal_flip=True)
    tokenizer_trainer.train_tokenizer(options, tmp_path / "straight")

    # Interrupt right after the step-4 checkpoint, as Ctrl-C would, then resume.
    save = tokenizer_trainer.save_checkpoint

    def save_then_interrupt(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer_trainer, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        tokenizer_trainer.train_tokenizer(options, tmp_path / "resumed")
    monkeypatch.setattr(tokenizer_trainer, "save_checkpoint", save)
    with pytest.raises(ValueError, match="--resume"):
        tokenizer_trainer.train_tokenizer(options, tmp_path / "resumed")
    metrics = tokenizer_trainer.train_tokenizer(options, tmp_path / "resumed", resume=True)

    assert metrics["steps"] == 8
    straight = VQTokenizer.from_pretrained(tmp_path / "straight").state_dict()
    resumed = VQTokenizer.from_pretrained(tmp_path / "resumed").state_dict()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_training_runs_on_imagefolder_photos(tmp_path):
    options = dict(tokenizer_trainer.DEFAULTS)
    options.update(source="imagefolder", data_dir=str(REPO / "tests" / "fixtures" / "imagenet"), eval_split="train",
                   image_size=32, num_embeddings=16, embedding_dim=4, block_out_channels=[8, 8], latent_channels=8,
                   norm_num_groups=4, steps=2, batch_size=4, warmup_steps=1, eval_images=6, threads=1)
    metrics = tokenizer_trainer.train_tokenizer(options, tmp_path)
    assert metrics["num_images"] == 6
    assert VQTokenizer.from_pretrained(tmp_path).config.grid_size == 16


def test_training_resume_rejects_changed_options(tmp_path):
    options = dict(tokenizer_trainer.DEFAULTS)
    options.update(num_embeddings=16, embedding_dim=4, block_out_channels=[8, 8], latent_channels=8,
                   norm_num_groups=4, steps=2, batch_size=4, warmup_steps=1, eval_images=0, threads=1)
    tokenizer_trainer.train_tokenizer(options, tmp_path)
    options["learning_rate"] = 0.5
    with pytest.raises(ValueError, match="learning_rate: 0.001 -> 0.5"):
        tokenizer_trainer.train_tokenizer(options, tmp_path, resume=True)


def test_train_tokenizer_cli_rejects_unknown_recipe_option(tmp_path, capsys):
    from xdlm_vision.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("num_embedings: 512\n")
    assert main(["train-tokenizer", "--config", str(recipe), "--output-dir", str(tmp_path / "out")]) == 2
    assert "num_embedings" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The shipped Fashion-MNIST tokenizer


def test_shipped_tokenizer_meets_quality_targets(fashion_test_images):
    tokenizer = load_tokenizer(SHIPPED)
    images = fashion_test_images[0]
    tokens = tokenizer.encode(images)
    reconstruction = tokenizer.decode(tokens)

    mse = ((reconstruction - images) / 2.0).pow(2).flatten(1).mean(dim=1)
    psnr = (-10.0 * torch.log10(mse)).mean().item()
    usage = tokens.unique().numel() / tokenizer.config.num_embeddings
    assert tokenizer.config.grid_size == 8
    assert tokenizer.config.num_embeddings == 512
    assert psnr >= 22.0
    # 512 images give 32768 tokens; the README reports the usage over the whole test set.
    assert usage >= 0.8


# --------------------------------------------------------------------------------------------------
# LlamaGen VQ-16: a state dict with the real key names and shapes, and a direct reference forward


def llamagen_vq16_shapes(codebook_size: int = 16384, embed_dim: int = 8) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of LlamaGen's VQ_16 state dict (ch 128, multipliers 1 1 2 2 4, 2 res blocks, z 256)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, out_channels, in_channels, kernel):
        shapes[f"{name}.weight"] = (out_channels, in_channels, kernel, kernel)
        shapes[f"{name}.bias"] = (out_channels,)

    def norm(name, channels):
        shapes[f"{name}.weight"] = (channels,)
        shapes[f"{name}.bias"] = (channels,)

    def res(name, in_channels, out_channels):
        norm(f"{name}.norm1", in_channels)
        conv(f"{name}.conv1", out_channels, in_channels, 3)
        norm(f"{name}.norm2", out_channels)
        conv(f"{name}.conv2", out_channels, out_channels, 3)
        if in_channels != out_channels:
            conv(f"{name}.nin_shortcut", out_channels, in_channels, 1)

    def attn(name, channels):
        norm(f"{name}.norm", channels)
        for projection in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{projection}", channels, channels, 1)

    ch, mult = 128, (1, 1, 2, 2, 4)
    conv("encoder.conv_in", ch, 3, 3)
    block_in = ch
    for level, m in enumerate(mult):
        for j in range(2):
            res(f"encoder.conv_blocks.{level}.res.{j}", block_in, ch * m)
            block_in = ch * m
            if level == len(mult) - 1:
                attn(f"encoder.conv_blocks.{level}.attn.{j}", block_in)
        if level != len(mult) - 1:
            conv(f"encoder.conv_blocks.{level}.downsample.conv", block_in, block_in, 3)
    res("encoder.mid.0", block_in, block_in)
    attn("encoder.mid.1", block_in)
    res("encoder.mid.2", block_in, block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", 256, block_in, 3)

    block_in = ch * mult[-1]
    conv("decoder.conv_in", block_in, 256, 3)
    res("decoder.mid.0", block_in, block_in)
    attn("decoder.mid.1", block_in)
    res("decoder.mid.2", block_in, block_in)
    for k, level in enumerate(reversed(range(len(mult)))):
        for j in range(3):
            res(f"decoder.conv_blocks.{k}.res.{j}", block_in, ch * mult[level])
            block_in = ch * mult[level]
            if level == len(mult) - 1:
                attn(f"decoder.conv_blocks.{k}.attn.{j}", block_in)
        if level != 0:
            conv(f"decoder.conv_blocks.{k}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", 3, block_in, 3)

    conv("quant_conv", embed_dim, 256, 1)
    conv("post_quant_conv", 256, embed_dim, 1)
    shapes["quantize.embedding.weight"] = (codebook_size, embed_dim)
    shapes["quantize.codebook_used"] = (65536,)
    return shapes


def random_llamagen_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in llamagen_vq16_shapes().items():
        if key == "quantize.codebook_used":
            state[key] = torch.zeros(shape)
        elif key.endswith("bias") or ".norm" in key:
            # Norm scales near 1, biases near 0.
            base = 1.0 if key.endswith("weight") else 0.0
            state[key] = base + 0.1 * torch.randn(shape, generator=generator)
        else:
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    return state


def _res_reference(x, p, name):
    h = F.silu(F.group_norm(x, 32, p[f"{name}.norm1.weight"], p[f"{name}.norm1.bias"], eps=1e-6))
    h = F.conv2d(h, p[f"{name}.conv1.weight"], p[f"{name}.conv1.bias"], padding=1)
    h = F.silu(F.group_norm(h, 32, p[f"{name}.norm2.weight"], p[f"{name}.norm2.bias"], eps=1e-6))
    h = F.conv2d(h, p[f"{name}.conv2.weight"], p[f"{name}.conv2.bias"], padding=1)
    if f"{name}.nin_shortcut.weight" in p:
        x = F.conv2d(x, p[f"{name}.nin_shortcut.weight"], p[f"{name}.nin_shortcut.bias"])
    return x + h


def _attn_reference(x, p, name):
    b, c, height, width = x.shape
    h = F.group_norm(x, 32, p[f"{name}.norm.weight"], p[f"{name}.norm.bias"], eps=1e-6)
    q, k, v = (F.conv2d(h, p[f"{name}.{n}.weight"], p[f"{name}.{n}.bias"]).flatten(2) for n in "qkv")
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # (b, hw, hw)
    out = (v @ weights.transpose(1, 2)).view(b, c, height, width)
    return x + F.conv2d(out, p[f"{name}.proj_out.weight"], p[f"{name}.proj_out.bias"])


def llamagen_reference_encode(p, x):
    """LlamaGen VQ-16 encoder + l2-normalised nearest code, written directly from its layer list."""
    h = F.conv2d(x, p["encoder.conv_in.weight"], p["encoder.conv_in.bias"], padding=1)
    for level in range(5):
        for j in range(2):
            h = _res_reference(h, p, f"encoder.conv_blocks.{level}.res.{j}")
            if f"encoder.conv_blocks.{level}.attn.{j}.q.weight" in p:
                h = _attn_reference(h, p, f"encoder.conv_blocks.{level}.attn.{j}")
        if f"encoder.conv_blocks.{level}.downsample.conv.weight" in p:
            h = F.conv2d(F.pad(h, (0, 1, 0, 1)), p[f"encoder.conv_blocks.{level}.downsample.conv.weight"],
                         p[f"encoder.conv_blocks.{level}.downsample.conv.bias"], stride=2)
    h = _res_reference(h, p, "encoder.mid.0")
    h = _attn_reference(h, p, "encoder.mid.1")
    h = _res_reference(h, p, "encoder.mid.2")
    h = F.silu(F.group_norm(h, 32, p["encoder.norm_out.weight"], p["encoder.norm_out.bias"], eps=1e-6))
    h = F.conv2d(h, p["encoder.conv_out.weight"], p["encoder.conv_out.bias"], padding=1)
    z = F.conv2d(h, p["quant_conv.weight"], p["quant_conv.bias"])  # (b, 8, h, w)
    z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)
    codebook = F.normalize(p["quantize.embedding.weight"], dim=-1)
    return torch.cdist(z, codebook).argmin(dim=1).view(x.shape[0], -1)


def llamagen_reference_decode(p, tokens, side):
    codes = F.normalize(p["quantize.embedding.weight"], dim=-1)[tokens]  # (b, hw, 8)
    z = codes.view(tokens.shape[0], side, side, -1).permute(0, 3, 1, 2)
    h = F.conv2d(z, p["post_quant_conv.weight"], p["post_quant_conv.bias"])
    h = F.conv2d(h, p["decoder.conv_in.weight"], p["decoder.conv_in.bias"], padding=1)
    h = _res_reference(h, p, "decoder.mid.0")
    h = _attn_reference(h, p, "decoder.mid.1")
    h = _res_reference(h, p, "decoder.mid.2")
    for k in range(5):
        for j in range(3):
            h = _res_reference(h, p, f"decoder.conv_blocks.{k}.res.{j}")
            if f"decoder.conv_blocks.{k}.attn.{j}.q.weight" in p:
                h = _attn_reference(h, p, f"decoder.conv_blocks.{k}.attn.{j}")
        if f"decoder.conv_blocks.{k}.upsample.conv.weight" in p:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = F.conv2d(h, p[f"decoder.conv_blocks.{k}.upsample.conv.weight"],
                         p[f"decoder.conv_blocks.{k}.upsample.conv.bias"], padding=1)
    h = F.silu(F.group_norm(h, 32, p["decoder.norm_out.weight"], p["decoder.norm_out.bias"], eps=1e-6))
    return F.conv2d(h, p["decoder.conv_out.weight"], p["decoder.conv_out.bias"], padding=1).clamp(-1, 1)


@pytest.fixture(scope="module")
def llamagen_checkpoint(tmp_path_factory):
    state = random_llamagen_state_dict()
    path = tmp_path_factory.mktemp("llamagen") / "vq_ds16_c2i.pt"
    # The other entries of a checkpoint written by LlamaGen's vq_train.py; only "model" is read.
    arguments = argparse.Namespace(vq_model="VQ-16", codebook_size=16384, codebook_embed_dim=8, image_size=256)
    torch.save({"model": state, "steps": 0, "args": arguments, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path, state


def test_llamagen_layout_has_published_shapes():
    shapes = llamagen_vq16_shapes()
    assert shapes["quantize.embedding.weight"] == (16384, 8)
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert shapes["encoder.conv_out.weight"] == (256, 512, 3, 3)
    assert shapes["quant_conv.weight"] == (8, 256, 1, 1)
    assert shapes["post_quant_conv.weight"] == (256, 8, 1, 1)
    assert shapes["decoder.conv_blocks.0.attn.2.q.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.conv_blocks.3.res.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert sum(math.prod(shape) for key, shape in shapes.items() if key != "quantize.codebook_used") > 70_000_000


def test_llamagen_key_map_examples():
    assert map_llamagen_key("encoder.conv_blocks.2.res.0.nin_shortcut.weight") == (
        "encoder.down_blocks.2.resnets.0.conv_shortcut.weight")
    assert map_llamagen_key("encoder.conv_blocks.4.attn.1.proj_out.bias") == (
        "encoder.down_blocks.4.attentions.1.to_out.0.bias")
    assert map_llamagen_key("encoder.conv_blocks.0.downsample.conv.weight") == (
        "encoder.down_blocks.0.downsamplers.0.conv.weight")
    assert map_llamagen_key("decoder.conv_blocks.1.upsample.conv.bias") == "decoder.up_blocks.1.upsamplers.0.conv.bias"
    assert map_llamagen_key("decoder.mid.1.norm.weight") == "decoder.mid_block.attentions.0.group_norm.weight"
    assert map_llamagen_key("decoder.mid.2.conv1.weight") == "decoder.mid_block.resnets.1.conv1.weight"
    assert map_llamagen_key("decoder.norm_out.weight") == "decoder.conv_norm_out.weight"
    assert map_llamagen_key("encoder.conv_blocks.0.res.0.bogus.weight") is None


def test_llamagen_checkpoint_matches_reference(llamagen_checkpoint):
    path, state = llamagen_checkpoint
    tokenizer = VQTokenizer.from_llamagen_checkpoint(path)
    assert tokenizer.config.num_embeddings == 16384
    assert tokenizer.config.embedding_dim == 8
    assert tokenizer.config.downsample_factor == 16
    assert tokenizer.config.grid_size == 16
    assert tokenizer.config.image_size == 256
    num_parameters = sum(parameter.numel() for parameter in tokenizer.parameters())
    assert num_parameters == sum(value.numel() for key, value in state.items() if key != "quantize.codebook_used")

    # A 32 px input keeps the check fast; the graph is the same at 256 px (2 x 2 instead of 16 x 16 tokens).
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    with torch.no_grad():
        expected_tokens = llamagen_reference_encode(state, images)
        tokens = tokenizer.encode(images)
        assert torch.equal(tokens, expected_tokens)
        expected_images = llamagen_reference_decode(state, tokens, 2)
        decoded = tokenizer.decode(tokens)
    torch.testing.assert_close(decoded, expected_images, atol=1e-4, rtol=1e-4)


def test_llamagen_checkpoint_lists_missing_and_unexpected_keys(llamagen_checkpoint, tmp_path):
    _, state = llamagen_checkpoint
    missing = {key: value for key, value in state.items() if key != "decoder.conv_out.bias"}
    torch.save({"model": missing}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"1 missing keys: decoder\.conv_out\.bias"):
        VQTokenizer.from_llamagen_checkpoint(tmp_path / "missing.pt")

    unexpected = dict(state)
    unexpected["encoder.conv_blocks.0.res.0.extra.weight"] = torch.zeros(1)
    unexpected["discriminator.weight"] = torch.zeros(1)
    torch.save({"model": unexpected}, tmp_path / "unexpected.pt")
    with pytest.raises(ValueError) as raised:
        VQTokenizer.from_llamagen_checkpoint(tmp_path / "unexpected.pt")
    assert "2 unexpected keys" in str(raised.value)
    assert "encoder.conv_blocks.0.res.0.extra.weight" in str(raised.value)
    assert "discriminator.weight" in str(raised.value)

    misshaped = dict(state)
    misshaped["encoder.conv_in.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save({"model": misshaped}, tmp_path / "misshaped.pt")
    with pytest.raises(ValueError, match=r"encoder\.conv_in\.weight \(64, 3, 3, 3\) != \(128, 3, 3, 3\)"):
        VQTokenizer.from_llamagen_checkpoint(tmp_path / "misshaped.pt")


def test_llamagen_checkpoint_truncated_file(llamagen_checkpoint, tmp_path):
    path, _ = llamagen_checkpoint
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        VQTokenizer.from_llamagen_checkpoint(truncated)
    with pytest.raises(ValueError, match="not found"):
        VQTokenizer.from_llamagen_checkpoint(tmp_path / "absent.pt")


def test_llamagen_checkpoint_rejects_pickled_objects(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"model": {}, "args": Path("x")}, path)
    with pytest.raises(ValueError, match="objects other than tensors"):
        VQTokenizer.from_llamagen_checkpoint(path)


# --------------------------------------------------------------------------------------------------
# diffusers VQModel folders


def test_vqmodel_folder_matches_vqmodel(tmp_path):
    from diffusers import VQModel

    torch.manual_seed(0)
    vqmodel = VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=8, num_vq_embeddings=32, vq_embed_dim=4, norm_num_groups=8, sample_size=32,
    ).eval()
    vqmodel.save_pretrained(tmp_path / "vqmodel")
    tokenizer = load_tokenizer(tmp_path / "vqmodel")
    assert tokenizer.config.codebook_l2_norm is False
    assert tokenizer.config.grid_size == 16
    assert tokenizer.config.num_embeddings == 32

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        latents = vqmodel.encode(images).latents
        _, _, (_, _, indices) = vqmodel.quantize(latents)
        expected_images = vqmodel.decode(latents).sample.clamp(-1, 1)
        tokens = tokenizer.encode(images)
        decoded = tokenizer.decode(tokens)
    assert torch.equal(tokens.flatten(), indices.flatten())
    torch.testing.assert_close(decoded, expected_images, atol=1e-5, rtol=1e-5)


def test_load_tokenizer_rejects_unknown_folder(tmp_path):
    with pytest.raises(ValueError, match="neither a folder with config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(ValueError, match="UNet2DModel"):
        load_tokenizer(tmp_path)
