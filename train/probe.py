"""A judge of prompt following: a small 3D CNN that reads object, colour and camera move off a clip.

It is trained only on the procedural renderer's ground-truth clips (``train.clips``), never on a
model's output, so it measures whether a generated video *looks like* what the prompt asked for.
Light augmentation (noise, blur, brightness) keeps it from depending on the renderer's exact pixels.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .clips import CAMERAS, COLOURS, OBJECTS, ClipShape, ClipSpec, render_clip, sample_spec

HEADS: dict[str, tuple[str, ...]] = {
    "object": OBJECTS,
    "colour": tuple(COLOURS),
    "camera": tuple(move.value for move in CAMERAS),
}


def labels(spec: ClipSpec) -> dict[str, int]:
    return {
        "object": OBJECTS.index(spec.object),
        "colour": HEADS["colour"].index(spec.colour),
        "camera": HEADS["camera"].index(spec.camera.value),
    }


def _network():
    import torch
    from torch import nn

    class ClipProbe(nn.Module):
        def __init__(self) -> None:
            super().__init__()

            def block(cin: int, cout: int, stride: tuple[int, int, int]) -> nn.Sequential:
                return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

            # Input: RGB plus the frame-to-frame difference (motion is what tells camera moves apart).
            self.features = nn.Sequential(
                block(6, 16, (1, 2, 2)),
                block(16, 32, (2, 2, 2)),
                block(32, 64, (2, 2, 2)),
                block(64, 96, (2, 2, 2)),
            )
            self.heads = nn.ModuleDict({name: nn.Linear(96 * 2, len(names)) for name, names in HEADS.items()})

        def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
            # video: (B, 3, T, H, W) in [-1, 1]
            motion = torch.diff(video, dim=2, prepend=video[:, :, :1])
            x = self.features(torch.cat([video, motion], dim=1))
            # Mean and max over space-time: what is there, and its strongest local evidence.
            pooled = torch.cat([x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))], dim=1)
            return {name: head(pooled) for name, head in self.heads.items()}

    return ClipProbe()


def to_tensor(frames: np.ndarray):
    """uint8 (B, T, H, W, 3) or (T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1]."""
    import torch

    if frames.ndim == 4:
        frames = frames[None]
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def _augment(video, generator):
    import torch

    batch = video.shape[0]
    brightness = 1 + 0.12 * (torch.rand(batch, 1, 1, 1, 1, generator=generator) * 2 - 1)
    video = (video + 1) * brightness - 1
    blurred = torch.nn.functional.avg_pool3d(video, (1, 3, 3), stride=1, padding=(0, 1, 1))
    mix = torch.rand(batch, 1, 1, 1, 1, generator=generator)
    video = mix * blurred + (1 - mix) * video
    noise = 0.08 * torch.rand(batch, 1, 1, 1, 1, generator=generator)
    return (video + noise * torch.randn(video.shape, generator=generator)).clamp(-1, 1)


@dataclass
class ProbeReport:
    """Training record of the judge, with its accuracy on fresh ground-truth clips."""

    clips: int
    steps: int
    seconds: float
    ground_truth_accuracy: dict[str, float] = field(default_factory=dict)


def train_probe(
    shape: ClipShape = ClipShape(), clips: int = 3000, epochs: int = 5, seed: int = 100, progress: bool = True
):
    """Train the judge on ``clips`` fresh renderer clips (all combinations); returns (model, report)."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    specs = [sample_spec(rng, held_out=rng.random() < 0.15) for _ in range(clips)]
    started = time.perf_counter()
    data = np.stack([render_clip(spec, shape) for spec in tqdm(specs, desc="render", disable=not progress)])
    targets = {name: torch.tensor([labels(s)[name] for s in specs]) for name in HEADS}
    model = _network()
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    batch = 32
    steps = epochs * (clips // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in tqdm(range(steps), desc="probe", disable=not progress):
        index = torch.randint(0, clips, (batch,), generator=generator)
        video = _augment(to_tensor(data[index.numpy()]), generator)
        logits = model(video)
        loss = sum(torch.nn.functional.cross_entropy(logits[n], targets[n][index]) for n in HEADS)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    model.eval()
    # Accuracy on clips it has never seen (new seeds): the judge's own ceiling.
    check = [sample_spec(rng, held_out=True) for _ in range(200)]
    predicted = classify(model, np.stack([render_clip(s, shape) for s in check]))
    accuracy = {
        name: float(
            np.mean([p[name] == getattr_label(s, name) for p, s in zip(predicted, check, strict=True)])
        )
        for name in HEADS
    }
    report = ProbeReport(
        clips=clips, steps=steps, seconds=time.perf_counter() - started, ground_truth_accuracy=accuracy
    )
    return model, report


def getattr_label(spec: ClipSpec, head: str) -> str:
    return spec.camera.value if head == "camera" else str(getattr(spec, head))


def classify(model, frames: np.ndarray, batch: int = 32) -> list[dict[str, str]]:
    """Predicted object, colour and camera move of each clip in uint8 (B, T, H, W, 3)."""
    import torch

    results: list[dict[str, str]] = []
    with torch.inference_mode():
        for start in range(0, len(frames), batch):
            logits = model(to_tensor(frames[start : start + batch]))
            picks = {name: logits[name].argmax(dim=1).tolist() for name in HEADS}
            for i in range(len(picks["object"])):
                results.append({name: HEADS[name][picks[name][i]] for name in HEADS})
    return results


def save_probe(model, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(path))


def load_probe(path: Path):
    from safetensors.torch import load_file

    model = _network()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
