"""Names users type: model references resolved, module paths grouped by role, near misses suggested.

:func:`resolve_model` turns what a user gives for a model into a path the
checkpoint reader opens. Accepted, in this order:

1. a path that exists: a ``.safetensors`` file, a sharded checkpoint's index
   (``*.safetensors.index.json``), a model folder (``model.safetensors``, an
   index, or one ``.safetensors`` file), or a PEFT adapter folder;
2. a Hugging Face cache folder of one repository (``models--org--name``,
   holding ``refs/`` and ``snapshots/``): ``refs/main`` (or the revision
   asked for) names the commit, whose ``snapshots/<commit>/`` is used;
3. a model id (``org/name``, optionally ``org/name@revision``) found in the
   local Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``; read without any network);
4. the same id downloaded with ``huggingface_hub`` (the ``hub`` extra) when it
   is installed and ``HF_HUB_OFFLINE`` is not set: safetensors weights and
   JSON/tokenizer files only, never pickles. An ``org/name`` whose ``org`` is a
   local folder is taken for a mistyped path: no download is tried.

Anything else is refused in one line listing these forms, with "did you mean"
for near misses among the neighbouring files and the cached model ids.

:func:`module_roles` names each module path by its role in its block: the path
after the last layer index, shortened to the fewest trailing parts that still
tell the roles apart (BERT: ``query``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``, ``pooler.dense``; Llama: ``q_proj``,
``up_proj``). :func:`no_layer_selected` says why a ``target_modules`` selected
nothing, listing what exists.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from pathlib import Path

from .._validation import OptionError

__all__ = ["resolve_model", "hf_cache_dir", "module_roles", "close_matches", "no_layer_selected"]

_ID = re.compile(r"^(?P<id>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<rev>[\w./-]+))?$")
#: What a download fetches: weights as safetensors, configs and tokenizers; never pickles.
HUB_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model")
_PATH_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".pth", ".ckpt")
FORMS = (
    "a .safetensors file, a sharded checkpoint's index (*.safetensors.index.json), a model folder, "
    "a Hugging Face cache folder (models--org--name) or a model id (org/name) in the Hugging Face cache"
)


def hf_cache_dir():
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _offline():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _is_cache_repo(path):
    return (
        path.is_dir()
        and (path / "snapshots").is_dir()
        and (path.name.startswith("models--") or (path / "refs").is_dir())
    )


def _snapshot(repo, revision=None):
    """``snapshots/<commit>`` of a cache repository folder, through ``refs/<revision or main>``."""
    snapshots = repo / "snapshots"
    have = sorted(p.name for p in snapshots.iterdir() if p.is_dir())
    ref = repo / "refs" / (revision or "main")
    if ref.is_file():
        commit = ref.read_text().strip()
    elif revision and revision in have:
        commit = revision
    elif revision is None and len(have) == 1:
        commit = have[0]
    else:
        wanted = f"revision {revision!r}" if revision else "refs/main"
        raise FileNotFoundError(
            f"{repo}: the cache folder has no {wanted}; its snapshots are {have or 'none'}: "
            f"pass {repo / 'snapshots'}/<one of them>"
        )
    if not (snapshots / commit).is_dir():
        raise FileNotFoundError(f"{repo}: refs name commit {commit}, but snapshots/{commit} is missing")
    return snapshots / commit


def _cached_ids(cache):
    if not cache.is_dir():
        return []
    return sorted(p.name[len("models--") :].replace("--", "/") for p in cache.glob("models--*") if p.is_dir())


def close_matches(word, candidates, n=3):
    """Up to ``n`` of ``candidates`` close to ``word`` (:func:`difflib.get_close_matches`), best first."""
    return difflib.get_close_matches(word, list(dict.fromkeys(candidates)), n=n, cutoff=0.6)


def _download(model_id, revision, role):
    from .._extras import require

    hub = require("huggingface_hub")
    try:
        return hub.snapshot_download(model_id, revision=revision, allow_patterns=list(HUB_PATTERNS))
    except Exception as exc:  # the hub's errors vary by version: say which id and why, in one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FileNotFoundError(
            f"{role} {model_id!r}: not a local path, and downloading it failed ({first[:200]})"
        ) from None


def _not_found(ref, role, cache, note, is_id):
    path = Path(ref).expanduser()
    near = []
    parent = path.parent
    if parent.is_dir():
        shown = (lambda n: n) if str(Path(ref).parent) in ("", ".") else (lambda n: str(Path(ref).parent / n))
        near += [shown(n) for n in close_matches(path.name, (p.name for p in parent.iterdir()))]
    if is_id:
        near += close_matches(str(ref), _cached_ids(cache))
    hint = f"; did you mean {' or '.join(repr(n) for n in near[:3])}?" if near else "."
    where = f", and no model of that id is in the Hugging Face cache ({cache}){note}" if is_id else ""
    return FileNotFoundError(
        f"{role}: no checkpoint at {str(ref)!r}: it does not exist{where}{hint} A model is {FORMS}."
    )


def resolve_model(ref, *, role="model", download=None):
    """The local path of a model reference (see the module notes for the forms accepted).

    Parameters
    ----------
    ref : str or path-like
        A path, a Hugging Face cache folder, or a model id (``org/name``,
        ``org/name@revision``). Anything that is not a str or a path (an open
        :class:`~blocklowrank.checkpoints.Checkpoint`) is returned unchanged.
    role : str, default="model"
        How errors name it ("base", "fine-tuned", ...).
    download : bool, optional
        Allow a download when the id is not cached; default: when
        huggingface_hub is installed and ``HF_HUB_OFFLINE`` is not set.

    Returns
    -------
    str or object
        A file or folder that exists (a cache folder resolved to its snapshot).

    Raises
    ------
    FileNotFoundError
        One line: the forms accepted, and close matches where there are some.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> repo = root / "models--org--tiny"
    >>> (repo / "snapshots" / "abc123").mkdir(parents=True)
    >>> (repo / "refs").mkdir(); _ = (repo / "refs" / "main").write_text("abc123")
    >>> resolve_model(repo) == str(repo / "snapshots" / "abc123")
    True
    """
    if not isinstance(ref, (str, os.PathLike)):
        return ref
    text = os.fspath(ref)
    if not text.strip():
        raise FileNotFoundError(f"{role}: an empty name is not a model; a model is {FORMS}")
    path = Path(text).expanduser()
    if path.exists():
        return str(_snapshot(path)) if _is_cache_repo(path) else str(path)
    cache = hf_cache_dir()
    match = _ID.match(text)
    if match is None or text.endswith("/") or text.startswith((".", "~")) or text.endswith(_PATH_SUFFIXES):
        raise _not_found(text, role, cache, "", False)
    model_id, revision = match.group("id"), match.group("rev")
    repo = cache / ("models--" + model_id.replace("/", "--"))
    if _is_cache_repo(repo):
        return str(_snapshot(repo, revision))
    has_hub = importlib.util.find_spec("huggingface_hub") is not None
    local = "/" in model_id and Path(model_id).parent.is_dir()  # models/base: a path with a typo, not an id
    allowed = (has_hub and not _offline() and not local) if download is None else download
    if allowed:
        return _download(model_id, revision, role)
    note = (
        " (HF_HUB_OFFLINE is set, so nothing is downloaded)"
        if has_hub
        else "; to download model ids: pip install 'blocklowrank[hub]'"
    )
    raise _not_found(text, role, cache, note, True)


# ---------------------------------------------------------------------------- module names
def _role_parts(module):
    parts = module.split(".")
    last = max((t for t, p in enumerate(parts) if p.isdigit()), default=-1)
    return tuple(parts[last + 1 :] or parts)


def module_roles(modules):
    """``{module path: role}``: the path after its last layer index, in as few trailing parts as tell roles apart.

    Examples
    --------
    >>> roles = module_roles(["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.output.dense",
    ...                       "encoder.layer.0.intermediate.dense", "encoder.layer.1.output.dense", "pooler.dense"])
    >>> list(roles.values())
    ['query', 'attention.output.dense', 'intermediate.dense', 'output.dense', 'pooler.dense']
    >>> list(module_roles(["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]).values())
    ['q_proj', 'up_proj']
    """
    full = {m: _role_parts(m) for m in modules}
    distinct = set(full.values())
    out = {}
    for module, parts in full.items():
        for k in range(1, len(parts) + 1):
            if all(other == parts or other[-k:] != parts[-k:] for other in distinct):
                break
        out[module] = ".".join(parts[-k:])
    return out


def no_layer_selected(modules, target_modules, *, max_names=8):
    """Why ``target_modules`` selected none of ``modules``: what exists, and the closest names.

    Returns an :class:`~blocklowrank.OptionError` (its message
    spells ``target_modules`` as the caller does).
    """
    roles = list(dict.fromkeys(module_roles(modules).values()))
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules or ())
    lasts = list(dict.fromkeys(m.split(".")[-1] for m in modules))
    near = [c for w in wanted for c in close_matches(str(w), roles + lasts + list(modules))]
    shown = ", ".join(roles[:max_names]) + (f", ... ({len(roles)} roles)" if len(roles) > max_names else "")
    hint = f" Did you mean {', '.join(dict.fromkeys(near))}?" if near else ""
    what = ", ".join(map(str, wanted)) or "nothing"
    return OptionError(
        f"«target_modules» {what} matches none of the {len(modules)} 2-D weights present in both checkpoints "
        f"with the same shape.{hint} The modules there, by role: {shown} (a name matches a module path "
        "that equals it or ends with '.' + name; one value with regex characters must match the whole path)"
    )
