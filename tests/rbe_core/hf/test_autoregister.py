"""``import rbe_core`` alone makes transformers load rbe folders and PEFT wrap rbe layers, in either import order.

Each case runs in a fresh interpreter (what is imported, and in which order, is the point).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rbe_core.hf import quantize

from .conftest import build

CODEC = {"id": "hadamard", "bits": 4}

#: Loads the folder argv[1] and prints how many of its recorded layers came back as rbe layers.
_LOAD = """
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
names = m.config.quantization_config.modules
print(json.dumps({"rbe": sum(type(m.get_submodule(n)).__name__ == "QuantizedLinear" for n in names),
                  "modules": len(names)}))
"""


def _fresh_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env)


def _last_json(res: subprocess.CompletedProcess) -> dict:
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("rbe_llama")
    quantize(build("llama"), CODEC).save_pretrained(path)
    return path


def test_import_rbe_core_is_light_then_transformers_loads_an_rbe_folder(folder):
    code = """
import json, sys
import rbe_core
heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
assert not heavy, f"import rbe_core imported {heavy}"
from transformers import AutoModelForCausalLM
""" + _LOAD
    out = _last_json(_fresh_python(code, str(folder)))
    assert out["modules"] > 0 and out["rbe"] == out["modules"]


def test_the_hf_package_and_the_folder_reader_import_no_torch():
    code = """
import sys
import rbe_core.files, rbe_core.hf, rbe_core.hf.autoregister, rbe_core.hf.folder
heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
assert not heavy, f"importing rbe_core.hf(.folder) imported {heavy}"
assert {"quantize", "QuantizedLinear", "RbeConfig", "register"} <= set(dir(rbe_core.hf))
print("LIGHT")
"""
    res = _fresh_python(code)
    assert res.returncode == 0 and res.stdout.split() == ["LIGHT"], res.stderr[-3000:]


def test_hf_quantize_stays_the_function_next_to_its_module():
    import types

    import rbe_core
    import rbe_core.hf.quantize
    from rbe_core.hf.quantize import set_module

    assert isinstance(rbe_core.hf.quantize, types.FunctionType) and rbe_core.hf.quantize is rbe_core.quantize
    assert sys.modules["rbe_core.hf.quantize"].quantize is rbe_core.hf.quantize and callable(set_module)


def test_transformers_imported_first_then_rbe_core(folder):
    code = """
import json, sys
from transformers import AutoModelForCausalLM, PreTrainedModel
assert "transformers.quantizers.auto" in sys.modules and "rbe_core" not in sys.modules
import rbe_core
""" + _LOAD
    out = _last_json(_fresh_python(code, str(folder)))
    assert out["modules"] > 0 and out["rbe"] == out["modules"]


@pytest.mark.parametrize("peft_first", [False, True], ids=["rbe_core-first", "peft-first"])
def test_peft_dispatches_rbe_layers_after_import_rbe_core_alone(folder, peft_first):
    pytest.importorskip("peft", reason="peft is not installed (pip install 'rbe[hf]')")
    imports = "import peft\nimport rbe_core\n" if peft_first else "import rbe_core\nimport peft\n"
    code = "import json, sys\n" + imports + """
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
print(json.dumps({"wrapped": sorted({type(x).__name__ for n, x in pm.named_modules() if n.endswith(("q_proj", "v_proj"))})}))
"""
    assert _last_json(_fresh_python(code, str(folder))) == {"wrapped": ["RbeLoraLinear"]}


def test_a_failing_registration_warns_and_the_import_goes_on():
    code = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
from rbe_core.hf import autoregister
autoregister.HOOKS["json.tool"] = ("rbe_core.hf.no_such_module", "register")
autoregister.install()
autoregister.install()
import json.tool
print("IMPORTED", sum(isinstance(f, autoregister.Finder) for f in sys.meta_path))
"""
    res = _fresh_python(code)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["IMPORTED", "1"]
    assert "rbe: could not register with json" in res.stderr and "no_such_module" in res.stderr
