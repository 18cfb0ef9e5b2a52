"""The GPU benchmark's code path on CPU (tiny preset, one setting): it runs the trainer's program,
measures, and reports the figures it promises."""
import numpy as np


def test_sweep_runs_the_trainers_step_and_reports_figures(tmp_path, capsys):
    from sdxl_jax.tools import bench
    out = tmp_path / "sweep.md"
    bench.main(["--models", "micro", "--backend", "cpu", "--batches", "1", "--side", "64",
                "--steps", "2", "--variants", "none/standard", "--markdown", str(out)])
    printed = capsys.readouterr().out
    assert "batch  1 | remat none   | attention standard" in printed and "samples/s" in printed
    table = out.read_text().splitlines()
    assert table[0].startswith("micro at 64², jax ") and len(table) == 5
    cells = [c.strip() for c in table[4].strip("|").split("|")]
    ms, samples = float(cells[3]), float(cells[4])
    assert ms > 0 and np.isclose(samples, 1000.0 / ms, rtol=1e-2)  # batch 1: samples/s = 1/step
    assert float(cells[5]) > 0  # model TFLOP/s from XLA's cost analysis
