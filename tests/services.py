"""Throw-away real services for tests (a helper module, not a test file): a PostgreSQL cluster and an S3 server
(moto), each on a free loopback port, stopped and removed when its `with` block ends, also on failure.

    with postgres_server(tmp) as url:          # "postgresql://freud@127.0.0.1:PORT" (trust auth, user freud)
        db = create_database(url, "mlflow")    # "postgresql://freud@127.0.0.1:PORT/mlflow"
    with s3_server(tmp) as endpoint:           # "http://127.0.0.1:PORT"
        bucket(endpoint, "freud")              # "s3://freud" (credentials test/test, region us-east-1)

Nothing global is set: a test passes the URLs on (monkeypatch) itself. A missing PostgreSQL or moto is an
environment guard (`require_services`, through conftest.require_extra): skipped, or failed under `make test`.
PostgreSQL refuses to run as root: as root the cluster is initialised and run as the `postgres` system user, in a
directory of its own under the system temp dir (pytest's temporary directories are private to root).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

try:
    from conftest import require_extra
except ImportError:  # tests collected as a package
    from tests.conftest import require_extra

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
AS_ROOT = os.geteuid() == 0


def _postgres_bin() -> Path | None:
    """The directory holding initdb and pg_ctl: Debian's newest /usr/lib/postgresql/<major>/bin, else PATH's."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                    key=lambda p: int(re.sub(r"\D", "", p.parents[1].name) or 0), reverse=True)
    for initdb in [*debian, *filter(None, [shutil.which("initdb")])]:
        initdb = Path(initdb)
        if (initdb.parent / "pg_ctl").is_file():
            return initdb.parent
    return None


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


POSTGRES_BIN = _postgres_bin()
HAVE_POSTGRES = (POSTGRES_BIN is not None and importlib.util.find_spec("psycopg2") is not None
                 and (not AS_ROOT or (_has_user("postgres") and bool(shutil.which("runuser") or shutil.which("setpriv")))))
MOTO_SERVER = next((str(p) for p in [Path(sys.executable).parent / "moto_server"] if p.is_file()),
                   shutil.which("moto_server"))
HAVE_MOTO = MOTO_SERVER is not None and importlib.util.find_spec("boto3") is not None


def require_services(*, postgres: bool = False, s3: bool = False, module_level: bool = False) -> None:
    """The environment guard of a test that needs these services (conftest.require_extra)."""
    if postgres:
        require_extra(HAVE_POSTGRES, "PostgreSQL (apt-get install postgresql: initdb, pg_ctl) or psycopg2 in the venv"
                      + (" or the postgres system user (to run it as root)" if AS_ROOT else ""), module_level=module_level)
    if s3:
        require_extra(HAVE_MOTO, "moto_server (pip install 'moto[server]') or boto3 in the venv", module_level=module_level)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------- PostgreSQL
def _pg(tool: str, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    command = [str(POSTGRES_BIN / tool), *args]
    if AS_ROOT:
        command = (["runuser", "-u", "postgres", "--"] if shutil.which("runuser")
                   else ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]) + command
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LC_ALL": "C", "LANG": "C"})
    if check and done.returncode != 0:
        log = cwd / "postgres.log"
        tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
        raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout[-1000:]}{done.stderr[-2000:]}{tail}")
    return done


@contextlib.contextmanager
def postgres_server(tmp_dir: str | os.PathLike) -> Iterator[str]:
    """A fresh cluster (trust auth for its superuser `freud`, listening on 127.0.0.1 only, its unix socket inside
    its directory, fsync off); yields its base URL "postgresql://freud@127.0.0.1:PORT"."""
    base = Path(tempfile.mkdtemp(prefix="freud-pg-", dir=None if AS_ROOT else tmp_dir))
    if AS_ROOT:
        owner = pwd.getpwnam("postgres")
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data, port = base / "data", free_port()
    options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {shlex.quote(str(base))} -c fsync=off "
               f"-c synchronous_commit=off -c full_page_writes=off")
    try:
        _pg("initdb", "-D", str(data), "-U", "freud", "--auth=trust", "--no-sync", "-E", "UTF8", "--no-locale",
            cwd=base)
        _pg("pg_ctl", "start", "-w", "-t", "60", "-D", str(data), "-l", str(base / "postgres.log"), "-o", options,
            cwd=base)
        yield f"postgresql://freud@127.0.0.1:{port}"
    finally:
        if (data / "postmaster.pid").exists():
            _pg("pg_ctl", "stop", "-D", str(data), "-m", "immediate", "-w", cwd=base, check=False)
        shutil.rmtree(base, ignore_errors=True)


def create_database(url: str, name: str) -> str:
    """Create database `name` on the server at base URL `url`; its URL."""
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(f"{url}/postgres")
    try:
        conn.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()
    return f"{url}/{name}"


def query(db_url: str, statement: str, params: tuple = ()) -> list[tuple]:
    """The rows of one SQL statement on the database at `db_url`."""
    import psycopg2

    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall()
    finally:
        conn.close()


# ---------------------------------------------------------------------- S3 (moto)
def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer: the server is up
    except OSError:
        return False


@contextlib.contextmanager
def s3_server(tmp_dir: str | os.PathLike, wait_s: float = 60.0) -> Iterator[str]:
    """moto's S3 server on a free loopback port (log in `tmp_dir`); yields its endpoint URL once it answers."""
    port = free_port()
    log = Path(tmp_dir) / f"moto-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + wait_s
        while not _answers(endpoint):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"moto_server did not answer on {endpoint}: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        yield endpoint
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        region_name=S3_CREDENTIALS["AWS_REGION"])


def bucket(endpoint: str, name: str) -> str:
    """Create bucket `name` on the S3 server at `endpoint`; its URI "s3://<name>"."""
    s3_client(endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


# ---------------------------------------------------------------------- Redis (the Celery broker)
def stop(proc: subprocess.Popen, group: bool = False) -> None:
    """Terminate a process (its whole process group with `group`), killing it after 20 s."""
    if proc.poll() is not None:
        return
    (os.killpg(proc.pid, signal.SIGTERM) if group else proc.terminate())
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        (os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill())
        proc.wait(10)


@contextlib.contextmanager
def redis_server(tmp_dir: str | os.PathLike, wait_s: float = 20.0) -> Iterator[str]:
    """redis-server on a free loopback port, no persistence; yields its URL "redis://127.0.0.1:PORT/0"."""
    import redis

    workdir = Path(tmp_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=open(workdir / "redis.log", "wb"), stderr=subprocess.STDOUT)
    try:
        client, deadline = redis.Redis(host="127.0.0.1", port=port), time.time() + wait_s
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start: {(workdir / 'redis.log').read_text()[-2000:]}")
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)


def s3_environment(monkeypatch, endpoint: str, **settings: str) -> None:
    """FREUD's S3 settings for `endpoint` (plus `settings`, e.g. FREUD_OBJECT_STORE), through `monkeypatch`, with
    every variable `objectstore.configure_environment()` would derive set too: all restored when the test ends,
    and none left over from an earlier test's (stopped) server."""
    values = {**S3_CREDENTIALS, "AWS_DEFAULT_REGION": S3_CREDENTIALS["AWS_REGION"], "FREUD_S3_ENDPOINT_URL": endpoint,
              "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT": endpoint,
              "AWS_ALLOW_HTTP": "true", **settings}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
