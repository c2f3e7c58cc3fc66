"""Released checkpoints by name (ddim.models.pretrained) and hash-checked downloads (ddim.downloads), against a local
HTTP server: download + cache hit, MD5 mismatch, truncated transfer, no server, stale staging files, bad names,
CelebA's manual steps, evaluate.py pretrained=..., and the FID Inception weights' SHA-256 check."""
from __future__ import annotations

import copy
import hashlib
import io
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from ddim import downloads
from ddim.models import pretrained
from ddim.models.pretrained import Release


class FileServer:
    """Serves ``files[path] = (body, mode)`` on localhost; mode "ok" or "truncate" (announces the full length, sends
    half, closes).  ``hits[path]`` counts the requests."""

    def __init__(self):
        self.files: dict[str, tuple[bytes, str]] = {}
        self.hits: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                if self.path not in server.files:
                    self.send_error(404)
                    return
                body, mode = server.files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if mode == "ok" else body[: len(body) // 2])
                if mode == "truncate":
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def add(self, path: str, body: bytes, mode: str = "ok") -> str:
        self.files[path] = (body, mode)
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _register(monkeypatch, name: str, ema: bool, url: str, md5: str) -> Release:
    rel = Release(url=url, relpath=f"{'ema_' if ema else ''}{name}_model/model-1.ckpt", md5=md5)
    monkeypatch.setitem(pretrained.RELEASES, (name, ema), rel)
    return rel


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_download_then_cache_hit(server, monkeypatch, tmp_path):
    body = b"released weights" * 1000
    rel = _register(monkeypatch, "cifar10", True, server.add("/ema.ckpt", body), _md5(body))
    monkeypatch.setenv("DDIM_CACHE_DIR", str(tmp_path / "cache"))
    path = pretrained.fetch("cifar10", progress=False)
    assert path == tmp_path / "cache" / "diffusion_models_converted" / rel.relpath == pretrained.cached_path("cifar10")
    assert path.read_bytes() == body and server.hits == {"/ema.ckpt": 1}
    assert pretrained.fetch("cifar10", progress=False) == path and server.hits == {"/ema.ckpt": 1}  # no new request
    assert _files(tmp_path / "cache") == [f"diffusion_models_converted/{rel.relpath}"]  # no staging file left


def test_md5_mismatch_keeps_nothing(server, monkeypatch, tmp_path):
    _register(monkeypatch, "church", True, server.add("/church.ckpt", b"not the released file"), _md5(b"released"))
    with pytest.raises(downloads.HashMismatchError, match=r"pretrained=church: .*downloaded from http.*church.ckpt "
                                                          r"has md5 .*expected " + _md5(b"released")):
        pretrained.fetch("church", cache_dir=tmp_path, progress=False)
    assert _files(tmp_path) == []


def test_truncated_download_keeps_nothing(server, monkeypatch, tmp_path):
    body = bytes(range(256)) * 400
    _register(monkeypatch, "bedroom", True, server.add("/bedroom.ckpt", body, mode="truncate"), _md5(body))
    with pytest.raises((downloads.DownloadError, downloads.HashMismatchError), match="bedroom.ckpt"):
        pretrained.fetch("bedroom", cache_dir=tmp_path, progress=False)
    assert server.hits == {"/bedroom.ckpt": 1} and _files(tmp_path) == []


def test_offline_error_names_url_cache_path_and_official_way(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cat.ckpt"
    _register(monkeypatch, "cat", False, url, _md5(b"x"))
    with pytest.warns(UserWarning, match="non-EMA"), pytest.raises(downloads.DownloadError) as err:
        pretrained.fetch("cat", ema=False, cache_dir=tmp_path, progress=False)
    msg = str(err.value)
    path = pretrained.cached_path("cat", ema=False, cache_dir=tmp_path)
    assert url in msg and str(path) in msg and "official=cat official_path=<file>" in msg
    assert "pretrained=cat use_ema=false" in msg and _files(tmp_path) == []


def test_cached_file_of_other_content_is_refused(monkeypatch, tmp_path):
    """A file put in the cache by hand under the wrong name (EMA and non-EMA share theirs) is not used."""
    _register(monkeypatch, "cifar10", True, "http://127.0.0.1:9/never", _md5(b"the EMA file"))
    path = pretrained.cached_path("cifar10", cache_dir=tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"the non-EMA file")
    with pytest.raises(downloads.HashMismatchError, match=r"cached .*model-1.ckpt has md5 .*Delete it"):
        pretrained.fetch("cifar10", cache_dir=tmp_path)


def test_stale_staging_files_are_removed(server, monkeypatch, tmp_path):
    body = b"weights"
    _register(monkeypatch, "cifar10", True, server.add("/w.ckpt", body), _md5(body))
    folder = pretrained.cached_path("cifar10", cache_dir=tmp_path).parent
    folder.mkdir(parents=True)
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()  # its pid is now free: a download of that process was killed

    def staging(pid: int) -> Path:  # this host's staging file of process pid
        return downloads.staging_path(folder / "model-1.ckpt").with_name(
            downloads.staging_path(folder / "model-1.ckpt").name.replace(f"-{os.getpid()}.", f"-{pid}."))

    dead = [staging(done.pid), staging(done.pid).with_name(staging(done.pid).name + f".{'ab' * 16}.partial")]
    alive = staging(os.getppid())
    for p in (*dead, alive):
        p.write_bytes(b"partial")
    pretrained.fetch("cifar10", cache_dir=tmp_path, progress=False)
    assert _files(folder) == sorted([alive.name, "model-1.ckpt"])  # a live process's download is left alone


def test_bad_names():
    for name in ("cifar100", "google/ddpm-cifar10-32", None):
        with pytest.raises(ValueError, match=r"not a released name.*allowed: bedroom, cat, church, cifar10 "
                                             r"\(downloaded by name; celeba only by hand: official=celeba "
                                             r"official_path=<file>\), or a diffusers model: a Hub id owner/name "
                                             r"\(e.g. google/ddpm-cifar10-32\) or a local diffusers folder"):
            pretrained.fetch(name)
    with pytest.raises(ValueError, match="Hub ids and paths are not released names"):
        pretrained.check_pretrained_name("google/ddpm-cifar10-32")


def test_celeba_says_how_to_fetch_it_by_hand():
    with pytest.raises(ValueError, match=r"Google-Drive folder.*drive.google.com/drive/folders/.*"
                                         r"official=celeba official_path=/path/to/ckpt.pth"):
        pretrained.fetch("celeba")


# ----------------------------------------------------------------------------- evaluate.py pretrained=<name>

@pytest.fixture
def tiny_release(server, monkeypatch, tmp_path):
    """A tiny network released under the name cifar10 (a 1-channel 8x8 stand-in config; samples against digits)."""
    from test_evaluate import TINY_UNET

    from ddim.models import OFFICIAL_CONFIGS, UNet

    tiny = copy.deepcopy(OFFICIAL_CONFIGS["cifar10"])
    tiny["model"].update(ch=32, in_channels=1, out_ch=1, ch_mult=[1], num_res_blocks=1, attn_resolutions=[])
    tiny["data"]["image_size"] = 8
    monkeypatch.setitem(OFFICIAL_CONFIGS, "cifar10", tiny)
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(UNet(**{**TINY_UNET, "dropout": 0.1}).state_dict(), buffer)
    body = buffer.getvalue()
    monkeypatch.setenv("DDIM_CACHE_DIR", str(tmp_path / "cache"))
    return _register(monkeypatch, "cifar10", True, server.add("/tiny.ckpt", body), _md5(body))


def test_evaluate_pretrained_by_name(monkeypatch, tmp_path, tiny_release, server):
    from test_evaluate import records, run_evaluate

    torch.set_num_threads(1)
    args = ("pretrained=cifar10", "dataset=digits", "task=samples", "samples.num_samples=2", "sampler.steps=2",
            f"output_dir={tmp_path / 'out'}")
    run_evaluate(monkeypatch, tmp_path / "logs", *args)
    (rec,) = records(tmp_path / "logs")
    assert rec["key"]["model"] == {"pretrained": "cifar10", "official": "cifar10", "use_ema": True,
                                   "md5": tiny_release.md5}
    assert (tmp_path / "out" / "samples.png").is_file() and server.hits == {"/tiny.ckpt": 1}
    assert pretrained.cached_path("cifar10").is_file()


def test_evaluate_pretrained_is_checked_before_any_download(monkeypatch, tmp_path, tiny_release, server):
    from omegaconf import OmegaConf
    from test_evaluate import run_evaluate

    from ddim.evaluation.runner import check_model_source

    with pytest.raises(ValueError, match="official=celeba official_path="):
        run_evaluate(monkeypatch, tmp_path, "pretrained=celeba", "task=samples")
    with pytest.raises(ValueError, match=r"two models given: pretrained=cifar10 and ckpt_path=/x.ckpt; pass one"):
        check_model_source(OmegaConf.create({"pretrained": "cifar10", "ckpt_path": "/x.ckpt"}))
    with pytest.raises(ValueError, match=r"two models given: pretrained=cifar10 and official=cifar10; pass one"):
        check_model_source(OmegaConf.create({"pretrained": "cifar10", "official": "cifar10"}))
    with pytest.raises(ValueError, match=r"pretrained='cifar' is not a released name; allowed: bedroom, cat"):
        check_model_source(OmegaConf.create({"pretrained": "cifar"}))
    assert server.hits == {} and not (tmp_path / "records").exists()


# ----------------------------------------------------------------------------- the other downloads' hashes

def test_inception_download_is_sha256_checked(server, monkeypatch, tmp_path):
    from ddim.evaluation import fid as fidmod
    from ddim.evaluation import inception_convert

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(inception_convert, "find_torchscript", lambda: None)
    body = b"not the Inception weights"
    monkeypatch.setattr(fidmod, "_torch_fidelity_url", lambda: server.add("/inception.pth", body))
    with pytest.raises(RuntimeError, match=r"downloaded from http.*inception.pth has sha256 .*expected 6726825d0af5"):
        fidmod.resolve_inception_weights(cache_dir=tmp_path / "cache")
    hub = fidmod.torch_fidelity_cached_path()
    assert _files(hub.parent) == []
    hub.write_bytes(b"a corrupt cached copy")  # not used; a verified download replaces it
    monkeypatch.setattr(fidmod, "INCEPTION_SHA256", hashlib.sha256(body).hexdigest())
    assert fidmod.resolve_inception_weights(cache_dir=tmp_path / "cache") == hub and hub.read_bytes() == body
    assert _files(hub.parent) == [hub.name]


def test_cifar10_files_are_md5_checked(tmp_path):
    """torchvision checks each CIFAR-10 batch file's MD5: a corrupt copy is refused with a message that says so."""
    from torchvision.datasets import CIFAR10

    from ddim.data import cifar10_dataset

    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        (batches / name).write_bytes(b"corrupt")
    with pytest.raises(RuntimeError, match=r"could not be read .*corrupt.*MD5"):
        cifar10_dataset(tmp_path, "train", 32, False, False, download=False)
