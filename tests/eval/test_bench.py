"""eval/bench/gpu.py's routing table (c) on the tiny backbone: every method and layout is timed against the bare
UNet, and the markdown holds only the tables that were measured."""
import copy

from eval.bench import gpu


def test_routing_table_times_every_method_and_layout():
    pipe = gpu.backbone("tiny", 64, "cpu", "fp32")
    bare = copy.deepcopy(pipe.unet)
    sources = gpu._random_sources(pipe, 2)
    rows = gpu.routing(pipe, bare, sources, [1, 2], repeats=1, rows=4)
    assert [(r["n"], r["layout"]) for r in rows] == [(1, "interleaved"), (2, "interleaved"), (2, "grouped")]
    for r in rows:
        assert r["bare_s"] > 0 and all(r[f"{m}_s"] > 0 for m in gpu.ROUTING_METHODS)
        assert all(r[f"{m}_overhead"] == r[f"{m}_s"] / r["bare_s"] - 1 for m in gpu.ROUTING_METHODS)
    text = gpu.table({"command": "python -m eval.bench.gpu --tables c", "device": "cpu", "dtype": "float32",
                      "backbone": "tiny", "size": 64, "routing": rows})
    assert "(c) LoRA routing" in text and "(a)" not in text and "(b)" not in text
    assert text.count("| grouped |") == 1 and text.count("| interleaved |") == 2
    assert "segments s" in text.splitlines()[6]


def test_bad_table_or_row_count_is_refused_before_the_backbone_loads(monkeypatch, capsys):
    import pytest

    monkeypatch.setattr(gpu, "backbone", lambda *a, **k: pytest.fail("the backbone loaded before the check"))
    for args, message in ((["--tables", "c,e"], "--tables takes a, b, c, d"),
                          (["--routing-rows", "0"], "--routing-rows must be at least 1")):
        with pytest.raises(SystemExit) as e:
            gpu.main(["--device", "cpu", *args])
        assert e.value.code == 2 and message in capsys.readouterr().err
