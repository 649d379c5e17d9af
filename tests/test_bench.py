"""Smoke tests of `xdlm-vision bench` at toy sizes: JSON fields, finite ratios, timers. No timed assertions."""

import json
import math

import pytest
import torch

from xdlm_vision.bench.measure import ComponentTimer, count_flops, matmul_peak, transformer_forward_flops
from xdlm_vision.bench.sample_bench import COMPONENTS, random_pipeline, run_sample_bench
from xdlm_vision.bench.scaling_bench import plot_scaling, run_scaling_bench
from xdlm_vision.bench.train_bench import PHASES, run_train_bench
from xdlm_vision.cli import main

TOY_TOKENIZER = dict(num_embeddings=32, embedding_dim=4, image_size=16, block_out_channels=(8, 8, 8),
                     norm_num_groups=4, latent_channels=8)
TOY_SIZES = dict(num_embeddings=32, grid_size=4, num_classes=3)


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class Counter:
    def __init__(self):
        self.count = 0

    def work(self, value):
        self.count += 1
        return 2 * value


def test_component_timer_counts_and_restores():
    counter = Counter()
    timer = ComponentTimer()
    with timer.wrap(counter, "work", "work"):
        assert counter.work(3) == 6
        assert counter.work(4) == 8
    assert timer.calls == {"work": 2}
    assert timer.seconds["work"] >= 0.0
    assert "work" not in vars(counter)
    counter.work(1)
    assert timer.calls == {"work": 2}


def test_count_flops_matmul_matches_formula():
    left, right = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: left @ right) == 2 * 8 * 16 * 4


def test_forward_flops_match_flop_counter():
    pipeline = random_pipeline("tiny", tokenizer_config=TOY_TOKENIZER, **TOY_SIZES)
    config = pipeline.transformer.config
    batch_size, length = 2, config.grid_size**2
    tokens = torch.randint(0, config.num_embeddings, (batch_size, length))
    labels = torch.zeros(batch_size, dtype=torch.long)
    with torch.no_grad():
        counted = count_flops(lambda: pipeline.transformer(tokens, labels))
    # FlopCounterMode counts the linear layers; CPU attention it leaves out, so add QK^T and AV by hand.
    attention = config.depth * 2 * (2 * batch_size * length * length * config.hidden_size)
    assert transformer_forward_flops(config, batch_size) == counted + attention


def test_matmul_peak_fields():
    peak = matmul_peak(torch.float32, size=64, repeats=2)
    assert peak["dtype"] == "float32"
    assert finite(peak["flop_per_s"])
    assert peak["flop_per_s"] > 0
    assert peak["best_s"] <= peak["median_s"]


def test_sample_bench_toy_components():
    small = random_pipeline("tiny", tokenizer_config=TOY_TOKENIZER, **TOY_SIZES)
    shipped = random_pipeline("tiny", tokenizer_config=TOY_TOKENIZER, seed=1, **TOY_SIZES)
    results = run_sample_bench(batch_size=2, num_steps=2, guidance_scale=2.0, repeats=1, small=small,
                               shipped=shipped, matmul_size=64)

    assert len(results["pipelines"]) == 2
    for pipeline in results["pipelines"]:
        runs = pipeline["runs"]
        assert [(run["precision"], run["guidance_scale"]) for run in runs] == [
            ("float32", 1.0), ("float32", 2.0), ("bfloat16", 1.0), ("bfloat16", 2.0)]
        for run in runs:
            assert run["forward_calls"] == 2
            assert set(run["components_s"]) == set(COMPONENTS)
            assert sum(run["share"].values()) == pytest.approx(1.0)
            assert 0.0 <= run["non_forward_share"] <= 1.0
            for key in ("total_s", "forward_flop_per_s", "forward_fraction_of_matmul_peak", "images_per_s"):
                assert finite(run[key]), key
        assert all(finite(run["speedup_vs_float32"]) for run in runs if run["precision"] == "bfloat16")
    # The timers are removed after the run.
    assert "forward" not in vars(small.transformer)
    assert "step" not in vars(small.scheduler)


def test_train_bench_toy_phases():
    results = run_train_bench(steps=1, tiny_batch_size=4, small_batch_size=2, small_sizes=TOY_SIZES,
                              small_preset="tiny", small_tokenizer_config=TOY_TOKENIZER, matmul_size=64)

    assert [setup["name"] for setup in results["setups"]] == ["tiny", "small"]
    for setup in results["setups"]:
        runs = setup["runs"]
        assert [(run["data"], run["precision"]) for run in runs] == [
            ("token shards", "float32"), ("token shards", "bfloat16"), ("images encoded on the fly", "float32")]
        for run in runs:
            assert set(PHASES) <= set(run["phases_s"])
            assert len(run["losses"]) == 2 and all(finite(loss) for loss in run["losses"])
            assert finite(run["tokens_per_s"])
            assert run["tokens_per_s"] > 0
            assert finite(run["forward_fraction_of_matmul_peak"])
        assert "encode" in runs[2]["phases_s"]
        assert finite(runs[1]["loss_relative_change"])
        # float32 and bfloat16 start from the same weights, batches and noise: the first losses are close.
        assert runs[1]["losses"][0] == pytest.approx(runs[0]["losses"][0], rel=0.05)
        assert runs[2]["losses"][0] != runs[0]["losses"][0]  # on-the-fly tokens differ from the shard tokens


def test_scaling_bench_toy_plot(tmp_path):
    results = run_scaling_bench(batch_size=1, repeats=1, codebook_sizes=(16, 64), sequence_lengths=(4, 16))
    assert len(results["rows"]) == 4
    assert all(finite(slope) for slope in results["fitted_log_log_slopes"].values())
    plot_scaling(results, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_scheduler_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    code = main(["bench", "scheduler", "--batch-size", "1", "--num-tokens", "8", "--num-embeddings", "32",
                 "--repeats", "1", "--out", str(out)])
    assert code == 0
    payload = json.loads(out.read_text())
    assert payload["command"] == "xdlm-vision bench scheduler"
    assert finite(payload["step"]["speedup"])
    assert finite(payload["loss_forward_backward"]["speedup"])
    assert payload["machine"]["torch"] == torch.__version__
    assert finite(payload["machine"]["load_average_1m"])


def test_cli_rejects_zero_repeats(tmp_path, capsys):
    code = main(["bench", "sample", "--repeats", "0", "--out", str(tmp_path / "x.json")])
    assert code == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
