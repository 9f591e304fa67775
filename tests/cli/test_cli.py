import json

import pytest

from megaedge.cli.main import COMMANDS, build_parser
from tests.conftest import BLOCK_TORCH, run_cli, speechlike


def test_every_command_has_help():
    parser = build_parser()
    names = [a for a in parser._subparsers._group_actions[0].choices]
    assert len(names) == len(COMMANDS)
    for name in names:
        result = run_cli(name, "--help")
        assert result.returncode == 0 and "usage: megaedge" in result.stdout, result.stderr


def test_doctor_runs_with_torch_unimportable():
    result = run_cli("doctor", "--json", python_prelude=BLOCK_TORCH)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["onnxruntime"]["available_providers"]
    assert report["cpu"]["logical_cores"] >= 1 and report["memory"]["total_gib"] > 0
    human = run_cli("doctor", python_prelude=BLOCK_TORCH)
    assert human.returncode == 0 and "onnxruntime" in human.stdout


def test_export_commands_say_which_extra_is_missing(tmp_path):
    result = run_cli("merge", "x", "--out", "y", python_prelude=BLOCK_TORCH)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "megaedge merge: error: this command needs the 'export' extra (module 'torch' is not installed): "
        "pip install 'megaedge[export]'"
    ]
    assert run_cli("merge", "--help", python_prelude=BLOCK_TORCH).returncode == 0
    for module in ("jiwer", "onnxscript"):  # the INT8 report's WER, the exporter: found missing before any work
        out = tmp_path / module
        result = run_cli("export", "--out", str(out), "--int8",
                         python_prelude=f"import sys\nsys.modules[{module!r}] = None\n")
        assert result.returncode == 1 and not out.exists()
        assert result.stderr.strip().splitlines() == [
            f"megaedge export: error: this command needs the 'export' extra (module '{module}' is not installed): "
            "pip install 'megaedge[export]'"]


def test_merge_writes_a_checkpoint_transformers_loads(tiny_mega, tmp_path):
    import torch
    from transformers import Qwen3ASRForConditionalGeneration

    from megaedge.export.loader import load_checkpoint
    from tests.export.helpers import prompt_logits

    out = tmp_path / "merged"
    result = run_cli("merge", str(tiny_mega), "--out", str(out))
    assert result.returncode == 0, result.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*.safetensors")}
    assert modes and set(modes.values()) == {0o644}, modes  # safetensors writes 0600
    plain = Qwen3ASRForConditionalGeneration.from_pretrained(str(out)).eval()
    ours = load_checkpoint(tiny_mega, lora="merge")
    audio = speechlike(1.0, seed=11)
    reloaded = load_checkpoint(out, lora="none")
    assert reloaded.router is not None  # carried along in audio_quality_router/
    ref = prompt_logits(ours, audio)
    assert torch.equal(prompt_logits(reloaded, audio), ref)
    ours.model = plain
    assert torch.equal(prompt_logits(ours, audio), ref)
    again = run_cli("merge", str(tiny_mega), "--out", str(out))
    assert again.returncode == 1 and "not empty; pass --force" in again.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("reference", "{tmp}/nope", "{tmp}/a.wav"), "a.wav: no such file"),
        (("reference", "{tmp}", "{wav}"), "unknown checkpoint layout"),
        (("merge", "{tmp}/absent", "--out", "{tmp}/o"), "no such checkpoint directory"),
    ],
)
def test_user_errors_are_one_line_and_exit_1(tmp_path, args, message):
    import soundfile as sf

    wav = tmp_path / "ok.wav"
    sf.write(wav, speechlike(0.5), 16000)
    filled = [a.format(tmp=tmp_path, wav=wav) for a in args]
    result = run_cli(*filled)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_reference_cli_prints_json(tiny_mega, tmp_path):
    import soundfile as sf

    wav = tmp_path / "clip.wav"
    sf.write(wav, speechlike(1.0, seed=5), 16000)
    result = run_cli("reference", str(tiny_mega), str(wav), "--json", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["route"] in ("base", "merged") and len(doc["token_ids"]) <= 4 and 0 <= doc["degraded_prob"] <= 1


def test_export_help_lists_every_int8_recipe():
    from megaedge.cli import export
    from megaedge.export.quantize import RECIPES

    assert set(export.RECIPE_NAMES) == set(RECIPES)


def test_a_reader_that_stops_reading_ends_the_command_quietly():
    """`megaedge ... | head -1`: the closed pipe ends the command with exit 1 and no traceback."""
    import os
    import subprocess
    import sys

    prelude = ("import megaedge.cli.doctor as doctor\n"
               "def run(args):\n"
               "    for i in range(10**6):\n"
               "        print('line', i, flush=True)\n"
               "doctor.run = run\n")
    code = f"{prelude}\nimport sys\nfrom megaedge.cli.main import main\nsys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "doctor"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.stdout.read(20).startswith(b"line 0")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_global_options_after_the_command():
    """`megaedge export --no-progress ...` was 'unrecognized arguments': -v and --no-progress go either side."""
    parser = build_parser()
    for argv in (["doctor", "--no-progress", "-vv"], ["--no-progress", "-vv", "doctor"]):
        args = parser.parse_args(argv)
        assert (args.no_progress, args.verbose) == (True, 2), argv
    assert (parser.parse_args(["doctor"]).no_progress, parser.parse_args(["doctor"]).verbose) == (False, 0)


def test_a_broken_pipe_of_the_commands_own_is_not_hidden():
    """Only the reader of stdout going away ends a command quietly; another broken pipe is a failure to see."""
    prelude = ("import megaedge.cli.doctor as doctor\n"
               "def run(args):\n"
               "    raise BrokenPipeError(32, 'a socket of its own')\n"
               "doctor.run = run\n")
    result = run_cli("doctor", python_prelude=prelude)
    assert result.returncode == 1 and "BrokenPipeError" in result.stderr and "a socket of its own" in result.stderr


def test_merge_refuses_its_own_input_and_a_router_that_is_not_safetensors(tiny_mega, tmp_path):
    """`merge SRC --out SRC --force` wrote into the checkpoint, then crashed (SameFileError); --router took any
    file and copied it under a .safetensors name."""
    before = sorted(p.name for p in tiny_mega.rglob("*"))
    inside = run_cli("merge", str(tiny_mega), "--out", str(tiny_mega), "--force")
    assert inside.returncode == 1 and inside.stderr.strip().splitlines() == [
        f"megaedge merge: error: --out {tiny_mega}: overlaps the checkpoint {tiny_mega}; merging there would "
        "overwrite the input; choose a new folder"]
    assert sorted(p.name for p in tiny_mega.rglob("*")) == before
    note = tmp_path / "router.json"
    note.write_text("{}")
    bad = run_cli("merge", str(tiny_mega), "--out", str(tmp_path / "m"), "--router", str(note))
    assert bad.returncode == 1 and "not a safetensors file" in bad.stderr and len(bad.stderr.splitlines()) == 1
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("raised, line", [
    ("OSError(28, 'No space left on device', '/data/out')", "/data/out: No space left on device"),
    ("FileNotFoundError(2, 'No such file or directory', '/proc/x')", "/proc/x: No such file or directory"),
    ("OSError('Error no file named model.safetensors found in directory ckpt.')",
     "Error no file named model.safetensors found in directory ckpt."),
])
def test_an_os_error_is_one_line_with_the_path(raised, line):
    """`make-test-model /proc/x` and a checkpoint missing its shard index ended in tracebacks."""
    prelude = ("import megaedge.cli.doctor as doctor\n"
               f"def run(args):\n    raise {raised}\n"
               "doctor.run = run\n")
    result = run_cli("doctor", python_prelude=prelude)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [f"megaedge doctor: error: {line}"]


def test_reference_route_lora_without_an_adapter_is_refused(tmp_path):
    """`reference --route merged` on a checkpoint without LoRA ran base quietly; lora is transcribe's name."""
    import soundfile as sf

    from megaedge.export.factory import write_checkpoint

    plain = write_checkpoint(tmp_path / "plain", "tiny", "original", seed=0)
    wav = tmp_path / "a.wav"
    sf.write(str(wav), speechlike(1.0, seed=3), 16000)
    result = run_cli("reference", str(plain), str(wav), "--route", "lora")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"megaedge reference: error: --route lora: {plain} has no LoRA adapter to turn on; pass --adapter DIR or "
        "leave --route at auto"]


def test_a_ctrl_c_after_the_command_finished_prints_nothing():
    """A Ctrl-C that lands in the interpreter's clean-up (here a finalizer, as a temporary folder's is) once the
    console command returned: no "Exception ignored" trace."""
    import os
    import subprocess
    import sys

    code = ("import os, signal, sys, time\n"
            "from megaedge.cli.main import console, main\n"
            "class Finalizer:\n"
            "    def __del__(self):\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "        time.sleep(0.2)\n"
            "sys.argv = ['megaedge', 'plan', '/nonexistent/bundle']\n"
            "assert main() == 1 and signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
            "status = console()\n"
            "pending = Finalizer()\n"
            "del pending\n"
            "sys.exit(status)\n")
    import signal

    # A suite started in the background (cmd &) inherits SIGINT ignored, and Python then installs no handler
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 2, proc.stderr  # main(), console()
    assert "Exception ignored" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
