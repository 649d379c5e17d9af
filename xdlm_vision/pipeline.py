"""The class-conditional XDLM image pipeline: sample a token grid with the scheduler, then decode it to images.

```python
pipe = XDLMPipeline.from_pretrained("pipelines/<name>")
images = pipe(["Sneaker", "Bag"], num_steps=8, guidance_scale=2.0, generator=torch.Generator().manual_seed(0)).images
```
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput
from torch import nn

from xdlm_vision.scheduler import XDLMScheduler
from xdlm_vision.transformer import XDLMTransformer

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "tokens")

# The package whose modules `from_pretrained` may import to resolve the classes named in model_index.json.
_OWN_PACKAGE = __name__.split(".")[0]


@dataclass
class XDLMPipelineOutput(BaseOutput):
    """Output of `XDLMPipeline.__call__`.

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            For "pil" a list of images, for "np" an array `[B, H, W, 3]` in [0, 1], for "pt" a tensor
            `[B, 3, H, W]` in [0, 1], for "tokens" the token grids `[B, h, w]` (long).
        tokens (`torch.LongTensor` of shape `[B, h, w]`): the sampled token grids, for every output type.
        trajectory (`torch.LongTensor` of shape `[B, num_steps + 1, h, w]`, *optional*):
            with `return_trajectory=True`, the prior draw (index 0) and the grid after each step (index i).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    tokens: torch.LongTensor
    trajectory: torch.LongTensor | None = None


class XDLMPipeline(DiffusionPipeline):
    """Class-conditional image generation by mixed discrete diffusion over the tokens of a VQ tokenizer.

    Args:
        vqvae (`torch.nn.Module`): the image tokenizer. Anything with `decode(tokens [B, L]) -> images [B, 3, H, W]`
            in [-1, 1] and `config.num_embeddings`, `config.grid_size`, such as `VQTokenizer`. It may be `None`,
            in which case only `output_type="tokens"` is available.
        transformer (`XDLMTransformer`): the class-conditional denoiser.
        scheduler (`XDLMScheduler`): the noise kernel and sampler.
        id2label (`dict[int, str]` or `list[str]`, *optional*): class names, saved in `model_index.json`.
            A list gives the name of class `i` at index `i`.
    """

    model_cpu_offload_seq = "transformer->vqvae"
    _optional_components = ["vqvae"]
    _callback_tensor_inputs = ["tokens", "pred_original_sample"]

    def __init__(
        self,
        vqvae: nn.Module | None,
        transformer: XDLMTransformer,
        scheduler: XDLMScheduler,
        id2label: dict[int, str] | dict[str, str] | list[str] | None = None,
    ):
        super().__init__()
        self.register_modules(vqvae=vqvae, transformer=transformer, scheduler=scheduler)
        self.register_to_config(id2label=_normalize_id2label(id2label, transformer.config.num_classes))
        self.image_processor = VaeImageProcessor(do_normalize=True)
        self.check_components()

    # ------------------------------------------------------------------ class names

    @property
    def id2label(self) -> dict[int, str]:
        """Class names by class id (empty when the pipeline has none)."""
        return {int(key): name for key, name in (self.config.id2label or {}).items()}

    @property
    def labels(self) -> dict[str, int]:
        """Class ids by class name, sorted by name."""
        return {name: class_id for class_id, name in sorted(self.id2label.items(), key=lambda item: item[1])}

    def get_label_ids(self, label: int | str | Sequence[int | str] | torch.Tensor) -> list[int]:
        """Map class names and ids to a list of class ids.

        Names match case-insensitively, as a whole or as one of their comma-separated synonyms
        (ImageNet's "tench, Tinca tinca" matches "tench").

        Args:
            label (`int`, `str`, a list of them, or an integer tensor or array): the classes.

        Returns:
            `list[int]`: the class ids, in the order given.
        """
        if isinstance(label, torch.Tensor):
            if label.dtype.is_floating_point or label.dtype == torch.bool or label.ndim > 1:
                raise TypeError(f"class_labels as a tensor must hold integer ids in one dimension, "
                                f"got dtype {label.dtype} and shape {list(label.shape)}")
            label = label.tolist()
        elif isinstance(label, np.ndarray):
            label = label.tolist()
        items = [label] if isinstance(label, (str, numbers.Integral)) else label
        if not isinstance(items, Sequence):
            raise TypeError(f"class_labels must be an int, a class name or a list of them, got {type(label).__name__}")
        if len(items) == 0:
            raise ValueError("class_labels is empty; pass at least one class id or class name")

        num_classes = self.transformer.config.num_classes
        names: dict[str, set[int]] | None = None
        label_ids = []
        for item in items:
            if isinstance(item, str):
                names = self._names_to_ids() if names is None else names
                label_ids.append(self._lookup_name(item, names))
            elif isinstance(item, numbers.Integral) and not isinstance(item, bool):
                if not 0 <= int(item) < num_classes:
                    raise ValueError(f"class id {int(item)} is out of range; valid ids are 0..{num_classes - 1}")
                label_ids.append(int(item))
            else:
                raise TypeError(f"class labels must be ints or class names, got {item!r} ({type(item).__name__})")
        return label_ids

    def _names_to_ids(self) -> dict[str, set[int]]:
        """Map every case-folded name and comma-separated synonym to the class ids that carry it."""
        names: dict[str, set[int]] = {}
        for class_id, name in self.id2label.items():
            keys = {name.casefold().strip()} | {part.casefold().strip() for part in name.split(",")}
            for key in keys - {""}:
                names.setdefault(key, set()).add(class_id)
        return names

    def _lookup_name(self, name: str, names: dict[str, set[int]]) -> int:
        if not self.id2label:
            raise ValueError(f"class name {name!r} cannot be resolved: this pipeline has no class names (id2label); "
                             f"pass class ids 0..{self.transformer.config.num_classes - 1}")
        exact = [class_id for class_id, label in self.id2label.items() if label == name]
        if len(exact) == 1:
            return exact[0]
        candidates = names.get(name.casefold().strip(), set())
        if len(candidates) == 1:
            return next(iter(candidates))
        if len(candidates) > 1:
            raise ValueError(f"class name {name!r} is ambiguous: it names classes {sorted(candidates)}; pass the id")
        valid = ", ".join(repr(label) for label in sorted(self.labels))
        raise ValueError(f"unknown class name {name!r}; valid names are: {valid}")

    # ------------------------------------------------------------------ input checks

    def check_components(self) -> None:
        """Raise `ValueError` if the tokenizer, transformer and scheduler disagree on codebook or grid size."""
        transformer_config = self.transformer.config
        scheduler_size = self.scheduler.config.num_embeddings
        if scheduler_size != transformer_config.num_embeddings:
            raise ValueError(
                f"scheduler num_embeddings={scheduler_size} does not match the transformer's codebook size "
                f"{transformer_config.num_embeddings} (vocabulary {transformer_config.vocab_size}); "
                "build the scheduler with XDLMScheduler(num_embeddings=transformer.config.num_embeddings)"
            )
        if self.vqvae is None:
            return

        vqvae_config = getattr(self.vqvae, "config", None)
        if not callable(getattr(self.vqvae, "decode", None)) or vqvae_config is None:
            raise TypeError(f"vqvae must have decode(tokens) and a config with num_embeddings and grid_size, "
                            f"got {type(self.vqvae).__name__}")
        for name in ("num_embeddings", "grid_size"):
            value = getattr(vqvae_config, name, None)
            expected = getattr(transformer_config, name)
            if value != expected:
                raise ValueError(
                    f"vqvae {name}={value} does not match the transformer's {name}={expected}; "
                    f"the transformer must be trained on tokens of this tokenizer"
                )

    def check_inputs(
        self,
        num_steps: int,
        guidance_scale: float,
        generator: torch.Generator | list[torch.Generator] | None,
        num_images_per_label: int,
        output_type: str,
        num_labels: int,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> None:
        """Raise `ValueError`/`TypeError` for any argument of `__call__` that sampling cannot use."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
            raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
                or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number >= 0 (1 means no guidance)")
        if isinstance(num_images_per_label, bool) or not isinstance(num_images_per_label, numbers.Integral) \
                or num_images_per_label < 1:
            raise ValueError(f"num_images_per_label={num_images_per_label!r} must be an integer >= 1")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; use one of {list(OUTPUT_TYPES)}")
        if output_type != "tokens" and self.vqvae is None:
            raise ValueError(f"output_type={output_type!r} needs a vqvae to decode tokens, but this pipeline has "
                             "none; use output_type='tokens' or load the pipeline with a tokenizer")
        batch_size = num_labels * num_images_per_label
        if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} images (labels x num_images_per_label); "
                             "pass one generator per image or a single generator")
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not available; "
                             f"choose from {self._callback_tensor_inputs}")
        self.check_components()

    # ------------------------------------------------------------------ sampling

    def predict_logits(
        self, tokens: torch.Tensor, class_labels: torch.Tensor, timestep: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """Return the transformer's logits at `timestep`, combined by classifier-free guidance when it is on.

        With guidance, the conditional and unconditional passes run as one batch of `2 * B` rows.
        """
        batch_size = tokens.shape[0]
        null_labels = torch.full_like(class_labels, self.transformer.config.num_classes)  # (B,)
        timesteps = timestep.to(tokens.device, torch.float32).expand(batch_size)  # (B,)

        if guidance_scale == 1.0:
            return self.transformer(tokens, class_labels, timesteps)  # (B, L, V)
        if guidance_scale == 0.0:
            # w = 0 keeps only the unconditional term of the guidance rule.
            return self.transformer(tokens, null_labels, timesteps)  # (B, L, V)

        model_tokens = torch.cat([tokens, tokens])  # (2B, L)
        model_labels = torch.cat([class_labels, null_labels])  # (2B,)
        logits = self.transformer(model_tokens, model_labels, timesteps.repeat(2))  # (2B, L, V)
        cond_logits, uncond_logits = logits.chunk(2)  # 2 x (B, L, V)
        # Guided log-probabilities stay in float32: bfloat16 would round log p near -10 by up to 0.03.
        return self.scheduler.apply_guidance(cond_logits.float(), uncond_logits.float(), guidance_scale)  # (B, L, V)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        num_steps: int | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_label: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("tokens",),
        return_trajectory: bool = False,
        num_inference_steps: int | None = None,
    ) -> XDLMPipelineOutput | tuple:
        """Generate images of the given classes.

        Args:
            class_labels (`int`, `str`, a list of them, or an integer tensor): class ids or names
                (see `get_label_ids`). Mixed lists of ids and names are accepted.
            num_steps (`int`, *optional*, defaults to 8): number of reverse steps.
            guidance_scale (`float`, defaults to 1.0): classifier-free guidance weight `w >= 0`, combining
                `w * log p_cond + (1 - w) * log p_uncond`. 1 means no guidance (one forward pass per step),
                0 samples from the unconditional model.
            generator (`torch.Generator` or a list of them, *optional*): source of randomness. A list gives
                one generator per image, in output order.
            num_images_per_label (`int`, defaults to 1): images per entry of `class_labels`; images of one
                label are adjacent in the output.
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" or "tokens" (see `XDLMPipelineOutput`).
            return_dict (`bool`, defaults to True): return an `XDLMPipelineOutput` instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): called after each step as
                `callback(pipe, step_index, timestep, callback_kwargs)`; it returns a dict, whose "tokens"
                entry, if present, replaces the current tokens.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `("tokens",)`): tensors put in
                `callback_kwargs`, among "tokens" and "pred_original_sample".
            return_trajectory (`bool`, defaults to False): also return the token grid before the first and
                after every step, to show which tokens were unmasked, revised or re-masked.
            num_inference_steps (`int`, *optional*): diffusers' name for `num_steps`; give one or the other.

        Returns:
            `XDLMPipelineOutput`, or with `return_dict=False` the tuple `(images,)`, or `(images, trajectory)`
            with `return_trajectory=True`.
        """
        # 1. Check every input before any compute.
        if num_steps is not None and num_inference_steps is not None and num_steps != num_inference_steps:
            raise ValueError(f"num_steps={num_steps} and num_inference_steps={num_inference_steps} differ; "
                             "they are synonyms, pass only one")
        num_steps = next((value for value in (num_steps, num_inference_steps) if value is not None), 8)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        label_ids = self.get_label_ids(class_labels)
        self.check_inputs(num_steps, guidance_scale, generator, num_images_per_label, output_type, len(label_ids),
                          callback_on_step_end_tensor_inputs)
        guidance_scale = float(guidance_scale)
        batch_size = len(label_ids) * int(num_images_per_label)

        # 2. Class labels, timesteps and the prior draw.
        device = self._execution_device
        grid_size = self.transformer.config.grid_size
        labels = torch.tensor(label_ids, dtype=torch.long, device=device)
        labels = labels.repeat_interleave(num_images_per_label)  # (B,)
        self.scheduler.set_timesteps(int(num_steps), device=device)
        tokens = self.scheduler.sample_prior((batch_size, grid_size**2), generator=generator, device=device)  # (B, L)
        trajectory = [tokens] if return_trajectory else None

        # 3. The reverse process.
        with self.progress_bar(total=len(self.scheduler.timesteps)) as progress_bar:
            for step_index, timestep in enumerate(self.scheduler.timesteps):
                logits = self.predict_logits(tokens, labels, timestep, guidance_scale)  # (B, L, V)
                step_output = self.scheduler.step(logits, timestep, tokens, generator=generator)
                tokens = step_output.prev_sample  # (B, L)

                if callback_on_step_end is not None:
                    available = {"tokens": tokens, "pred_original_sample": step_output.pred_original_sample}
                    callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, step_index, timestep, callback_kwargs)
                    tokens = callback_outputs.pop("tokens", tokens)
                if trajectory is not None:
                    trajectory.append(tokens)
                progress_bar.update()

        # 4. Decode and convert.
        num_embeddings = self.transformer.config.num_embeddings
        if bool((tokens >= num_embeddings).any()) or bool((tokens < 0).any()):
            raise RuntimeError(f"the sampled tokens hold ids outside the codebook 0..{num_embeddings - 1} after the "
                               "last step (a callback may have inserted mask tokens); they cannot be decoded")
        token_grids = tokens.view(batch_size, grid_size, grid_size)  # (B, h, w)
        if output_type == "tokens":
            images = token_grids
        else:
            decoded = self.vqvae.decode(tokens)  # (B, 3, H, W) in [-1, 1]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        if trajectory is not None:
            trajectory = torch.stack(trajectory, dim=1).view(batch_size, -1, grid_size, grid_size)  # (B, T + 1, h, w)

        self.maybe_free_model_hooks()

        if not return_dict:
            return (images, trajectory) if return_trajectory else (images,)
        return XDLMPipelineOutput(images=images, tokens=token_grids, trajectory=trajectory)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> XDLMPipeline:
        """Load a saved pipeline folder (see `DiffusionPipeline.from_pretrained` for the keyword arguments).

        diffusers resolves a component class recorded as `[module, class]` in `model_index.json` only from
        modules already imported. This method first imports the modules of this package named there
        (such as `xdlm_vision.tokenizer`), so loading needs neither `trust_remote_code` nor a prior import.
        A local folder is checked first (see `check_saved_folder`), so a missing component, damaged
        weights or sizes that disagree raise an error naming the file; weights load from safetensors only.
        """
        _import_own_component_modules(pretrained_model_name_or_path)
        if os.path.isdir(pretrained_model_name_or_path):
            check_saved_folder(pretrained_model_name_or_path)
            kwargs.setdefault("use_safetensors", True)  # never fall back to pickled .bin weights
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _import_own_component_modules(folder: str | os.PathLike) -> None:
    """Import the modules of this package that a saved folder's `model_index.json` names for its components."""
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        return
    index = _read_json(index_path)
    for value in index.values():
        is_component = isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
        if is_component and value[0].startswith(_OWN_PACKAGE + "."):
            importlib.import_module(value[0])


def check_saved_folder(folder: str | os.PathLike) -> None:
    """Check a saved pipeline folder before loading it; raise OSError or ValueError naming the file at fault.

    Every model component needs `config.json` and safetensors weights whose tensor names and shapes are
    those its config builds; the tokenizer, transformer and scheduler configs must agree on the codebook
    size and the grid. Only file headers are read: the check builds each model on the meta device.
    """
    from diffusers import ModelMixin
    from safetensors import safe_open

    folder = os.fspath(folder)
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise OSError(f"{index_path} not found; {folder!r} is not a saved pipeline folder")
    configs: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, value in _read_json(index_path).items():
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(item, str) for item in value)):
            continue  # a plain setting (id2label) or an absent optional component
        try:
            component_class = getattr(importlib.import_module(value[0]), value[1])
        except (ImportError, AttributeError):
            continue  # diffusers reports classes it cannot resolve
        is_model = isinstance(component_class, type) and issubclass(component_class, ModelMixin)
        config_path = os.path.join(folder, name, "config.json" if is_model else "scheduler_config.json")
        if not os.path.isfile(config_path):
            raise OSError(f"pipeline folder {folder!r} lacks its {name} component: {config_path} not found")
        config = _read_json(config_path)
        configs[name] = (config_path, config)
        if not is_model:
            continue

        weights_path = os.path.join(folder, name, "diffusion_pytorch_model.safetensors")
        if not os.path.isfile(weights_path):
            raise OSError(f"{weights_path} not found; the {name} component needs safetensors weights "
                          "(pickled .bin weights are not loaded)")
        try:
            with safe_open(weights_path, framework="pt") as file:
                saved = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            raise OSError(f"{weights_path} is damaged or truncated ({error}); save or copy the pipeline again") from None
        with torch.device("meta"):
            expected = {key: tuple(tensor.shape) for key, tensor in component_class.from_config(config).state_dict().items()}
        missing = sorted(expected.keys() - saved.keys())
        mismatched = [f"{key} {saved[key]} != {expected[key]}" for key in sorted(expected.keys() & saved.keys())
                      if saved[key] != expected[key]]
        if missing or mismatched:
            details = "; ".join([*(f"{key} missing" for key in missing[:4]), *mismatched[:4]])
            raise ValueError(f"{weights_path} does not match {config_path} (saved shape != config shape): {details}")

    transformer = configs.get("transformer")
    if transformer is None:
        return
    for name, keys in (("vqvae", ("num_embeddings", "grid_size")), ("scheduler", ("num_embeddings",))):
        if name not in configs:
            continue
        path, config = configs[name]
        for key in keys:
            if key in config and config[key] != transformer[1].get(key):
                raise ValueError(f"{key}={config[key]} in {path} disagrees with {key}={transformer[1].get(key)} in "
                                 f"{transformer[0]}; the components come from different models")


def _normalize_id2label(
    id2label: Mapping[int | str, str] | Sequence[str] | None, num_classes: int
) -> dict[str, str] | None:
    """Return class names keyed by the class id as text (the form JSON stores), sorted by id."""
    if id2label is None:
        return None
    if isinstance(id2label, Sequence) and not isinstance(id2label, str):
        id2label = dict(enumerate(id2label))
    if not isinstance(id2label, Mapping):
        raise TypeError(f"id2label must be a dict of class id to name or a list of names, got {type(id2label).__name__}")

    normalized = {}
    for key, name in id2label.items():
        try:
            class_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"id2label key {key!r} is not a class id; keys must be integers") from None
        if not 0 <= class_id < num_classes:
            raise ValueError(f"id2label has class id {class_id}, outside the transformer's classes 0..{num_classes - 1}")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"id2label[{class_id}] = {name!r} must be a non-empty string")
        normalized[class_id] = name
    return {str(class_id): normalized[class_id] for class_id in sorted(normalized)}
