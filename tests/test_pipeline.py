"""XDLMPipeline: saving and loading, output types, class names, guidance, trajectories and input checks."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from xdlm_vision import XDLMPipeline, XDLMScheduler, XDLMTransformer

N = 24  # codebook size
GRID = 4  # 4x4 token grid
PATCH = 2  # stand-in decoder: 2x2 pixels per token, so 8x8 images
NAMES = ["T-shirt/top", "Trouser", "Bag", "tench, Tinca tinca"]
CLASSES = len(NAMES)


class PatchDecoder(ModelMixin, ConfigMixin):
    """Random stand-in for the VQ tokenizer: each token decodes to a fixed RGB patch in [-1, 1]."""

    @register_to_config
    def __init__(self, num_embeddings: int = N, grid_size: int = GRID, patch_size: int = PATCH):
        super().__init__()
        self.register_to_config(image_size=grid_size * patch_size)
        self.codebook = nn.Embedding(num_embeddings, 3 * patch_size * patch_size)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        batch_size, grid, patch = tokens.shape[0], self.config.grid_size, self.config.patch_size
        patches = torch.tanh(self.codebook(tokens.to(self.device)))  # (B, L, 3 * p * p)
        patches = patches.view(batch_size, grid, grid, 3, patch, patch)
        return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch_size, 3, grid * patch, grid * patch)


class TableTransformer(XDLMTransformer):
    """Hand-made denoiser: the logits of every position are a fixed row of a table, chosen by the class label."""

    def __init__(self, table: torch.Tensor, **config):
        super().__init__(**config)
        self.table = nn.Parameter(table, requires_grad=False)  # (num_classes + 1, N + 1)
        self.calls = []  # (tokens, class_labels) of each forward pass

    def forward(self, tokens, class_labels, timestep=None, force_drop_ids=None):
        self.check_inputs(tokens, class_labels, timestep, force_drop_ids)
        self.calls.append((tokens.clone(), class_labels.clone()))
        logits = self.table[class_labels].unsqueeze(1).expand(-1, tokens.shape[1], -1).clone()  # (B, L, V)
        logits[..., N] = float("-inf")
        return logits


def small_config(**overrides) -> dict:
    config = dict(num_embeddings=N, grid_size=GRID, num_classes=CLASSES, hidden_size=32, depth=2, num_heads=4)
    config.update(overrides)
    return config


def make_transformer(**overrides) -> XDLMTransformer:
    torch.manual_seed(0)
    model = XDLMTransformer(**small_config(**overrides)).eval()
    # Random modulation and head weights, so that the predictions depend on tokens and labels.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "adaln_modulation" in name or "final_layer.linear" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def make_pipeline(transformer=None, mixing_ratio=0.1, vqvae="default", id2label=NAMES) -> XDLMPipeline:
    if vqvae == "default":
        torch.manual_seed(2)
        vqvae = PatchDecoder()
    pipe = XDLMPipeline(
        vqvae=vqvae,
        transformer=transformer if transformer is not None else make_transformer(),
        scheduler=XDLMScheduler(num_embeddings=N, mixing_ratio=mixing_ratio),
        id2label=id2label,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_table(peaked: bool = False, seed: int = 0) -> torch.Tensor:
    """Logit table with one row per class and a last row for "no class"; `peaked` puts class c on token c."""
    table = torch.randn(CLASSES + 1, N + 1, generator=torch.Generator().manual_seed(seed))
    if peaked:
        table = torch.full((CLASSES + 1, N + 1), -30.0)
        for row in range(CLASSES):
            table[row, row] = 30.0
        table[CLASSES, N - 1] = 30.0
    return table


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample_manually(pipe: XDLMPipeline, labels: list[int], num_steps: int, seed: int) -> torch.Tensor:
    """Reference sampler: the scheduler's loop around the transformer called with the given labels alone."""
    generator = seeded(seed)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_steps)
    label_tensor = torch.tensor(labels)
    tokens = scheduler.sample_prior((len(labels), GRID * GRID), generator=generator)
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            logits = pipe.transformer(tokens, label_tensor, timestep.expand(len(labels)))
            tokens = scheduler.step(logits, timestep, tokens, generator=generator).prev_sample
    return tokens.view(-1, GRID, GRID)


# ---------------------------------------------------------------- saving and loading


def test_save_load_same_seed_same_output(tmp_path):
    pipe = make_pipeline()
    pipe.save_pretrained(tmp_path)
    loaded = XDLMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    index = json.loads((tmp_path / "model_index.json").read_text())

    assert index["transformer"] == ["xdlm_vision.transformer", "XDLMTransformer"]
    assert index["scheduler"] == ["xdlm_vision.scheduler", "XDLMScheduler"]
    assert index["id2label"] == {str(i): name for i, name in enumerate(NAMES)}
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert loaded.id2label == dict(enumerate(NAMES))
    assert isinstance(loaded.vqvae, PatchDecoder)

    original = pipe([0, 2], num_steps=4, generator=seeded(5), output_type="np")
    reloaded = loaded([0, 2], num_steps=4, generator=seeded(5), output_type="np")
    assert torch.equal(original.tokens, reloaded.tokens)
    np.testing.assert_array_equal(original.images, reloaded.images)


def test_reload_vq_tokenizer_fresh_process(tmp_path):
    """A saved folder with a VQTokenizer loads offline in a new interpreter that imported only XDLMPipeline."""
    tokenizer_module = pytest.importorskip("xdlm_vision.tokenizer")
    torch.manual_seed(0)
    tokenizer = tokenizer_module.VQTokenizer(num_embeddings=N, image_size=8, block_out_channels=(8, 8),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            latent_channels=8, norm_num_groups=4)
    transformer = make_transformer(grid_size=tokenizer.config.grid_size)
    pipe = XDLMPipeline(vqvae=tokenizer, transformer=transformer,
                        scheduler=XDLMScheduler(num_embeddings=N), id2label=NAMES)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    expected = pipe(["Bag"], num_steps=3, generator=seeded(3), output_type="np").images

    script = textwrap.dedent(f"""
        import numpy as np, torch
        from xdlm_vision import XDLMPipeline
        pipe = XDLMPipeline.from_pretrained({str(tmp_path)!r})
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe.vqvae).__name__ == "VQTokenizer", type(pipe.vqvae)
        images = pipe(["Bag"], num_steps=3, generator=torch.Generator().manual_seed(3), output_type="np").images
        np.save({str(tmp_path / "images.npy")!r}, images)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)

    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "images.npy"), expected)


def test_pipeline_without_vqvae_returns_tokens(tmp_path):
    pipe = make_pipeline(vqvae=None)
    tokens = pipe([1], num_steps=2, generator=seeded(0), output_type="tokens").images

    assert tokens.shape == (1, GRID, GRID)
    with pytest.raises(ValueError, match="needs a vqvae"):
        pipe([1], num_steps=2, output_type="pil")
    pipe.save_pretrained(tmp_path)
    loaded = XDLMPipeline.from_pretrained(tmp_path)
    assert loaded.vqvae is None


# ---------------------------------------------------------------- outputs


def test_output_types_shapes_and_values():
    pipe = make_pipeline()
    outputs = {
        output_type: pipe([0, 3, 1], num_steps=3, generator=seeded(1), output_type=output_type)
        for output_type in ("pil", "np", "pt", "tokens")
    }
    tokens = outputs["tokens"].images
    expected = (pipe.vqvae.decode(tokens.view(3, -1)) / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W)

    assert tokens.dtype == torch.long
    assert tokens.shape == (3, GRID, GRID)
    for output in outputs.values():
        assert torch.equal(output.tokens, tokens)
    assert isinstance(outputs["pil"].images, list)
    assert all(isinstance(image, PIL.Image.Image) for image in outputs["pil"].images)
    assert [image.size for image in outputs["pil"].images] == [(8, 8)] * 3
    assert outputs["np"].images.shape == (3, 8, 8, 3)
    assert outputs["pt"].images.shape == (3, 3, 8, 8)
    torch.testing.assert_close(outputs["pt"].images, expected)
    np.testing.assert_allclose(outputs["np"].images, expected.permute(0, 2, 3, 1).numpy(), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.asarray(outputs["pil"].images[1]), (outputs["np"].images[1] * 255).round())


def test_mixed_labels_reach_their_rows():
    table = make_table(peaked=True)
    pipe = make_pipeline(TableTransformer(table, **small_config()))
    tokens = pipe(["bag", 0, "Trouser"], num_steps=4, num_images_per_label=2, generator=seeded(0),
                  output_type="tokens").images

    expected_classes = [2, 2, 0, 0, 1, 1]  # images of one label are adjacent
    for row, class_id in enumerate(expected_classes):
        assert torch.all(tokens[row] == class_id), (row, tokens[row])
    assert torch.equal(pipe.transformer.calls[0][1], torch.tensor(expected_classes))


def test_return_dict_false_tuple():
    pipe = make_pipeline()
    images_only = pipe([0], num_steps=2, generator=seeded(0), output_type="pt", return_dict=False)
    with_trajectory = pipe([0], num_steps=2, generator=seeded(0), output_type="pt", return_dict=False,
                           return_trajectory=True)

    assert len(images_only) == 1
    assert len(with_trajectory) == 2
    assert with_trajectory[1].shape == (1, 3, GRID, GRID)
    torch.testing.assert_close(images_only[0], with_trajectory[0])


def test_trajectory_mdlm_never_revises_tokens():
    """With mixing ratio 0 (MDLM) a token, once unmasked, stays; the last grid is the output."""
    num_steps = 6
    pipe = make_pipeline(mixing_ratio=0.0)
    output = pipe([1, 2], num_steps=num_steps, generator=seeded(4), output_type="tokens", return_trajectory=True)
    trajectory = output.trajectory  # (B, T + 1, h, w)

    assert trajectory.shape == (2, num_steps + 1, GRID, GRID)
    assert torch.all(trajectory[:, 0] == N)  # the MDLM prior is all masks
    assert torch.equal(trajectory[:, -1], output.tokens)
    assert not torch.any(output.tokens == N)
    for step in range(num_steps):
        before, after = trajectory[:, step], trajectory[:, step + 1]
        unmasked_before = before != N
        assert torch.equal(after[unmasked_before], before[unmasked_before]), step


def test_trajectory_xdlm_shows_revisions():
    """With mixing ratio 0.5 some positions change from one codebook token to another during sampling."""
    pipe = make_pipeline(mixing_ratio=0.5)
    trajectory = pipe(list(range(CLASSES)) * 4, num_steps=8, generator=seeded(0), output_type="tokens",
                      return_trajectory=True).trajectory
    before, after = trajectory[:, :-1], trajectory[:, 1:]
    revised = (before != N) & (after != N) & (before != after)
    remasked = (before != N) & (after == N)

    assert int(revised.sum()) > 0
    assert int(remasked.sum()) > 0


# ---------------------------------------------------------------- randomness


def test_seed_reproducible_and_distinct():
    pipe = make_pipeline()
    first = pipe([0, 1], num_steps=3, generator=seeded(7), output_type="tokens").images
    second = pipe([0, 1], num_steps=3, generator=seeded(7), output_type="tokens").images
    other = pipe([0, 1], num_steps=3, generator=seeded(8), output_type="tokens").images

    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_generator_list_one_per_image():
    pipe = make_pipeline(TableTransformer(make_table(), **small_config()))
    pair = pipe([0, 1], num_steps=4, generator=[seeded(1), seeded(2)], output_type="tokens").images
    alone = pipe([1], num_steps=4, generator=[seeded(2)], output_type="tokens").images

    assert torch.equal(pair[1], alone[0])


def test_bfloat16_pipeline_runs():
    pipe = make_pipeline().to(torch.bfloat16)
    output = pipe([0, 1], num_steps=2, guidance_scale=2.0, generator=seeded(0), output_type="np")

    assert pipe.transformer.dtype == torch.bfloat16
    assert output.images.dtype == np.float32
    assert np.isfinite(output.images).all()


# ---------------------------------------------------------------- guidance


def test_guidance_one_is_conditional():
    pipe = make_pipeline(TableTransformer(make_table(), **small_config()))
    tokens = pipe([3, 1], num_steps=4, guidance_scale=1.0, generator=seeded(9), output_type="tokens").images
    calls = pipe.transformer.calls

    assert len(calls) == 4
    assert all(torch.equal(labels, torch.tensor([3, 1])) for _, labels in calls)  # no unconditional pass
    torch.testing.assert_close(tokens, sample_manually(pipe, [3, 1], num_steps=4, seed=9), rtol=0, atol=0)


def test_guidance_zero_is_unconditional():
    pipe = make_pipeline(TableTransformer(make_table(), **small_config()))
    tokens = pipe([3, 1], num_steps=4, guidance_scale=0.0, generator=seeded(9), output_type="tokens").images

    assert torch.equal(tokens, sample_manually(pipe, [CLASSES, CLASSES], num_steps=4, seed=9))


@pytest.mark.parametrize("guidance_scale", [0.5, 3.0])
def test_guidance_log_probs_one_pass(guidance_scale, monkeypatch):
    """Guided log-probabilities match w * log p_cond + (1 - w) * log p_uncond, renormalized, in float64."""
    table = make_table(seed=3)
    pipe = make_pipeline(TableTransformer(table, **small_config()))
    step_logits = []
    original_step = pipe.scheduler.step

    def recording_step(logits, timestep, sample, **kwargs):
        step_logits.append(logits.clone())
        return original_step(logits, timestep, sample, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", recording_step)
    labels = [2, 0, 3]
    pipe(labels, num_steps=3, guidance_scale=guidance_scale, generator=seeded(0), output_type="tokens")

    calls = pipe.transformer.calls
    assert len(calls) == 3  # one forward pass per step
    assert torch.equal(calls[0][1], torch.tensor(labels + [CLASSES] * 3))  # conditional rows, then unconditional

    log_p = torch.log_softmax(table[:, :N].double(), dim=-1)  # (C + 1, N)
    mixed = guidance_scale * log_p[labels] + (1 - guidance_scale) * log_p[CLASSES]  # (3, N)
    expected = torch.log_softmax(mixed, dim=-1)  # (3, N)
    for logits in step_logits:
        assert logits.shape == (3, GRID * GRID, N + 1)
        assert torch.all(logits[..., N] == float("-inf"))
        guided = torch.log_softmax(logits[..., :N].double(), dim=-1)  # (3, L, N)
        torch.testing.assert_close(guided, expected.unsqueeze(1).expand_as(guided), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- class names


def test_get_label_ids_names_and_ids():
    pipe = make_pipeline()

    assert pipe.get_label_ids("Bag") == [2]
    assert pipe.get_label_ids("bag") == [2]
    assert pipe.get_label_ids("TINCA TINCA") == [3]
    assert pipe.get_label_ids("tench") == [3]
    assert pipe.get_label_ids(["Trouser", 0, np.int64(2)]) == [1, 0, 2]
    assert pipe.get_label_ids(torch.tensor([3, 1])) == [3, 1]
    assert pipe.get_label_ids(np.array([2, 0])) == [2, 0]
    assert pipe.id2label == dict(enumerate(NAMES))
    assert pipe.labels == {"Bag": 2, "T-shirt/top": 0, "Trouser": 1, "tench, Tinca tinca": 3}


def test_get_label_ids_unknown_name_lists_valid():
    pipe = make_pipeline()

    with pytest.raises(ValueError, match=r"unknown class name 'Unicorn'; valid names are: 'Bag', 'T-shirt/top'"):
        pipe.get_label_ids("Unicorn")
    with pytest.raises(ValueError, match="no class names"):
        make_pipeline(id2label=None).get_label_ids("Bag")
    with pytest.raises(ValueError, match=r"ambiguous: it names classes \[0, 1\]"):
        make_pipeline(id2label=["crane", "Crane", "x", "y"]).get_label_ids("CRANE")


def test_id2label_rejects_bad_ids():
    with pytest.raises(ValueError, match="outside the transformer's classes 0..3"):
        make_pipeline(id2label={7: "extra"})
    with pytest.raises(ValueError, match="is not a class id"):
        make_pipeline(id2label={"first": "a"})


# ---------------------------------------------------------------- input checks


INVALID_CALLS = [
    ({"class_labels": []}, "class_labels is empty"),
    ({"class_labels": CLASSES}, r"class id 4 is out of range; valid ids are 0..3"),
    ({"class_labels": [0, -1]}, r"class id -1 is out of range"),
    ({"class_labels": "Unicorn"}, "valid names are"),
    ({"num_steps": 0}, r"num_steps=0 must be an integer >= 1"),
    ({"num_steps": 2.5}, r"num_steps=2.5 must be an integer >= 1"),
    ({"num_steps": 4, "num_inference_steps": 6}, "num_steps=4 and num_inference_steps=6 differ"),
    ({"guidance_scale": -0.5}, r"guidance_scale=-0.5 must be a finite number >= 0"),
    ({"guidance_scale": math.nan}, "guidance_scale=nan"),
    ({"num_images_per_label": 0}, r"num_images_per_label=0 must be an integer >= 1"),
    ({"output_type": "latent"}, r"output_type='latent' is not supported; use one of \['pil', 'np', 'pt', 'tokens'\]"),
    ({"generator": [torch.Generator()]}, "got 1 generators for 2 images"),
    ({"callback_on_step_end_tensor_inputs": ["logits"]}, r"\['logits'\] are not available"),
]


@pytest.mark.parametrize("arguments, message", INVALID_CALLS)
def test_invalid_call_raises_before_compute(arguments, message):
    pipe = make_pipeline(TableTransformer(make_table(), **small_config()))
    generator = seeded(0)
    state = generator.get_state()
    call = {"class_labels": [0, 1], "generator": generator, **arguments}

    with pytest.raises(ValueError, match=message):
        pipe(**call)
    assert pipe.transformer.calls == []
    assert torch.equal(generator.get_state(), state)


def test_invalid_label_types_raise():
    pipe = make_pipeline()

    with pytest.raises(TypeError, match="ints or class names"):
        pipe([1.5])
    with pytest.raises(TypeError, match="ints or class names"):
        pipe([True])
    with pytest.raises(TypeError, match="integer ids"):
        pipe(torch.tensor([0.0]))


@pytest.mark.parametrize(
    "vqvae, scheduler_size, message",
    [
        (PatchDecoder(num_embeddings=N + 1), N, r"vqvae num_embeddings=25 does not match the transformer's num_embeddings=24"),
        (PatchDecoder(grid_size=GRID + 1), N, r"vqvae grid_size=5 does not match the transformer's grid_size=4"),
        (PatchDecoder(), N - 1, r"scheduler num_embeddings=23 does not match"),
    ],
)
def test_mismatched_components_raise(vqvae, scheduler_size, message):
    with pytest.raises(ValueError, match=message):
        XDLMPipeline(vqvae=vqvae, transformer=make_transformer(), scheduler=XDLMScheduler(num_embeddings=scheduler_size))

    pipe = make_pipeline(TableTransformer(make_table(), **small_config()))
    pipe.vqvae = vqvae
    pipe.scheduler = XDLMScheduler(num_embeddings=scheduler_size)
    with pytest.raises(ValueError, match=message):
        pipe([0], num_steps=2)
    assert pipe.transformer.calls == []


# ---------------------------------------------------------------- steps and callbacks


def test_num_inference_steps_synonym():
    pipe = make_pipeline(TableTransformer(make_table(), **small_config()))
    pipe([0], num_inference_steps=3, output_type="tokens")
    pipe([0], num_steps=5, num_inference_steps=5, output_type="tokens")

    assert len(pipe.transformer.calls) == 3 + 5


def test_callback_sees_and_replaces_tokens():
    pipe = make_pipeline()
    seen = []

    def callback(pipeline, step_index, timestep, callback_kwargs):
        seen.append((step_index, float(timestep), callback_kwargs["tokens"].shape))
        tokens = callback_kwargs["tokens"].clone()
        tokens[:, 0] = 5
        return {"tokens": tokens}

    output = pipe([0, 1], num_steps=4, generator=seeded(0), output_type="tokens", callback_on_step_end=callback,
                  return_trajectory=True)

    assert [entry[0] for entry in seen] == [0, 1, 2, 3]
    assert [entry[1] for entry in seen] == [1.0, 0.75, 0.5, 0.25]
    assert all(entry[2] == (2, GRID * GRID) for entry in seen)
    assert torch.all(output.tokens[:, 0, 0] == 5)
    assert torch.all(output.trajectory[:, 1:, 0, 0] == 5)
