import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from media import probe
from typer.testing import CliRunner

from shopreel.cli import app
from shopreel.pipelines.types import Storyboard

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
runner = CliRunner()


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "brief.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("brief", "args", "message"),
    [
        ("{not json", [], "is not valid JSON"),
        ({"title": "Shoe", "duration_s": 600}, [], "brief.duration_s"),
        ({"title": "Shoe", "language": "fr"}, [], "brief.language"),
        ({"title": "Shoe", "images": [{"path": "missing.png"}]}, [], "images[0]: cannot read"),
        ({"title": "Shoe"}, ["--size", "100x100"], "multiple of 16"),
        ({"title": "Shoe"}, ["--preset", "no-such-model"], "neither a preset"),
        ({"title": "Shoe"}, ["--audio", "missing.wav"], "--audio missing.wav: no such file"),
        ({"title": "Shoe"}, ["--device", "tpu"], "invalid option"),
        ({"title": "Shoe"}, ["--renderer", "vulkan"], "backend: Input should be 'auto'"),
        ({"title": "Shoe"}, ["--renderer-precision", "int4"], "precision: Input should be 'fp32'"),
        ({"title": "Shoe"}, ["--speed-profile", "turbo"], "speed_profile: Input should be 'quality'"),
        ({"title": "Shoe"}, ["--step-cache", "faster"], "--step-cache faster: pick one of none"),
        # A step cache the fidelity gate refuses (MagCache at 12 steps: about 23 dB on the tiny preset).
        ({"title": "Shoe"}, ["--step-cache", "mag", "--steps", "12", "--size", "64x64"], "dB PSNR"),
    ],
)
def test_bad_input_is_a_message_and_exit_2(tmp_path, brief, args, message):
    result = runner.invoke(
        app, ["generate", str(_write(tmp_path, brief)), "-o", str(tmp_path / "o.mp4"), *args]
    )
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.mp4").exists()


def test_missing_brief_file(tmp_path):
    result = runner.invoke(app, ["generate", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and "cannot read brief" in result.output


def test_plan_prints_a_valid_storyboard():
    result = runner.invoke(
        app, ["plan", str(EXAMPLES / "brief_zh.json"), "--campaign", str(EXAMPLES / "campaign_1111.json")]
    )
    assert result.exit_code == 0, result.output
    storyboard = Storyboard.model_validate_json(result.stdout)
    assert storyboard.language == "zh" and storyboard.badge_text == "双11"


@pytest.mark.parametrize(("name", "steps"), [("brief_tutorial.json", 4), ("brief_process_zh.json", 4)])
def test_plan_a_how_to_and_a_process_brief(name, steps):
    result = runner.invoke(app, ["plan", str(EXAMPLES / name)])
    assert result.exit_code == 0, result.output
    storyboard = Storyboard.model_validate_json(result.stdout)
    assert [shot.step_number for shot in storyboard.shots if shot.step_number] == list(range(1, steps + 1))


def test_a_tutorial_without_steps_is_a_message_and_exit_2(tmp_path):
    result = runner.invoke(app, ["plan", str(_write(tmp_path, {"title": "Bottle", "mode": "tutorial"}))])
    assert result.exit_code == 2 and "needs steps" in result.output


def test_presets_lists_tiny():
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0 and "tiny" in result.output


@pytest.mark.slow
def test_generate_example_writes_the_planned_video(tmp_path):
    """The README's main command, as a user runs it: the video matches its storyboard."""
    exe = Path(sys.executable).with_name("shopreel")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "shopreel.cli"]
    shutil.copy(EXAMPLES / "sneaker.png", tmp_path / "sneaker.png")
    shutil.copy(EXAMPLES / "brief_en.json", tmp_path / "brief.json")
    out, thumb, plan = tmp_path / "out.mp4", tmp_path / "out.jpg", tmp_path / "storyboard.json"
    done = subprocess.run(
        [
            *command,
            "generate",
            str(tmp_path / "brief.json"),
            "-o",
            str(out),
            "--thumbnail",
            str(thumb),
            "--storyboard-out",
            str(plan),
            "--size",
            "64x64",
            "--steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    storyboard = Storyboard.model_validate_json(plan.read_text())
    video = probe(out)
    assert (video.width, video.height) == (storyboard.width, storyboard.height) == (64, 64)
    assert video.frames == storyboard.total_frames
    assert video.fps == storyboard.fps
    assert video.duration_s == pytest.approx(storyboard.duration_s, abs=1.5 / storyboard.fps)
    assert video.audio_streams == 1
    assert video.audio_duration_s == pytest.approx(storyboard.duration_s, abs=0.05)
    assert thumb.read_bytes()[:3] == b"\xff\xd8\xff"
    assert "noise-like" in done.stderr  # the tiny preset says its pictures are untrained
    assert "renderer: onnxruntime fp32 on cpu" in done.stderr  # what "auto" chose
    assert "quality: " in done.stderr and "LUFS" in done.stderr  # every video is scored


def test_quantize_bad_input_is_a_message_and_exit_2(tmp_path):
    result = runner.invoke(app, ["quantize", "--size", "100x100"])
    assert result.exit_code == 2 and "multiple of 16" in result.output
    result = runner.invoke(app, ["quantize", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and "cannot read brief" in result.output


@pytest.mark.slow
def test_quantize_reports_fidelity_and_exit_code_follows_the_floor(tmp_path):
    args = ["quantize", "--size", "64x64", "--steps", "2", "--seeds", "1", "--cache-dir", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["precision"] == "int8" and 0 < report["psnr_db"] < float("inf")
    assert result.exit_code == (0 if report["accepted"] else 1)
    assert Path(report["model_path"]).exists() == report["accepted"]
    assert Path(report["model_path"]).parent == tmp_path


def test_remote_without_a_server_is_a_clear_error(tmp_path):
    brief = tmp_path / "brief.json"
    brief.write_text('{"title": "Mug"}')
    result = runner.invoke(app, ["remote", str(brief), "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "no shopreel server at http://127.0.0.1:9" in result.output


def test_keys_are_created_listed_and_revoked_in_the_servers_store(tmp_path):
    from shopreel.serve.auth import Authenticator, AuthError
    from shopreel.serve.config import AuthSettings
    from shopreel.serve.store import SqliteJobStore

    store = ["--data-dir", str(tmp_path)]
    created = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--label", "web shop", *store])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()  # stdout holds the key alone: `KEY=$(shopreel keys create ...)`
    assert key.startswith("sr-") and "\n" not in key and "not shown again" in created.output
    listed = runner.invoke(app, ["keys", "list", "--json", *store])
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["tenant"], row["role"], row["label"], row["revoked_at"]) == ("acme", "user", "web shop", None)
    assert key not in listed.output and key.split("-", 2)[2] not in listed.output
    with SqliteJobStore(tmp_path / "jobs.sqlite3") as jobs:  # what the server reads
        auth = Authenticator(AuthSettings(enabled=True, key_cache_s=0), jobs, "UNSET_ADMIN_KEY_ENV")
        assert auth.principal(f"Bearer {key}").tenant == "acme"
        assert runner.invoke(app, ["keys", "revoke", row["id"], *store]).exit_code == 0
        with pytest.raises(AuthError):
            auth.principal(f"Bearer {key}")
    again = runner.invoke(app, ["keys", "revoke", row["id"], *store])
    assert again.exit_code == 0 and "already revoked" in again.output
    assert "revoked" in runner.invoke(app, ["keys", "list", *store]).output
    unknown = runner.invoke(app, ["keys", "revoke", "key_000000000000", *store])
    assert unknown.exit_code == 2 and "no key" in unknown.output


def test_tenant_quotas_from_the_cli(tmp_path):
    store = ["--data-dir", str(tmp_path)]
    result = runner.invoke(
        app, ["tenants", "set", "acme", "--max-streams", "2", "--videos-per-minute", "30", *store]
    )
    assert result.exit_code == 0 and "max_streams=2, videos_per_minute=30" in result.output, result.output
    assert "acme: max_streams=2" in runner.invoke(app, ["tenants", "list", *store]).output
    policy = runner.invoke(app, ["tenants", "set", "acme", "--compliance", "rewrite", *store])
    assert policy.exit_code == 0 and "acme: compliance=rewrite" in policy.output, policy.output
    assert runner.invoke(app, ["tenants", "set", "acme", "--clear", *store]).exit_code == 0
    assert runner.invoke(app, ["tenants", "list", *store]).output.strip() == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keys", "create", "--tenant", "Bad Name"], "tenant 'Bad Name'"),
        (["tenants", "set", "acme", "--max-streams", "0"], "max_streams"),
        (["tenants", "set", "acme", "--clear", "--max-jobs", "3"], "--clear takes no quota"),
        (["tenants", "set", "acme", "--compliance", "lenient"], "compliance"),
        (["keys", "list", "--store", "mysql://x"], "cannot open the job store"),
    ],
)
def test_bad_key_and_tenant_commands_exit_2(tmp_path, args, message):
    result = runner.invoke(app, [*args, "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and message in result.output, result.output


def test_variants_without_shoppers_or_with_a_bad_profile_is_a_message_and_exit_2(tmp_path):
    brief = str(EXAMPLES / "brief_en.json")
    result = runner.invoke(app, ["variants", brief, "--out", str(tmp_path)])
    assert result.exit_code == 2 and "name 1..16 shoppers" in result.output
    bad = _write(tmp_path, {"interests": "not a list"})
    result = runner.invoke(app, ["variants", brief, "--profile", str(bad), "--out", str(tmp_path)])
    assert (
        result.exit_code == 2
        and "is not a valid profile" in result.output
        and "Traceback" not in result.output
    )
    assert not list(tmp_path.glob("*.mp4"))


@pytest.mark.slow
def test_variants_writes_a_video_per_shopper_and_says_what_they_share(tmp_path):
    args = ["variants", str(EXAMPLES / "brief_en.json"), "--profile", str(EXAMPLES / "profile_runner.json")]
    args += ["--segment", "students", "--segment", "commuters", "--out", str(tmp_path / "v")]
    result = runner.invoke(app, [*args, "--size", "64x64", "--steps", "2", "--audio", "none"])
    assert result.exit_code == 0, result.output
    files = sorted(path.name for path in (tmp_path / "v").glob("variant-*.mp4"))
    assert files == ["variant-0.mp4", "variant-1.mp4", "variant-2.mp4"]
    # The runner's own style shares nothing; the two segments share every shot with each other.
    assert "0/5" in result.output and result.output.count("5/5") == 2, result.output
    assert all(probe(tmp_path / "v" / name).frames > 0 for name in files)
