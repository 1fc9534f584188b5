"""The denoising benchmark (benchmarks/denoise.py): its shapes and FLOPs, and a --quick run end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest

from shopreel.benchmarks.denoise import (
    CPU_SHAPE,
    FLOOR_S_PER_STEP,
    FULL_SHAPE,
    PEAK_BF16_FLOPS,
    is_full_model_shape,
    scaled_down,
    wan_step_flops,
)


def test_the_full_shape_is_wan_1_3b_at_480p_and_its_floor_is_the_issue_anchor():
    assert FULL_SHAPE.latent_tokens == 21 * 30 * 52
    assert scaled_down(FULL_SHAPE) == [] and is_full_model_shape(FULL_SHAPE)
    # 2 passes x 30 blocks of Wan 2.1 1.3B at 32,760 tokens, at 989 TFLOPS: the issue's 0.57 s/step.
    assert wan_step_flops(FULL_SHAPE) / PEAK_BF16_FLOPS == pytest.approx(FLOOR_S_PER_STEP, abs=0.01)
    assert wan_step_flops(FULL_SHAPE, guidance=False) == pytest.approx(wan_step_flops(FULL_SHAPE) / 2)
    # Fewer steps only: still the shape the published step time was measured at.
    assert is_full_model_shape(dataclasses.replace(FULL_SHAPE, steps=10))


def test_the_cpu_shape_says_what_it_scaled_down():
    notes = " ".join(scaled_down(CPU_SHAPE))
    for said in (
        "128x128, 9 frames (192 latent tokens)",
        f"{CPU_SHAPE.layers} transformer blocks",
        "float32",
    ):
        assert said in notes
    assert not is_full_model_shape(CPU_SHAPE)
    assert wan_step_flops(CPU_SHAPE) < wan_step_flops(FULL_SHAPE) / 500


@pytest.mark.slow
def test_quick_run_reports_every_row_with_sane_figures(tmp_path):
    from shopreel.benchmarks.denoise import QUICK_SHAPE, main, step_cache_methods
    from shopreel.pipelines.speed import SPEED_PROFILES

    main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "denoise.json").read_text())
    assert (tmp_path / "denoise.png").stat().st_size > 0
    methods = step_cache_methods()
    assert {"first_block", "mag", "taylorseer", "pab", "sea"} <= set(methods)

    shape = report["shape"]
    assert shape["shape"]["layers"] == QUICK_SHAPE.layers and shape["scaled_down"]
    rows = {row["row"]: row for row in shape["rows"]}
    compiled_cached = {f"compiled + {m}" for m in ("first_block", "mag")}
    assert set(rows) == {
        "eager float32",
        "compiled float32",
        *(f"eager + {m}" for m in methods),
        *compiled_cached,
    }
    assert rows["eager float32"]["speedup_vs_eager"] == 1.0
    for row in rows.values():
        assert len(row["step_s"]) == QUICK_SHAPE.steps and all(s > 0 for s in row["step_s"])
        assert row["s_per_step"] > 0
        assert row["s_per_step"] == pytest.approx(
            row["speedup_vs_eager"] ** -1 * rows["eager float32"]["s_per_step"], rel=0.01
        )
        if row["method"] == "none":
            assert "gate_passed" not in row and row["tflops"] > 0
        else:
            assert row["step_cache"].startswith(row["method"])
            assert 0 < row["gate_compute_fraction"] <= 1.1
            assert row["gate_latent_error"] >= 0 and isinstance(row["gate_passed"], bool)
    assert "vs_published" not in rows["eager float32"]  # CPU rows are not held against the GPU anchors

    video = report["video"]
    assert video["preset"] == "tiny"
    by_name: dict[str, dict] = {}
    for row in video["rows"]:
        assert row["steps"] == 2
        by_name[row["row"]] = row
    assert set(by_name) == {
        "uncached (quality)",
        *methods,
        *(f"profile {name}" for name in SPEED_PROFILES if name != "quality"),
    }
    reference = by_name["uncached (quality)"]
    assert reference["latent_error"] == 0 and reference["psnr_db"] is None  # identical to itself
    assert reference["step_cache"] == "none" and "production" not in reference
    for name, row in by_name.items():
        assert row["denoise_s"] > 0 and row["video_s"] >= row["denoise_s"] * 0.5
        assert row["denoise_s_per_step"] == pytest.approx(
            row["denoise_s"] / (row["steps_run"] * len(video["shot_frames"])), rel=0.01
        )
        profile = SPEED_PROFILES[row["speed_profile"]]
        assert row["steps_run"] == profile.steps(2) and row["scheduler"] == profile.scheduler
        assert row["latent_error"] >= 0
        if name == "uncached (quality)":
            continue
        assert 0 < row["gate_compute_fraction"] <= 1.1
        expected = "cached" if row["gate_passed"] else ("refused" if name in methods else "uncached")
        assert row["production"] == expected
        if name in methods:
            assert row["step_cache"].startswith(name)
        else:
            assert row["step_cache"].startswith(profile.step_cache)

    markdown = (tmp_path / "denoise.md").read_text()
    assert "## A. Seconds per step" in markdown and "## B. Seconds per video" in markdown
    assert "compare the ratios within this run" in markdown
