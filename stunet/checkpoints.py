"""STU-Net's sizes and the official TotalSegmentator-pretrained checkpoints of them: what they are, where they live,
and a local cache.

The sizes (`PRESETS`) and the checkpoints' conventions (the layers fine-tuning adapts or replaces, the pretraining
strides) are data that both reading a checkpoint (`stunet.loading`, which names the size a file holds) and building
a network (`stunet.presets`, which may load a checkpoint) need; they live here, below both, so that presets imports
loading and loading never needs presets.

Each catalogue entry is data, like timm's pretrained configs: the file, where to get it, what it expects (one CT
channel, 1.5 mm isotropic spacing, 128^3 patches, per-image z-score) and which layers fine-tuning adapts
(`first_conv`) or replaces (`classifier`). The authors publish no checksums. The small checkpoint's SHA-256 is
catalogued (an independent project pins it); for the other sizes it is recorded next to the file on its first
download. Every later download or `verify` is checked against the catalogued or recorded one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Callable

HF_REPOSITORY = "https://huggingface.co/ziyanhuang/STU-Net/resolve/main"
_CHUNK = 1 << 16  # small enough that an interrupted download keeps most of what arrived

#: The layers adapted or dropped on fine-tuning (timm calls these `first_conv` and `classifier`).
FIRST_CONV_KEYS = ("conv_blocks_context.0.0.conv1.weight", "conv_blocks_context.0.0.conv3.weight")
HEAD_PREFIX = "seg_outputs."
#: Strides of the TotalSegmentator pretraining plans (1.5 mm isotropic, 128^3 patch).
PRETRAINING_STRIDES: list[list[int]] = [[2, 2, 2]] * 4 + [[1, 1, 2]]


@dataclass(frozen=True)
class Preset:
    name: str
    base_width: int
    blocks_per_stage: int

    @property
    def dims(self) -> list[int]:
        return [self.base_width * m for m in (1, 2, 4, 8, 16, 16)]

    @property
    def depth(self) -> list[int]:
        return [self.blocks_per_stage] * 6


#: The paper's four sizes, and `tiny` (base width 8): not released by the authors, it makes the CPU demo and the
#: tests fast while running every code path of the real study.
PRESETS: dict[str, Preset] = {
    p.name: p for p in (Preset("tiny", 8, 1), Preset("small", 16, 1), Preset("base", 32, 1), Preset("large", 64, 2),
                        Preset("huge", 96, 3))
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown STU-Net preset {name!r}; choose one of {', '.join(PRESETS)}") from None


@cache
def totalsegmentator_v1_labels() -> tuple[str, ...]:
    """The 105 output channels of the released checkpoints (background, then 104 classes alphabetically)."""
    text = resources.files("stunet").joinpath("data/totalsegmentator_v1_labels.json").read_text()
    order = json.loads(text)
    return tuple(order[str(i)] for i in range(len(order)))


@dataclass(frozen=True)
class PretrainedCfg:
    preset: str
    filename: str
    urls: tuple[str, ...]
    manual_urls: tuple[str, ...] = ()
    sha256: str | None = None
    input_channels: int = 1
    num_classes: int = 105
    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 1.5)
    patch_size: tuple[int, int, int] = (128, 128, 128)
    normalization: str = "per-image z-score"
    strides: tuple[tuple[int, ...], ...] = tuple(tuple(s) for s in PRETRAINING_STRIDES)
    first_conv: tuple[str, ...] = FIRST_CONV_KEYS
    classifier: str = HEAD_PREFIX.rstrip(".")
    pretraining: str = "TotalSegmentator v1 (1,204 CTs, 104 classes), 4000 epochs"
    label_names: tuple[str, ...] = field(default_factory=totalsegmentator_v1_labels)
    #: The file's format: a key of `segbook.backbones.FORMAT_READERS` (the reader that takes it).
    format: str = "stunet"
    licence: str = "MIT (the licence of uni-medical/STU-Net, the repository that publishes the checkpoints)"
    citation: str = ("Huang et al., STU-Net: Scalable and Transferable Medical Image Segmentation Models Empowered by "
                     "Large-Scale Supervised Pre-training, arXiv:2304.06716 (2023)")


def _official(preset: str, drive_id: str, baidu: str, sha256: str | None = None) -> PretrainedCfg:
    filename = f"{preset}_ep4k.model"
    return PretrainedCfg(preset=preset, filename=filename, urls=(f"{HF_REPOSITORY}/{filename}",),
                         manual_urls=(f"https://drive.google.com/file/d/{drive_id}/view", baidu), sha256=sha256)


CATALOGUE: dict[str, PretrainedCfg] = {
    "small": _official("small", "1HReH6dDrEuXgHPrsw7OrHSjvEUF3f4mv",
                       "https://pan.baidu.com/s/1ZBfOhaTvjvhcgXKGNe_gWg?pwd=soz7",
                       sha256="f440f401bf4cac1d1d6f7c4635542ef057193a5f96c0b3c661a6179afeab7be6"),
    "base": _official("base", "1BHCp1Ort-OaVFwaZmvsG4qHiKiPeNb4h",
                      "https://pan.baidu.com/s/1a17XmOGiGSgbEvK-acSOSg?pwd=91w3"),
    "large": _official("large", "1KA1eXWWf_xAoJg5KHYrxTmfiz7wxGhHS",
                       "https://pan.baidu.com/s/1WOLoTrzCLYyJXZnITGK6jg?pwd=91pt"),
    "huge": _official("huge", "1Qrq7oGPJ7ileFHWOAxwpeWdaB6hySptU",
                      "https://pan.baidu.com/s/1CinTvceZuvdEEWGcaJEuEA?pwd=bk9n"),
}


class WeightsError(RuntimeError):
    """A checkpoint that is missing, failed to download, or does not match its recorded checksum."""


def get_cfg(preset: str) -> PretrainedCfg:
    try:
        return CATALOGUE[preset]
    except KeyError:
        raise WeightsError(f"no pretrained checkpoint for {preset!r}; known: {', '.join(CATALOGUE)}") from None


class WeightCache:
    """A folder of checkpoints, each with a `.sha256` file recorded on its first download."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, cfg: PretrainedCfg) -> Path:
        return self.root / cfg.filename

    def is_cached(self, cfg: PretrainedCfg) -> bool:
        return self.path(cfg).is_file()

    def recorded_sha256(self, cfg: PretrainedCfg) -> str | None:
        sidecar = self._sidecar(cfg)
        return sidecar.read_text().split()[0] if sidecar.is_file() else None

    def resolve(self, cfg: PretrainedCfg | None, local_file: str | os.PathLike | None = None) -> Path:
        """The checkpoint to use: `local_file` if given, else the cached copy of `cfg`; a clear error if missing."""
        if local_file is not None:
            path = Path(local_file).expanduser()
            if not path.is_file():
                raise WeightsError(f"weights file not found: {path}")
            return path
        if cfg is None:
            raise WeightsError("no weights file given, and the model has no official checkpoint to fall back on")
        path = self.path(cfg)
        if not path.is_file():
            raise WeightsError(
                f"the pretrained STU-Net {cfg.preset} checkpoint is not in the cache ({path}). Run "
                f"`segbook weights download {cfg.preset}`, or download {cfg.filename} yourself "
                f"({' or '.join(cfg.manual_urls or cfg.urls)}) and pass it with --weights PATH")
        return path

    def download(self, cfg: PretrainedCfg, url: str | None = None,
                 progress: Callable[[int, int | None], None] | None = None, timeout: float = 60.0) -> Path:
        """Fetch the checkpoint into the cache; an interrupted download resumes from its `.part` file."""
        import requests

        target = self.path(cfg)
        partial = target.with_name(target.name + ".part")
        self.root.mkdir(parents=True, exist_ok=True)
        errors = []
        for candidate in ([url] if url else list(cfg.urls)):
            try:
                _fetch_resumable(requests, candidate, partial, progress, timeout)
                break
            except (requests.RequestException, OSError) as error:
                errors.append(f"{candidate}: {error}")
        else:
            raise WeightsError(f"could not download {cfg.filename}: " + "; ".join(errors)
                               + (f". Partial data kept in {partial}; run the command again to resume."
                                  if partial.exists() else ""))
        self._check_and_record(cfg, partial, target)
        os.replace(partial, target)
        return target

    def verify(self, cfg: PretrainedCfg) -> str:
        """The file's SHA-256 if it matches the recorded (and catalogued) one; a `WeightsError` otherwise."""
        path = self.resolve(cfg)
        digest = file_sha256(path)
        expected = cfg.sha256 or self.recorded_sha256(cfg)
        if expected is None:
            raise WeightsError(f"no checksum recorded for {path}; download it with `segbook weights download`")
        if digest != expected:
            raise WeightsError(f"{path} is corrupted: SHA-256 {digest} differs from the {checksum_origin(cfg)} "
                               f"{expected}. Delete it and download it again.")
        return digest

    def _check_and_record(self, cfg: PretrainedCfg, downloaded: Path, target: Path) -> None:
        digest = file_sha256(downloaded)
        expected = cfg.sha256 or self.recorded_sha256(cfg)
        if expected is not None and digest != expected:
            downloaded.unlink()
            raise WeightsError(f"download of {cfg.filename} failed verification: SHA-256 {digest}, "
                               f"expected the {checksum_origin(cfg)} {expected}; nothing was written to {target}")
        sidecar = self._sidecar(cfg)
        tmp = sidecar.with_name(sidecar.name + ".tmp")
        tmp.write_text(f"{digest}  {cfg.filename}\n")
        os.replace(tmp, sidecar)

    def _sidecar(self, cfg: PretrainedCfg) -> Path:
        return self.root / (cfg.filename + ".sha256")


def checksum_origin(cfg: PretrainedCfg) -> str:
    """Where the expected SHA-256 of a checkpoint comes from, for messages."""
    return "catalogued" if cfg.sha256 else "recorded"


def _fetch_resumable(requests, url: str, partial: Path, progress: Callable[[int, int | None], None] | None,
                     timeout: float) -> None:
    have = partial.stat().st_size if partial.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code == 416:  # the part file is already complete
            return
        response.raise_for_status()
        resumed = response.status_code == 206
        length = response.headers.get("Content-Length")
        total = (int(length) + (have if resumed else 0)) if length else None
        done = have if resumed else 0
        with open(partial, "ab" if resumed else "wb") as f:
            for chunk in response.iter_content(_CHUNK):
                f.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
        if total is not None and done != total:
            raise OSError(f"connection closed after {done} of {total} bytes")


def write_official_checkpoint(state_dict: dict, path: str | os.PathLike, epoch: int = 0) -> Path:
    """Save weights in the layout of the released checkpoints (an nnU-Net v1 `.model` dict), atomically."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"epoch": epoch, "state_dict": dict(state_dict), "optimizer_state_dict": None,
                "lr_scheduler_state_dict": None, "plot_stuff": ([], [], [], []), "best_stuff": None,
                "amp_grad_scaler": None}, partial)
    os.replace(partial, path)
    return path


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
