"""PostgreSQL as MLflow's backend store: a cluster in dir/postgres (initdb once) that listens on
127.0.0.1 only, a password for the `mlflow` user, and the `mlflow` database."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
from pathlib import Path

from infra.local.service import HOST, Service, StackError


def postgres_bin() -> Path | None:
    """PostgreSQL's binaries: where `initdb` on PATH really lives, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # Debian links only some tools onto PATH
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


class Postgres(Service):
    name = port_name = "postgres"
    log_name = "postgres.log"
    label = "PostgreSQL"

    @property
    def data(self) -> Path:
        return self.stack.dir / "postgres"

    @property
    def uri(self) -> str:
        """The SQLAlchemy URI of the `mlflow` database; the password goes in PGPASSWORD."""
        return f"postgresql+psycopg2://mlflow@{HOST}:{self.port}/mlflow"  # SQLAlchemy 2.1 defaults to psycopg 3

    def _start(self) -> None:
        """initdb a cluster (once), start it, create the `mlflow` database (once)."""
        password = self.stack.pg_password
        self._let_postgres_in()
        if not (self.data / "PG_VERSION").exists():
            pwfile = self.stack.dir / ".initdb-password"  # initdb wants an empty data folder
            pwfile.write_text(password + "\n")
            pwfile.chmod(0o600)
            if os.geteuid() == 0:
                shutil.chown(pwfile, "postgres", "postgres")
            try:
                self._run("initdb", "-D", str(self.data), "-U", "mlflow", f"--pwfile={pwfile}",
                          "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions")
            finally:
                pwfile.unlink(missing_ok=True)
        options = f"-c listen_addresses={HOST} -c port={self.port} -c unix_socket_directories=''"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start")
        # pg_ctl starts the postmaster in a session of its own, so its group holds every backend
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        self.stack.save()
        client = dict(env={"PGPASSWORD": password}, as_owner=False)
        where = ["-h", HOST, "-p", str(self.port), "-U", "mlflow"]
        exists = self._run("psql", *where, "-d", "postgres", "-tAc",
                           "SELECT 1 FROM pg_database WHERE datname = 'mlflow'", **client)
        if exists.stdout.strip() != "1":
            self._run("createdb", *where, "mlflow", **client)

    def stop(self, timeout: float = 10) -> None:
        """A fast shutdown through pg_ctl, then whatever of the group is left."""
        if self.alive() and (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop", check=False)
        super().stop(timeout=timeout)

    def healthy(self) -> bool:
        """It accepts connections."""
        try:
            with socket.create_connection((HOST, self.port), timeout=2):
                return True
        except OSError:
            return False

    def _run(self, tool: str, *args: str, check: bool = True, as_owner: bool = True,
             env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a PostgreSQL tool; server tools as the `postgres` user when we are root (they refuse root)."""
        binaries = postgres_bin()
        if binaries is None:
            raise StackError("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
        command = [str(binaries / tool), *args]
        if as_owner and os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/",
                                env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise StackError(f"{tool} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
        return result

    def _let_postgres_in(self) -> None:
        """As root, the cluster belongs to `postgres`, which must be able to reach the stack's folder."""
        if os.geteuid() != 0:
            return
        folder = self.stack.dir
        folder.chmod(0o711)  # traversable, not listable; state.json and the ini stay 0600
        probe = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(folder)])
        if probe.returncode != 0:
            raise StackError(f"the postgres user cannot reach {folder}: pick a --dir whose parent folders "
                             "others may traverse (chmod o+x), e.g. one under /tmp or /srv")
        self.data.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(self.data, "postgres", "postgres")
        self.log.touch()
        shutil.chown(self.log, "postgres", "postgres")
