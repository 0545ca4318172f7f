"""Checkpoints: every format loads, nothing executes, fine-tuning adapts heads and stem, downloads are safe."""

from __future__ import annotations

import collections
import http.server
import re
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from segbook.cli.main import main
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


def test_first_block_is_tiled_for_multichannel_inputs(tmp_path):
    pretrained = tiny(input_channels=1, seed=3)
    network = tiny(input_channels=3, seed=4)
    report = load_pretrained(network, pretrained.state_dict())
    assert sorted(report.tiled) == ["conv_blocks_context.0.0.conv1.weight", "conv_blocks_context.0.0.conv3.weight"]
    # Three identical channels give exactly the single-channel network's features.
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        single = pretrained.conv_blocks_context[0](image)
        tripled = network.conv_blocks_context[0](image.repeat(1, 3, 1, 1, 1))
    torch.testing.assert_close(tripled, single, rtol=1e-5, atol=1e-5)


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
    server = _Server({"/small_ep4k.model": checkpoint_bytes})
    try:
        cache = WeightCache(tmp_path / "weights")
        cfg = replace(CATALOGUE["small"], urls=(f"{server.url}/small_ep4k.model",))
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
    cfg = replace(CATALOGUE["small"], urls=(f"{server.url}/f",))
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
    cfg = replace(CATALOGUE["small"], urls=(f"{server.url}/f",))
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
    server = _Server({"/small_ep4k.model": checkpoint_bytes})
    try:
        assert main(["weights", "download", "small", "--url", f"{server.url}/small_ep4k.model"]) == 0
    finally:
        server.close()
    cached = segbook_home / "weights" / "small_ep4k.model"
    assert cached.read_bytes() == checkpoint_bytes
    assert main(["weights", "path", "small"]) == 0
    assert main(["weights", "verify", "small"]) == 0
    out = capsys.readouterr().out
    assert str(cached) in out and f"ok {cached}" in out
    cached.write_bytes(b"garbage")
    assert main(["weights", "verify", "small"]) == 2
    assert "corrupted" in capsys.readouterr().err


def test_models_cli_counts_at_the_requested_patch(segbook_home, capsys):
    assert main(["models", "--patch", "64", "64", "64", "--format", "json"]) == 0
    import json
    rows = {row["model"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["large"]["parameters"] == 440_302_605
    assert rows["large"]["forward TMACs"] == pytest.approx(3.825 / 8, abs=1e-3)
    assert rows["huge"]["cached"] == "no"
