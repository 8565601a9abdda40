"""`qlora-kernels demo`: a short run end to end (table, plot, finite and matching losses) and the CLI's errors."""
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from qlora_kernels import _backend, cli  # noqa: E402
from qlora_kernels.demo import DemoError, run_demo  # noqa: E402

# the kernels are interpreter objects only if TRITON_INTERPRET=1 when they were imported (conftest: no GPU)
KERNELS_INTERPRETED = _backend.interpreting()


def test_demo_short_run(tmp_path, monkeypatch):
    # the demo's own path on CPU is the C++ extension: no Triton interpreter (conftest turns it on for the ops)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = io.StringIO()
    res = run_demo(steps=12, out_dir=str(tmp_path), device="cpu", progress=False, out=out)
    text = out.getvalue()
    assert "| run | final loss | step time (ms) | tokens/s | step peak memory (MiB, CPU tensors, profiler) |" in text
    assert "| qlora_kernels |" in text and "| reference (PyTorch) |" in text
    assert "MAE $" in text and "before fine-tuning" in text
    png = tmp_path / "demo_loss.png"
    assert res["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in res["runs"]:
        assert len(run.losses) == 12 and all(math.isfinite(v) for v in run.losses)
        assert run.step_s > 0 and run.tokens_per_s > 0 and run.peak_mib > 0
    ours, ref = res["runs"]
    assert ours.losses[0] == pytest.approx(ref.losses[0], rel=1e-5)     # same model, batch and dropout masks
    assert res["relative_difference"] < 0.01
    assert ours.losses[-1] < ours.losses[0]                             # it learns


def test_cpu_step_peak_counts_tensors_not_heap_growth():
    """The demo's CPU memory column: the live tensor bytes of a step, the same whether or not the heap already
    holds the memory (RSS growth read ~0 for whichever run came second)."""
    from qlora_kernels.demo import _cpu_step_peak

    def step():
        a = torch.ones(2**20)             # 4 MiB
        b = torch.ones(2**21)             # 8 MiB, both live
        del a, b
        c = torch.ones(2**20)             # 4 MiB after both were freed: no new peak
        return c

    for _ in range(2):                    # the second call finds the heap already grown
        assert 12 * 2**20 <= _cpu_step_peak(step) < 12.1 * 2**20


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "expected a positive integer"),
    (["--steps", "ten"], "expected a positive integer"),
    (["--device", "tpu"], "invalid choice"),
    (["--threads", "-1"], "expected a positive integer"),
    (["--lr", "nan"], "expected a positive number"),
    (["--bogus"], "unrecognized arguments"),
    (["--seed", str(2**64)], "seed must be an integer in [0, 2**64)"),
    (["--seed", "-3"], "seed must be an integer in [0, 2**64)"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_cli_unreadable_model(tmp_path, capsys):
    assert cli.main(["demo", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qlora-kernels demo: error: cannot read model") and len(err.splitlines()) == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    assert cli.main(["demo", "--model", str(bad)]) == 2                 # a directory without config.json
    assert "no config.json" in capsys.readouterr().err
    (bad / "config.json").write_text("{not json")
    assert cli.main(["demo", "--model", str(bad), "--out", str(tmp_path)]) == 2   # the loader's failure, one line
    err = capsys.readouterr().err.strip()
    assert err.startswith("qlora-kernels demo: error: cannot load a causal LM") and len(err.splitlines()) == 1


def test_cli_model_with_a_smaller_vocabulary_than_its_tokenizer(tmp_path, capsys):
    import transformers
    from test_patch import _tokenizer

    cfg = transformers.LlamaConfig(vocab_size=10, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    _tokenizer().save_pretrained(tmp_path)
    capsys.readouterr()
    assert cli.main(["demo", "--model", str(tmp_path), "--out", str(tmp_path), "--steps", "1"]) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if "qlora-kernels demo:" in line]
    assert len(ours) == 1 and "past the model's 10 embedding rows" in ours[0]


@pytest.mark.parametrize("argv,message", [(["bench", "foo"], "invalid choice: 'foo'"), ([], "required: command"),
                                          (["frob"], "invalid choice: 'frob'"),
                                          (["bench", "nf4", "extra"], "unrecognized arguments: extra")])
def test_cli_argument_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_bench_unwritable_out(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("")
    assert cli.main(["bench", "adamw", "--quick", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qlora-kernels bench: error: cannot write results to") and len(err.splitlines()) == 1


def test_demo_bad_values(tmp_path):
    with pytest.raises(DemoError, match="steps must be > 0"):
        run_demo(steps=0, out_dir=str(tmp_path), device="cpu", progress=False, out=io.StringIO())
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DemoError, match="larger than the training set"):
        run_demo(steps=1, batch_size=10**6, out_dir=str(tmp_path), device="cpu", progress=False, out=io.StringIO())
    if not torch.cuda.is_available():
        with pytest.raises(DemoError, match="no CUDA device"):
            run_demo(steps=1, out_dir=str(tmp_path), device="cuda", progress=False, out=io.StringIO())
    with pytest.raises(DemoError, match="cannot create output directory"):
        run_demo(steps=1, out_dir=str(blocker / "sub"), device="cpu", progress=False, out=io.StringIO())


def test_console_script_exit_code(tmp_path):
    """The installed entry point: unreadable --model is one line on stderr and exit code 2."""
    proc = subprocess.run([sys.executable, "-m", "qlora_kernels.cli", "demo", "--model", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"qlora-kernels demo: error: cannot read model at "
                                                f"'{tmp_path / 'x'}': no such directory"]


def test_cpu_step_peak_prints_nothing():
    """The profiled step writes nothing to stderr (kineto's start/stop lines, the allocator's one-time warning
    when a tensor made before the profiler is freed inside it): on a terminal they would cut the progress bar."""
    code = ("import torch\nfrom qlora_kernels.demo import _cpu_step_peak\nold = [torch.ones(1000)]\n"
            "print(_cpu_step_peak(lambda: old.pop()) >= 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-2000:]
    assert proc.stderr == ""


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_reference_layer_drops_what_ours_drops(interpret, monkeypatch):
    """The demo's reference LoRA forward draws the same dropout mask as the op (Triton's Philox or the CPU
    generator), so the two runs see identical dropout."""
    from qlora_kernels.demo import _reference_lora_forward
    from qlora_kernels.nn import LoRALinear4bit

    if interpret == "1" and not KERNELS_INTERPRETED:
        pytest.skip("the kernels were loaded for the GPU: Triton cannot run them on CPU tensors here")
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    layer = LoRALinear4bit.from_linear(torch.nn.Linear(128, 192), 8, 16, 0.25, compute_dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 128)
    torch.manual_seed(7)
    ours = layer(x)
    torch.manual_seed(7)
    ref = _reference_lora_forward(layer, x)
    torch.manual_seed(8)
    other = _reference_lora_forward(layer, x)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert (ours - other).abs().max() > 1e-2


@pytest.mark.parametrize("suite", list(cli.SUITES))
def test_bench_quick_writes_table_and_plot(suite, tmp_path, monkeypatch, capfd):
    """`qlora-kernels bench <suite> --quick`: every provider that exists here runs (none prints a failure), and
    the suite writes its JSON, markdown table and PNG plot, so a GPU run never finds a broken script."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")    # CPU paths: the interpreter would take minutes per suite
    assert cli.main(["bench", suite, "--quick", "--out", str(tmp_path)]) == 0
    printed = capfd.readouterr().out
    assert " failed: " not in printed and "plot failed" not in printed
    stem = cli.SUITES[suite].removeprefix("bench_")
    rows = json.loads((tmp_path / f"{stem}.json").read_text())["rows"]
    assert rows and all("provider" in row for row in rows)
    assert (tmp_path / f"{stem}.md").read_text().count("\n|") >= len(rows) + 1
    assert (tmp_path / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rows_are_saved_as_they_come(tmp_path):
    """A suite cut by the GPU run's time limit keeps what it measured: every appended row is on disk at once,
    marked partial until the final table replaces it."""
    from argparse import Namespace

    from benchmarks import harness

    args = Namespace(out=str(tmp_path), quick=True)
    rows = harness.Rows("adamw", args)
    rows.append({"set": "lite", "provider": "ours", "ms": 1.0})
    rows += [{"set": "lite", "provider": "torch", "ms": 2.0}]
    assert len(json.loads((tmp_path / "adamw.json").read_text())["rows"]) == 2
    assert "PARTIAL" in (tmp_path / "adamw.md").read_text()
    harness.write_results("adamw", rows, args)
    assert "PARTIAL" not in (tmp_path / "adamw.md").read_text()
    assert len(json.loads((tmp_path / "adamw.json").read_text())["rows"]) == 2


def test_model_whose_logits_are_not_the_head_output(tmp_path, capsys):
    """--model with logits scaled after the LM head (Granite's logits_scaling): our loss would compute another
    objective than the reference's, so the demo refuses it in one line."""
    import transformers
    from test_patch import _tokenizer

    cfg = transformers.GraniteConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, logits_scaling=8.0)
    transformers.GraniteForCausalLM(cfg).save_pretrained(tmp_path)
    _tokenizer().save_pretrained(tmp_path)
    capsys.readouterr()                          # save_pretrained's progress bars
    assert cli.main(["demo", "--model", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err       # transformers' loading bar may come first
    ours = [line for line in err.splitlines() if "qlora-kernels demo:" in line]
    assert len(ours) == 1 and "GraniteForCausalLM is not a supported causal LM" in ours[0], err


def test_kernel_profile_quick(tmp_path, monkeypatch):
    """benchmarks/kernel_profile.py (the GPU run's PROFILE=1 step) runs end to end on its CPU shapes: every case
    has ours and the peer, and each provider's listed ops add up to at most its total."""
    from benchmarks import kernel_profile

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(sys, "argv", ["kernel_profile", "--quick", "--out", str(tmp_path)])
    kernel_profile.main()
    rows = json.loads((tmp_path / "kernel_profile.json").read_text())["rows"]
    assert not [row for row in rows if "error" in row]
    totals = {(row["case"], row["provider"]): row for row in rows if row["kernel"] == "(all ops)"}
    assert len(totals) == 6 and len({case for case, _ in totals}) == 3
    for (case, provider), total in totals.items():
        parts = [row for row in rows if (row["case"], row["provider"]) == (case, provider) and row is not total]
        listed = [row["us"] for row in parts if not row["kernel"].endswith(" others)")]
        assert total["wall ms"] > 0 and listed == sorted(listed, reverse=True) and max(listed) < total["us"]
    # each table profiled its own provider: the peer's step runs bitsandbytes' 4-bit matmuls, ours our Function
    names = lambda case, provider: " ".join(row["kernel"] for row in rows  # noqa: E731
                                            if (row["case"], row["provider"]) == (case, provider))
    e2e = next(case for case, _ in totals if case.startswith("e2e"))
    assert "bitsandbytes" in names(e2e, "bnb+peft+torch") and "NF4LoRALinear" in names(e2e, "qlora_kernels")
