"""The INT8 recipe advice follows the CPU flags: doctor's recommendation and the load-time warning (flags faked)."""

from __future__ import annotations

import json
import logging

import pytest

from megaedge.runtime import machine
from megaedge.runtime.recipe_advice import advise, cpu_class
from tests.conftest import int8_bundle_from, run_cli

FLAGS = {
    "amx": ({"avx2", "avx512f", "avx512_vnni", "amx_int8"}, "x86_64"),
    "avx512-vnni": ({"avx2", "avx512f", "avx512_vnni"}, "x86_64"),
    "avx-vnni": ({"avx2", "avx_vnni"}, "x86_64"),
    "avx2": ({"avx2", "fma"}, "x86_64"),
    "portable": ({"sse4_2"}, "x86_64"),
    "arm-dotprod": ({"asimd", "asimddp"}, "aarch64"),
    "arm": ({"asimd"}, "aarch64"),
}


@pytest.mark.parametrize("expected", list(FLAGS))
def test_cpu_class_from_flags(expected):
    flags, arch = FLAGS[expected]
    assert cpu_class(flags, arch) == expected


FE = "cpu-float-encoder"


@pytest.mark.parametrize("klass,recommended", [("amx", FE), ("avx512-vnni", FE), ("avx-vnni", FE),
                                               ("arm-dotprod", FE), ("avx2", "cpu-prefill"),
                                               ("arm", "cpu-prefill"), ("portable", "cpu-prefill")])
def test_recommendation_per_class(klass, recommended):
    assert advise(None, klass).recommended == recommended
    assert advise(recommended, klass).problem is None


def test_the_export_default_is_what_int8_dot_product_cpus_are_told_to_export():
    from megaedge.export.quantize import Int8Recipe

    assert Int8Recipe.for_target("cpu").name == advise(None, "avx512-vnni").recommended == FE
    assert advise(FE, "avx2").problem.startswith("slow")  # no prefill graph: AVX2 is told cpu-prefill


def test_what_is_wrong_where():
    assert advise("cpu", "avx2").problem.startswith("slow")
    assert advise("cpu", "amx").problem is None  # the int8 encoder: a documented trade, not a warning
    assert advise("cpu-prefill", "amx").problem is None  # a second weight copy, but not slow or inaccurate
    for recipe in ("naive", "smoothquant", "tensorrt"):
        assert advise(recipe, "amx").problem.startswith("inaccurate")
    assert advise("cpu-int4", "avx2").problem is None  # it carries the prefill graph


def _fake(monkeypatch, klass):
    flags, arch = FLAGS[klass]
    monkeypatch.setattr(machine, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr("platform.machine", lambda: arch)


@pytest.fixture(scope="module")
def int8_cpu_bundle(tiny_bundles, tmp_path_factory):
    return int8_bundle_from(tiny_bundles["merged"], tmp_path_factory.mktemp("advice"))


def _load_warnings(bundle, caplog):
    from megaedge.runtime.transcriber import Transcriber

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megaedge"):
        Transcriber.from_bundle(bundle, decode="ort", stem="ort", verify=False)
    return [r.getMessage() for r in caplog.records if r.name == "megaedge.runtime.recipe_advice"]


def test_loading_warns_once_where_the_recipe_does_not_suit(int8_cpu_bundle, monkeypatch, caplog):
    _fake(monkeypatch, "avx2")
    assert _load_warnings(int8_cpu_bundle, caplog) == [
        "this bundle's INT8 recipe 'cpu' is slow (no prefill graph, and this CPU has no int8 dot products for "
        "megaedge's prompt kernel) on this CPU (avx2); export with --int8 --recipe cpu-prefill for it"]
    _fake(monkeypatch, "avx512-vnni")
    assert _load_warnings(int8_cpu_bundle, caplog) == []


def test_fp32_bundles_get_no_advice(tiny_bundles, monkeypatch, caplog):
    _fake(monkeypatch, "avx2")
    assert _load_warnings(tiny_bundles["merged"], caplog) == []


FAKE_AVX2 = ("import megaedge.runtime.machine as m, platform\n"
             "m.cpu_flags = lambda: {'avx2'}\n"
             "platform.machine = lambda: 'x86_64'\n")
FAKE_AMX = FAKE_AVX2.replace("{'avx2'}", "{'avx2', 'avx512_vnni', 'amx_int8'}")


def test_doctor_names_the_recipe_for_this_cpu(int8_cpu_bundle):
    avx2 = run_cli("doctor", "--bundle", str(int8_cpu_bundle), python_prelude=FAKE_AVX2)
    assert avx2.returncode == 0, avx2.stderr
    lines = avx2.stdout.splitlines()
    assert "int8 recipe  cpu-prefill for this CPU (avx2): megaedge export --int8 --recipe cpu-prefill" in lines
    assert any(line.startswith("bundle recipe cpu: WARNING slow") and line.endswith("--recipe cpu-prefill")
               for line in lines), avx2.stdout
    amx = run_cli("doctor", "--json", "--bundle", str(int8_cpu_bundle), python_prelude=FAKE_AMX)
    report = json.loads(amx.stdout)
    assert report["int8_recipe"] == {"recipe": None, "cpu_class": "amx", "recommended": FE, "problem": None}
    assert report["bundle_recipe"]["recipe"] == "cpu" and report["bundle_recipe"]["problem"] is None
