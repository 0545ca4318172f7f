"""Checkpoints: every format loads, nothing executes, fine-tuning adapts heads and stem, downloads are safe."""

from __future__ import annotations

import collections
import hashlib
import http.server
import re
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from segbook.cli.main import main
from segbook.errors import SegbookError
from segbook.paths import Paths
from segbook.runs import resolve_weights
from stunet import (CATALOGUE, CheckpointError, STUNet, WeightCache, WeightsError, create_stunet, load_pretrained,
                    read_state_dict)
from stunet.checkpoints import file_sha256

TINY = dict(dims=[4, 6, 8, 8, 10, 10], depth=[1, 2, 1, 1, 1, 1], strides=[[2, 2, 2]] * 4 + [[1, 1, 2]])


def tiny(input_channels: int = 1, num_classes: int = 5, seed: int = 0) -> STUNet:
    torch.manual_seed(seed)
    return STUNet(input_channels, num_classes, **TINY)


def save_v1(network: STUNet, path: Path) -> None:
    """The nnU-Net v1 layout of the official release, training curves as numpy scalars included."""
    torch.save({"epoch": 4000, "state_dict": collections.OrderedDict(network.state_dict()),
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
                "plot_stuff": ([np.float64(0.9)], [np.float32(0.8)], [np.float64(0.7)], [np.mean([0.5])]),
                "best_stuff": (3999, np.float64(0.71), 4000, None), "amp_grad_scaler": {"scale": 65536.0}}, path)


@pytest.mark.parametrize("layout", ["v1", "v2", "plain"])
def test_every_checkpoint_format_reads_to_the_same_weights(tmp_path, layout):
    network = tiny()
    path = tmp_path / f"checkpoint.{layout}"
    if layout == "v1":
        save_v1(network, path)
    elif layout == "v2":  # nnU-Net v2 saves DDP-wrapped weights with a `module.` prefix when trained on several GPUs
        weights = {f"module.{k}": v for k, v in network.state_dict().items()}
        torch.save({"network_weights": weights, "trainer_name": "nnUNetTrainer", "current_epoch": 3}, path)
    else:  # a torch.compile'd network's plain state_dict
        torch.save({f"_orig_mod.{k}": v for k, v in network.state_dict().items()}, path)
    loaded = read_state_dict(path)
    assert loaded.keys() == network.state_dict().keys()
    for key, value in network.state_dict().items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_a_command_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.model"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsACommand(marker)}, path)
    with pytest.raises(CheckpointError, match="refused: reading it would import and run `posix.system`, and "
                                              "segbook never runs code from a checkpoint") as refused:
        read_state_dict(path)
    assert not marker.exists()
    assert "weights_only" not in str(refused.value)  # never torch's advice to read it the unsafe way
    # The payload is live: an unsafe load of the same file does run the command.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("content,reason", [(b"", "is empty (0 bytes)"),
                                            (b"PK\x03\x04 not really a zip", "not a PyTorch checkpoint, or it is "
                                                                             "damaged or truncated"),
                                            (bytes(range(256)) * 8, "not a PyTorch checkpoint, or it is damaged")])
def test_a_file_that_is_no_checkpoint_gets_a_reason(tmp_path, content, reason):
    path = tmp_path / "weights.model"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(reason)):
        read_state_dict(path)


def test_fine_tuning_load_keeps_body_and_fresh_heads(tmp_path):
    pretrained = tiny(num_classes=105, seed=1)
    path = tmp_path / "small_ep4k.model"
    save_v1(pretrained, path)
    network = tiny(num_classes=3, seed=2)
    heads_before = {k: v.clone() for k, v in network.state_dict().items() if k.startswith("seg_outputs")}
    report = load_pretrained(network, read_state_dict(path), source=str(path))
    state = network.state_dict()
    for key, value in pretrained.state_dict().items():
        if key.startswith("seg_outputs"):
            assert key in report.skipped_heads
            torch.testing.assert_close(state[key], heads_before[key])
        else:
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    assert report.tiled == []


STEM = ("conv_blocks_context.0.0.conv1.weight", "conv_blocks_context.0.0.conv3.weight")


def _official_tiling(state_dict: dict, channels: int) -> dict:
    """What uni-medical/STU-Net's loaders (nnU-Net v1 `run_finetuning.py`, v2.2 `run_finetuning_stunet.py`) do to
    the first block of a multi-channel network: `weight.repeat(1, num_inputs, 1, 1, 1)`, nothing else."""
    return {key: value.repeat(1, channels, 1, 1, 1) if key in STEM else value for key, value in state_dict.items()}


def test_first_block_is_tiled_as_the_official_loaders_do(tmp_path):
    """Random official-format weights, a 4-channel input made of one channel repeated: the first block computes
    what the official tiling gives, and not what dividing by the channel count (the `mean` option) gives."""
    pretrained = tiny(input_channels=1, num_classes=105, seed=3)
    path = tmp_path / "small_ep4k.model"
    save_v1(pretrained, path)
    network = tiny(input_channels=4, seed=4)
    report = load_pretrained(network, read_state_dict(path), source=str(path))
    assert sorted(report.tiled) == list(STEM)
    official = tiny(input_channels=4, seed=5)
    heads = {k: v for k, v in official.state_dict().items() if k.startswith("seg_outputs")}
    official.load_state_dict({**_official_tiling(pretrained.state_dict(), 4), **heads}, strict=True)
    image = torch.randn(1, 1, 32, 32, 32).repeat(1, 4, 1, 1, 1)
    with torch.no_grad():
        ours = network.conv_blocks_context[0](image)
        reference = official.conv_blocks_context[0](image)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    mean = tiny(input_channels=4, seed=4)
    load_pretrained(mean, pretrained.state_dict(), tiling="mean")
    with torch.no_grad():
        averaged = mean.conv_blocks_context[0](image)
        single = pretrained.conv_blocks_context[0](image[:, :1])
    torch.testing.assert_close(averaged, single, rtol=1e-5, atol=1e-5)  # what `mean` is for
    assert (averaged - reference).abs().max() > 0.1  # the two tilings start from different networks


def test_stem_tiling_is_chosen_by_name(tmp_path):
    pretrained = create_stunet("tiny", num_classes=105)
    path = tmp_path / "tiny.model"
    save_v1(pretrained, path)
    stem = pretrained.state_dict()[STEM[1]]
    repeated = create_stunet("tiny", input_channels=3, num_classes=2, pretrained=path)
    averaged = create_stunet("tiny", input_channels=3, num_classes=2, pretrained=path, tiling="mean")
    torch.testing.assert_close(repeated.state_dict()[STEM[1]], torch.cat([stem] * 3, dim=1), rtol=0, atol=0)
    torch.testing.assert_close(averaged.state_dict()[STEM[1]], torch.cat([stem / 3] * 3, dim=1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown stem tiling 'sum'; choose one of repeat, mean"):
        create_stunet("tiny", input_channels=3, num_classes=2, pretrained=path, tiling="sum")


def test_a_checkpoint_of_another_size_is_named_in_the_error():
    base = create_stunet("base", device="meta").state_dict()
    large = create_stunet("large", device="meta")
    with pytest.raises(CheckpointError, match=r"holds STU-Net base \(widths 32\.\.512.*network is STU-Net large"):
        load_pretrained(large, base, source="base_ep4k.model")


def test_create_stunet_loads_a_pretrained_file(tmp_path):
    source = create_stunet("small", num_classes=105)
    path = tmp_path / "small_ep4k.model"
    save_v1(source, path)
    network = create_stunet("small", input_channels=2, num_classes=4, pretrained=path)
    torch.testing.assert_close(network.conv_blocks_context[3][0].conv2.weight,
                               source.conv_blocks_context[3][0].conv2.weight)
    assert network.seg_outputs[0].weight.shape == (4, 256, 1, 1, 1)


# --- downloads from a local HTTP server -------------------------------------------------------------------------


class _Server:
    """Serves byte strings with Range support; `cut_after` drops the first response after that many bytes."""

    def __init__(self, files: dict[str, bytes], cut_after: int | None = None):
        self.files, self.cut_after, self.requests = files, cut_after, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                data = outer.files.get(self.path)
                outer.requests.append((self.path, self.headers.get("Range")))
                if data is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                body = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_after is not None:
                    body, outer.cut_after = body[:outer.cut_after], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def checkpoint_bytes(tmp_path) -> bytes:
    path = tmp_path / "source.model"
    save_v1(tiny(num_classes=105), path)
    return path.read_bytes()


def test_download_records_checksum_and_loads(tmp_path, checkpoint_bytes):
    server = _Server({"/base_ep4k.model": checkpoint_bytes})
    try:
        cache = WeightCache(tmp_path / "weights")
        cfg = replace(CATALOGUE["base"], urls=(f"{server.url}/base_ep4k.model",))
        path = cache.download(cfg)
    finally:
        server.close()
    assert path.read_bytes() == checkpoint_bytes
    assert cache.recorded_sha256(cfg) == file_sha256(path)
    assert cache.verify(cfg) == file_sha256(path)
    assert not any(p.name.endswith(".part") for p in path.parent.iterdir())
    read_state_dict(path)


def test_interrupted_download_resumes_with_a_range_request(tmp_path, checkpoint_bytes):
    server = _Server({"/f": checkpoint_bytes}, cut_after=len(checkpoint_bytes) // 3)
    cache = WeightCache(tmp_path / "weights")
    cfg = replace(CATALOGUE["base"], urls=(f"{server.url}/f",))
    try:
        with pytest.raises(WeightsError, match="resume"):
            cache.download(cfg)
        assert not cache.is_cached(cfg)
        path = cache.download(cfg)
    finally:
        server.close()
    assert path.read_bytes() == checkpoint_bytes
    resumed_from = int(server.requests[-1][1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= len(checkpoint_bytes) // 3


def test_a_corrupted_file_fails_verification(tmp_path, checkpoint_bytes):
    server = _Server({"/f": checkpoint_bytes})
    cache = WeightCache(tmp_path / "weights")
    cfg = replace(CATALOGUE["base"], urls=(f"{server.url}/f",))
    try:
        path = cache.download(cfg)
        path.write_bytes(checkpoint_bytes[:-10] + b"0123456789")
        with pytest.raises(WeightsError, match="corrupted"):
            cache.verify(cfg)
        # A download whose bytes differ from the known checksum is rejected and leaves nothing behind.
        server.files["/f"] = checkpoint_bytes + b"tampered"
        path.unlink()
        with pytest.raises(WeightsError, match="failed verification"):
            cache.download(cfg)
        assert not path.exists()
    finally:
        server.close()


def test_weights_cli_download_path_verify(segbook_home, checkpoint_bytes, capsys):
    server = _Server({"/base_ep4k.model": checkpoint_bytes})
    try:
        assert main(["weights", "download", "base", "--url", f"{server.url}/base_ep4k.model"]) == 0
    finally:
        server.close()
    cached = segbook_home / "weights" / "base_ep4k.model"
    assert cached.read_bytes() == checkpoint_bytes
    assert main(["weights", "path", "base"]) == 0
    assert main(["weights", "verify", "base"]) == 0
    out = capsys.readouterr().out
    assert str(cached) in out and f"ok {cached}" in out
    cached.write_bytes(b"garbage")
    assert main(["weights", "verify", "base"]) == 2
    assert "corrupted" in capsys.readouterr().err


SMALL_SHA256 = "f440f401bf4cac1d1d6f7c4635542ef057193a5f96c0b3c661a6179afeab7be6"


def test_the_small_checkpoints_sha256_is_catalogued_and_a_mismatch_names_both(segbook_home, checkpoint_bytes,
                                                                               capsys):
    assert CATALOGUE["small"].sha256 == SMALL_SHA256
    assert all(CATALOGUE[size].sha256 is None for size in ("base", "large", "huge"))
    server = _Server({"/small_ep4k.model": checkpoint_bytes})
    try:  # a file that is not the official one fails the download, whatever was recorded before
        assert main(["weights", "download", "small", "--url", f"{server.url}/small_ep4k.model"]) == 2
    finally:
        server.close()
    error = capsys.readouterr().err
    digest = hashlib.sha256(checkpoint_bytes).hexdigest()
    assert f"SHA-256 {digest}, expected the catalogued {SMALL_SHA256}" in error
    cached = segbook_home / "weights" / "small_ep4k.model"
    assert not cached.exists()
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(checkpoint_bytes)  # put into the cache by hand, with a sidecar that agrees with it
    (segbook_home / "weights" / "small_ep4k.model.sha256").write_text(f"{digest}  small_ep4k.model\n")
    assert main(["weights", "verify", "small"]) == 2
    assert f"SHA-256 {digest} differs from the catalogued {SMALL_SHA256}" in capsys.readouterr().err
    with pytest.raises(SegbookError, match=f"SHA-256 {digest} differs from the catalogued {SMALL_SHA256}"):
        resolve_weights("small", None, Paths.from_env())


def test_models_cli_counts_at_the_requested_patch(segbook_home, capsys):
    assert main(["models", "--patch", "64", "64", "64", "--format", "json"]) == 0
    import json
    rows = {row["model"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["large"]["parameters"] == 440_302_605
    assert rows["large"]["forward TMACs"] == pytest.approx(3.825 / 8, abs=1e-3)
    assert rows["huge"]["cached"] == "no"
