"The project settings: nbdev must never render a notebook over the hand-written README.md."
from pathlib import Path
from nbdev.config import get_config
from nbdev.quarto import _doc_mtime_not_older


def test_readme_is_not_rendered():
    cfg = get_config(path=Path(__file__).parents[1])
    src = cfg.nbs_path/cfg.readme_nb
    assert src.resolve() == (cfg.config_path/"README.md").resolve()   # the README is its own source
    assert _doc_mtime_not_older(cfg.config_path/"README.md", src)     # so `nbdev_prepare` (chk_time) leaves it as it is
