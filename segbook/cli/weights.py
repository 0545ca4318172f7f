"""`segbook weights`: download, locate and verify the official pretrained checkpoints."""

from __future__ import annotations

import argparse

from segbook.errors import SegbookError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "weights", help="download, locate or verify the official TotalSegmentator-pretrained checkpoints",
        description="Manage the cache of official STU-Net checkpoints (in $SEGBOOK_HOME/weights, default "
                    "~/.cache/segbook/weights). Downloads resume where they stopped; the SHA-256 is checked "
                    "against the catalogued one (small) or recorded on the first download and checked afterwards "
                    "(base, large, huge).")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    download = actions.add_parser("download", help="download a checkpoint into the cache (resumable)")
    download.add_argument("model", help="small, base, large or huge")
    download.add_argument("--url", help="download from this URL instead of the catalogue's (a mirror)")
    download.set_defaults(handler=run_download)
    path = actions.add_parser("path", help="print where a checkpoint is (or would be) cached")
    path.add_argument("model")
    path.set_defaults(handler=run_path)
    verify = actions.add_parser("verify", help="check a cached checkpoint against its catalogued or recorded SHA-256")
    verify.add_argument("model")
    verify.set_defaults(handler=run_verify)


def _cache_and_cfg(model: str):
    from segbook.paths import Paths
    from stunet import WeightCache, WeightsError, get_cfg

    try:
        return WeightCache(Paths.from_env().weights), get_cfg(model)
    except WeightsError as error:
        raise SegbookError(str(error)) from None


def run_download(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from stunet import WeightsError

    cache, cfg = _cache_and_cfg(args.model)
    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=cfg.filename) as bar:
        def progress(done: int, total: int | None) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            path = cache.download(cfg, url=args.url, progress=progress)
        except WeightsError as error:
            raise SegbookError(str(error)) from None
    print(f"{path}\nsha256 {cache.recorded_sha256(cfg)}")
    return 0


def run_path(args: argparse.Namespace) -> int:
    cache, cfg = _cache_and_cfg(args.model)
    path = cache.path(cfg)
    print(path if path.is_file() else f"{path} (not downloaded)")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from stunet import WeightsError

    cache, cfg = _cache_and_cfg(args.model)
    try:
        digest = cache.verify(cfg)
    except WeightsError as error:
        raise SegbookError(str(error)) from None
    print(f"ok {cache.path(cfg)} sha256 {digest}")
    return 0
