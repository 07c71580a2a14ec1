"""Loading checkpoints: device/dtype handling, tied heads, and one clear error for each broken input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_hf_checkpoint
from safetensors.torch import load_file, save_file

import minillama
from minillama.errors import MinillamaError


def copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_loads_in_eval_mode_with_tied_head(tiny_llama32):
    model = minillama.load_model(tiny_llama32, device="cpu")
    assert not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())


def test_untied_head_is_its_own_tensor(tiny_llama2):
    model = minillama.load_model(tiny_llama2, device="cpu")
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_dtype_default_follows_device_and_can_be_asked_for(tmp_path):
    path = make_hf_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert json.loads((path / "config.json").read_text()).get("dtype") == "bfloat16"
    assert minillama.load_model(path, device="cpu").dtype == torch.float32  # CPU default: fp32
    assert minillama.load_model(path, device="cpu", dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(MinillamaError, match="unknown dtype 'int3'"):
        minillama.load_model(path, device="cpu", dtype="int3")


def test_truncated_file(tiny_llama32, tmp_path):
    bad = copy_dir(tiny_llama32, tmp_path / "m")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(MinillamaError, match=r"model\.safetensors: corrupted or truncated") as e:
        minillama.load_model(bad, device="cpu")
    assert "\n" not in str(e.value)


def test_missing_tensor_is_named(tiny_llama32, tmp_path):
    bad = copy_dir(tiny_llama32, tmp_path / "m")
    state = load_file(bad / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, bad / "model.safetensors")
    with pytest.raises(MinillamaError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        minillama.load_model(bad, device="cpu")


def test_unexpected_tensor_is_named(tiny_llama32, tmp_path):
    bad = copy_dir(tiny_llama32, tmp_path / "m")
    state = load_file(bad / "model.safetensors")
    state["model.layers.7.mlp.up_proj.weight"] = torch.zeros(2)
    save_file(state, bad / "model.safetensors")
    with pytest.raises(MinillamaError, match="unexpected tensor model.layers.7.mlp.up_proj.weight"):
        minillama.load_model(bad, device="cpu")


def test_config_that_disagrees_with_weights(tiny_llama32, tmp_path):
    bad = copy_dir(tiny_llama32, tmp_path / "m")
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(MinillamaError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \[128, 64\] "
                                             r"but config\.json implies \[96, 64\]"):
        minillama.load_model(bad, device="cpu")


def test_shard_index_naming_a_missing_file(tmp_path):
    path = make_hf_checkpoint(tmp_path / "m", max_shard_size="60KB")
    shards = sorted(path.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(MinillamaError, match=f"names shard {shards[-1].name}, which is missing"):
        minillama.load_model(path, device="cpu")


def test_pickled_weights_are_refused_without_loading(tiny_llama32, tmp_path):
    bad = copy_dir(tiny_llama32, tmp_path / "m")
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"a pickle that must never be opened")
    with pytest.raises(MinillamaError, match="only pickled weights"):
        minillama.load_model(bad, device="cpu")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_weights_are_refused(tiny_llama32, tmp_path, value, dtype):
    bad = copy_dir(tiny_llama32, tmp_path / "m")
    state = {k: v.to(dtype) for k, v in load_file(bad / "model.safetensors").items()}
    state["model.layers.1.mlp.down_proj.weight"][5, 7] = value
    save_file(state, bad / "model.safetensors")
    with pytest.raises(MinillamaError, match="model.layers.1.mlp.down_proj.weight holds NaN or inf"):
        minillama.load_model(bad, device="cpu", dtype=dtype)


def test_huge_finite_weights_load(tiny_llama32, tmp_path):
    """Values near the dtype's limit are finite: they load (a float32 sum of them would overflow)."""
    path = copy_dir(tiny_llama32, tmp_path / "m")
    state = load_file(path / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"].fill_(3e38)
    save_file(state, path / "model.safetensors")
    model = minillama.load_model(path, device="cpu")
    assert float(model.model.layers[0].mlp.up_proj.weight.detach().max()) == pytest.approx(3e38)


def test_cuda_request_without_cuda(tiny_llama32):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the message is for machines without it")
    with pytest.raises(MinillamaError, match="no usable CUDA GPU"):
        minillama.load_model(tiny_llama32, device="cuda")
    with pytest.raises(MinillamaError, match="unknown device 'gpu0'"):
        minillama.load_model(tiny_llama32, device="gpu0")


def test_loading_keeps_one_copy_in_host_memory(tiny_llama32, tmp_path):
    """Peak RSS while loading stays near one copy of the weights (a state dict + model would be two)."""
    import subprocess
    import sys

    path = make_hf_checkpoint(tmp_path / "m", hidden_size=1024, intermediate_size=2816, num_hidden_layers=3,
                              num_attention_heads=8, num_key_value_heads=8)
    weight_bytes = (path / "model.safetensors").stat().st_size
    probe = (
        "import sys, torch, minillama\n"
        "def status(key): return int([l for l in open('/proc/self/status') if l.startswith(key)][0].split()[1])\n"
        "minillama.load_model(sys.argv[2], device='cpu')\n"  # first load pulls in lazy imports: not weights
        "before = status('VmRSS')\n"
        "m = minillama.load_model(sys.argv[1], device='cpu')\n"
        "print((status('VmHWM') - before) * 1024)\n"  # peak resident memory added by loading
    )
    growth = int(subprocess.run([sys.executable, "-c", probe, str(path), str(tiny_llama32)],
                                capture_output=True, text=True, check=True).stdout.split()[-1])
    assert weight_bytes > 100e6
    assert growth < 1.5 * weight_bytes, f"peak RSS grew {growth / 1e6:.0f} MB for {weight_bytes / 1e6:.0f} MB"
