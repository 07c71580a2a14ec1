"""One convention across the subcommands: the same flags and defaults, quiet exits, one-line errors.

Closed pipes (`| head`), missing optional dependencies, near-miss model names, the prompt on stdin,
`--version`, flag-named messages and `--stop` trimming, each through the real command line.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pexpect
import pytest

from minillama.cli import build_parser, main
from minillama.stopping import StopTrimmer
from minillama.hub import DEFAULT_MODEL

CLI = [sys.executable, "-m", "minillama"]
MODEL_TOOLS = ["chat", "generate", "inspect", "dump", "diff", "lens"]


def subparser(name: str):
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[name]


def option(name: str, flag: str):
    return next((a for a in subparser(name)._actions if flag in a.option_strings), None)


# ---- the same names and defaults ----------------------------------------------------------------

@pytest.mark.parametrize("tool", MODEL_TOOLS + ["patch", "bench"])
def test_model_is_optional_and_device_defaults_alike(tool):
    model = next(a for a in subparser(tool)._actions if a.dest == "model")
    assert model.nargs == "?" and model.default in (DEFAULT_MODEL, None)  # bench: None means the default model
    device = option(tool, "--device")
    if tool != "inspect":  # inspect reads no weights
        assert device.default is None and "default: cuda if available, else cpu" in device.help


@pytest.mark.parametrize("tool", ["chat", "generate", "bench"])
def test_max_new_tokens_is_n_everywhere(tool):
    assert "-n" in option(tool, "--max-new-tokens").option_strings


@pytest.mark.parametrize("tool", ["generate", "dump", "diff", "lens", "inspect"])
def test_prompt_flags_alike(tool):
    assert "-p" in option(tool, "--prompt").option_strings
    assert option(tool, "--raw") and option(tool, "--chat")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("minillama ") and out.split()[1][0].isdigit()


@pytest.mark.parametrize("flag, value, message", [
    ("--top-p", "1.5", "--top-p must be in (0, 1]"),
    ("--top-k", "-1", "--top-k must be >= 0"),
    ("--min-p", "2", "--min-p must be in [0, 1]"),
    ("--repetition-penalty", "0", "--repetition-penalty must be > 0"),
    ("-n", "0", "--max-new-tokens must be >= 1"),
])
def test_messages_name_the_flag(flag, value, message, tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "hi", flag, value]) == 2  # checked before loading
    err = capsys.readouterr().err
    assert err.startswith("minillama: error: " + message) and err.count("\n") == 1


def test_did_you_mean(chat_model, capsys):
    assert main(["inspect", str(chat_model.parent / (chat_model.name[:-1] + "x"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.rstrip().endswith(f"did you mean {chat_model}?")
    assert main(["inspect", "smollm2-135m-instrct"]) == 2
    assert capsys.readouterr().err.rstrip().endswith(f"did you mean {DEFAULT_MODEL}?")
    assert main(["inspect", "/no/such/model"]) == 2
    assert "did you mean" not in capsys.readouterr().err  # nothing like it: no guess


def test_inspect_without_model_uses_the_default(smollm2_dir, monkeypatch, capsys):
    monkeypatch.setenv("MINILLAMA_CACHE", str(smollm2_dir.parent))
    assert main(["inspect"]) == 0
    assert capsys.readouterr().out.startswith(f"# {smollm2_dir}\n")


# ---- optional dependencies: one line naming the extra, before any work --------------------------

@pytest.mark.parametrize("args, message", [
    (["diff", "/no/such/model", "--prompt", "hi"], "minillama diff needs transformers, which is not installed: "
                                                   "pip install 'minillama[reference]'"),
    (["bench", "--tiny"], "minillama bench (its transformers side) needs transformers, which is not installed: "
                          "pip install 'minillama[reference]'"),
    (["lens", "/no/such/model", "--prompt", "hi", "--plot", "x.png"],
     "--plot needs matplotlib, which is not installed: pip install 'minillama[plot]'"),
])
def test_missing_optional_dependency_is_one_line(args, message, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an install without the extra sees
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(args) == 2
    assert capsys.readouterr().err == f"minillama: error: {message}\n"


# ---- pipes and terminals ------------------------------------------------------------------------

def run_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """Run with stdout a pipe whose reader is gone before the first write, as `| head -1` leaves it."""
    read, write = os.pipe()
    os.close(read)
    try:
        child = subprocess.run([*CLI, *args], stdout=write, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               text=True, timeout=120)
    finally:
        os.close(write)
    return child


def test_closed_pipe_exits_quietly(chat_model):
    for args in (["inspect", str(chat_model)], ["generate", str(chat_model), "--prompt", "hi", "-n", "5"]):
        r = run_closed_pipe(*args)
        assert r.returncode == 141, r.stderr
        assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr and "Exception ignored" not in r.stderr


def test_generate_reads_a_piped_prompt_and_refuses_a_terminal(chat_model):
    args = ["generate", str(chat_model), "--greedy", "-n", "4"]
    piped = subprocess.run([*CLI, *args], input="Name three rivers", capture_output=True, text=True, timeout=120)
    given = subprocess.run([*CLI, *args, "--prompt", "Name three rivers"], capture_output=True, text=True,
                           timeout=120)
    assert piped.returncode == given.returncode == 0, piped.stderr
    assert piped.stdout == given.stdout and "reply: 4 tokens" in piped.stderr
    # At a terminal with no --prompt there is nothing to wait for: say what to pass, don't hang.
    child = pexpect.spawn(CLI[0], [*CLI[1:], *args], encoding="utf-8", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2 and "no prompt: pass --prompt TEXT or pipe the text on stdin" in child.before


def test_stop_string_is_left_out(chat_model, capsys):
    args = ["generate", str(chat_model), "--prompt", "hi", "--seed", "3", "-n", "12"]  # a random model's text
    assert main(args) == 0
    full = capsys.readouterr().out.rstrip("\n")
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert len(stop) == 3 and full.index(stop) > 0
    assert main([*args, "--stop", stop]) == 0
    assert capsys.readouterr().out == full[:full.index(stop)] + "\n"


def test_stop_trimmer_holds_back_only_a_possible_start():
    trimmer = StopTrimmer(["</end>", "STOP"])
    assert trimmer.push("Hello <") == "Hello "  # "<" may begin "</end>"
    assert trimmer.push("b>") == "<b>"  # it did not
    assert trimmer.push(" ST") == " "
    assert trimmer.push("OP and more") == ""  # the stop string and what follows are left out
    assert trimmer.push("later") == "" and trimmer.flush() == ""
    open_end = StopTrimmer(["STOP"])
    assert open_end.push("a ST") == "a " and open_end.flush() == "ST"  # never completed: printed at the end
    assert StopTrimmer(None).push("x") == "x"


def test_help_is_written_for_users():
    """`--help` of every subcommand says what the command does and how to use it: no notes about the code's own
    classes and files (chat's help explained the length of its `Repl` class, patch's said "this file parses")."""
    for name, parser in next(a for a in build_parser()._actions if a.dest == "command").choices.items():
        text = parser.format_help()
        for developer_words in ("`Repl`", "-line class", "this file", "parses, prints", "Parses flags"):
            assert developer_words not in text, (name, developer_words)


def test_threads_flag_sets_torchs_threads(chat_model, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["generate", str(chat_model), "--threads", "1", "--prompt", "Hi", "-n", "2"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert main(["serve", "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err
    for tool in ("chat", "generate", "serve", "dump", "diff", "lens", "patch"):
        assert "--threads" in build_parser()._subparsers._group_actions[0].choices[tool].format_help()


def test_default_threads_are_the_idle_cores(chat_model, monkeypatch, capsys):
    import torch

    from minillama import threads

    cores = threads.usable_cores()
    assert threads.default_threads(idle=0.3) == 1 and threads.default_threads(idle=cores + 5) == cores
    assert threads.default_threads(idle=1.6) == min(2, cores)
    idle = threads.idle_cores(0.05)
    assert idle is None or 0 <= idle <= (threads.os.cpu_count() or 1) + 1e-9
    monkeypatch.setattr(threads, "idle_cores", lambda sample_s=0.1: 0.0)  # every core busy
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    try:
        assert main(["generate", str(chat_model), "--prompt", "Hi", "-n", "2"]) == 0
        assert torch.get_num_threads() == 1
        assert "thread" not in capsys.readouterr().err  # not at a terminal: stderr as it was
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
        assert main(["generate", str(chat_model), "--prompt", "Hi", "-n", "2"]) == 0
    finally:
        torch.set_num_threads(before)
    assert "1 thread (other programs keep 1 of 2 cores busy; --threads N to choose)" in capsys.readouterr().err


def test_an_unknown_flag_shows_the_subcommands_usage(capsys):
    """`minillama generate --bogus` printed the top-level usage (`minillama [-h] [--version] COMMAND`), which says
    nothing of generate's flags; now it is generate's usage, and the flag is named."""
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "hi", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: minillama generate ") and "--max-new-tokens" in err
    assert err.strip().endswith("minillama generate: error: unrecognized arguments: --bogus")
    with pytest.raises(SystemExit):
        main(["--bogus"])
    assert capsys.readouterr().err.startswith("usage: minillama [-h]")


def test_readme_says_which_subcommands_take_device():
    """The README said every subcommand takes --device, which `inspect` refuses (it reads no weights)."""
    from pathlib import Path

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "Every subcommand takes MODEL" not in readme
    assert "`inspect` reads no weights, so it takes MODEL and `--offline` only" in readme
    assert option("inspect", "--device") is None and option("inspect", "--offline") is not None
    assert all(option(tool, "--device") is not None for tool in MODEL_TOOLS if tool != "inspect")


def test_help_version_and_usage_errors_import_no_torch():
    """`--version`, every `--help` and argparse's usage errors took ~2-4 s: `import minillama.cli` ran the package's
    eager imports, torch among them. They must answer before anything heavy is imported."""
    script = """
import sys
from minillama.cli import SUBCOMMANDS, build_parser, main

commands = next(a for a in build_parser()._actions if a.dest == "command").choices
argvs = [["--version"], ["--help"], ["--bogus"], ["nope"], ["chat", "--bogus"], ["chat", "--engine", "nope"],
         ["serve", "--port", "x"], ["bench", "--compile", "maybe"]] + [[name, "--help"] for name in commands]
for argv in argvs:
    try:
        main(argv)
    except SystemExit:
        pass
    heavy = [m for m in ("torch", "transformers", "numpy", "safetensors", "tokenizers", "jinja2") if m in sys.modules]
    assert not heavy, (argv, heavy)
print(len(argvs), len(commands) == len(SUBCOMMANDS))
"""
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["18", "True"]
