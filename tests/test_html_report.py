"""The shareable report: index.html rendered in a real browser (headless Chromium), the statistics it shows (exact
binomial intervals, shared ranks, no p-value below 5 models, clean accuracy of the attacked images), RobustBench-style
model info, terminal tables that fit 100 columns, and what the renderers escape (CSV formulas, HTML in Markdown).

Result rows are written by hand: every number below is known without running a model."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from rich.console import Console
from scipy import stats

from robust_enc.cli import main
from robust_enc.errors import UserError
from robust_enc.reports import build_report, tables
from robust_enc.reports.plots import run_styles
from robust_enc.reports.render import render_table
from robust_enc.reports.report import MARKER
from robust_enc.reports.stats import NO_P_VALUE, clopper_pearson
from robust_enc.reports.terminal import table3_tables
from robust_enc.results import ResultRow, write_results
from robust_enc.runtime.progress import _progress, format_eps

STAMP = "2025-01-01T00:00:00+00:00"
AA8 = tables.Threat("autoattack", "linf", 8 / 255)


def _row(run_id: str, regularizer: str, attack: str = "none", eps: float = 0.0, *, n: int, clean: float,
         adv: float | None = None, **kw) -> ResultRow:
    return ResultRow(run_id=run_id, model=kw.pop("model", "resnet_tiny"), regularizer=regularizer,
                     dataset=kw.pop("dataset", "digits"), split="test", subset=0, attack=attack,
                     norm="none" if attack == "none" else "linf", eps=eps, n=n, clean_top1=clean,
                     adv_top1=clean if adv is None else adv, created_at=STAMP, checkpoint_hash=f"h-{run_id}", **kw)


def _model(run_id: str, regularizer: str, clean450: float, clean40: float, aa40: float, fgsm: float,
           gbr: float, **kw) -> list[ResultRow]:
    """A model as the quick study leaves it: clean + FGSM/PGD on 450 images, AutoAttack on a 40-image subset (whose
    row carries the clean accuracy of those 40)."""
    rows = [_row(run_id, regularizer, n=450, clean=clean450, gbr=gbr, image_set="all450", **kw)]
    for attack, eps, adv in (("fgsm", 2 / 255, (clean450 + fgsm) / 2), ("fgsm", 8 / 255, fgsm),
                             ("pgd", 8 / 255, fgsm * 0.8), ("fgsm", 16 / 255, fgsm / 2)):
        rows.append(_row(run_id, regularizer, attack, eps, n=450, clean=clean450, adv=adv, image_set="all450", **kw))
    rows.append(_row(run_id, regularizer, "autoattack", 8 / 255, n=40, clean=clean40, adv=aa40, image_set="sub40",
                     **kw))
    return rows


def _tiny_study(root: Path, *, names: tuple[str, ...] = (), regularizers: tuple[str, ...] = ()) -> Path:
    """Three models in run folders (results.csv + model card); ``names`` / ``regularizers`` replace theirs."""
    models = [("rt-baseline", "baseline", 0.9600, 0.950, 0.750, 0.40, 980.4),
              ("rt-enc-cutmix-ls", "enc+cutmix+ls", 0.9711, 0.975, 0.750, 0.52, 512.0),
              ("rt-mixup", "mixup", 0.9533, 0.925, 0.200, 0.31, 1500.0)]
    for i, (run_id, regularizer, *numbers) in enumerate(models):
        run_id = names[i] if i < len(names) else run_id
        regularizer = regularizers[i] if i < len(regularizers) else regularizer
        folder = root / f"run{i}"
        folder.mkdir(parents=True)
        write_results(folder / "results.csv", _model(run_id, regularizer, *numbers))
        (folder / "model_card.json").write_text(json.dumps({"run_id": run_id, "dataset": "digits",
                                                            "checkpoint_hash": f"h-{run_id}"}))
        (folder / "checkpoint.pt").write_bytes(b"")
    return root


# ------------------------------------------------------------------ statistics
def test_clopper_pearson_against_hand_computed_values_and_the_binomial_tails():
    low, high = clopper_pearson(3, 10)
    assert (round(low, 4), round(high, 4)) == (0.0667, 0.6525)  # the textbook value for 3 of 10
    # Defining property: each bound puts 2.5% of the binomial mass beyond k (checked with the binomial, not beta).
    assert stats.binom.sf(2, 10, low) == pytest.approx(0.025, abs=1e-9)
    assert stats.binom.cdf(3, 10, high) == pytest.approx(0.025, abs=1e-9)
    assert clopper_pearson(0, 10)[0] == 0.0 and clopper_pearson(10, 10)[1] == 1.0
    assert round(clopper_pearson(0, 10)[1], 4) == 0.3085  # 1 - 0.025 ** (1 / 10)


def test_two_models_at_75_percent_on_40_images_share_rank_one():
    rows = []
    for run_id, aa in (("a", 0.75), ("b", 0.75), ("c", 0.10)):
        rows += [_row(run_id, run_id, n=40, clean=0.9), _row(run_id, run_id, "autoattack", 8 / 255, n=40, clean=0.9,
                                                             adv=aa)]
    board = tables.leaderboard(tables.results_frame(rows))
    assert board["rank"].tolist() == [1, 1, 3] and board["tied"].tolist() == [True, True, False]
    # 30/40 [0.588, 0.873] and 4/40 [0.028, 0.237] do not overlap: c is ranked below both
    assert board["adv_hi"].iloc[2] < board["adv_lo"].iloc[0]
    assert "| 1 (tied) |" in render_table(board, "leaderboard", "md")


def test_leaderboard_clean_column_is_measured_on_the_attacked_40_images():
    board = tables.leaderboard(tables.results_frame(_model("m", "enc", 0.96, 0.975, 0.75, 0.4, 10.0)))
    assert board.attrs["threat"]["attack"] == "autoattack"
    row = board.iloc[0]
    assert (row["n"], row["clean_top1"], row["adv_top1"]) == (40, 0.975, 0.75)  # not the 450-image 0.96
    assert (row["clean_lo"], row["clean_hi"]) == pytest.approx(clopper_pearson(39, 40))
    assert (row["adv_lo"], row["adv_hi"]) == pytest.approx(clopper_pearson(30, 40))
    assert row["image_set"] == "sub40"


def test_rows_of_two_image_sets_are_never_averaged():
    """FGSM on a 30-image subset and on all 450 images of one model: the cell is the 450 images' 90.89%, not the mean
    93.78% of the two (labelled with n = 450)."""
    rows = [_row("m", "enc", n=450, clean=0.96, image_set="all450"),
            _row("m", "enc", "fgsm", 8 / 255, n=30, clean=29 / 30, adv=29 / 30, image_set="sub30"),
            _row("m", "enc", "fgsm", 8 / 255, n=450, clean=0.96, adv=409 / 450, image_set="all450")]
    column = tables.Threat("fgsm", "linf", 8 / 255).column
    table = tables.table3(tables.results_frame(rows))
    assert table[column].iloc[0] == 409 / 450 and table[f"n:{column}"].iloc[0] == 450
    board = tables.leaderboard(tables.results_frame(rows))
    assert (board["adv_top1"].iloc[0], board["clean_top1"].iloc[0], board["image_set"].iloc[0]) == (
        409 / 450, 0.96, "all450")
    unrecorded = [dataclasses.replace(r, image_set="") for r in rows]  # older files: told apart by n
    assert tables.table3(tables.results_frame(unrecorded))[column].iloc[0] == 409 / 450


def test_a_three_model_correlation_prints_no_p_value():
    rows = [r for i in range(3) for r in _model(f"m{i}", f"r{i}", 0.9, 0.9, 0.5 - 0.1 * i, 0.4 - 0.1 * i,
                                                 10.0 + 7 * i ** 2)]
    corr = tables.correlation(tables.table3(tables.results_frame(rows))).set_index("y")
    row = corr.loc[AA8.column]
    gbr = np.array([10.0, 17.0, 38.0])
    assert row["pearson_r"] == pytest.approx(np.corrcoef(gbr, [0.5, 0.4, 0.3])[0, 1], abs=1e-12)
    assert np.isnan(row["pearson_p"]) and np.isnan(row["spearman_p"]) and row["note"] == NO_P_VALUE
    text = render_table(corr.reset_index(), "correlation", "md")
    assert "n &lt; 5: no p-value" in text and "0.0" not in text.split("no p-value")[-1].split("|")[1]


def test_every_run_gets_its_own_colour_and_marker():
    styles = run_styles([f"run{i}" for i in range(12)])
    assert len(set(styles.values())) == 12
    first10 = list(styles.values())[:10]
    assert len({c for c, _ in first10}) == 10 and len({m for _, m in first10}) == 10


def test_eps_is_k_over_255_or_the_float_it_is():
    assert format_eps(16 / 255) == "16/255" and format_eps(0.0313725490196078) == "8/255"
    assert format_eps(1e-30) == "1e-30" and format_eps(0.03) == "0.03" and format_eps(0.0) == "0"
    assert format_eps(8 / 255, "l2") == "0.031372549"


# ------------------------------------------------------------------ files: escaping, marker, model info
def test_csv_formulas_are_neutralized_and_markdown_escapes_html(tmp_path):
    root = _tiny_study(tmp_path / "runs", names=("=HYPERLINK(\"http://x\")", "<script>alert(1)</script>", "-2+3"))
    written = build_report([root], tmp_path / "report", formats=("md", "csv"))
    with open(written["leaderboard.csv"], newline="") as f:
        records = list(csv.DictReader(f))
    run_ids = {r["run_id"] for r in records}
    assert "'=HYPERLINK(\"http://x\")" in run_ids and "'-2+3" in run_ids and "<script>alert(1)</script>" in run_ids
    table3 = list(csv.DictReader(io.StringIO(written["table3.csv"].read_text())))
    deltas = [float(r[f"{AA8.column}:delta"]) for r in table3 if r[f"{AA8.column}:delta"]]
    assert min(deltas) < 0  # a negative number is a number, not a formula: no quote
    for name in ("leaderboard.md", "table3.md", "index.md"):
        text = written[name].read_text()
        assert "<script>" not in text, name
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in written["leaderboard.md"].read_text()
    page = written["index.html"].read_text()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_out_is_replaced_only_when_it_holds_the_marker(tmp_path):
    root = _tiny_study(tmp_path / "runs")
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("index.md", "table3.csv", "plots"):  # names a report uses, but the user's own files
        (mine / name).write_text("my notes")
    with pytest.raises(UserError, match=f"no {MARKER} file"):
        build_report([root], mine)
    assert (mine / "index.md").read_text() == "my notes"
    out = tmp_path / "report"
    build_report([root], out)
    assert (out / MARKER).is_file()
    (out / "stale.txt").write_text("x")  # a report folder (marker present) is replaced whole
    build_report([root], out)
    assert not (out / "stale.txt").exists() and (out / "index.html").is_file()


def test_model_info_json_has_robustbench_fields_and_provenance(tmp_path):
    written = build_report([_tiny_study(tmp_path / "runs")], tmp_path / "report")
    info = json.loads(written["model_info/rt-enc-cutmix-ls.json"].read_text())
    assert info["eps"] == "8/255" and info["threat_model"] == "Linf" and info["architecture"] == "resnet_tiny"
    assert info["autoattack_acc"] == 75.0 and info["clean_acc"] == 97.5  # percent, numbers, the same 40 images
    assert info["robust_enc"]["n"] == 40 and info["robust_enc"]["checkpoint_hash"] == "h-rt-enc-cutmix-ls"
    assert info["robust_enc"]["clean_acc_all_images"] == 97.11 and info["dataset"] == "digits"


# ------------------------------------------------------------------ terminal
def _long_table3() -> tuple[object, str]:
    rows = [r for i, reg in enumerate(("baseline", "enc+cutmix+ls", "mixup", "ws+wn")) for r in
            _model(f"resnet_tiny-{reg}-s0", reg, 0.96, 0.95, 0.7 - i / 20, 0.4, 980.4 + i)]
    return tables.table3(tables.results_frame(rows)), "Table 3"


def test_table3_fits_100_columns_without_a_cut_cell():
    table, title = _long_table3()
    console = Console(width=100, file=io.StringIO(), color_system=None)
    for part in table3_tables(table, title, console):
        console.print(part)
    text = console.file.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 100
    assert "980.4 ± " not in text or all("980.4" not in line or "±" in line for line in text.splitlines())
    for cell in ("enc+cutmix+ls", "8/255, 40 img", "16/255", "(+"):
        assert cell in text, cell


def test_cli_report_under_columns_100_prints_no_ellipsis(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    root = _tiny_study(tmp_path / "runs", names=("[/red]",), regularizers=("[/bold]",))  # rich markup: shown as text
    assert main(["report", str(root), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and "enc+cutmix+ls" in out and "[/bold]" in out
    assert max(len(line) for line in out.splitlines() if not line.startswith("report written")) <= 100


def test_progress_bars_keep_count_and_eta_whole_at_100_columns():
    console = Console(width=100, file=io.StringIO(), color_system=None)
    bars = _progress(console)
    bars.add_task("  attack resnet_tiny-digits-enc+cutmix+ls-s0-n300 (fgsm,pgd,autoattack)", total=45000,
                  completed=12000, info="1,234 img/s, robust autoattack@16/255 45.0%")
    console.print(bars.make_tasks_table(bars.tasks))
    line = console.file.getvalue().rstrip("\n")
    assert len(line) <= 100 and "12000/45000" in line and "eta -:--:--" in line and "0:00:00" in line


# ------------------------------------------------------------------ the page in a browser
CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var th = Array.prototype.find.call(document.querySelectorAll("#panel0 th"), function (h) {
    return h.textContent === "Robust (%)"; });
  th.click();  // ascending: the least robust model first
  var first = document.querySelector("#panel0 tbody tr").cells[1].textContent;
  var d = document.createElement("pre");
  d.id = "check";
  d.textContent = JSON.stringify({images: imgs.length, loaded: imgs.filter(function (i) {
    return i.complete && i.naturalWidth > 0; }).length, width: document.documentElement.scrollWidth,
    height: document.documentElement.scrollHeight, first: first, errors: window.__errors});
  document.body.appendChild(d);
});
</script>"""
ERRORS = '<script>window.__errors = []; window.addEventListener("error", function (e) { ' \
         'window.__errors.push(String(e.message)); });</script>'


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    command = [shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={profile}", "--window-size=1400,1000", "--enable-logging=stderr",
               "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium (make data installs Debian's where apt is)")
def test_index_html_renders_in_headless_chromium(tmp_path):
    long_name = "rt-baseline-" + "with-a-very-long-run-name-" * 8  # must scroll in its table, not widen the page
    written = build_report([_tiny_study(tmp_path / "runs", names=(long_name,))], tmp_path / "report")
    page = written["index.html"].read_text()
    assert "http://" not in page and "https://" not in page and 'src="data:image/png;base64,' in page
    checked = tmp_path / "report" / "checked.html"  # the page plus the probe, beside it (same relative links)
    checked.write_text(page.replace("<head>", "<head>" + ERRORS, 1).replace("</body>", CHECK + "</body>", 1))
    dom = _chromium(["--dump-dom", checked.as_uri()], tmp_path / "profile1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Uncaught" not in dom.stderr and "CONSOLE" not in dom.stderr.upper().replace("CONSOLE_", ""), dom.stderr
    probe = json.loads(dom.stdout.split('<pre id="check">')[1].split("</pre>")[0].replace("&quot;", '"'))
    assert probe["errors"] == []
    assert probe["images"] == len([k for k in written if k.startswith("plots/")]) >= 3
    assert probe["loaded"] == probe["images"]  # every inlined PNG decoded
    assert probe["width"] <= 1400 and 1000 <= probe["height"] <= 20000
    assert probe["first"] == "rt-mixup"  # the header click sorted the board (20% robust: the lowest)
    shot = tmp_path / "shot.png"
    result = _chromium([f"--screenshot={shot}", written["index.html"].as_uri()], tmp_path / "profile2")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    image = matplotlib.image.imread(shot)
    assert image.shape[:2] == (1000, 1400) and image[..., :3].std() > 0.05  # not a blank page
