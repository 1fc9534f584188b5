"""The ``shopreel`` command line.

Heavy imports (torch, diffusers) happen inside the commands that need them, so ``shopreel --help``
and input errors answer at once. A user mistake prints ``error: ...`` and exits with code 2; it
never shows a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="shopreel: product brief -> short product video (understand, generate, render, compose).",
)
console = Console(stderr=True)
EXIT_USAGE = 2


class UserError(Exception):
    """A mistake in what the user gave us: reported as one message, exit code 2."""


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(EXIT_USAGE)


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from exc


def _inline_image_paths(data: Any, base: Path) -> Any:
    """Briefs on disk may name images by path ({"path": "shoe.jpg"}); the API takes only data."""
    from .pipelines.catalog import inline_image_paths

    try:
        return inline_image_paths(data, base)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def _load_model(model: type[BaseModel], path: Path | None, what: str, **overrides: Any) -> Any:
    from .pipelines.types import describe_validation_error

    if path is None:
        return None
    data = _inline_image_paths(_read_json(path, what), path.parent)
    if isinstance(data, dict):
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = "\n  ".join(describe_validation_error(exc, prefix=what))
        raise UserError(f"{path} is not a valid {what}:\n  {details}") from exc


@app.command()
def generate(
    brief: Annotated[Path, typer.Argument(help="product brief JSON (see examples/)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="MP4 to write")] = Path("out.mp4"),
    preset: Annotated[str, typer.Option(help="preset name or local diffusers checkpoint directory")] = "tiny",
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT, overrides the brief")] = None,
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: the preset's)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed, overrides the brief")] = None,
    fps: Annotated[int | None, typer.Option(help="frames per second, overrides the brief")] = None,
    duration: Annotated[float | None, typer.Option(help="target seconds, overrides the brief")] = None,
    profile: Annotated[Path | None, typer.Option(help="shopper profile JSON")] = None,
    campaign: Annotated[Path | None, typer.Option(help="campaign JSON (e.g. 11.11)")] = None,
    audio: Annotated[str, typer.Option(help="'bed' (generated music), 'none', or an audio file")] = "bed",
    thumbnail: Annotated[Path | None, typer.Option(help="JPEG thumbnail to write")] = None,
    min_height: Annotated[
        int, typer.Option(help="enlarge smaller frames (whole factor) before captions, e.g. 192 for mini")
    ] = 0,
    storyboard_out: Annotated[Path | None, typer.Option(help="also write the storyboard JSON here")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16")] = "auto",
    planner: Annotated[str, typer.Option(help="template or llm")] = "template",
    llm_path: Annotated[Path | None, typer.Option(help="local causal-LM directory for --planner llm")] = None,
    renderer: Annotated[str, typer.Option(help="decoder: auto, torch, onnxruntime, tensorrt")] = "auto",
    renderer_precision: Annotated[str, typer.Option(help="decoder precision: fp32, int8")] = "fp32",
    speed_profile: Annotated[
        str, typer.Option(help="quality, balanced or fast: steps, scheduler and step cache")
    ] = "quality",
    step_cache: Annotated[
        str | None,
        typer.Option(help="none, first_block, mag, taylorseer, pab, sea (default: the profile's)"),
    ] = None,
    compile: Annotated[
        bool, typer.Option("--compile", help="torch.compile the denoiser's blocks (slow first shot)")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Make a product video from a brief, in this process (no cluster needed)."""
    from .pipelines.config import (
        CompileConfig,
        ComposeConfig,
        GenerateConfig,
        ModelConfig,
        PipelineConfig,
        PlannerConfig,
        RenderConfig,
    )
    from .pipelines.step_cache import FidelityRefused
    from .pipelines.types import (
        Campaign,
        ProductBrief,
        ShopperProfile,
        StepCacheMethod,
        describe_validation_error,
    )

    try:
        # 1. Read and check every input before loading any model.
        product = _load_model(
            ProductBrief, brief, "brief", size=size, seed=seed, fps=fps, duration_s=duration
        )
        shopper = _load_model(ShopperProfile, profile, "profile")
        event = _load_model(Campaign, campaign, "campaign")
        audio_source: Any = audio
        if audio not in ("bed", "none"):
            audio_source = Path(audio)
            if not audio_source.is_file():
                raise UserError(f"--audio {audio}: no such file (use 'bed', 'none' or a file path)")
        if not output.parent.exists():
            raise UserError(f"output directory {output.parent} does not exist")
        try:
            config = PipelineConfig(
                model=ModelConfig(preset=preset, device=device, dtype=dtype),  # type: ignore[arg-type]
                generate=GenerateConfig(
                    num_inference_steps=steps,
                    speed_profile=speed_profile,  # type: ignore[arg-type]
                    compile=CompileConfig(enabled=compile),
                ),
                planner=PlannerConfig(kind=planner, llm_path=llm_path),  # type: ignore[arg-type]
                render=RenderConfig(backend=renderer, precision=renderer_precision),  # type: ignore[arg-type]
                compose=ComposeConfig(min_height=min_height),
            )
        except ValidationError as exc:
            raise UserError("invalid option: " + "; ".join(describe_validation_error(exc))) from exc
        if step_cache is not None and step_cache not in get_args(StepCacheMethod):
            raise UserError(f"--step-cache {step_cache}: pick one of {', '.join(get_args(StepCacheMethod))}")
        # 2. Build the pipeline (model loading errors about presets/devices are user errors).
        from .pipelines.pipeline import ProductVideoPipeline

        try:
            pipeline = ProductVideoPipeline(config)
            storyboard = pipeline.plan(product, shopper, event)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    except UserError as exc:
        raise _fail(str(exc)) from None

    _print_storyboard(storyboard, pipeline.model.preset)
    if storyboard_out is not None:
        storyboard_out.write_text(storyboard.model_dump_json(indent=2), encoding="utf-8")

    # 3. Run with a progress bar (denoising steps and composed frames). A step cache asked for here
    #    that misses the fidelity floor is refused before any shot is denoised.
    try:
        result = _run_with_progress(
            pipeline, product, shopper, event, output, thumbnail, audio_source, quiet, step_cache
        )
    except FidelityRefused as exc:
        raise _fail(str(exc)) from None
    _print_result(result, output, thumbnail)
    _print_renderer(pipeline.renderer.describe())


@app.command()
def variants(
    brief: Annotated[Path, typer.Argument(help="product brief JSON (see examples/)")],
    profile: Annotated[
        list[Path] | None, typer.Option("--profile", help="shopper profile JSON; repeat for more variants")
    ] = None,
    segment: Annotated[
        list[str] | None, typer.Option("--segment", help="a shopper segment by name, e.g. students; repeat")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="directory for variant-<i>.mp4/.jpg")] = Path("variants"),
    campaign: Annotated[Path | None, typer.Option(help="campaign JSON (e.g. 11.11)")] = None,
    preset: Annotated[str, typer.Option(help="preset name or local diffusers checkpoint directory")] = "tiny",
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT, overrides the brief")] = None,
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: the preset's)")] = None,
    audio: Annotated[str, typer.Option(help="'bed' (generated music) or 'none'")] = "bed",
    cache: Annotated[bool, typer.Option(help="reuse shared shots (--no-cache: make every shot anew)")] = True,
    concurrency: Annotated[int, typer.Option(help="variants made at once (1..16)")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
) -> None:
    """Make one video per shopper profile or segment for one product, in this process.

    The shots the variants share (hook, product features, price) are generated and decoded once;
    captions, order, overlays and audio are each variant's own.
    """
    from rich.table import Table

    from .pipelines.config import GenerateConfig, ModelConfig, PipelineConfig, RenderConfig, ShotCacheConfig
    from .pipelines.types import (
        MAX_VARIANTS,
        Campaign,
        ProductBrief,
        ShopperProfile,
        describe_validation_error,
    )

    try:
        product = _load_model(ProductBrief, brief, "brief", size=size)
        shoppers: list[ShopperProfile | None] = [
            _load_model(ShopperProfile, p, "profile") for p in profile or []
        ]
        shoppers += [ShopperProfile(segment=name) for name in segment or []]
        if not 1 <= len(shoppers) <= MAX_VARIANTS:
            raise UserError(f"name 1..{MAX_VARIANTS} shoppers (--profile, --segment), got {len(shoppers)}")
        event = _load_model(Campaign, campaign, "campaign")
        if audio not in ("bed", "none"):
            raise UserError(f"--audio {audio}: use 'bed' or 'none'")
        if not 1 <= concurrency <= 16:
            raise UserError(f"--concurrency {concurrency}: use 1..16")
        try:
            config = PipelineConfig(
                model=ModelConfig(preset=preset, device=device),
                generate=GenerateConfig(
                    num_inference_steps=steps, shot_cache=ShotCacheConfig(shared_shots=cache)
                ),
                render=RenderConfig(frame_cache_bytes=RenderConfig().frame_cache_bytes if cache else 0),
            )
        except ValidationError as exc:
            raise UserError("invalid option: " + "; ".join(describe_validation_error(exc))) from exc
        from .pipelines.pipeline import ProductVideoPipeline

        try:
            pipeline = ProductVideoPipeline(config)
            pipeline.plan_variants(product, shoppers, event)  # every refusal before any model work
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    except UserError as exc:
        raise _fail(str(exc)) from None

    def made(index: int, result: Any) -> None:
        console.print(f"variant {index}: {result.compose.num_frames} frames in {result.timings.total_s:.2f}s")

    results = pipeline.run_variants(
        product, shoppers, event, output_dir=out, audio=audio, concurrency=concurrency, on_variant=made
    )
    table = Table(title=f"{len(results)} variants of {product.title!r} in {out}")
    for column in ("variant", "shopper", "shared shots", "generate s", "render s", "total s", "quality"):
        table.add_column(column)
    for index, (shopper, result) in enumerate(zip(shoppers, results, strict=True)):
        who = "-" if shopper is None else shopper.segment or ", ".join(shopper.interests) or "profile"
        shared = sum(shot.shared for shot in result.storyboard.shots)
        t = result.timings
        verdict = "-" if result.quality is None else "passed" if result.quality.passed else "flagged"
        table.add_row(
            str(index), who, f"{shared}/{len(result.storyboard.shots)}", f"{t.generate_s:.2f}",
            f"{t.render_s:.2f}", f"{t.total_s:.2f}", verdict,
        )  # fmt: skip
    console.print(table)


def _print_renderer(described: dict[str, Any]) -> None:
    line = f"renderer: {described['backend']} {described['precision']} on {described['device']}"
    if described["requested"] != described["backend"]:
        line += f" (asked for {described['requested']})"
    graphs = dict(described.get("graphs_by_latent_size") or {})
    fallbacks = [size for size, graph in graphs.items() if graph == "torch"]
    if described.get("fallback_reason"):
        where = f" for latent size {', '.join(fallbacks)}" if fallbacks else ""
        line += f"; torch{where} because {described['fallback_reason']}"
    console.print(line, highlight=False)


def _print_storyboard(storyboard: Any, preset: Any) -> None:
    console.print(
        f"[bold]{storyboard.title}[/]: {len(storyboard.shots)} shots, {storyboard.total_frames} frames, "
        f"{storyboard.width}x{storyboard.height} @ {storyboard.fps} fps ({storyboard.duration_s:.2f} s), "
        f"planner {storyboard.planner}, preset {preset.name}",
        highlight=False,
    )
    if preset.untrained:
        console.print(
            "[yellow]note:[/] this preset has random weights: the pictures are noise-like by design "
            "(use --preset PATH with a real checkpoint for real footage)",
            highlight=False,
        )


def _run_with_progress(pipeline, product, shopper, event, output, thumbnail, audio, quiet, step_cache=None):  # noqa: ANN001
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .pipelines.produce import ProductionProgress

    with Progress(
        TextColumn("{task.description:>10}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
        transient=False,
    ) as bar:
        tasks: dict[str, Any] = {}

        def advance(stage: str, done: int, total: int) -> None:
            if total <= 0:
                return  # the step count is known from the first step on
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        def on_progress(progress: ProductionProgress) -> None:
            advance("denoise", progress.denoise_steps_done, progress.denoise_steps_total)
            advance("frames", progress.frames_done, progress.frames_total)

        return pipeline.run(
            product,
            shopper,
            event,
            output_path=output,
            thumbnail_path=thumbnail,
            audio=audio,
            on_progress=on_progress,
            step_cache=step_cache,
        )


def _print_result(result: Any, output: Path, thumbnail: Path | None) -> None:
    t = result.timings
    console.print(
        f"wrote [bold]{output}[/] ({result.compose.num_frames} frames, {result.compose.duration_s:.2f} s, "
        f"{result.compose.width}x{result.compose.height}, "
        f"audio {'yes' if result.compose.has_audio else 'no'})" + (f" and {thumbnail}" if thumbnail else ""),
        highlight=False,
    )
    console.print(
        f"timings: understand {t.understand_s:.2f}s, generate {t.generate_s:.2f}s, render {t.render_s:.2f}s, "
        f"compose {t.compose_s:.2f}s, first fragment {t.first_fragment_s or 0:.2f}s, total {t.total_s:.2f}s "
        f"({result.frames_per_s:.1f} frames/s)",
        highlight=False,
    )
    if result.quality is not None:
        _print_quality(result.quality)


def _print_quality(report: Any) -> None:
    def number(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    verdict = "[green]passed[/]" if report.passed else f"[yellow]flagged: {', '.join(report.flags)}[/]"
    console.print(
        f"quality: {verdict} (flicker {report.flicker:.3f}, SSIM {number(report.ssim_mean, '.2f')}, black "
        f"{report.black_fraction:.0%}, frozen {report.frozen_run_s:.1f}s, caption contrast "
        f"{number(report.caption_contrast, '.1f')}:1, loudness {number(report.loudness_lufs, '.1f')} LUFS, "
        f"clipped {number(report.clipped_fraction, '.2%')})",
        highlight=False,
    )


@app.command()
def plan(
    brief: Annotated[Path, typer.Argument(help="product brief JSON")],
    profile: Annotated[Path | None, typer.Option(help="shopper profile JSON")] = None,
    campaign: Annotated[Path | None, typer.Option(help="campaign JSON")] = None,
    size: Annotated[str, typer.Option(help="WIDTHxHEIGHT when the brief has none")] = "128x128",
    fps: Annotated[int, typer.Option(help="fps when the brief has none")] = 16,
) -> None:
    """Print the storyboard the template planner makes for a brief (no model is loaded)."""
    from .pipelines.config import PlannerConfig
    from .pipelines.types import Campaign, ProductBrief, ShopperProfile, VideoSize
    from .pipelines.understand import build_planner

    try:
        product = _load_model(ProductBrief, brief, "brief")
        try:
            product = product.model_copy(
                update={"size": product.size or VideoSize.model_validate(size), "fps": product.fps or fps}
            )
        except ValidationError as exc:
            raise UserError(f"--size {size}: {exc.errors()[0]['msg']}") from exc
        storyboard = build_planner(PlannerConfig()).plan(
            product,
            _load_model(ShopperProfile, profile, "profile"),
            _load_model(Campaign, campaign, "campaign"),
        )
    except (UserError, ValueError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(storyboard.model_dump_json(indent=2))


@app.command()
def presets() -> None:
    """List the model presets."""
    from rich.table import Table

    from .pipelines.presets import PRESETS

    table = Table("preset", "default size", "fps", "steps", "description")
    for preset in PRESETS.values():
        table.add_row(
            preset.name,
            str(preset.default_size),
            str(preset.default_fps),
            str(preset.default_steps),
            preset.description,
        )
    table.add_row(
        "PATH", "832x480", "16", "30", "a local Wan 2.1 T2V checkpoint directory (diffusers format)"
    )
    Console().print(table)


EXAMPLE_BRIEFS = ("brief_en.json", "brief_zh.json")
EXIT_REFUSED = 1


@app.command()
def quantize(
    briefs: Annotated[
        list[Path] | None,
        typer.Argument(help="briefs to calibrate on (default: bundled examples)"),
    ] = None,
    preset: Annotated[str, typer.Option(help="preset name or local diffusers checkpoint directory")] = "tiny",
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT (default: the preset's)")] = None,
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: the preset's)")] = None,
    seeds: Annotated[int, typer.Option(min=1, max=16, help="calibration seeds per brief")] = 2,
    min_psnr: Annotated[float, typer.Option(help="fidelity floor vs fp32 torch, in dB")] = 35.0,
    cache_dir: Annotated[Path | None, typer.Option(help="where renderers look for graphs")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "cpu",
) -> None:
    """Calibrate a static INT8 renderer on generator latents; keep it only if it meets the floor.

    Exit code 0: accepted (serve with renderer precision int8 and the same cache dir); 1: refused.
    """
    from .pipelines.config import ModelConfig, RenderConfig
    from .pipelines.types import ProductBrief, VideoSize

    try:
        paths = briefs or [Path(__file__).resolve().parent / "examples" / name for name in EXAMPLE_BRIEFS]
        loaded = [_load_model(ProductBrief, path, "brief") for path in paths]
        try:
            video_size = VideoSize.model_validate(size) if size else None
            model_config = ModelConfig(preset=preset, device=device, dtype="float32")  # type: ignore[arg-type]
            render_config = RenderConfig(min_psnr_db=min_psnr, cache_dir=cache_dir)
        except ValidationError as exc:
            raise UserError(f"invalid option: {exc.errors()[0]['msg']}") from exc
        from .pipelines.presets import load_model

        try:
            model = load_model(model_config)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    except UserError as exc:
        raise _fail(str(exc)) from None

    from .pipelines.calibrate import calibration_set
    from .pipelines.render.int8 import quantize_int8

    video_size = video_size or model.preset.default_size
    console.print(f"calibrating on {len(loaded)} briefs x {seeds} seeds at {video_size} ...", highlight=False)
    data = calibration_set(
        model, loaded, size=video_size, calibration_seeds=range(1, seeds + 1), num_inference_steps=steps
    )
    report = quantize_int8(
        model.vae,
        model.device,
        data.calibration,
        data.held_out,
        cache_dir=render_config.cache_dir,
        min_psnr_db=render_config.min_psnr_db,
    )
    print(json.dumps(dataclasses.asdict(report), indent=2))
    if not report.accepted:
        console.print(
            f"[yellow]refused:[/] INT8 reaches {report.psnr_db} dB on held-out latents, below the "
            f"{report.min_psnr_db} dB floor; renderers keep fp32",
            highlight=False,
        )
        raise typer.Exit(EXIT_REFUSED)
    console.print(f"accepted: {report.psnr_db} dB; renderer precision int8 will load {report.model_path}")
    if report.speedup_vs_fp32 is not None and report.speedup_vs_fp32 < 1.0:
        console.print(
            f"[yellow]note:[/] INT8 decodes at {report.speedup_vs_fp32}x the speed of fp32 on this machine: "
            "keep renderer precision fp32 here",
            highlight=False,
        )


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address the HTTP server binds")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to join (e.g. ray://head:10001, auto); default: start one here"),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="ServeConfig as YAML/JSON, or a Serve config file")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="preset name or checkpoint directory")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="where job records and videos are kept")] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Prometheus port of the embedded Ray cluster's metrics agent; default: Ray's pick"),
    ] = None,
) -> None:
    """Run the serving cluster (embedded Ray on this machine unless --address) until Ctrl-C."""
    import signal
    import threading

    from pydantic import ValidationError

    from .pipelines.types import describe_validation_error
    from .serve.runner import load_config, start

    try:
        settings = load_config(
            config, **{"pipeline.model.preset": preset, "jobs.data_dir": str(data_dir) if data_dir else None}
        )
    except ValidationError as exc:
        raise _fail("bad serve config:\n  " + "\n  ".join(describe_validation_error(exc))) from None
    except (OSError, ValueError) as exc:
        raise _fail(f"cannot read serve config {config}: {exc}") from None
    typer.echo(
        f"starting shopreel ({settings.model_name}, preset {settings.pipeline.model.preset}) ...", err=True
    )
    try:
        server = start(settings, host=host, port=port, address=address, metrics_export_port=metrics_port)
    except (TimeoutError, ValueError, ConnectionError) as exc:
        raise _fail(f"could not start: {exc}") from None
    typer.echo(f"shopreel is serving at {server.url}  (OpenAI API: {server.url}/v1, Ctrl-C stops)")
    if not settings.auth.enabled:
        from .serve.auth import AUTH_OFF_WARNING

        console.print(f"[bold yellow]warning:[/] {AUTH_OFF_WARNING}", highlight=False, soft_wrap=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        typer.echo("stopping ...", err=True)
        server.stop()


@app.command()
def remote(
    brief: Annotated[Path, typer.Argument(help="product brief JSON")],
    output: Annotated[Path, typer.Option("--output", "-o", help="MP4 to write")] = Path("out.mp4"),
    url: Annotated[str, typer.Option(help="a running `shopreel serve`")] = "http://127.0.0.1:8000",
    profile: Annotated[Path | None, typer.Option(help="shopper profile JSON")] = None,
    campaign: Annotated[Path | None, typer.Option(help="campaign JSON (e.g. 11.11)")] = None,
    wait: Annotated[float, typer.Option(help="seconds to wait for the server to become ready")] = 0.0,
    speed_profile: Annotated[
        str | None, typer.Option(help="quality, balanced or fast (default: an event's, else the server's)")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="SHOPREEL_API_KEY", help="API key, where the server requires one", show_default=False
        ),
    ] = None,
) -> None:
    """Make a product video on a running server: streams fMP4 from POST /v1/product-videos to a file."""
    import time

    import httpx

    try:
        body: dict[str, Any] = {"brief": _inline_image_paths(_read_json(brief, "brief"), brief.parent)}
        if profile is not None:
            body["profile"] = _read_json(profile, "profile")
        if campaign is not None:
            body["campaign"] = _read_json(campaign, "campaign")
        if speed_profile is not None:
            body["speed_profile"] = speed_profile  # the server answers 400 to an unknown name
    except UserError as exc:
        raise _fail(str(exc)) from None
    deadline = time.monotonic() + wait
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, timeout=httpx.Timeout(30.0, read=900.0), headers=headers) as client:
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError as exc:
                if time.monotonic() >= deadline:
                    raise _fail(f"no shopreel server at {url}: {exc}") from None
            if time.monotonic() >= deadline:
                raise _fail(f"{url} is not ready")
            time.sleep(0.5)
        started = time.perf_counter()
        first_byte: float | None = None
        temp = output.with_name(f".{output.name}.part")
        with client.stream("POST", "/v1/product-videos", json={**body, "stream": True}) as response:
            if response.status_code != 200:
                response.read()
                message = response.json().get("error", {}).get("message", response.text)
                raise _fail(f"server refused the brief ({response.status_code}): {message}")
            video_id = response.headers.get("x-shopreel-video-id", "?")
            with temp.open("wb") as file:
                for chunk in response.iter_bytes():
                    if first_byte is None:
                        first_byte = time.perf_counter() - started
                    file.write(chunk)
        total = time.perf_counter() - started
        record = client.get(f"/v1/videos/{video_id}").json()
    if record.get("status") in ("queued", "in_progress"):  # the stream broke off; the video is made again
        temp.unlink(missing_ok=True)
        raise _fail(
            f"the stream of video {video_id} broke off (a stage replica was lost); it is being produced "
            f"again: GET {url}/v1/videos/{video_id}/content once it is completed"
        )
    if record.get("status") != "completed":
        temp.unlink(missing_ok=True)
        raise _fail(f"video {video_id} {record.get('status')}: {record.get('error')}")
    temp.replace(output)
    typer.echo(
        f"wrote {output} ({record['shopreel']['num_frames']} frames, "
        f"{record['seconds']} s, {record['size']}) "
        f"from {url}: first bytes after {first_byte or 0:.2f} s, done after {total:.2f} s; "
        f"download again: GET {url}/v1/videos/{video_id}/content"
    )


# --- API keys and tenants (in the job store the cluster uses) -------------------------------------

keys_app = typer.Typer(no_args_is_help=True, help="API keys: create, list, revoke (stored hashed).")
tenants_app = typer.Typer(no_args_is_help=True, help="Tenants' quotas: jobs, streams, videos/min, bytes.")
app.add_typer(keys_app, name="keys")
app.add_typer(tenants_app, name="tenants")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="the server's ServeConfig (YAML/JSON or Serve config file)")
]
DataDirOption = Annotated[Path | None, typer.Option(help="the server's --data-dir (its SQLite job store)")]
StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="job store URL (sqlite:///PATH, postgresql://...); default: the config's, $SHOPREEL_JOBS_STORE",
    ),
]


def _job_store(config: Path | None, data_dir: Path | None, store: str | None) -> Any:
    """The job store a server with these options uses (keys and quotas live there)."""
    from .serve.runner import load_config
    from .serve.store_url import open_job_store

    try:
        settings = load_config(
            config, **{"jobs.data_dir": str(data_dir) if data_dir else None, "jobs.store": store}
        )
        return open_job_store(settings.jobs.store_url())
    except ValidationError as exc:
        raise _fail(f"bad serve config: {exc.errors(include_url=False)[0]['msg']}") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise _fail(f"cannot open the job store: {exc}") from None


def _check_tenant(tenant: str) -> None:
    import re

    from .serve.config import TENANT_PATTERN

    if re.fullmatch(TENANT_PATTERN, tenant) is None:
        raise _fail(f"tenant {tenant!r}: use 1-64 of a-z 0-9 . _ - (starting with a letter or digit)")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="the tenant whose videos the key makes and sees")],
    admin: Annotated[bool, typer.Option("--admin", help="may also use the admin API")] = False,
    label: Annotated[str | None, typer.Option(help="a note to tell keys apart (who holds it)")] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    store: StoreOption = None,
) -> None:
    """Create a key and print it (stdout, once: only its hash is kept)."""
    from .serve.auth import new_key

    _check_tenant(tenant)
    if label is not None and len(label) > 200:
        raise _fail("label: at most 200 characters")
    created = new_key(tenant, "admin" if admin else "user", label)
    with _job_store(config, data_dir, store) as jobs:
        jobs.create_key(created.record, created.secret_sha256)
    console.print(
        f"created {created.record.id} ({created.record.role}) for tenant {tenant}; "
        "keep the key now: it is not shown again",
        highlight=False,
        soft_wrap=True,
    )
    typer.echo(created.secret)


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's keys")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    store: StoreOption = None,
) -> None:
    """List keys (never their secrets), revoked ones included."""
    from datetime import datetime, timezone

    with _job_store(config, data_dir, store) as jobs:
        keys = jobs.api_keys(tenant)
    if as_json:
        for key in keys:
            typer.echo(key.model_dump_json())
        return

    def when(seconds: int | None) -> str:
        if seconds is None:
            return "-"
        return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M")

    typer.echo(f"{'id':<16} {'tenant':<20} {'role':<6} {'created (UTC)':<17} {'revoked (UTC)':<17} label")
    for key in keys:
        typer.echo(
            f"{key.id:<16} {key.tenant:<20} {key.role:<6} {when(key.created_at):<17} "
            f"{when(key.revoked_at):<17} {key.label or ''}"
        )


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id (key_...), as `keys list` shows it")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    store: StoreOption = None,
) -> None:
    """Revoke a key: every replica refuses it within auth.key_cache_s, no restart needed."""
    with _job_store(config, data_dir, store) as jobs:
        revoked = jobs.revoke_key(key_id)
    if revoked is None:
        raise _fail(f"no key {key_id!r} (shopreel keys list shows the ids)")
    typer.echo(f"revoked {key_id}" if revoked else f"{key_id} was already revoked")


@tenants_app.command("set")
def tenants_set(
    tenant: Annotated[str, typer.Argument(help="tenant name")],
    max_jobs: Annotated[int | None, typer.Option(help="queued + running jobs at once")] = None,
    max_streams: Annotated[int | None, typer.Option(help="streaming + sync videos at once")] = None,
    videos_per_minute: Annotated[int | None, typer.Option(help="videos accepted per rolling minute")] = None,
    max_stored_bytes: Annotated[int | None, typer.Option(help="bytes of finished videos kept")] = None,
    compliance: Annotated[
        str | None, typer.Option(help="reject|rewrite: policy for its briefs that name none")
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="drop its own quotas: the defaults apply")] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    store: StoreOption = None,
) -> None:
    """Set a tenant's quotas (unset ones: no limit for this tenant); takes effect without a restart."""
    from .pipelines.types import describe_validation_error
    from .serve.config import TenantQuotas

    _check_tenant(tenant)
    given = {"max_jobs": max_jobs, "max_streams": max_streams, "videos_per_minute": videos_per_minute}
    given["max_stored_bytes"] = max_stored_bytes
    given["compliance"] = compliance
    if clear and any(value is not None for value in given.values()):
        raise _fail("--clear takes no quota options")
    try:
        quotas = None if clear else TenantQuotas(**given)
    except ValidationError as exc:
        raise _fail("; ".join(describe_validation_error(exc))) from None
    with _job_store(config, data_dir, store) as jobs:
        jobs.set_tenant_quotas(tenant, quotas)
    typer.echo(f"{tenant}: " + ("default quotas" if quotas is None else quotas.describe()))


@tenants_app.command("list")
def tenants_list(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    store: StoreOption = None,
) -> None:
    """Tenants with their own quotas (others run under the config's auth.default_quotas)."""
    with _job_store(config, data_dir, store) as jobs:
        for tenant, quotas in jobs.tenants():
            typer.echo(f"{tenant}: {quotas.describe()}")


@app.command(
    help="Make a video for every product of a catalog into --out; resumable.\n\n"
    "Finished products (recorded in OUT/manifest.jsonl) are skipped, so an interrupted run is simply "
    "started again. A product that fails is recorded with its reason and skipped by later runs unless "
    "--retry-failed. Exit status: 0 when every product is finished, 1 when any is failed, 2 for a "
    "usage error."
)
def batch(
    catalog: Annotated[
        Path, typer.Argument(help="JSONL: one brief (or {id, brief, profile, campaign}) a line")
    ],
    out: Annotated[Path, typer.Option("--out", help="directory for <id>.mp4, <id>.jpg and manifest.jsonl")],
    url: Annotated[
        str | None, typer.Option(help="make the videos on this running cluster as bulk jobs instead")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="SHOPREEL_API_KEY", help="the cluster's API key", show_default=False)
    ] = None,
    engine: Annotated[
        str | None, typer.Option(help="ray (Ray Data actors here) or local (this process); default ray")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Ray Data actors, or cluster jobs in flight")] = 1,
    cpus_per_actor: Annotated[float, typer.Option(help="CPUs each Ray Data actor asks for")] = 1.0,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to join; default: a new one")] = None,
    retry_failed: Annotated[bool, typer.Option(help="make products earlier runs recorded as failed")] = False,
    preset: Annotated[str, typer.Option(help="preset name or local diffusers checkpoint directory")] = "tiny",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT for every product")] = None,
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: the preset's)")] = None,
    fps: Annotated[int | None, typer.Option(help="frames per second for every product")] = None,
    duration: Annotated[float | None, typer.Option(help="target seconds for every product")] = None,
    audio: Annotated[str, typer.Option(help="'bed' (generated music) or 'none'")] = "bed",
    thumbnails: Annotated[bool, typer.Option(help="also write <id>.jpg")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Make a video for every product of a catalog (see the command's help); resumable."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .pipelines.catalog import CatalogError, ProductOverrides
    from .pipelines.config import GenerateConfig, ModelConfig, PipelineConfig
    from .pipelines.types import describe_validation_error
    from .serve.batch import BatchConfig, BatchPlan, run_batch

    try:
        if engine not in (None, "ray", "local"):
            raise UserError(f"--engine {engine}: use ray or local (or --url for a cluster)")
        if url is not None and engine is not None:
            raise UserError("--engine is for making videos here; --url makes them on the cluster")
        if not catalog.is_file():
            raise UserError(f"catalog {catalog} does not exist")
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is not a directory")
        try:
            config = BatchConfig(
                engine="cluster" if url is not None else engine or "ray",  # type: ignore[arg-type]
                url=url,
                api_key=api_key,
                concurrency=concurrency,
                num_cpus=cpus_per_actor,
                ray_address=ray_address,
                retry_failed=retry_failed,
                audio=audio,  # type: ignore[arg-type]
                thumbnails=thumbnails,
                overrides=ProductOverrides(size=size, fps=fps, duration_s=duration),
                pipeline=PipelineConfig(
                    model=ModelConfig(preset=preset, device=device),
                    generate=GenerateConfig(num_inference_steps=steps),
                ),
            )
        except ValidationError as exc:
            raise UserError("invalid option: " + "; ".join(describe_validation_error(exc))) from exc
        if url is None:  # a wrong preset is one message here, not an error in every actor
            from .pipelines.presets import resolve_preset

            try:
                resolve_preset(preset)
            except ValueError as exc:
                raise UserError(str(exc)) from exc
    except UserError as exc:
        raise _fail(str(exc)) from None

    with Progress(
        TextColumn("products"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[failed]} failed[/]  {task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    ) as bar:
        task = bar.add_task("products", total=None, failed=0, rate="")
        started = time.perf_counter()
        made = 0

        def on_plan(plan: BatchPlan) -> None:
            skipped = plan.skipped_done + len(plan.skipped_failed)
            bar.update(task, total=plan.total, completed=skipped, failed=len(plan.skipped_failed))

        def on_record(result: dict[str, Any]) -> None:
            nonlocal made
            made += 1
            failed = bar.tasks[0].fields["failed"] + (result["status"] == "failed")
            rate = f"{made / (time.perf_counter() - started) * 60:.1f}/min"
            bar.update(task, advance=1, failed=failed, rate=rate)

        try:
            summary = run_batch(catalog, out, config, on_plan=on_plan, on_record=on_record)
        except CatalogError as exc:
            raise _fail(str(exc)) from None

    from rich.table import Table

    table = Table(title=f"batch {catalog.name} -> {summary.out_dir}", show_header=False)
    table.add_row("products", str(summary.total))
    table.add_row("made now", str(summary.done))
    table.add_row("skipped (already finished)", str(summary.skipped_done))
    table.add_row("failed", str(len(summary.failures)))
    table.add_row("total seconds", f"{summary.seconds:.1f}")
    per_video = summary.seconds_per_video
    table.add_row("seconds per video", "-" if per_video is None else f"{per_video:.2f}")
    table.add_row("output", str(summary.out_dir))
    console.print(table)
    if summary.failures:
        failures = Table(title="failed products (--retry-failed makes them again)")
        failures.add_column("id")
        failures.add_column("line")
        failures.add_column("reason", overflow="fold")
        for record in summary.failures:
            failures.add_row(record["id"], str(record.get("line", "")), str(record.get("error")))
        console.print(failures)
        raise typer.Exit(1)


@app.command("export-tiny")
def export_tiny(directory: Annotated[Path, typer.Argument(help="directory to write")]) -> None:
    """Write the tiny preset as a diffusers checkpoint directory (exercises --preset PATH offline)."""
    from .pipelines.presets import export_tiny_checkpoint

    if directory.exists() and any(directory.iterdir()):
        raise _fail(f"{directory} exists and is not empty")
    export_tiny_checkpoint(directory)
    typer.echo(f"wrote {directory}")


@app.command("train-mini")
def train_mini(
    output: Annotated[Path, typer.Option("--output", "-o", help="checkpoint directory to write")] = Path(
        "mini-checkpoint"
    ),
    config: Annotated[
        Path | None, typer.Option(help="TrainMiniConfig as JSON (default: the shipped mini's)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed for weights, data, noise and captions")] = None,
    vae_steps: Annotated[int | None, typer.Option(help="VAE optimiser steps")] = None,
    denoiser_steps: Annotated[int | None, typer.Option(help="transformer + text encoder steps")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (0: all cores)")] = None,
    init_from: Annotated[
        Path | None, typer.Option(help="continue this checkpoint's denoiser (its VAE is kept)")
    ] = None,
    smoke: Annotated[
        bool, typer.Option("--smoke", help="a few steps of every phase (checks the script)")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Train the mini video model on procedural product clips (about an hour on 2 CPU cores)."""
    from .train.mini import TrainMiniConfig, train

    if output.exists() and any(output.iterdir()):
        raise _fail(f"{output} exists and is not empty: pick a new --output")
    try:
        base = _load_model(TrainMiniConfig, config, "training config") if config else None
    except UserError as exc:
        raise _fail(str(exc)) from None
    settings = base or (TrainMiniConfig.smoke() if smoke else TrainMiniConfig())
    overrides = {
        "seed": seed,
        "vae_steps": vae_steps,
        "denoiser_steps": denoiser_steps,
        "threads": threads,
        "init_from": init_from,
    }
    try:
        settings = TrainMiniConfig.model_validate(
            {**settings.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        )
    except ValidationError as exc:
        raise _fail(f"bad training option: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None
    if settings.init_from is not None and not (settings.init_from / "model_index.json").is_file():
        raise _fail(f"init_from {settings.init_from} is not a diffusers checkpoint (no model_index.json)")
    train(settings, output, progress=not quiet)
    typer.echo(f"wrote {output} (load it with --preset {output})")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    sys.exit(main())
