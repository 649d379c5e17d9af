"""XDLMTransformer: shapes, the mask entry, conditioning, input checks, presets, saving and initialisation."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from xdlm_vision import XDLMScheduler, XDLMTransformer
from xdlm_vision.transformer import MODEL_PRESETS, SelfAttention, load_model_preset

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"

N = 40  # codebook size of the small test models
GRID = 4  # 4x4 token grid
CLASSES = 5


def make_model(**overrides) -> XDLMTransformer:
    torch.manual_seed(0)
    config = dict(num_embeddings=N, grid_size=GRID, num_classes=CLASSES, hidden_size=32, depth=2, num_heads=4)
    config.update(overrides)
    return XDLMTransformer(**config).eval()


def randomize_modulation(model: XDLMTransformer, std: float = 0.2) -> XDLMTransformer:
    """Give the zero-initialised adaLN layers and the small head random weights, so every input matters."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "adaln_modulation" in name or "final_layer.linear" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def random_tokens(batch_size: int, seed: int = 0, high: int = N + 1) -> torch.Tensor:
    return torch.randint(0, high, (batch_size, GRID * GRID), generator=torch.Generator().manual_seed(seed))


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# ---------------------------------------------------------------- outputs


def test_forward_shape_and_mask_entry():
    model = make_model()
    logits = model(random_tokens(3), torch.tensor([0, 4, CLASSES]))

    assert logits.shape == (3, GRID * GRID, N + 1)
    assert model.config.vocab_size == N + 1
    assert torch.all(logits[..., N] == float("-inf"))
    assert torch.isfinite(logits[..., :N]).all()


def test_init_blocks_identity_and_near_uniform():
    model = make_model()
    tokens, labels = random_tokens(2), torch.tensor([1, 2])
    block_changes = []
    hooks = [
        block.register_forward_hook(lambda module, args, output: block_changes.append((output - args[0]).abs().max()))
        for block in model.blocks
    ]
    logits = model(tokens, labels)
    for hook in hooks:
        hook.remove()

    assert len(block_changes) == 2
    assert all(change == 0 for change in block_changes)  # adaLN-Zero: gates start at 0
    log_probs = torch.log_softmax(logits[..., :N], dim=-1)
    # Near uniform: every log-probability is within 0.2 of log(1/N).
    assert (log_probs + math.log(N)).abs().max() < 0.2
    assert logits[..., :N].std() > 0  # a nonzero head, so gradient flows from step 0


def test_bfloat16_forward_keeps_mask_entry():
    model = make_model().to(torch.bfloat16)
    logits = model(random_tokens(2), torch.tensor([0, 1]))

    assert logits.dtype == torch.bfloat16
    assert torch.all(logits[..., N] == float("-inf"))
    assert torch.isfinite(logits[..., :N]).all()


def test_attention_matches_naive_softmax():
    torch.manual_seed(0)
    attention = SelfAttention(hidden_size=16, num_heads=2)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    attention = attention.double()

    q, k, v = attention.qkv(x).split(16, dim=-1)  # 3 x (2, 5, 16)
    outputs = []
    for head in range(2):
        columns = slice(8 * head, 8 * head + 8)
        weights = torch.softmax(q[..., columns] @ k[..., columns].transpose(1, 2) / math.sqrt(8), dim=-1)
        outputs.append(weights @ v[..., columns])
    expected = attention.proj(torch.cat(outputs, dim=-1))

    torch.testing.assert_close(attention(x), expected)


def test_context_is_bidirectional_and_positional():
    model = randomize_modulation(make_model())
    tokens, labels = random_tokens(1), torch.tensor([2])
    logits = model(tokens, labels)

    last_changed = tokens.clone()
    last_changed[0, -1] = (tokens[0, -1] + 1) % N
    first_changed = tokens.clone()
    first_changed[0, 0] = (tokens[0, 0] + 1) % N
    # A change at the last position reaches the first, and the other way round (no causal mask).
    assert not torch.allclose(model(last_changed, labels)[0, 0], logits[0, 0])
    assert not torch.allclose(model(first_changed, labels)[0, -1], logits[0, -1])

    # Equal tokens at different grid positions get different predictions (2-D position embedding).
    constant = torch.full_like(tokens, 7)
    constant_logits = model(constant, labels)
    assert not torch.allclose(constant_logits[0, 0], constant_logits[0, 5])


# ---------------------------------------------------------------- conditioning


def test_class_labels_change_logits():
    model = randomize_modulation(make_model())
    tokens = random_tokens(1).expand(2, -1)
    logits = model(tokens, torch.tensor([0, 3]))

    assert not torch.allclose(logits[0, :, :N], logits[1, :, :N])


def test_label_dropout_only_in_training():
    model = randomize_modulation(make_model(class_dropout_prob=1.0))
    tokens, labels = random_tokens(2), torch.tensor([0, 3])
    unconditional = model(tokens, torch.full((2,), CLASSES))

    model.train()
    torch.testing.assert_close(model(tokens, labels), unconditional)
    model.eval()
    assert not torch.allclose(model(tokens, labels)[..., :N], unconditional[..., :N])


def test_label_dropout_rate():
    model = make_model(class_dropout_prob=0.1).train()
    torch.manual_seed(0)
    dropped = model.label_embedder.drop_labels(torch.zeros(20000, dtype=torch.long), None) == CLASSES

    # Binomial(20000, 0.1): mean 2000, standard deviation 42; 5 standard deviations either side.
    assert 1790 < int(dropped.sum()) < 2210


def test_force_drop_ids_in_eval_mode():
    model = randomize_modulation(make_model())
    tokens, labels = random_tokens(2), torch.tensor([0, 3])
    logits = model(tokens, labels, force_drop_ids=torch.tensor([1, 0]))

    torch.testing.assert_close(logits[0], model(tokens[:1], torch.tensor([CLASSES]))[0])
    torch.testing.assert_close(logits[1], model(tokens[1:], torch.tensor([3]))[0])


def test_time_conditioning_on_and_off():
    tokens, labels = random_tokens(1), torch.tensor([1])
    timed = randomize_modulation(make_model(time_conditioning=True))
    untimed = randomize_modulation(make_model())

    assert not torch.allclose(timed(tokens, labels, timestep=0.2), timed(tokens, labels, timestep=0.8))
    torch.testing.assert_close(timed(tokens, labels, timestep=torch.tensor([0.2])), timed(tokens, labels, timestep=0.2))
    torch.testing.assert_close(untimed(tokens, labels, timestep=0.2), untimed(tokens, labels, timestep=0.8))
    with pytest.raises(ValueError, match="timestep"):
        timed(tokens, labels)


# ---------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "tokens, labels, error, message",
    [
        (torch.full((1, GRID * GRID), -1), torch.tensor([0]), ValueError, r"outside \[0, 40\]"),
        (torch.full((1, GRID * GRID), N + 1), torch.tensor([0]), ValueError, r"outside \[0, 40\]"),
        (torch.zeros(1, GRID * GRID + 1, dtype=torch.long), torch.tensor([0]), ValueError, r"expected \[batch, 16\]"),
        (torch.zeros(1, GRID, GRID, dtype=torch.long), torch.tensor([0]), ValueError, r"expected \[batch, 16\]"),
        (torch.zeros(1, GRID * GRID), torch.tensor([0]), TypeError, "integer tensor"),
        (torch.zeros(1, GRID * GRID, dtype=torch.long), torch.tensor([-1]), ValueError, r"outside \[0, 5\]"),
        (torch.zeros(1, GRID * GRID, dtype=torch.long), torch.tensor([CLASSES + 1]), ValueError, r"outside \[0, 5\]"),
        (torch.zeros(1, GRID * GRID, dtype=torch.long), torch.tensor([0, 1]), ValueError, r"expected \[1\]"),
        (torch.zeros(1, GRID * GRID, dtype=torch.long), torch.tensor([0.0]), TypeError, "integer tensor"),
    ],
)
def test_forward_rejects_invalid_input(tokens, labels, error, message):
    with pytest.raises(error, match=message):
        make_model()(tokens, labels)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_heads": 5}, "not divisible by num_heads=5"),
        ({"vocab_size": N}, "must equal num_embeddings"),
        ({"class_dropout_prob": 1.5}, "outside"),
        ({"grid_size": 0}, "grid_size=0"),
        ({"num_embeddings": 2.5}, "num_embeddings=2.5"),
    ],
)
def test_constructor_rejects_bad_sizes(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_model(**overrides)


# ---------------------------------------------------------------- presets and saving


def test_presets_match_yaml_files():
    yaml_names = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))

    assert yaml_names == sorted(MODEL_PRESETS)
    for name in yaml_names:
        with open(CONFIG_DIR / f"{name}.yaml", encoding="utf-8") as file:
            assert yaml.safe_load(file) == MODEL_PRESETS[name], name
    assert MODEL_PRESETS["small"] == {"hidden_size": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0}


def test_from_preset_name_and_file(tmp_path):
    model = XDLMTransformer.from_preset("tiny", num_embeddings=N, grid_size=GRID, num_classes=CLASSES,
                                        class_dropout_prob=0.0)
    for key, value in MODEL_PRESETS["tiny"].items():
        assert model.config[key] == value
    assert model.config.class_dropout_prob == 0.0

    preset_file = tmp_path / "custom.yaml"
    preset_file.write_text("hidden_size: 16\ndepth: 1\nnum_heads: 2\n")
    model = XDLMTransformer.from_preset(preset_file, num_embeddings=N, grid_size=GRID, num_classes=CLASSES)
    assert (model.config.hidden_size, model.config.depth, len(model.blocks)) == (16, 1, 1)

    with pytest.raises(ValueError, match=r"unknown model preset 'huge'.*\['base', 'small', 'tiny'\]"):
        load_model_preset("huge")
    preset_file.write_text("hidden_size: 16\nwidth: 3\n")
    with pytest.raises(ValueError, match=r"unknown keys \['width'\]"):
        load_model_preset(preset_file)


def test_small_preset_published_size():
    """The published 12 x 768 x 12 model with 16384 codes, a 16x16 grid and 1000 classes."""
    model = XDLMTransformer.from_preset("small", num_embeddings=16384, grid_size=16, num_classes=1000).eval()

    d, vocab, classes = 768, 16385, 1001
    per_block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    expected = vocab * d + classes * d + 12 * per_block + (2 * d * d + 2 * d) + (d * vocab + vocab)
    assert parameter_count(model) == expected
    assert parameter_count(model) == 154_673_921  # the count given in configs/model/small.yaml

    tokens = torch.randint(0, 16385, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens, torch.tensor([7]))
    assert logits.shape == (1, 256, 16385)
    assert torch.isfinite(logits[..., :16384]).all()


def test_save_and_load_roundtrip(tmp_path):
    model = randomize_modulation(make_model(time_conditioning=True))
    model.save_pretrained(tmp_path)
    loaded = XDLMTransformer.from_pretrained(tmp_path).eval()
    tokens, labels = random_tokens(2), torch.tensor([0, 4])

    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert loaded.config.vocab_size == N + 1
    assert loaded.config.time_conditioning is True
    torch.testing.assert_close(loaded(tokens, labels, 0.3), model(tokens, labels, 0.3), rtol=0, atol=0)


# ---------------------------------------------------------------- training


def test_gradient_checkpointing_same_gradients():
    model = randomize_modulation(make_model()).train()
    model.label_embedder.dropout_prob = 0.0
    tokens, labels = random_tokens(2), torch.tensor([0, 1])

    def gradients():
        model.zero_grad()
        model(tokens, labels)[..., :N].logsumexp(-1).sum().backward()
        return [parameter.grad.clone() for parameter in model.parameters() if parameter.grad is not None]

    plain = gradients()
    model.enable_gradient_checkpointing()
    checkpointed = gradients()

    assert len(plain) == len(checkpointed)
    for expected, actual in zip(plain, checkpointed):
        torch.testing.assert_close(actual, expected)


def test_tiny_model_fits_fixed_batch():
    """From the default initialisation, AdamW halves the XDLM loss on a fixed noised batch in 60 steps."""
    model = make_model(class_dropout_prob=0.0).train()
    scheduler = XDLMScheduler(num_embeddings=N, mixing_ratio=0.1)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, N, (8, GRID * GRID), generator=generator)
    labels = torch.arange(8) % CLASSES
    t = torch.full((8,), 0.5)
    noisy = scheduler.add_noise(tokens, t, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    losses = []
    for _ in range(60):
        loss = scheduler.loss(model(noisy, labels), noisy, tokens, t).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < 0.5 * losses[0], losses[::10]
