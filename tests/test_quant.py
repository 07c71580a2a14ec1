"""Weight-only int8/int4 (minillama/quant.py): each kernel against its dequantize-then-matmul reference,
quantize -> save -> load, GGUF tensors kept quantized, the real SmolLM2 running its own Q4_1 weights,
and one-line errors that name the tensor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from conftest import llama32_like, make_hf_checkpoint, read_json
from safetensors import safe_open
from test_gguf import IDS, chat_prompt_ids, write_gguf
from torch import nn

from minillama import MinillamaError, kernels, load_model, load_tokenizer, quant
from minillama.gguf import convert_gguf
from minillama.perplexity import perplexity

Q = gguf.GGMLQuantizationType
LINEARS = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_gate.weight",
           "ffn_up.weight", "ffn_down.weight")


pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices (conftest.one_thread)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds (parameters and buffers), a shared one counted once."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---- kernels against their references ------------------------------------------------------------

def activation_error_bound(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """How far int8 activations can move each output: half a step of each block of x, times |w|, summed."""
    _, xd, _ = kernels.quantize_activations(x.reshape(-1, module.in_features))
    step = xd.repeat_interleave(kernels.QK, dim=1)  # (M, K)
    return (step / 2) @ module.dequantize().abs().t()  # (M, N)


@pytest.fixture(params=["torch", "minillama"])
def kernel(request, monkeypatch):
    """Each kernel family a module can be built to run (it chooses as it is made): torch's weight-only ones, and
    minillama's own (kernels.py, the default where they build)."""
    monkeypatch.setenv("MINILLAMA_KERNELS", request.param)
    if request.param == "minillama" and not kernels.available():
        pytest.skip(f"minillama's kernels are not built here: {kernels.describe()}")
    return request.param


@pytest.mark.parametrize("kind, group_size, bias", [("int8", None, False), ("int8", 32, True),
                                                    ("int4", 32, True), ("int4", 64, False),
                                                    ("int4", 128, False)])
@pytest.mark.parametrize("tokens", [1, 9, 40])
def test_kernel_equals_dequantize_then_matmul(kernel, kind, group_size, bias, tokens):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=bias)
    module = quant.quantize_linear(linear, kind, group_size)
    assert module.kernel == kernel
    x = torch.randn(2, tokens, 256).to(torch.bfloat16).float()
    y, ref = module(x), module.reference_forward(x)
    assert y.shape == ref.shape == (2, tokens, 96) and y.dtype == torch.float32
    if module.kernel == "torch":
        # torch's kernels take bf16 inputs: rounding x first leaves only the kernel's own bf16 output
        # rounding (2^-9 relative, per group for grouped int8) and its summation order.
        torch.testing.assert_close(y, ref, atol=2**-8 * ref.abs().max().item(), rtol=0)
    elif tokens > 1:  # a prompt's chunk: dequantize, then a float32 matmul
        torch.testing.assert_close(y, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    else:  # int8 activations in two passes: the second's rounding is ~1/127 of the first's half step per input
        assert module.passes == 2
        bound = activation_error_bound(module, x).reshape(y.shape) / 50
        assert ((y - ref).abs() <= bound + 1e-5 * ref.abs().max()).all()
        assert (y - ref).abs().max() > 0  # the activations were quantized: this is not the float path


@pytest.mark.parametrize("kind, group_size", [("int8", None), ("int8", 32), ("int4", 32), ("int4", 128)])
def test_quantization_error_is_at_most_half_a_step(kind, group_size):
    torch.manual_seed(1)
    w = torch.randn(64, 256) * torch.rand(64, 1)  # rows of different magnitudes
    if kind == "int8":
        q, scales = quant.quantize_int8(w, group_size)
        error = (quant.dequantize_int8(q, scales) - w).reshape(64, scales.shape[1], -1)
    else:
        q, scales, zeros = quant.quantize_int4(w, group_size)
        assert int(q.min()) >= 0 and int(q.max()) <= 15
        error = (quant.dequantize_int4(q, scales, zeros) - w).reshape(64, scales.shape[1], -1)
    # half a step, plus what the bf16 rounding of the scale (and zero) moves the grid
    assert (error.abs().amax(-1) <= scales * (0.5 + 2**-7 * (15 if kind == "int4" else 127))).all()


def test_int4_layout_round_trips_through_the_kernel_packing(kernel):
    torch.manual_seed(2)
    q = torch.randint(0, 16, (48, 128), dtype=torch.uint8)
    assert torch.equal(quant.unpack_nibbles(quant.pack_nibbles(q)), q)
    assert quant.pack_nibbles(q)[0, 0] == q[0, 0] | (q[0, 1] << 4)  # input 0 low, input 1 high: the saved layout
    scales, zeros = torch.rand(48, 4).bfloat16().float(), torch.randn(48, 4).bfloat16().float()
    module = quant.Int4Linear(128, 48, group_size=32, device="meta")
    module.set_quantized(quant.pack_nibbles(q), scales, zeros)
    qweight, s, z = module.quantized()  # unpacked by the kernel itself, from torch's private layout
    assert torch.equal(qweight, quant.pack_nibbles(q)) and torch.equal(s, scales) and torch.equal(z, zeros)


def test_int8_embedding_rows_and_tied_head_share_one_table(kernel):
    torch.manual_seed(3)
    table = nn.Embedding(100, 64)
    emb = quant.Int8Embedding(100, 64, group_size=32, device="meta")
    emb.set_quantized(*quant.quantize_int8(table.weight, 32))
    ids = torch.tensor([[3, 99, 0], [7, 7, 50]])
    torch.testing.assert_close(emb(ids), emb.dequantize()[ids], atol=0, rtol=0)
    head = emb.tied_head()
    assert head.qweight.data_ptr() == emb.qweight.data_ptr()
    x = torch.randn(5, 1, 64).bfloat16().float()  # 5 rows of one decode step each: the int8 kernels
    atol = activation_error_bound(head, x) / 30 + 1e-5 if head.kernel == "minillama" else 2**-7 * 64
    assert ((head(x) - head.reference_forward(x))[:, 0].abs() <= atol).all()  # two passes


# ---- whole models -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def untied_with_bias(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("bias"), seed=4, tie_word_embeddings=False,
                              attention_bias=True, mlp_bias=True)


@pytest.mark.parametrize("checkpoint", ["tiny_llama32", "untied_with_bias"])
@pytest.mark.parametrize("mode, group_size", [("int8", None), ("int4", 32)])
def test_quantize_save_load_gives_identical_logits(checkpoint, mode, group_size, request, tmp_path):
    source = request.getfixturevalue(checkpoint)
    model = load_model(source, "cpu", quantize=mode, group_size=group_size)
    float_names = {name for name, _ in load_model(source, "cpu").named_modules()}
    assert {name for name, _ in model.named_modules()} == float_names  # swaps keep every module's name
    assert isinstance(model.model.layers[0].mlp.down_proj, quant.Int8Linear if mode == "int8" else quant.Int4Linear)
    assert isinstance(model.lm_head, quant.Int8Linear)  # the head is int8 in both modes (docs/quantization.md)

    out = quant.save_quantized(model, source, tmp_path / "q")
    config = read_json(out / "config.json")
    assert config["quantization_config"]["quant_method"] == "minillama"
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.up_proj.qweight" in names and "model.layers.1.mlp.up_proj.weight" not in names
    assert ("lm_head.qweight" in names) == (checkpoint == "untied_with_bias")  # a tied head is saved once
    assert (tmp_path / "q" / "tokenizer_config.json").exists() or not (source / "tokenizer_config.json").exists()

    reloaded = load_model(out, "cpu")
    assert str(reloaded) == str(model)
    assert torch.equal(logits(reloaded), logits(model))
    dequantized = load_model(out, "cpu", quantize="none")  # float weights from the saved quantized ones
    assert isinstance(dequantized.model.layers[0].mlp.down_proj, nn.Linear)
    torch.testing.assert_close(logits(dequantized), logits(model), atol=0.02, rtol=0.02)


# ---- GGUF tensors kept quantized ---------------------------------------------------------------

@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_gguf_blocks_load_without_dequantizing(kind, tmp_path):
    hf_dir = make_hf_checkpoint(tmp_path / "hf", seed=5, **llama32_like())
    types = {**{name: kind for name in LINEARS}, "token_embd.weight": Q.Q8_0}
    path = write_gguf(hf_dir, tmp_path / "m.gguf", quant=types)
    native = convert_gguf(path, tmp_path / "native", progress=False, keep_quantized=True)
    dequantized = load_model(convert_gguf(path, tmp_path / "float", progress=False), "cpu")

    model = load_model(native, "cpu")
    expected = quant.Int8Linear if kind == Q.Q8_0 else quant.Int4Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, expected)
    assert isinstance(model.model.embed_tokens, quant.Int8Embedding) and isinstance(model.lm_head, quant.Int8Linear)
    assert read_json(native / "config.json")["quantization_config"]["modules"]["model.layers.*.self_attn.q_proj"] \
        == ("int8-g32" if kind == Q.Q8_0 else "int4-g32")
    # The same numbers as the gguf package's own dequantization (q/k rows unpermuted alike) ...
    torch.testing.assert_close(logits(load_model(native, "cpu", quantize="none")), logits(dequantized),
                               atol=1e-5, rtol=1e-5)
    # ... and run by the kernels: bf16 activations and scales
    torch.testing.assert_close(logits(model), logits(dequantized), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("name, kind", [("blk.0.attn_q.weight", Q.Q5_0), ("token_embd.weight", Q.Q4_0)])
def test_gguf_type_not_kept_is_named(name, kind, tmp_path):
    hf_dir = make_hf_checkpoint(tmp_path / "hf", seed=6, **llama32_like())
    path = write_gguf(hf_dir, tmp_path / "m.gguf", quant={name: kind})
    with pytest.raises(MinillamaError, match=rf"tensor {name} is {kind.name}, which minillama cannot keep") as e:
        convert_gguf(path, tmp_path / "out", progress=False, keep_quantized=True)
    assert "\n" not in str(e.value) and "without --keep-quantized" in str(e.value)
    assert not (tmp_path / "out").exists()


# ---- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(quantize="int4", group_size=128), r"model\.layers\.0\.self_attn\.q_proj\.weight: its 64 inputs are not "
                                            r"divisible by the group size 128; choose one that divides 64 \(32, 64\)"),
    (dict(quantize="int8", group_size=48), r"q_proj\.weight: its 64 inputs are not divisible by the group size 48"),
    (dict(quantize="int4", group_size=16), r"q_proj\.weight: int4 group size 16 is not supported; use 32, 64 or 128"),
    (dict(quantize="int3"), r"unknown quantization 'int3'; use int8, int4 or none"),
    (dict(group_size=32), r"a group size needs quantize int8 or int4"),
])
def test_errors_are_one_line_and_name_the_tensor(kwargs, message, tiny_llama2):
    with pytest.raises(MinillamaError, match=message) as e:
        load_model(tiny_llama2, "cpu", **kwargs)
    assert "\n" not in str(e.value)


def test_quantized_directory_errors(tiny_llama2, tmp_path):
    out = quant.save_quantized(load_model(tiny_llama2, "cpu", quantize="int8"), tiny_llama2, tmp_path / "q")
    with pytest.raises(MinillamaError, match="already holds quantized weights; load it as it is"):
        load_model(out, "cpu", quantize="int4")
    config = read_json(out / "config.json")
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(MinillamaError, match="quantization_config 'gptq' is not supported"):
        load_model(out, "cpu")


# ---- the real SmolLM2, from its Q4_1 GGUF ----------------------------------------------------------

@pytest.mark.slow
def test_smollm2_runs_its_q4_1_weights(smollm2_q4_dir, smollm2_dir):
    native = smollm2_q4_dir  # the GGUF converted with keep_quantized=True: what `minillama chat` runs
    model = load_model(native, "cpu")
    fp32 = load_model(smollm2_dir, "cpu", "float32")  # today's conversion: every tensor dequantized
    assert weight_bytes(model) <= 0.25 * weight_bytes(fp32)
    ids = torch.tensor([chat_prompt_ids(smollm2_dir, "What is the capital of France?")])
    # The same numbers: dequantizing the kept tensors gives today's float32 model, bit for bit.
    assert torch.equal(logits(load_model(native, "cpu", quantize="none"), ids), logits(fp32, ids))
    # Run natively the only difference is bf16 rounding (activations and scales into the kernels): no larger
    # than running the whole float32 model in bf16.
    bf16_error = (logits(load_model(smollm2_dir, "cpu", "bfloat16"), ids).float() - logits(fp32, ids)).abs().max()
    assert (logits(model, ids) - logits(fp32, ids)).abs().max() <= bf16_error
    text = (Path(__file__).parent / "data" / "alice-chapter1.txt").read_text()
    text_ids = load_tokenizer(smollm2_dir).encode(text)[:256]
    assert perplexity(model, text_ids) <= 1.02 * perplexity(fp32, text_ids)


def test_cli_convert_gguf_keep_quantized(tmp_path):
    from minillama.cli import main as cli_main

    hf_dir = make_hf_checkpoint(tmp_path / "hf", seed=7, **llama32_like())
    path = write_gguf(hf_dir, tmp_path / "m.gguf", quant={name: Q.Q8_0 for name in (*LINEARS, "token_embd.weight")})
    assert cli_main(["convert-gguf", str(path), str(tmp_path / "out"), "--keep-quantized", "--quiet"]) == 0
    assert read_json(tmp_path / "out" / "config.json")["quantization_config"]["quant_method"] == "minillama"
    assert isinstance(load_model(tmp_path / "out", "cpu").model.layers[0].mlp.up_proj, quant.Int8Linear)


# ---- the command line -------------------------------------------------------------------------------

def test_dtype_without_quantize_means_float_weights():
    from argparse import Namespace

    from minillama.cli.common import quantize_args

    assert quantize_args(Namespace(quantize=None, dtype=None, group_size=None))["quantize"] is None  # as stored
    assert quantize_args(Namespace(quantize=None, dtype="float32", group_size=None))["quantize"] == "none"
    assert quantize_args(Namespace(quantize="int4", dtype="float32", group_size=64)) == {"quantize": "int4",
                                                                                         "group_size": 64}


@pytest.mark.slow
@pytest.mark.parametrize("flags, quantized", [([], True), (["--dtype", "float32"], False),
                                              (["--quantize", "none"], False), (["--quantize", "int8"], False),
                                              (["--engine", "compiled"], True)])
def test_default_model_runs_its_4bit_weights_unless_asked(flags, quantized, smollm2_dir, smollm2_q4_dir,
                                                          monkeypatch):
    """`minillama chat` / `generate` on the default model: its own Q4_1 blocks on a CPU, on either engine;
    --dtype or --quantize take the float32 conversion, as before."""
    from minillama.cli import build_parser
    from minillama.cli.common import load_all

    monkeypatch.setenv("MINILLAMA_CACHE", str(smollm2_dir.parent))
    loaded = load_all(build_parser().parse_args(["generate", "--prompt", "hi", "--device", "cpu", *flags]))
    assert loaded.path == (smollm2_q4_dir if quantized else smollm2_dir)
    formats = set(quant.formats(loaded.model).values())
    assert formats == ({"int4-g32", "int8-g32"} if quantized else {"int8", "int8-g32"} if "int8" in flags else set())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_cli_tools_take_quantize(mode, chat_model, tmp_path, capsys):
    from minillama.cli import main as cli_main

    base = [str(chat_model), "--quantize", mode, "--prompt", "Hello there"]
    assert cli_main(["generate", *base, "-n", "4", "--greedy"]) == 0
    assert cli_main(["dump", *base, "--out", str(tmp_path / "acts.safetensors")]) == 0
    assert cli_main(["lens", *base]) == 0
    capsys.readouterr()
    assert cli_main(["diff", *base, "--json", "--tol", "0.5"]) == 0  # against float transformers: small, not zero
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert 0 < rows[-1]["rel"] < 0.1


def test_bench_quantized_sides(capsys):
    from minillama.cli import main as cli_main

    assert cli_main(["bench", "--tiny", "--prompt-len", "4", "-n", "3", "--json", "--sides", "minillama",
                     "--quantize", "int8,int4"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by = {(r["figure"], r["side"]): r["value"] for r in records}
    for side in ("minillama:quantize=int8", "minillama:quantize=int4"):
        assert by[("decode_tok_s", side)] > 0 and by[("bandwidth_fraction", side)] > 0
        assert by[("weight_bytes", side)] < by[("weight_bytes", "minillama")]
        assert by[("tokens_checked", side)] == 1.0  # the timed tokens are the quantized model's own argmax


# ---- the bench's GGUF sides: minillama on the file's own blocks, and llama.cpp -------------------------

FAKE_LLAMA_CPP = '''
"""A stand-in for llama-cpp-python (not installable in CI): the API the bench's llama.cpp side calls, answering
with minillama's float model of the same GGUF, and recording how it was called."""
import json, os
import torch
from minillama import load_model

class Llama:
    def __init__(self, model_path, n_ctx, n_batch, n_threads, n_threads_batch, verbose):
        self.model = load_model(os.environ["FAKE_LLAMA_CPP_MODEL"], "cpu")
        self.log = {"model_path": model_path, "n_ctx": n_ctx, "n_threads": n_threads, "resets": 0, "evals": []}
        self.tokens = []

    def n_vocab(self):
        return self.model.config.vocab_size

    def reset(self):
        self.log["resets"] += 1
        self.tokens = []

    def eval(self, tokens):
        assert not self.tokens, "eval after reset only: the whole prompt is evaluated"
        self.log["evals"].append(len(tokens))
        self.tokens = list(tokens)

    def generate(self, tokens, top_k, top_p, min_p, temp, repeat_penalty):
        assert (top_k, temp, repeat_penalty) == (1, 0.0, 1.0)  # greedy, nothing else
        with open(os.environ["FAKE_LLAMA_CPP_LOG"], "w") as f:
            json.dump(self.log, f)
        ids = list(tokens)
        while True:  # like llama.cpp's generate: never stops by itself
            token = int(self.model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(token)
            yield token
'''


@pytest.fixture
def converted_gguf(tmp_path):
    """A tiny model as a Q4_1 GGUF (Q8_0 embedding) and its float conversion, as `minillama bench` sees them."""
    hf_dir = make_hf_checkpoint(tmp_path / "hf", seed=9, **llama32_like())
    path = write_gguf(hf_dir, tmp_path / "m.gguf", quant={**{name: Q.Q4_1 for name in LINEARS},
                                                          "token_embd.weight": Q.Q8_0})
    return path, convert_gguf(path, tmp_path / "float", progress=False)


def test_bench_gguf_and_llama_cpp_sides(converted_gguf, tmp_path, monkeypatch, capsys):
    from minillama.cli import main as cli_main

    path, float_dir = converted_gguf
    fake = tmp_path / "fake-site"
    (fake / "llama_cpp").mkdir(parents=True)
    (fake / "llama_cpp" / "__init__.py").write_text(FAKE_LLAMA_CPP)
    monkeypatch.syspath_prepend(str(fake))  # `installed("llama_cpp")` in this process
    monkeypatch.setenv("PYTHONPATH", str(fake))  # and the side's own process
    monkeypatch.setenv("FAKE_LLAMA_CPP_MODEL", str(float_dir))
    monkeypatch.setenv("FAKE_LLAMA_CPP_LOG", str(tmp_path / "calls.json"))
    assert cli_main(["bench", str(float_dir), "--gguf", str(path), "--quantize", "gguf", "--sides", "minillama",
                     "--prompt-len", "5", "-n", "4", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by = {(r["figure"], r["side"]): r["value"] for r in records}
    native = "minillama:weights=gguf"
    assert by[("tokens_checked", native)] == 1.0  # the timed tokens are the Q4_1 model's own argmax
    assert by[("weight_bytes", native)] < 0.5 * by[("weight_bytes", "minillama")]
    assert by[("weight_bytes", "llama.cpp")] == sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)
    assert by[("decode_ratio", f"{native}/llama.cpp")] > 0 and by[("bandwidth_fraction", "llama.cpp")] > 0
    assert by[("tokens_agree", "minillama/llama.cpp")] == 4  # the stand-in answers with the float model
    calls = json.loads((tmp_path / "calls.json").read_text())
    side_threads = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                                  capture_output=True, text=True, check=True).stdout  # what each side's process has
    assert calls["model_path"] == str(path) and calls["n_ctx"] == 9 and calls["n_threads"] == int(side_threads)
    # Prefill (warm-up, then timed) evaluates the whole prompt each time, after a reset; so does each generate.
    assert calls["evals"] == [5, 5] and calls["resets"] == 4


def test_bench_gguf_side_errors(converted_gguf, monkeypatch, capsys):
    from minillama.cli import main as cli_main

    path, float_dir = converted_gguf
    monkeypatch.setattr("minillama.optional.installed", lambda module: module != "llama_cpp")
    assert cli_main(["bench", str(float_dir), "--quantize", "gguf", "--sides", "minillama"]) == 2
    assert "give it with --gguf FILE" in capsys.readouterr().err
    assert cli_main(["bench", str(float_dir), "--gguf", "nope.gguf", "--quantize", "gguf", "--sides", "minillama"]) == 2
    assert "nope.gguf: no such GGUF file" in capsys.readouterr().err
    assert cli_main(["bench", str(float_dir), "--gguf", str(path), "--sides", "llama.cpp"]) == 2
    assert capsys.readouterr().err.strip().endswith("the llama.cpp side needs llama_cpp, which is not installed: "
                                                    "pip install llama-cpp-python")
    assert cli_main(["bench", str(float_dir), "--quantize", "int2", "--sides", "minillama"]) == 2
    assert "--quantize int2: choose from int8, int4, gguf" in capsys.readouterr().err
