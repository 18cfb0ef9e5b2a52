"""The full-size SDXL UNet (2,567,463,684 parameters, random in every one) against PyTorch
diffusers' UNet2DConditionModel at one 32×32 latent, float32, through our converter
(tools/parity_sdxl.py; its own process: ~12 GiB at the peak, returned to the system at exit).
Measured 2026-12-07: max |Δ| / max |torch| 4.7e-6 at t = 999, 4.9e-6 at t = 500."""
import json
import subprocess
import sys


def test_the_full_size_unet_matches_diffusers_at_a_small_latent():
    proc = subprocess.run([sys.executable, "-m", "sdxl_jax.tools.parity_sdxl", "--latent", "32",
                           "--timesteps", "999,500"], capture_output=True, text=True, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, proc.stderr[-3000:]
    out = json.loads(lines[-1])
    assert out["unet_params"] == 2_567_463_684
    assert [r["t"] for r in out["rows"]] == [999.0, 500.0]
    assert all(r["ratio"] <= 1e-5 and r["max_abs_torch"] > 0.1 for r in out["rows"]), out["rows"]
    assert proc.returncode == 0
