"""`minillama dump`: the file holds what capture saw, the summary describes it, nothing is overwritten."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import minillama
from minillama.cli import main
from minillama.dump import dump_activations, summary_path
from test_inspect import make_chat_model

IDS = torch.tensor([[5, 9, 200, 31, 77, 1, 128, 64, 3]])


@pytest.fixture(scope="module")
def model(tiny_llama32):
    return minillama.load_model(tiny_llama32, device="cpu", dtype="float32")


def test_round_trip_equals_capture(model, tmp_path):
    out = tmp_path / "acts.safetensors"
    with torch.no_grad(), minillama.capture(model) as expected:
        model(IDS)
    summary = dump_activations(model, IDS, out, metadata={"prompt": "ids"})
    stored = load_file(out)
    assert set(stored) == set(expected)
    for name, x in expected.items():
        assert torch.equal(stored[name], x), name  # bit for bit, -inf of the masked scores included
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["input_ids"]) == IDS.tolist() and f.metadata()["prompt"] == "ids"

    on_disk = json.loads(summary_path(out).read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert [t["name"] for t in on_disk["tensors"]] == list(expected)  # forward order
    for entry in on_disk["tensors"]:
        x = expected[entry["name"]].float()
        assert entry["shape"] == list(x.shape) and entry["dtype"] == "float32"
        finite = x[torch.isfinite(x)]
        assert entry["nonfinite"] == x.numel() - finite.numel()
        for stat, value in [("mean", finite.mean()), ("std", finite.std(correction=0)), ("min", finite.min()),
                            ("max", finite.max())]:
            assert entry[stat] == pytest.approx(value.item(), rel=1e-5, abs=1e-6), (entry["name"], stat)
    assert on_disk["tensors"][-1]["name"] == "lm_head" and on_disk["tensors"][-1]["shape"] == [1, 9, 256]


def test_names_filter_aliases_and_bf16(tiny_llama32, tmp_path):
    model = minillama.load_model(tiny_llama32, device="cpu", dtype="bfloat16")
    out = tmp_path / "bf16.safetensors"
    with torch.no_grad(), minillama.capture(model, names=["blocks.1.attn.hook_rot_q", "*.resid_post"]) as expected:
        model(IDS)
    dump_activations(model, IDS, out, names=["blocks.1.attn.hook_rot_q", "*.resid_post"])
    stored = load_file(out)
    assert set(stored) == {"blocks.1.attn.hook_rot_q", "model.layers.0.resid_post", "model.layers.1.resid_post"}
    for name, x in expected.items():
        assert stored[name].dtype == torch.bfloat16 and torch.equal(stored[name], x)  # transposed view stored right


def test_refuses_to_overwrite_without_force(model, tmp_path):
    out = tmp_path / "acts.safetensors"
    dump_activations(model, IDS, out, names=["lm_head"])
    before = out.read_bytes()
    with pytest.raises(minillama.MinillamaError, match="exists; pass force=True"):
        dump_activations(model, IDS, out, names=["model.norm"])
    assert out.read_bytes() == before
    dump_activations(model, IDS, out, names=["model.norm"], force=True)
    assert list(load_file(out)) == ["model.norm"]
    with pytest.raises(minillama.MinillamaError, match="no activation is named"):  # nothing half-written
        dump_activations(model, IDS, tmp_path / "bad.safetensors", names=["nope"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.safetensors", "acts.summary.json"]


def test_cli(tmp_path, llama32_tokenizer_dir, capsys):
    model_dir = make_chat_model(tmp_path / "chat", llama32_tokenizer_dir)
    out = tmp_path / "out.safetensors"
    args = ["dump", str(model_dir), "--prompt", "Hello world", "--out", str(out), "--names", "model.layers.0.*"]
    assert main(args) == 0
    assert "wrote 18 tensors" in capsys.readouterr().out
    summary = json.loads(summary_path(out).read_text())
    assert summary["input_ids"][0] == 128000 and summary["prompt"].endswith("<|end_header_id|>\n\n")
    assert main(args) == 2  # exists: one line, exit 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; pass --force" in err
    assert main([*args, "--force", "--raw"]) == 0
    summary = json.loads(summary_path(out).read_text())
    assert summary["prompt"] == "Hello world" and len(summary["input_ids"]) == 3  # bos Hello ␣world


def test_the_dump_and_its_summary_honour_the_umask(model, tmp_path):
    """The tensors file came out 0600 (a temporary file renamed into place) beside a 0644 summary; both get
    what the umask gives a new file."""
    import os
    import stat

    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(umask)
        try:
            out = tmp_path / f"acts-{umask:o}.safetensors"
            minillama.dump_activations(model, torch.tensor([[1, 2, 3]]), out, names=["*.resid_post"])
        finally:
            os.umask(old)
        assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(summary_path(out).stat().st_mode) == mode
