"""The one atomic writer, the one hasher, reading what others wrote, directories written whole and never over an
input, and the optional-dependency loader."""

import errno
import hashlib
import multiprocessing
import os
import sys

import pytest

from blocklowrank import _io
from blocklowrank._extras import MissingExtraError, require
from blocklowrank._io import atomic_write, check_output_dir, open_regular, parse_json, replace_directory, sha256_file


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with atomic_write(target) as f:
        f.write(b"new contents")
        assert target.read_bytes() == b"old"  # nothing visible before the block ends
    assert target.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(target) as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # the temporary file is gone


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # several chunks and a remainder
    (tmp_path / "x").write_bytes(data)
    assert sha256_file(tmp_path / "x") == hashlib.sha256(data).hexdigest()


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(MissingExtraError, match=r"pip install 'blocklowrank\[plots\]'") as info:
        require("matplotlib.pyplot")
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ImportError)


# ---------------------------------------------------------------------------- reading what others wrote
def test_open_regular_refuses_a_fifo_before_it_blocks(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file \\(a FIFO\\)"):  # no writer: open() would block forever
        open_regular(fifo)
    with pytest.raises(OSError, match="not a regular file \\(a directory\\)"):
        open_regular(tmp_path)
    (tmp_path / "f").write_bytes(b"data")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    with open_regular(tmp_path / "link") as f:  # symbolic links are followed (Hugging Face snapshots)
        assert f.read() == b"data"


@pytest.mark.parametrize(
    "raw, message",
    [
        (b'{"a": NaN}', "contains NaN, which is not JSON"),
        (b'{"a": 1, "a": 2}', "has the key 'a' twice"),
        (b"[" * 100_000 + b"]" * 100_000, "is nested too deeply"),
        (b'{"a": ' + b"9" * 5000 + b"}", "holds an integer too long to read"),
        (b'{"a": \xff}', "is not valid UTF-8"),
        (b'{"a": }', "is not valid JSON"),
    ],
)
def test_parse_json_refuses_with_one_message(raw, message):
    with pytest.raises(ValueError, match=f"^f.json {message}"):
        parse_json(raw, lambda text: ValueError(f"f.json {text}"))


def test_parse_json_reads_constants_only_when_asked():
    assert parse_json(b'{"a": Infinity}', ValueError, constants=True) == {"a": float("inf")}
    with pytest.raises(ValueError, match="Infinity"):
        parse_json(b'{"a": Infinity}', ValueError)


# ---------------------------------------------------------------------------- directories written whole
ADAPTER = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def _adapter(folder, text):
    folder.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_text(f"{text} {name}")
    return folder


def test_check_output_dir_protects_inputs_cwd_and_home(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "base").mkdir(parents=True)
    (data / "base" / "model.safetensors").write_bytes(b"x")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(data)
    inputs = [data / "base" / "model.safetensors"]
    for out, words in [
        ("", "must name a directory"),
        (".", "is the working directory"),
        (tmp_path, "holds (the input|the working directory|your home)"),
        (home, "is your home directory"),
        (data / "base", "holds the input"),
        (data / "base" / "model.safetensors", "is the input"),
        ("/", "holds"),
    ]:
        with pytest.raises(ValueError, match=words):
            check_output_dir(out, inputs=inputs, overwrite=True)
    (tmp_path / "link").symlink_to(data / "base")
    with pytest.raises(ValueError, match="holds the input"):
        check_output_dir(tmp_path / "link", inputs=inputs, overwrite=True)
    assert check_output_dir(home / "adapters" / "a", inputs=inputs) == str(home / "adapters" / "a")


def test_overwrite_replaces_only_what_the_writer_writes(tmp_path):
    _adapter(tmp_path / "a", "old")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        check_output_dir(tmp_path / "a", replaceable=ADAPTER)
    assert check_output_dir(tmp_path / "a", overwrite=True, replaceable=ADAPTER) == str(tmp_path / "a")
    (tmp_path / "a" / "train.py").write_text("mine")
    with pytest.raises(FileExistsError, match="holds 'train.py'.*never replaced, even with overwrite"):
        check_output_dir(tmp_path / "a", overwrite=True, replaceable=ADAPTER)
    (tmp_path / "f").write_text("a file")
    with pytest.raises(FileExistsError, match="is not a directory"):
        check_output_dir(tmp_path / "f", overwrite=True)


def _contents(folder):
    return {p.name: p.read_text() for p in folder.iterdir()}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_replace_directory(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(_io, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no")))
    _adapter(tmp_path / "a", "old")
    new = _adapter(tmp_path / ".a.tmp", "new")
    assert replace_directory(new, tmp_path / "a") == str(tmp_path / "a")
    assert _contents(tmp_path / "a") == {n: f"new {n}" for n in ("adapter_config.json", "adapter_model.safetensors")}
    assert sorted(os.listdir(tmp_path)) == ["a"]  # the old directory is gone, no backup left
    replace_directory(_adapter(tmp_path / ".b.tmp", "b"), tmp_path / "b")  # nothing there before
    assert _contents(tmp_path / "b")["adapter_config.json"] == "b adapter_config.json"


def _crash_in_fallback(new, out):
    """In a forked child: the fallback replacement (no renameat2), killed when moving the new directory in."""
    real = os.rename

    def rename(src, dst):
        if os.path.abspath(dst) == os.path.abspath(out):
            os._exit(9)
        return real(src, dst)

    _io._exchange = lambda a, b: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no"))
    os.rename = rename
    replace_directory(new, out)
    os._exit(0)


def test_a_crash_in_the_fallback_is_recovered_by_the_next_check(tmp_path):
    """Claim: killed between its two renames, the fallback leaves the old directory as a backup, and the next
    check_output_dir for that name puts it back (the data is never lost)."""
    out = _adapter(tmp_path / "a", "old")
    new = _adapter(tmp_path / ".a.tmp", "new")
    child = multiprocessing.get_context("fork").Process(target=_crash_in_fallback, args=(new, out))
    child.start()
    child.join(60)
    assert child.exitcode == 9 and not out.exists()  # killed with nothing at out
    assert [p for p in os.listdir(tmp_path) if p.startswith(".a.replaced-")]
    with pytest.raises(FileExistsError, match="not empty"):
        check_output_dir(out, replaceable=ADAPTER)  # restores, then refuses as for any existing adapter
    assert _contents(out)["adapter_config.json"] == "old adapter_config.json"
