"""What the main job imports: mindone (about 9 s to import) and transformers (2-3 s, and torch with it
where torch is installed) only when asked for."""

import json
import subprocess
import sys
from pathlib import Path

JOB = Path(__file__).with_name("main_job_modules.py")


def test_the_main_job_imports_neither_mindone_nor_transformers(tmp_path):
    result = subprocess.run([sys.executable, str(JOB), "--save_path", str(tmp_path), "--num_inference_steps", "2",
                             "--image_size", "64", "64", "--no_compile_cache"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert imported == {"mindone": False, "transformers": False, "torch": False, "diffusers": False}, imported
    assert (tmp_path / "fbcache_0.png").is_file()


def test_importing_the_pipeline_imports_neither():
    code = ("import sys; sys.path.insert(0, %r); import pipeline_flux; "
            "print(sorted(m for m in ('mindone', 'transformers', 'torch') if m in sys.modules))") % str(JOB.parents[1])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
