"""``gla-export generate``: only the text on stdout, exact resumption through state files (also
after Ctrl-C), the exit code of each kind of failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gla_export.cli import main
from gla_export.errors import EXIT_CODES
from gla_export.export import export_model
from gla_export.models import GLAConfig, GLAForCausalLM
from gla_export.runtime.decoder import StatefulDecoder
from gla_export.runtime.state import read_state_header

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(seed: int) -> GLAForCausalLM:
    torch.manual_seed(seed)
    config = GLAConfig(vocab_size=258, hidden_size=64, num_hidden_layers=2, num_heads=2, num_kv_heads=1, use_short_conv=True,
                       bos_token_id=256, eos_token_id=257, tie_word_embeddings=True, initializer_range=0.3)
    return GLAForCausalLM(config).eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate-cli")
    return {name: export_model(make_model(seed), root / name, gla_op="decomposed", validate=False, progress=False).out_dir
            for name, seed in (("a", 0), ("b", 1))}


def run(args: list[str], capsysbinary) -> tuple[int, bytes, str]:
    try:
        main(["generate", "--threads", "1", *args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsysbinary.readouterr()
    return code, out.out, out.err.decode()


def test_stdout_is_only_the_generated_text(exports, capsysbinary):
    code, out, err = run([str(exports["a"]), "-p", "In the beginning", "-n", "24"], capsysbinary)
    assert code == 0, err
    ref = StatefulDecoder(exports["a"], threads=1).generate("In the beginning", max_new_tokens=24).run()[0]
    assert out == ref.text_bytes and (len(ref.tokens) == 24 or ref.finish_reason == "eos")
    assert "ort-cpu" in err and "stopped: " in err


def test_output_ids(exports, capsysbinary):
    code, out, err = run([str(exports["a"]), "--prompt-ids", "256,73,110", "-n", "10", "--output-ids", "--ignore-eos"], capsysbinary)
    assert code == 0, err
    ref = StatefulDecoder(exports["a"], threads=1).generate(prompt_ids=[256, 73, 110], max_new_tokens=10, ignore_eos=True).run()[0]
    assert [int(x) for x in out.split()] == ref.tokens


@pytest.mark.parametrize("sampling", [[], ["-t", "0.9", "--top-p", "0.95", "--top-k", "64", "-s", "4"]], ids=["greedy", "sampled"])
def test_interrupt_and_resume_reproduces_the_uninterrupted_text(exports, tmp_path, capsysbinary, sampling):
    args = [str(exports["a"]), "--ignore-eos", *sampling]
    code, whole, err = run([*args, "-p", "Hello", "-n", "48"], capsysbinary)
    assert code == 0, err
    state = tmp_path / "conv.state"
    code, first, err = run([*args, "-p", "Hello", "-n", "20", "--save-state", str(state)], capsysbinary)
    assert code == 0 and state.is_file(), err
    # resumed without repeating the sampling options: the state file carries them and the position
    code, second, err = run([str(exports["a"]), "--ignore-eos", "--load-state", str(state), "-n", "28"], capsysbinary)
    assert code == 0, err
    assert first + second == whole
    assert "loaded" in err and "20 generated" in err


def test_resume_with_a_new_prompt(exports, tmp_path, capsysbinary):
    state = tmp_path / "c.state"
    code, first, err = run([str(exports["a"]), "-p", "Hello", "-n", "8", "--ignore-eos", "--save-state", str(state)], capsysbinary)
    assert code == 0, err
    pending = read_state_header(state)["pending_token"]
    code, second, err = run([str(exports["a"]), "--load-state", str(state), "-p", " and then", "-n", "8", "--ignore-eos",
                             "--save-state", str(state)], capsysbinary)
    assert code == 0, err
    dec = StatefulDecoder(exports["a"], threads=1)
    first_ids = dec.generate("Hello", max_new_tokens=8, ignore_eos=True).run()[0].tokens
    assert first_ids[-1] == pending
    ids = dec.encode("Hello") + first_ids + list(b" and then")
    assert second == dec.generate(prompt_ids=ids, max_new_tokens=8, ignore_eos=True).run()[0].text_bytes
    assert read_state_header(state)["generated"] == 16


def test_prime_a_conversation_with_zero_tokens(exports, tmp_path, capsysbinary):
    state = tmp_path / "c.state"
    code, out, err = run([str(exports["a"]), "-p", "Hello", "-n", "0", "--save-state", str(state)], capsysbinary)
    assert code == 0 and out == b"", err
    code, out, err = run([str(exports["a"]), "--load-state", str(state), "-n", "12", "--ignore-eos"], capsysbinary)
    ref = StatefulDecoder(exports["a"], threads=1).generate("Hello", max_new_tokens=12, ignore_eos=True).run()[0]
    assert code == 0 and out == ref.text_bytes


def test_state_files_are_checked(exports, tmp_path, capsysbinary):
    state = tmp_path / "c.state"
    assert run([str(exports["a"]), "-p", "Hi", "-n", "3", "--save-state", str(state)], capsysbinary)[0] == 0
    code, out, err = run([str(exports["b"]), "--load-state", str(state), "-n", "3"], capsysbinary)
    assert code == EXIT_CODES["UsageError"] and "belongs to another model" in err and out == b""
    blob = bytearray(state.read_bytes())
    blob[200] ^= 0xFF
    state.write_bytes(bytes(blob))
    code, out, err = run([str(exports["a"]), "--load-state", str(state), "-n", "3"], capsysbinary)
    assert code == EXIT_CODES["UsageError"] and "corrupt" in err
    (tmp_path / "text.state").write_text("hello")
    code, _, err = run([str(exports["a"]), "--load-state", str(tmp_path / "text.state")], capsysbinary)
    assert code == EXIT_CODES["UsageError"] and "not a gla-export state file" in err


@pytest.mark.parametrize("command", ["generate", "verify", "bench"])
def test_a_broken_export_is_a_model_error(command, exports, tmp_path, capsysbinary):
    import shutil

    def attempt(d: Path) -> tuple[int, str]:
        try:
            main([command, str(d), *(["-p", "x"] if command == "generate" else [])])
        except SystemExit as e:
            return int(e.code or 0), capsysbinary.readouterr().err.decode()
        return 0, capsysbinary.readouterr().err.decode()

    for broken in ("metadata", "graph"):
        d = tmp_path / broken
        shutil.copytree(exports["a"], d)
        if broken == "metadata":
            (d / "metadata.json").write_text('{"format": "gla-export", "files": ')
        else:
            (d / "step.onnx").unlink()
        code, err = attempt(d)
        assert code == EXIT_CODES["ModelError"], err
        assert (("cannot read" in err and "metadata.json" in err) if broken == "metadata" else "step.onnx is missing" in err), err
    code, err = attempt(tmp_path / "nothing")
    assert code == EXIT_CODES["UsageError"] and "not an export directory" in err


def test_errors_and_exit_codes(exports, tmp_path, capsysbinary):
    code, _, err = run([str(tmp_path), "-p", "x"], capsysbinary)
    assert code == EXIT_CODES["UsageError"] and "not an export directory" in err
    code, _, err = run([str(exports["a"]), "-p", "x", "--prompt-ids", "1"], capsysbinary)
    assert code == EXIT_CODES["UsageError"] and "not both" in err
    code, _, err = run([str(exports["a"]), "--prompt-ids", "1,999"], capsysbinary)
    assert code == EXIT_CODES["UsageError"] and "999" in err and "[0, 258)" in err
    code, _, err = run([str(exports["a"]), "-p", "x", "--top-p", "0"], capsysbinary)
    assert code == 2 and "top-p" in err
    code, _, err = run([str(exports["a"]), "-p", "x", "-b", "trt"], capsysbinary)
    assert code == EXIT_CODES["UsageError"] and "gla-export build" in err
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers() or not torch.cuda.is_available():
        code, _, err = run([str(exports["a"]), "-p", "x", "-b", "ort-cuda"], capsysbinary)
        assert code == EXIT_CODES["MissingRuntimeError"] and ("onnxruntime-gpu" in err or "CUDA GPU" in err)


def test_ctrl_c_saves_a_state_that_resumes_exactly(exports, tmp_path):
    """A real SIGINT in the middle of a long generation: exit 130, the state saved, and the
    resumed text continues the interrupted one as if nothing had happened."""
    state = tmp_path / "c.state"
    cmd = [sys.executable, "-c", "from gla_export.cli import main; main()", "generate", str(exports["a"]), "--threads", "1",
           "-p", "Hello", "-n", "1000000", "--ignore-eos", "--output-ids", "--save-state", str(state)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    # unbuffered: communicate() reads the pipe itself and would miss what a buffered readline() had taken in
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0)
    got = []
    deadline = time.monotonic() + 120
    while len(got) < 50 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        got.append(int(line))
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    got += [int(x) for x in rest.split()]
    assert proc.returncode == 130, err.decode()[-2000:]
    assert state.is_file() and "stopped: interrupted" in err.decode()
    header = read_state_header(state)
    assert header["generated"] == len(got) and header["pending_token"] == got[-1]
    dec = StatefulDecoder(exports["a"], threads=1)
    whole = dec.generate("Hello", max_new_tokens=len(got) + 10, ignore_eos=True).run()[0].tokens
    from gla_export.runtime.state import load_state

    resumed = dec.generate(states=load_state(state, identity=dec.identity), max_new_tokens=10, ignore_eos=True).run()[0].tokens
    assert got + resumed == whole


def test_interactive_chat_is_one_conversation(exports, tmp_path, capsysbinary, monkeypatch):
    import io

    state = tmp_path / "chat.state"
    monkeypatch.setattr(sys, "stdin", io.StringIO("In the beginning\n\n and then\n"))
    code, out, err = run([str(exports["a"]), "-i", "-n", "6", "--ignore-eos", "--save-state", str(state)], capsysbinary)
    assert code == 0, err
    dec = StatefulDecoder(exports["a"], threads=1)
    turns, st = [], None
    for prompt in ("In the beginning", None, " and then"):
        r = dec.generate(prompt, states=st, max_new_tokens=6, ignore_eos=True).run()[0]
        turns.append(r.text_bytes)
        st = r.state
    assert out == b"".join(turns)
    assert err.count("stopped: length") == 3 and read_state_header(state)["generated"] == 18
