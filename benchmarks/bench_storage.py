"""Object storage: checkpoint-sized upload and download through thinkforge.storage vs the raw minio
client's fput_object/fget_object, same files, same endpoint (moto's S3 server on loopback), same run.

    python benchmarks/bench_storage.py [--files 8] [--mb 16] [--json out.json]

thinkforge.storage also hashes every file (sha256 manifest written last) and verifies on download;
the baseline does neither. Goal: >= 0.9x the raw client's throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--mb", type=int, default=16, help="size of each file")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from minio import Minio
    from moto.server import ThreadedMotoServer

    from thinkforge.storage import ObjectStore

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint, key, secret = f"127.0.0.1:{port}", "bench-access", "bench-secret"
    try:
        work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
        src = work / "ckpt"
        src.mkdir()
        for i in range(args.files):
            (src / f"shard-{i:03d}.bin").write_bytes(os.urandom(args.mb << 20))
        total = args.files * (args.mb << 20)
        raw = Minio(endpoint, access_key=key, secret_key=secret, secure=False)
        store = ObjectStore(endpoint, f"tf-{uuid.uuid4().hex[:8]}", access_key=key, secret_key=secret, secure=False)
        store.ensure_bucket()
        raw_bucket = f"raw-{uuid.uuid4().hex[:8]}"
        raw.make_bucket(raw_bucket)

        def timed(fn) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        files = sorted(src.iterdir())
        up_raw = timed(lambda: [raw.fput_object(raw_bucket, f"ckpt/{f.name}", str(f)) for f in files])
        up_tf = timed(lambda: store.upload_dir(src, "ckpt"))
        down_raw = timed(lambda: [raw.fget_object(raw_bucket, f"ckpt/{f.name}", str(work / "raw" / f.name))
                                  for f in files])
        down_tf = timed(lambda: store.download_dir("ckpt", work / "tf"))
        mbps = lambda s: total / s / 1e6  # noqa: E731
        res = {
            "name": "object storage", "files": args.files, "mb_each": args.mb,
            "upload_MBps": mbps(up_tf), "upload_raw_MBps": mbps(up_raw), "upload_ratio": up_raw / up_tf,
            "download_MBps": mbps(down_tf), "download_raw_MBps": mbps(down_raw), "download_ratio": down_raw / down_tf,
        }
        res["ratio"] = min(res["upload_ratio"], res["download_ratio"])
    finally:
        server.stop()
    print(f"upload   thinkforge.storage {res['upload_MBps']:.0f} MB/s, raw fput_object {res['upload_raw_MBps']:.0f} MB/s, "
          f"ratio {res['upload_ratio']:.2f}x")
    print(f"download thinkforge.storage {res['download_MBps']:.0f} MB/s, raw fget_object {res['download_raw_MBps']:.0f} MB/s, "
          f"ratio {res['download_ratio']:.2f}x (goal >= 0.9x; ours also hashes and verifies every file)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)
