"""The real local AT Protocol network of the e2e suite: Postgres, dev-env, XRPC helpers.

* :func:`postgres_cluster`: a throwaway cluster (Debian's ``postgresql``) in a temp dir on a
  free port; as root, ``initdb`` and ``postgres`` run as ``nobody`` through ``setpriv``.
* :class:`DevNetwork`: ``network.mjs`` (npm ``@atproto/dev-env``: PLC, PDS, AppView, Ozone) in
  a Node 22 subprocess; its first stdout line says where everything is.
* Small XRPC helpers over httpx for what the tests do as users (post images), as the labeler
  (rewrite its service record), as an Ozone admin (take a post down by hand, read events and
  statuses) and as anyone (read labels, fetch blobs).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import attrs
import httpx

from phash_trio.testing.redis_server import free_port

HERE = Path(__file__).resolve().parent
ADMIN_AUTH = ("admin", "admin-pass")  # dev-env's Ozone admin password


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"{name} not found: apt-get install postgresql (e2e_ozone/prepare)")
    return found[-1]


def _as_user() -> list[str]:
    """A prefix that drops root to ``nobody`` (Postgres refuses to run as root)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """A fresh cluster on 127.0.0.1:<free port>; yields its URL; stopped and deleted after."""
    root = Path(tempfile.mkdtemp(prefix="phash-pg-"))
    data, sock = root / "data", root / "sock"
    data.mkdir()
    sock.mkdir()
    root.chmod(0o755)
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for path in (data, sock):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
    port = free_port()
    prefix = _as_user()
    try:
        initdb = [_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]
        subprocess.run(
            [*prefix, *initdb, "--no-sync", "-E", "UTF8", "--locale=C"],
            check=True,
            capture_output=True,
        )
        options = (
            f"-k {sock} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        pg_ctl = [_pg_bin("pg_ctl"), "-D", str(data), "-l", str(sock / "log")]
        subprocess.run(
            [*prefix, *pg_ctl, "-w", "-o", options, "start"],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, _pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@attrs.frozen
class Account:
    did: str
    handle: str
    password: str
    app_password: str = ""


@attrs.define
class DevNetwork:
    """``network.mjs`` running; ``info`` is its first stdout line (endpoints, accounts)."""

    process: subprocess.Popen[str]
    info: dict[str, Any]
    log: IO[str]

    @classmethod
    def start(
        cls, node_dir: Path, postgres_url: str, redis_host: str, log_path: Path
    ) -> DevNetwork:
        """Start and wait (at most 5 min) for the network to print where it is."""
        script = node_dir / "network.mjs"
        shutil.copyfile(HERE / "network.mjs", script)  # ESM resolves beside the script
        node = node_dir / "node22" / "node_modules" / "node" / "bin" / "node"
        log = log_path.open("a")
        env = {
            "PATH": f"{node.parent}:/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/tmp"),
            "DB_POSTGRES_URL": postgres_url,
            "REDIS_HOST": redis_host,
            "LOG_ENABLED": "false",
            "NODE_NO_WARNINGS": "1",
        }
        process = subprocess.Popen(
            [str(node), str(script)],
            cwd=node_dir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            process.wait(timeout=30)
            log.flush()
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"network.mjs exited with {process.returncode}:\n{tail}")
        return cls(process, json.loads(line), log)

    def command(self, cmd: str) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"cmd": cmd}) + "\n")
        self.process.stdin.flush()
        answer: dict[str, Any] = json.loads(self.process.stdout.readline())
        if "error" in answer:
            raise RuntimeError(f"network.mjs {cmd}: {answer['error']}")
        return answer

    def sync(self) -> None:
        """Let the PDS, AppView and Ozone (its daemon pushes takedowns) catch up."""
        self.command("sync")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.command("close")
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.log):
            if stream is not None:
                stream.close()

    def account(self, name: str) -> Account:
        data = self.info[name]
        return Account(data["did"], data["handle"], data["password"], data.get("appPassword", ""))

    @property
    def authors(self) -> list[Account]:
        return [Account(a["did"], a["handle"], a["password"]) for a in self.info["authors"]]


# -- XRPC as users ------------------------------------------------------------------------------


async def login(http: httpx.AsyncClient, pds: str, handle: str, password: str) -> str:
    """An access token for ``handle``."""
    response = await http.post(
        f"{pds}/xrpc/com.atproto.server.createSession",
        json={"identifier": handle, "password": password},
    )
    response.raise_for_status()
    token: str = response.json()["accessJwt"]
    return token


@attrs.frozen
class Post:
    did: str
    uri: str
    cid: str
    rkey: str
    record: dict[str, Any]
    blob_cids: tuple[str, ...]


async def post_images(
    http: httpx.AsyncClient, pds: str, author: Account, images: Sequence[bytes], text: str = ""
) -> Post:
    """Upload ``images`` and create a post embedding them, as ``author``."""
    token = await login(http, pds, author.handle, author.password)
    auth = {"authorization": f"Bearer {token}"}
    blobs = []
    for data in images:
        response = await http.post(
            f"{pds}/xrpc/com.atproto.repo.uploadBlob",
            content=data,
            headers={**auth, "content-type": "image/jpeg"},
        )
        response.raise_for_status()
        blobs.append(response.json()["blob"])
    record = {
        "$type": "app.bsky.feed.post",
        "text": text,
        "createdAt": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "embed": {
            "$type": "app.bsky.embed.images",
            "images": [{"alt": "", "image": blob} for blob in blobs],
        },
    }
    response = await http.post(
        f"{pds}/xrpc/com.atproto.repo.createRecord",
        json={"repo": author.did, "collection": "app.bsky.feed.post", "record": record},
        headers=auth,
    )
    response.raise_for_status()
    created = response.json()
    uri: str = created["uri"]
    return Post(
        author.did,
        uri,
        created["cid"],
        uri.rsplit("/", 1)[1],
        record,
        tuple(b["ref"]["$link"] for b in blobs),
    )


def jetstream_event(post: Post, time_us: int) -> dict[str, Any]:
    """The Jetstream commit event a relay would send for ``post``."""
    return {
        "did": post.did,
        "time_us": time_us,
        "kind": "commit",
        "commit": {
            "rev": f"3l{time_us % 10**11:011d}",
            "operation": "create",
            "collection": "app.bsky.feed.post",
            "rkey": post.rkey,
            "record": post.record,
            "cid": post.cid,
        },
    }


def now_us() -> int:
    return time.time_ns() // 1000


async def put_labeler_record(
    http: httpx.AsyncClient, pds: str, labeler: Account, changes: dict[str, Any]
) -> None:
    """Rewrite the labeler's ``app.bsky.labeler.service/self`` with ``changes`` on top."""
    token = await login(http, pds, labeler.handle, labeler.password)
    auth = {"authorization": f"Bearer {token}"}
    params = {"repo": labeler.did, "collection": "app.bsky.labeler.service", "rkey": "self"}
    response = await http.get(f"{pds}/xrpc/com.atproto.repo.getRecord", params=params)
    response.raise_for_status()
    record = {**response.json()["value"], **changes}
    response = await http.post(
        f"{pds}/xrpc/com.atproto.repo.putRecord", json={**params, "record": record}, headers=auth
    )
    response.raise_for_status()


# -- Ozone as an admin, labels and blobs as anyone ------------------------------------------------


async def admin_takedown(
    http: httpx.AsyncClient, ozone: str, post: Post, created_by: str, *, blobs: bool = True
) -> None:
    """A human moderator takes ``post`` down in Ozone (with its blobs unless told not to)."""
    response = await http.post(
        f"{ozone}/xrpc/tools.ozone.moderation.emitEvent",
        auth=ADMIN_AUTH,
        json={
            "event": {"$type": "tools.ozone.moderation.defs#modEventTakedown"},
            "subject": {"$type": "com.atproto.repo.strongRef", "uri": post.uri, "cid": post.cid},
            "subjectBlobCids": list(post.blob_cids) if blobs else [],
            "createdBy": created_by,
        },
    )
    response.raise_for_status()


async def mod_events(http: httpx.AsyncClient, ozone: str, subject: str) -> list[dict[str, Any]]:
    """Every moderation event on ``subject`` (post URI or DID), newest first."""
    response = await http.get(
        f"{ozone}/xrpc/tools.ozone.moderation.queryEvents",
        params={"subject": subject, "limit": "100"},
        auth=ADMIN_AUTH,
    )
    response.raise_for_status()
    events: list[dict[str, Any]] = response.json()["events"]
    return events


async def subject_status(http: httpx.AsyncClient, ozone: str, subject: str) -> dict[str, Any]:
    """Ozone's status row of ``subject`` (``{}`` when it has none)."""
    response = await http.get(
        f"{ozone}/xrpc/tools.ozone.moderation.queryStatuses",
        params={"subject": subject},
        auth=ADMIN_AUTH,
    )
    response.raise_for_status()
    statuses = response.json()["subjectStatuses"]
    return statuses[0] if statuses else {}


async def labels_on(http: httpx.AsyncClient, ozone: str, subject: str) -> list[dict[str, Any]]:
    """Labels Ozone serves for ``subject`` (public ``com.atproto.label.queryLabels``)."""
    response = await http.get(
        f"{ozone}/xrpc/com.atproto.label.queryLabels", params={"uriPatterns": subject}
    )
    response.raise_for_status()
    labels: list[dict[str, Any]] = response.json()["labels"]
    return labels


async def blob_status(http: httpx.AsyncClient, pds: str, did: str, cid: str) -> int:
    """HTTP status of the PDS's ``getBlob`` for one blob."""
    response = await http.get(
        f"{pds}/xrpc/com.atproto.sync.getBlob", params={"did": did, "cid": cid}
    )
    return response.status_code
