"""Run the README's main job in this process (shortened), then print which heavy libraries it imported,
as one JSON line: tests/test_imports.py checks that neither mindone nor transformers (nor torch through it)
are among them."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import run_flux_withFBCache_pipeline  # noqa: E402

run_flux_withFBCache_pipeline.main(sys.argv[1:])
print(json.dumps({name: name in sys.modules for name in ("mindone", "transformers", "torch", "diffusers")}))
