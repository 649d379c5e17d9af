"""The `fid` command: sample pipelines uniformly over classes and score them against a real reference.

One job scores every (pipeline, number of steps) pair of a sweep with the same protocol: N samples
(N / C per class, one seed per image, see `generation.py`), one guidance scale, one reference and one
feature extractor. It can also score the tokenizer's reconstructions of the reference images (rFID)
and a real training subset of the same size (the real-data floor), so generated FIDs can be read
against both. It writes `fid.json` (metrics and protocol) and `fid.md` (tables) to the output folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from xdlm_vision.atomic import write_json_atomic, write_text_atomic
from xdlm_vision.metrics.extractor import EXTRACTOR_KINDS, build_extractor, extract_features, file_sha256
from xdlm_vision.metrics.generation import SamplePlan, generate_samples, iter_sample_chunks
from xdlm_vision.metrics.reference import (
    ImageSet,
    ReferenceFeatures,
    compute_reference,
    default_cache_dir,
    default_floor_spec,
    load_reference_file,
    open_image_set,
)
from xdlm_vision.metrics.scores import ScoreOptions, score_features

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "xdlm-fid-results"
RESULTS_VERSION = 1


def run_fid_job(
    pipelines: list,
    num_steps: list[int] = (8,),
    num_samples: int = 10000,
    guidance_scale: float = 1.0,
    reference: str = "fashion-mnist:test",
    extractor: str = "inception",
    extractor_weights: str | None = None,
    out_dir: str | os.PathLike = "fid-results",
    seed: int = 0,
    batch_size: int = 100,
    rfid: bool = False,
    rfid_samples: int | None = None,
    tokenizer: str | None = None,
    real_floor: bool = False,
    floor_data: str | None = None,
    data_dir: str | None = None,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    save_reference: str | os.PathLike | None = None,
    score_options: ScoreOptions = ScoreOptions(),
    device: str | torch.device | None = None,
) -> dict:
    """Run an FID job and write `fid.json` and `fid.md` to `out_dir`; return the results dict.

    Args:
        pipelines: pipeline folders (or loaded `XDLMPipeline` objects); each is sampled at every `num_steps`.
        num_steps: numbers of reverse steps of the sweep.
        num_samples (`int`): images per (pipeline, steps), a multiple of the number of classes.
        guidance_scale (`float`): classifier-free guidance weight (1 means none).
        reference (`str`): a real-set spec or a reference .npz (see `reference.py`).
        extractor (`str`): "inception" (torch-fidelity's Inception-v3) or "classifier" (the project's CNN).
        extractor_weights (`str`, *optional*): the Inception weights file or the classifier folder.
        out_dir: where samples, `fid.json` and `fid.md` go. Finished sample chunks there are reused.
        seed (`int`): base seed of the per-image seeds and of the real-data floor's subset.
        batch_size (`int`): images per pipeline call and per chunk file.
        rfid (`bool`): also score the reconstructions of the reference images by each pipeline's tokenizer
            (or by `tokenizer`, a saved VQTokenizer folder).
        rfid_samples (`int`, *optional*): reconstruct only this many reference images (the same count per
            class, drawn with `seed`) instead of all of them.
        real_floor (`bool`): also score N real images (N / C per class) of `floor_data` (by default the
            training split that pairs with the reference).
        cache_dir: reference feature cache; None disables it.
        save_reference: also write the reference features to this .npz, for reuse as `reference`.
    """
    from xdlm_vision.pipeline import XDLMPipeline

    if not pipelines and not (rfid and tokenizer) and not real_floor:
        raise ValueError("nothing to score: pass --pipeline, or --rfid with --tokenizer, or --real-floor")
    num_steps = [int(steps) for steps in num_steps]
    if any(steps < 1 for steps in num_steps):
        raise ValueError(f"--num-steps values must be >= 1, got {num_steps}")
    if rfid and reference.endswith(".npz"):
        raise ValueError("--rfid reconstructs the reference images, but the reference is a statistics file; "
                         "pass --reference as an image set (fashion-mnist:test or a folder)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start_time = time.perf_counter()

    # 1. The extractor, before any sampling, so missing or damaged weights fail fast.
    feature_extractor, extractor_info = build_extractor(extractor, extractor_weights, device=device)
    layer_fid, layer_isc = extractor_info.feature_layer_fid, extractor_info.feature_layer_isc

    # 2. Load pipelines and check they agree on classes.
    loaded = [_load_pipeline(pipeline, device, XDLMPipeline) for pipeline in pipelines]
    names = _unique_names([name for name, _ in loaded])
    num_classes, class_names, sample_size = _common_classes(loaded)
    if loaded:
        SamplePlan(num_samples=num_samples, num_classes=num_classes, seed=seed, chunk_size=batch_size)  # validates

    # 3. The reference: features of a real set (cached) or a statistics file.
    reference_set: ImageSet | None = None
    if sample_size is None and tokenizer is not None:
        from xdlm_vision.tokenizer import VQTokenizer

        sample_size = VQTokenizer.load_config(tokenizer).get("image_size")
    if reference.endswith(".npz"):
        if not Path(reference).is_file():
            raise ValueError(f"reference statistics file {reference} not found")
        reference_features = load_reference_file(reference, extractor_info)
    else:
        reference_set = open_image_set(reference, image_size=image_size or sample_size, data_dir=data_dir)
        reference_features = compute_reference(reference_set, feature_extractor, extractor_info, cache_dir)
    if save_reference is not None:
        reference_features.save(save_reference)
        logger.info("wrote reference features to %s", save_reference)
    if class_names is None:
        reference_names = reference_features.meta.get("class_names")
        class_names = list(reference_names) if reference_names else [str(i) for i in range(num_classes or 0)]
        num_classes = num_classes or len(class_names)
    if reference_set is not None and len(reference_set.class_names) != num_classes:
        logger.warning("the reference has %d classes and the pipelines %d: per-class FID compares class ids "
                       "that may not match", len(reference_set.class_names), num_classes)

    classifier_accuracy = extractor == "classifier" and len(extractor_info.class_names or []) == num_classes
    common = {
        "num_samples": num_samples,
        "samples_per_class": num_samples // num_classes if num_classes else None,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "reference": {key: reference_features.meta.get(key) for key in ("spec", "num_images", "resize")},
        "extractor": extractor_info.to_dict(),
        "resize": {
            "samples": f"{sample_size}x{sample_size} as decoded, no resize" if sample_size else None,
            "reference": reference_features.meta.get("resize"),
            "extractor": extractor_info.input,
        },
        "score_options": asdict(score_options),
    }

    def score(features: dict, labels: torch.Tensor) -> dict:
        return score_features(features, labels, reference_features, layer_fid, layer_isc, class_names,
                              score_options, classifier_logits=classifier_accuracy)

    # 4. Generated sets: every pipeline at every number of steps.
    results = []
    for (path, pipe), name in zip(loaded, names):
        mixing_ratio = float(pipe.scheduler.config.mixing_ratio)
        for steps in num_steps:
            plan = SamplePlan(num_samples=num_samples, num_classes=num_classes, seed=seed, chunk_size=batch_size)
            samples_dir = out_dir / "samples" / name / f"steps-{steps}-guidance-{guidance_scale:g}"
            protocol = {"pipeline": path, "transformer_sha256": _transformer_digest(path), "num_steps": steps,
                        "guidance_scale": guidance_scale, "k": mixing_ratio}
            logger.info("sampling %s at %d steps into %s", name, steps, samples_dir)
            sampling = generate_samples(pipe, plan, samples_dir, steps, guidance_scale, protocol, device=device)
            features, labels = _features_of_chunks(feature_extractor, samples_dir, plan, f"{name} {steps} steps")
            metrics = score(features, labels)
            results.append({
                "kind": "generated",
                "name": name,
                "pipeline": path,
                "protocol": {**protocol, "num_samples": num_samples,
                             "samples_per_class": plan.samples_per_class, "seed": seed,
                             "reference": common["reference"]["spec"], "extractor": extractor_info.name,
                             "resize": common["resize"]},
                "metrics": metrics,
                "samples_dir": str(samples_dir),
                "sampling_seconds": round(sampling["sampling_seconds"], 1),
                "chunks_resumed": sampling["chunks_skipped"],
            })
            logger.info("%s, %d steps: FID %.3f", name, steps, metrics["fid"])

    # 5. rFID: reconstructions of the reference images by each distinct tokenizer.
    rfid_results = []
    if rfid:
        rfid_set = reference_set
        if rfid_samples is not None:
            per_class = rfid_samples // len(reference_set.class_names)
            if per_class < 1 or per_class * len(reference_set.class_names) != rfid_samples:
                raise ValueError(f"--rfid-samples {rfid_samples} must be a positive multiple of the "
                                 f"{len(reference_set.class_names)} reference classes")
            rfid_set = reference_set.subset_per_class(per_class, seed)
        for tokenizer_name, vqvae in _tokenizers(loaded, names, tokenizer, device):
            features = extract_features(feature_extractor, _reconstructions(vqvae, rfid_set, batch_size, device),
                                        total=len(rfid_set), description=f"rFID {tokenizer_name}")
            metrics = score(features, torch.from_numpy(rfid_set.labels))
            rfid_results.append({"kind": "reconstruction", "tokenizer": tokenizer_name, "images": rfid_set.spec,
                                 "num_images": len(rfid_set), "metrics": metrics})
            logger.info("rFID of %s: %.3f", tokenizer_name, metrics["fid"])

    # 6. The real-data floor: N real training images, N / C per class, against the same reference.
    floor_result = None
    if real_floor:
        spec = floor_data or default_floor_spec(reference_features.meta.get("spec") or reference)
        if spec is None:
            raise ValueError("--real-floor needs --floor-data: no training split pairs with the reference "
                             f"{reference!r}")
        if num_samples % num_classes != 0:
            raise ValueError(f"--num-samples {num_samples} must be a multiple of the {num_classes} classes")
        # NOTE: the shipped classifier was trained on fashion-mnist:train, so with it this floor is optimistic.
        floor_set = open_image_set(spec, image_size=image_size or sample_size, data_dir=data_dir)
        floor_set = floor_set.subset_per_class(num_samples // num_classes, seed)
        features = extract_features(feature_extractor, (images for images, _ in floor_set.iter_batches(batch_size)),
                                    total=len(floor_set), description="real-data floor")
        metrics = score(features, torch.from_numpy(floor_set.labels))
        floor_result = {"kind": "real", "data": floor_set.spec, "num_images": len(floor_set), "metrics": metrics}
        logger.info("real-data floor (%s): FID %.3f", floor_set.spec, metrics["fid"])

    payload = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "protocol": {**common, "num_steps": num_steps, "pipelines": [path for path, _ in loaded]},
        "results": results,
        "rfid": rfid_results,
        "real_floor": floor_result,
        "seconds": round(time.perf_counter() - start_time, 1),
    }
    write_json_atomic(out_dir / "fid.json", payload)
    write_text_atomic(out_dir / "fid.md", format_markdown(payload))
    return payload


# ---------------------------------------------------------------------- helpers


def _load_pipeline(pipeline, device: torch.device, pipeline_class) -> tuple[str, object]:
    if isinstance(pipeline, (str, os.PathLike)):
        path = Path(pipeline)
        if not (path / "model_index.json").is_file():
            raise ValueError(f"pipeline folder {path} not found or without model_index.json")
        pipe = pipeline_class.from_pretrained(path)
        name = str(path)
    else:
        pipe = pipeline
        name = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None) or "pipeline"
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return str(name), pipe


def _transformer_digest(path: str) -> str | None:
    """Return the sha256 of a saved pipeline's transformer weights, so a resume never mixes two trainings."""
    weight_files = sorted((Path(path) / "transformer").glob("*.safetensors"))
    return file_sha256(weight_files[0]) if weight_files else None


def _unique_names(paths: list[str]) -> list[str]:
    names = [Path(path).name or path for path in paths]
    return [f"{name}-{index}" if names.count(name) > 1 else name for index, name in enumerate(names)]


def _common_classes(loaded: list) -> tuple[int | None, list[str] | None, int | None]:
    """Return the number of classes, class names and image size shared by all pipelines (None without pipelines)."""
    if not loaded:
        return None, None, None
    counts = {pipe.transformer.config.num_classes for _, pipe in loaded}
    if len(counts) != 1:
        raise ValueError(f"the pipelines have different numbers of classes {sorted(counts)}; a sweep needs the same classes")
    num_classes = counts.pop()
    pipe = loaded[0][1]
    id2label = pipe.id2label
    class_names = [id2label.get(class_id, str(class_id)) for class_id in range(num_classes)]
    sizes = {getattr(p.vqvae.config, "image_size", None) for _, p in loaded if p.vqvae is not None}
    if len(sizes) > 1:
        raise ValueError(f"the pipelines decode images of different sizes {sorted(sizes)}; score them in separate jobs")
    return num_classes, class_names, sizes.pop() if sizes else None


def _features_of_chunks(extractor, samples_dir: Path, plan: SamplePlan, description: str):
    labels = []

    def images():
        for chunk_images, chunk_labels in iter_sample_chunks(samples_dir, plan):
            labels.append(chunk_labels)
            yield chunk_images

    features = extract_features(extractor, images(), total=plan.num_samples, description=description)
    return features, torch.cat(labels)


def _tokenizers(loaded: list, names: list[str], tokenizer: str | None, device: torch.device):
    """Yield (name, tokenizer) for rFID: the given folder, else each distinct tokenizer of the pipelines."""
    if tokenizer is not None:
        from xdlm_vision.tokenizer import VQTokenizer

        yield str(tokenizer), VQTokenizer.from_pretrained(tokenizer).to(device).eval()
        return
    seen = set()
    for (path, pipe), name in zip(loaded, names):
        if pipe.vqvae is None:
            continue
        weight_files = sorted((Path(path) / "vqvae").glob("*.safetensors"))
        key = file_sha256(weight_files[0]) if weight_files else id(pipe.vqvae)
        if key in seen:
            continue
        seen.add(key)
        yield f"{name}/vqvae", pipe.vqvae.eval()


@torch.no_grad()
def _reconstructions(vqvae, image_set: ImageSet, batch_size: int, device: torch.device):
    """Yield uint8 reconstructions [b, 3, S, S] of an image set: encode to tokens, decode, round."""
    for images, _ in image_set.iter_batches(batch_size):
        unit = images.to(device).float() / 127.5 - 1.0  # (b, 3, S, S) in [-1, 1]
        decoded = vqvae.decode(vqvae.encode(unit))  # (b, 3, S, S)
        yield ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def _number(value, digits: int = 2, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def format_markdown(payload: dict) -> str:
    """Render an FID job's results as Markdown: an FID table over steps x pipelines and a table of all metrics."""
    protocol = payload["protocol"]
    extractor = protocol["extractor"]
    reference = protocol["reference"]
    lines = [
        "# FID job",
        "",
        f"Extractor `{extractor['name']}` (layer `{extractor['feature_layer_fid']}`, weights sha256 "
        f"`{extractor['weights_sha256'][:12]}`); reference `{reference['spec']}` ({reference['num_images']} images); "
        f"{protocol['num_samples']} samples ({protocol['samples_per_class']} per class), guidance scale "
        f"{protocol['guidance_scale']:g}, seed {protocol['seed']}.",
        "",
    ]
    results = payload["results"]
    if results:
        steps = sorted({result["protocol"]["num_steps"] for result in results})
        lines += ["## FID over steps", "", "| pipeline | k | " + " | ".join(f"{s} steps" for s in steps) + " |",
                  "|---|---|" + "---|" * len(steps)]
        for name in dict.fromkeys(result["name"] for result in results):
            row = {result["protocol"]["num_steps"]: result for result in results if result["name"] == name}
            k = next(iter(row.values()))["protocol"]["k"]
            cells = [_number(row[s]["metrics"]["fid"]) if s in row else "" for s in steps]
            lines.append(f"| {name} | {k:g} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += ["## All metrics", "",
              "| set | steps | FID | KID x 1000 | IS | precision | recall | classifier accuracy |",
              "|---|---|---|---|---|---|---|---|"]

    def row(label: str, steps: str, metrics: dict) -> str:
        return (f"| {label} | {steps} | {_number(metrics['fid'])} | {_number(metrics['kid_mean'], 2, 1000)} | "
                f"{_number(metrics['inception_score_mean'])} | {_number(metrics['precision'], 3)} | "
                f"{_number(metrics['recall'], 3)} | {_number(metrics.get('classifier_accuracy'), 3)} |")

    for result in results:
        lines.append(row(f"{result['name']} (k = {result['protocol']['k']:g})", str(result["protocol"]["num_steps"]),
                         result["metrics"]))
    for result in payload["rfid"]:
        lines.append(row(f"rFID: {result['tokenizer']} reconstructions", "", result["metrics"]))
    if payload["real_floor"]:
        lines.append(row(f"real-data floor: {payload['real_floor']['data']}", "", payload["real_floor"]["metrics"]))
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", nargs="+", default=[], metavar="FOLDER",
                        help="saved pipeline folders; several give a sweep table")
    parser.add_argument("--num-steps", nargs="+", type=int, default=[8], metavar="N",
                        help="reverse steps; several give a sweep table (default: 8)")
    parser.add_argument("--num-samples", type=int, default=10000,
                        help="generated images per (pipeline, steps), a multiple of the number of classes (default: 10000)")
    parser.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance weight; 1 means none (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the per-image seeds (default: 0)")

    parser.add_argument("--reference", default="fashion-mnist:test",
                        help="fashion-mnist:test|train, a folder of class folders (imagefolder:PATH), or a reference "
                             ".npz written by --save-reference or holding mu and sigma (default: fashion-mnist:test)")
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side that folder images are resized and cropped to (default: the samples' size)")

    parser.add_argument("--extractor", choices=sorted(EXTRACTOR_KINDS), default="inception",
                        help="inception: torch-fidelity's Inception-v3 (needs its weights file); classifier: the "
                             "project's Fashion-MNIST classifier, offline (default: inception)")
    parser.add_argument("--inception-weights", default=None, metavar="PATH",
                        help="torch-fidelity's Inception weights file (default: its torch hub cache)")
    parser.add_argument("--classifier", default=None, metavar="FOLDER",
                        help="classifier folder for --extractor classifier (default: the shipped classifiers/fashion-mnist)")

    parser.add_argument("--out-dir", default="fid-results",
                        help="folder for samples, fid.json and fid.md; finished sample chunks there are reused "
                             "(default: fid-results)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per pipeline call and chunk file (default: 100)")

    parser.add_argument("--rfid", action="store_true",
                        help="also score the tokenizer's reconstructions of the reference images")
    parser.add_argument("--rfid-samples", type=int, default=None,
                        help="reconstruct only this many reference images, the same count per class (default: all)")
    parser.add_argument("--tokenizer", default=None, metavar="FOLDER",
                        help="tokenizer folder for --rfid (default: the tokenizer of each pipeline)")
    parser.add_argument("--real-floor", action="store_true",
                        help="also score --num-samples real training images against the reference")
    parser.add_argument("--floor-data", default=None,
                        help="image set of the real-data floor (default: the training split paired with the reference)")

    parser.add_argument("--cache-dir", default=str(default_cache_dir()),
                        help="reference feature cache (default: %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the reference cache")
    parser.add_argument("--save-reference", default=None, metavar="PATH.npz",
                        help="also write the reference features to this file, for reuse with --reference")
    parser.add_argument("--kid-subset-size", type=int, default=1000,
                        help="KID subset size, reduced to the set sizes when larger (default: 1000)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is much faster on a CPU shared with other jobs")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    weights = args.inception_weights if args.extractor == "inception" else args.classifier
    payload = run_fid_job(
        pipelines=args.pipeline,
        num_steps=args.num_steps,
        num_samples=args.num_samples,
        guidance_scale=args.guidance_scale,
        reference=args.reference,
        extractor=args.extractor,
        extractor_weights=weights,
        out_dir=args.out_dir,
        seed=args.seed,
        batch_size=args.batch_size,
        rfid=args.rfid,
        rfid_samples=args.rfid_samples,
        tokenizer=args.tokenizer,
        real_floor=args.real_floor,
        floor_data=args.floor_data,
        data_dir=args.data_dir,
        image_size=args.image_size,
        cache_dir=None if args.no_cache else args.cache_dir,
        save_reference=args.save_reference,
        score_options=ScoreOptions(kid_subset_size=args.kid_subset_size),
        device=args.device,
    )
    print(format_markdown(payload))
    print(f"wrote {Path(args.out_dir) / 'fid.json'} and {Path(args.out_dir) / 'fid.md'}")
    return 0
