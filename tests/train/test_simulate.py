"""``shardflow plan CONFIG --simulate N1,N2,...``: one process prices the config's job at each device count
(meshes grown along 'dp' with the config's tp kept, the batch grown with dp), prints a row per count and draws
a valid PNG; 1,024 devices cost one trace; a pipeline config keeps its stages; counts the mesh cannot take and
unknown profiles are one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from shardflow.cli.main import main
from shardflow.train.config import load_config
from shardflow.train.simulate import Simulation, plot

ROOT = Path(__file__).resolve().parents[2]
GPT = str(ROOT / "examples" / "gpt.toml")  # mesh [2, 2], axes dp, tp; batch_size 8
TINY = ["--model.args.n_layer", "1", "--model.args.n_embd", "32", "--model.args.block_size", "16"]


def _rows(printed: str) -> dict[int, list[str]]:
    """The table's rows by device count, as cells (a 2-d mesh's three words, 'dp=4 x tp=2', make one)."""
    rows = {}
    for line in printed.splitlines():
        cells = line.split()
        if cells and cells[0].isdigit():
            mesh = " ".join(cells[1:4])
            rows[int(cells[0])] = [cells[0], mesh, *cells[4:]]
    return rows


def test_simulate_prints_a_row_per_count_and_draws_the_plot(tmp_path, capsys):
    png = tmp_path / "tmp" / "plot.png"
    argv = ["plan", GPT, "--simulate", "2,8,1024", "--device", "h100", "--plot", str(png), *TINY]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = _rows(printed)
    assert sorted(rows) == [2, 8, 1024]
    for n, (dp, batch) in {2: (1, 4), 8: (4, 16), 1024: (512, 2048)}.items():
        # devices, mesh, batch, step ms, peak, its unit, tokens/s, MFU, traces, lowerings
        _, mesh, got_batch, step_ms, _, _, tokens, _, traces, lowerings = rows[n]
        assert mesh == f"dp={dp} x tp=2"  # the config's tp kept, the rest to dp
        assert int(got_batch) == batch  # 8 over the config's 2 data-parallel ranks: 4 per rank
        assert math.isfinite(float(step_ms)) and float(step_ms) > 0
        assert tokens[-1] in "KM"  # tokens/s: the inputs are token ids
        assert int(traces) == 1 and int(lowerings) == 1  # 1,024 ranks: one trace, one rank program
    assert "tokens/s" in printed and f"scaling plot: {png}" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape[:2] == (576, 960)  # 8 x 4.8 inches at 120 dpi
    assert not [p for p in png.parent.iterdir() if p != png]  # no temporary file left beside it


def test_a_fixed_batch_is_traced_once_for_every_count():
    cfg = load_config(GPT, TINY)
    sim = Simulation(cfg, [16, 2], "h100", fixed_batch=True)
    rows = list(sim.rows())
    assert [r.devices for r in rows] == [2, 16] and [r.batch for r in rows] == [8, 8]
    assert [r.traces for r in rows] == [1, 0]  # the same global shapes: the first row's trace serves the next
    assert rows[1].mesh.shape == (8, 2) and rows[1].mesh.device_type == "cuda"  # the profile's device


def test_a_count_the_kept_axes_do_not_divide_is_an_error(capsys):
    assert main(["plan", GPT, "--simulate", "8,7", "--device", "h100"]) == 2
    err = capsys.readouterr().err
    assert "--simulate 7: the config's axes ['dp', 'tp'] keep tp=2 at every size and grow 'dp'" in err
    assert "a multiple of 2" in err


def test_unknown_or_missing_profiles_are_one_line_errors(tmp_path, monkeypatch, capsys):
    assert main(["plan", GPT, "--simulate", "8", "--device", "h999"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no device profile 'h999': shipped ones are a100, h100, h200" in err
    monkeypatch.setenv("SHARDFLOW_CACHE", str(tmp_path / "empty"))  # this machine never calibrated
    assert main(["plan", "--simulate", "8", GPT]) == 2  # the flags may come before CONFIG too
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run `shardflow calibrate`" in err and "--device h100" in err


def test_a_pipeline_config_keeps_its_stages_and_grows_dp(tmp_path, capsys):
    """A 'pp' axis is kept like tp: each count prices its stages, one rank program per stage."""
    two_layers = ["--model.args.n_layer", "2", "--model.args.n_embd", "32", "--model.args.block_size", "16"]
    argv = ["plan", GPT, "--simulate", "4,64", "--device", "h100", "--axes", "pp,dp", "--strategy", "dp", *two_layers]
    argv += ["--plot", str(tmp_path / "pp.png")]
    assert main(argv) == 0
    rows = _rows(capsys.readouterr().out)
    for n, dp in {4: 2, 64: 32}.items():
        _, mesh, _, step_ms, *_, lowerings = rows[n]
        assert mesh == f"pp=2 x dp={dp}" and float(step_ms) > 0 and int(lowerings) == 2


def test_a_plot_path_that_cannot_be_written_is_refused_before_pricing(tmp_path, capsys):
    assert main(["plan", GPT, "--simulate", "8", "--device", "h100", "--plot", str(tmp_path), *TINY]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "give --plot a writable file path" in captured.err


def test_simulate_flags_need_simulate(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", GPT, "--device", "h100"])
    assert e.value.code == 2 and "go with --simulate" in capsys.readouterr().err


def test_rows_over_the_profiles_memory_are_flagged(tmp_path):
    small = json.loads((ROOT / "shardflow" / "cost" / "profiles" / "h100.json").read_text())
    small["memory_bytes"] = 2**18  # 256 KiB: the tiny GPT's ~470 KiB per rank do not fit
    path = tmp_path / "small.json"
    path.write_text(json.dumps(small))
    sim = Simulation(load_config(GPT, TINY), [2], str(path))  # a profile's JSON path, as --device takes
    (row,) = sim.rows()
    assert row.peak_bytes > 2**18 and " KiB ! " in sim.line(row)
    assert "! over the h100's 256.00 KiB of memory" in sim.footer([row])
    plot(sim, [row], str(tmp_path / "one.png"))  # one count: no line to draw, still a plot
    assert (tmp_path / "one.png").read_bytes()[:4] == b"\x89PNG"
