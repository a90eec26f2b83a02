"""e3rl.core is pure math: importing it must not import Ray or DeepSpeed (checked in a fresh process)."""
import subprocess
import sys


def test_core_imports_neither_ray_nor_deepspeed():
    code = (
        "import sys, importlib, pkgutil, e3rl.core as c\n"
        "for m in pkgutil.iter_modules(c.__path__): importlib.import_module('e3rl.core.' + m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
