"""The package, its selectors and its tuning API import without MONAI, ignite or nibabel; the
bundle-facing names still resolve, on first use. Each check runs in a fresh interpreter, since this
test process has long imported MONAI."""

import json
import subprocess
import sys

HEAVY = ("monai", "ignite", "nibabel")


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_selection_and_tuning_import_no_monai():
    loaded = _run(
        "import json, sys\n"
        "import medseg_peft\n"
        "import medseg_peft.selection, medseg_peft.tuning\n"
        "from medseg_peft.selection import iter_batches\n"
        "for name in medseg_peft.__all__: getattr(medseg_peft, name)\n"
        "medseg_peft.FPS; medseg_peft.attach; medseg_peft.selection.supcon_loss; medseg_peft.tuning.Delta\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    assert loaded == []


def test_bundle_facing_names_load_on_use():
    got = _run(
        "import json, sys\n"
        "import medseg_peft as mp\n"
        "import medseg_peft.workflows\n"
        "import medseg_peft.data.polyp_transforms\n"  # binds the submodule on the package: the function must still win
        "import medseg_peft.workflows.contour_sheet\n"
        "from medseg_peft.data import synthetic_organs\n"  # a submodule by from-import, as before
        "print(json.dumps({'train': callable(mp.workflows.train), 'checkpoints': mp.workflows.Checkpoints.__module__,\n"
        "  'polyp_transforms': type(mp.data.polyp_transforms).__name__, 'contour_sheet': type(mp.workflows.contour_sheet).__name__,\n"
        "  'synthetic_organs': synthetic_organs.__name__, 'export': mp.export.__name__,\n"
        "  'all_data': all(hasattr(mp.data, n) for n in mp.data.__all__), 'all_workflows': all(hasattr(mp.workflows, n) for n in mp.workflows.__all__),\n"
        "  'monai': 'monai' in sys.modules}))"
    )
    assert got == {"train": True, "checkpoints": "medseg_peft.workflows.checkpoints", "polyp_transforms": "function", "contour_sheet": "function",
                   "synthetic_organs": "medseg_peft.data.synthetic_organs", "export": "medseg_peft.export", "all_data": True, "all_workflows": True,
                   "monai": True}
