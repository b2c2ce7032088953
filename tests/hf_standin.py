"""A local stand-in for the Hugging Face Hub, so install and download tests never touch the network.

A real HTTP server on 127.0.0.1 that answers the requests huggingface_hub makes for `hf_hub_download`
(HEAD/GET /{repo}/resolve/{revision}/{filename}) and for llama-cpp-python's `Llama.from_pretrained`, which
first lists the repo through HfFileSystem (GET /api/models/{repo}[/revision/{revision}], then
GET /api/models/{repo}/tree/{revision}[/{path}]). Files are served from real files on disk under any name,
so a test can offer SmolLM2's bytes as "mistral-7b-instruct-v0.2.Q4_K_M.gguf". Point huggingface_hub at it
with HF_ENDPOINT=stand-in.url; the variable is read when huggingface_hub is imported, so run the code under
test in a subprocess with that environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fetch_model import read_default_model
from live_server import free_port
from llamachat.model_file import sha256_of

# A fixed commit id: huggingface_hub requires one (X-Repo-Commit) and stores it next to downloaded files.
COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")
_REPO_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<revision>[^/]+))?$")
_TREE_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?$")
_RANGE = re.compile(r"^bytes=(?P<start>\d+)-(?P<end>\d*)$")
_CHUNK = 1 << 20


# The Hub's ETag for an LFS file is its sha256; huggingface_hub compares it with local files.
_sha256 = cache(sha256_of)


class HubStandin:
    """Serves `repos` = {"owner/name": {"filename": Path of the bytes to serve}} until `close()`.

    `requests` records ("METHOD", "/path") of every request, so tests can tell whether a file was fetched;
    `ranges` the Range header of every file GET ("" for none) and `bytes_sent` the file bytes sent in all.
    Faults a real Hub shows only by bad luck, for the download's tests: `drop_after` = N makes each of the next
    `drops_left` file GETs send N bytes and then close the connection; `flip_byte_at` = i serves byte i changed.
    """

    def __init__(self, repos: dict[str, dict[str, Path]]):
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        self.ranges: list[str] = []
        self.bytes_sent = 0
        self.drop_after: int | None = None
        self.drops_left = 0
        self.flip_byte_at: int | None = None
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's httpx client expects

            def do_HEAD(self):
                standin._answer(self, send_body=False)

            def do_GET(self):
                standin._answer(self, send_body=True)

            def log_message(self, *args):  # keep test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hf-standin", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HubStandin:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fetched(self, filename: str) -> bool:
        """True when a GET downloaded `filename` (HEAD requests only ask for its metadata)."""
        return any(method == "GET" and path.endswith("/" + filename) for method, path in self.requests)

    # -- request handling ------------------------------------------------------------------------------

    def _answer(self, handler: BaseHTTPRequestHandler, send_body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path))
        if match := _RESOLVE.match(path):
            self._resolve(handler, send_body, **match.groupdict())
        elif match := _TREE_API.match(path):
            self._tree(handler, send_body, match["repo"], match["path"] or "")
        elif match := _REPO_API.match(path):
            self._repo_info(handler, send_body, match["repo"])
        else:
            self._error(handler, send_body, 404, "NotFound", f"No such endpoint in the Hub stand-in: {path}")

    def _files(self, handler, send_body, repo: str) -> dict[str, Path] | None:
        files = self.repos.get(repo)
        if files is None:
            self._error(handler, send_body, 404, "RepoNotFound", f"Repository not found: {repo}")
        return files

    def _repo_info(self, handler, send_body, repo: str) -> None:
        if (files := self._files(handler, send_body, repo)) is None:
            return
        info = {"id": repo, "sha": COMMIT, "private": False, "siblings": [{"rfilename": name} for name in files]}
        self._json(handler, send_body, info)

    def _tree(self, handler, send_body, repo: str, subpath: str) -> None:
        if (files := self._files(handler, send_body, repo)) is None:
            return
        if subpath:  # the stand-in's repos are flat: there are no folders to list
            self._error(handler, send_body, 404, "EntryNotFound", f"{subpath} is not a folder of {repo}")
            return
        entries = []
        for name, source in files.items():
            size = source.stat().st_size
            lfs = {"oid": _sha256(source), "size": size, "pointerSize": 134}
            entries.append(
                {"type": "file", "oid": hashlib.sha1(name.encode()).hexdigest(), "size": size, "path": name, "lfs": lfs}
            )
        self._json(handler, send_body, entries)

    def _resolve(self, handler, send_body, repo: str, revision: str, filename: str) -> None:
        if (files := self._files(handler, send_body, repo)) is None:
            return
        if revision not in ("main", COMMIT):
            self._error(handler, send_body, 404, "RevisionNotFound", f"Revision not found: {revision}")
            return
        source = files.get(filename)
        if source is None:
            self._error(handler, send_body, 404, "EntryNotFound", f"{filename} is not in {repo}")
            return
        size = source.stat().st_size
        start, end = 0, size - 1
        if send_body:
            self.ranges.append(handler.headers.get("Range", ""))
        if send_body and (wanted := _RANGE.match(handler.headers.get("Range", ""))):
            start = int(wanted["start"])
            end = min(int(wanted["end"]), size - 1) if wanted["end"] else size - 1
        etag = _sha256(source)
        handler.send_response(206 if (start, end) != (0, size - 1) else 200)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{etag}"')
        handler.send_header("X-Linked-Etag", f'"{etag}"')
        handler.send_header("X-Linked-Size", str(size))
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Type", "application/octet-stream")
        if (start, end) != (0, size - 1):
            handler.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        handler.send_header("Content-Length", str(end - start + 1))
        handler.end_headers()
        if not send_body:
            return
        left = end - start + 1
        if self.drops_left > 0:
            self.drops_left -= 1
            left = min(left, self.drop_after)
            handler.close_connection = True  # after `left` bytes, Content-Length notwithstanding
        with source.open("rb") as f:
            f.seek(start)
            while left > 0 and (block := f.read(min(_CHUNK, left))):
                flip = None if self.flip_byte_at is None else self.flip_byte_at - (f.tell() - len(block))
                if flip is not None and 0 <= flip < len(block):
                    block = bytearray(block)
                    block[flip] ^= 0xFF
                handler.wfile.write(block)
                self.bytes_sent += len(block)
                left -= len(block)

    @staticmethod
    def _json(handler, send_body, payload) -> None:
        body = json.dumps(payload).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if send_body:
            handler.wfile.write(body)

    @staticmethod
    def _error(handler, send_body, status: int, code: str, message: str) -> None:
        # huggingface_hub maps X-Error-Code to its exceptions (RepositoryNotFoundError, EntryNotFoundError...).
        body = json.dumps({"error": message}).encode()
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if send_body:
            handler.wfile.write(body)


def default_model_hub(model_bytes: Path) -> HubStandin:
    """A stand-in whose repo (modulesettings.json's) holds `model_bytes` as the module's default model file,
    next to a second quantisation, so that a file glob has to pick the right one."""
    model = read_default_model()
    other_quantisation = model.filename.replace("Q4_K_M", "Q5_K_M")
    return HubStandin({model.repo_id: {model.filename: model_bytes, other_quantisation: model_bytes}})


def unreachable_hub_url() -> str:
    """A loopback URL where nothing listens: connections are refused at once, as on a machine off the network."""
    return f"http://127.0.0.1:{free_port()}"


def hub_env(hub_url: str, scratch: Path) -> dict[str, str]:
    """Environment for a subprocess whose Hugging Face Hub is `hub_url` and which can reach nothing else:
    no token or cache of this machine, no model settings from outside, pip with no package index, and install.sh's
    llama-cpp-python wheel index on a closed loopback port."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("HF_", "HUGGING_FACE_", "CPAI_MODULE_LLAMA_", "LLAMACHAT_", "PIP_"))
    }
    env.update(
        HF_ENDPOINT=hub_url,
        HF_HOME=str(scratch / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        PIP_CONFIG_FILE=os.devnull,
        PIP_NO_INDEX="1",
        LLAMACHAT_WHEEL_INDEX=f"{unreachable_hub_url()}/whl/cpu",
    )
    return env
