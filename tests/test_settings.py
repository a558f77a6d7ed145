"The project settings: nbdev must never render a notebook over the hand-written README.md."
from pathlib import Path
from nbdev.config import get_config
from nbdev.quarto import _doc_mtime_not_older


def test_readme_is_not_rendered():
    cfg = get_config(path=Path(__file__).parents[1])
    src = cfg.nbs_path/cfg.readme_nb
    assert src.resolve() == (cfg.config_path/"README.md").resolve()   # the README is its own source
    assert _doc_mtime_not_older(cfg.config_path/"README.md", src)     # so `nbdev_prepare` (chk_time) leaves it as it is


def test_report_notebook_shows_its_results():
    "The report notebook is a document: its showcase cells keep their outputs (a rebuilt paper table, the paper's verdicts, figures)."
    import json
    nb = json.loads((Path(__file__).parents[1]/"nbs"/"17_report.ipynb").read_text())
    data = [o.get("data", {}) for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    html = "".join("".join(d.get("text/html", [])) for d in data)
    assert "81.63" in html and "KD improves every configuration" in html   # Table 2 rebuilt; the claims on the paper's numbers
    assert sum("image/png" in d for d in data) >= 2                        # the figures
