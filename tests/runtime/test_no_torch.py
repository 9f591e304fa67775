"""The runtime must work in an install without torch/transformers (what runs on the device)."""

from tests.conftest import BLOCK_TORCH, REPO


def test_runtime_modules_import_and_work_without_torch():
    import subprocess
    import sys

    code = BLOCK_TORCH + (
        "import numpy as np\n"
        "import megaedge.runtime.audio as a, megaedge.runtime.features as f, megaedge.runtime.routing as r\n"
        "import megaedge.runtime.text as t\n"
        "x = a.load(np.zeros(48000, dtype=np.float32), rate=48000)\n"
        "feats = f.asr_log_mel(x)\n"
        "assert feats.mel.shape == (128, 100) and feats.num_audio_tokens == 13\n"
        "assert f.router_log_mel(x).shape == (80, 101)\n"
        "assert t.parse_asr_output('language English<asr_text>open valve').text == 'open valve'\n"
        "assert len(r.windows(600 * 16000)) == 20\n"
        "import sys; assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
