"""Profiles are typed: the built-in ones load, and every mistake is one line naming the key's path."""

from importlib import resources

import pytest
import yaml

from bench_suite.errors import BadInputError, UnknownNameError
from bench_suite.options import parse_set
from bench_suite.profiles import load_profile, parse_profile, profile_names


@pytest.mark.parametrize("name", profile_names())
def test_builtin_profiles_load(name):
    p = load_profile(name)
    assert p.name == name and p.seeds and p.tables and p.datasets
    for t in p.tables:
        for d in p.table(t).cells:
            assert d in p.datasets


@pytest.mark.parametrize("change,message", [
    (lambda d: d["tables"]["1"]["cells"]["mnist"].append("x"), "tables.1.cells.mnist[3] must be a number, got 'x'"),
    (lambda d: d.pop("seeds"), "seeds is required"),
    (lambda d: d["datasets"]["mnist"]["pool"].update(limt=3), "unknown key(s) datasets.mnist.pool.limt"),
    (lambda d: d["tables"]["6"]["cells"]["mnist"].append(2.0), "tables.6: ratio 2.0 for mnist is not in (0, 1]"),
    (lambda d: d["encoder"].update(pooling="max"), "encoder.pooling must be one of"),
    (lambda d: d["tables"]["5"]["methods"][0].update(confg={}), "unknown key(s) tables.5.methods[0].confg"),
    (lambda d: d.update(seeds="0,1"), "seeds must be a list"),
])
def test_mistakes_name_the_key(change, message):
    data = yaml.safe_load(resources.files("bench_suite.profiles").joinpath("cpu.yaml").read_text())
    change(data)
    with pytest.raises(BadInputError) as err:
        parse_profile(data, "profile cpu")
    assert str(err.value).startswith("profile cpu: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_profile_and_lookups():
    with pytest.raises(UnknownNameError, match="unknown profile 'nope'; known: cpu, paper"):
        load_profile("nope")
    p = load_profile("cpu")
    with pytest.raises(UnknownNameError, match="unknown dataset of profile cpu 'cifar10'"):
        p.dataset("cifar10")
    with pytest.raises(BadInputError, match="no settings for table 9"):
        p.table("9")


def test_one_set_parser():
    assert parse_set(["iters=300", "lr=1e-3", "progress=false", "crop_scale=[0.08, 1.0]", "init=fps",
                      "max-points=null"]) == {"iters": 300, "lr": 0.001, "progress": False, "crop_scale": [0.08, 1.0],
                                              "init": "fps", "max_points": None}
    with pytest.raises(BadInputError, match="--set expects key=value, got 'iters'"):
        parse_set(["iters"])


def test_reports_list_what_a_profile_scales_down_from_the_resolved_options():
    """The setting note lists each method option set away from its original, generated from the resolved
    options: VAAL's width and epochs in the cpu profile; not a row's own variable (Table 6's tau), not how a
    method runs (device, threads), not the AL schedule (the table's protocol)."""
    from bench_suite.tables.grid import departure_lines

    cpu = load_profile("cpu")
    lines = "\n".join(departure_lines(cpu, "1"))
    assert "VAAL: `vae_width` 8 (original 128), `vae_epochs` 1 (original 100)" in lines
    assert "TA-VAAL: `vae_width` 8 (original 128), `vae_epochs` 1 (original 100)" in lines
    assert "init_ratio" not in lines and "device" not in lines
    assert "scaled down" in lines
    assert departure_lines(cpu, "6") == [
        "- Methods: every option at its original value (the method's paper / released code)."]
    edited = cpu.to_dict()
    edited["methods"]["activeft"] = {"iters": 50, "threads": 1, "device": "cpu"}
    lines = "\n".join(departure_lines(parse_profile(edited, "edited"), "6"))
    assert "ActiveFT: `iters` 50 (original 300)" in lines and "threads" not in lines and "temperature" not in lines
    paper = "\n".join(departure_lines(load_profile("paper"), "1"))
    assert "ActiveFT on imagenet: `iters` 100 (original 300)" in paper and "scaled down" not in paper


def test_a_profile_extends_another(tmp_path):
    """``extends: paper``: the file's keys deep-merge over the paper profile's; the result is reported as
    scaled down (a trimmed paper profile is not the paper's setting) unless it says otherwise."""
    f = tmp_path / "paper_seed0.yaml"
    f.write_text("extends: paper\nseeds: [0]\nmethods:\n  activeft: {iters: 30}\n"
                 "tables:\n  '7':\n    cells: {imagenet: [0.05]}\n")
    p = load_profile(str(f))
    paper = load_profile("paper")
    assert p.name == "paper_seed0" and p.seeds == [0] and p.scaled_down and not paper.scaled_down
    assert p.methods["activeft"] == {**paper.methods["activeft"], "iters": 30}  # merged key by key
    assert p.table("7").cells == {"imagenet": [0.05]} and p.table("7").methods == paper.table("7").methods
    assert p.datasets == paper.datasets and p.table("1") == paper.table("1")
    cycle = tmp_path / "a.yaml"
    cycle.write_text(f"extends: {cycle}\n")
    with pytest.raises(BadInputError, match="in a cycle"):
        load_profile(str(cycle))
