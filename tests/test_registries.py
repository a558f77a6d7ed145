"A made-up initialization and a made-up paper section are one record each: grids, the report, the claims and the explorer take them."
import pandas as pd, pytest
from kdnb.initialize import INITIALIZATIONS, Initialization, add_initialization, make_student
from kdnb.models import tiny_model
from kdnb.spec import Spec
from kdnb.paper import SECTIONS, Section, add_section, section_grid
from kdnb.claims import Claim, contrast
from kdnb.report import select, claims
from kdnb.explore import Explorer
from kdnb.testing import fake_results


@pytest.fixture
def registries():
    "Leave the registries as they were after the test."
    inits, sections = dict(INITIALIZATIONS), dict(SECTIONS)
    yield
    INITIALIZATIONS.clear(); INITIALIZATIONS.update(inits)
    SECTIONS.clear(); SECTIONS.update(sections)


def with_init(fr, name, like="from-base", gain=0.):
    "`fr` plus a copy of `like`'s runs as the runs of the initialization `name` (F1 + `gain`)."
    new = fr[fr.init == like].assign(init=name, spec_id=lambda d: d.spec_id + "-" + name,
                                     test_f1=lambda d: d.test_f1 + gain, dev_f1=lambda d: d.dev_f1 + gain)
    return pd.concat([fr, new], ignore_index=True)


def test_new_initialization(registries):
    add_initialization(Initialization("from-embeddings", "teacher"))
    # specs: valid, and a student that copies the teacher needs it even without KD
    s = Spec(model="tiny-xlmr", init="from-embeddings", kd=False)
    assert s.uses_teacher and s.teacher_key is not None
    student = make_student(tiny_model("xlmr", num_labels=3), init="from-embeddings", num_layers=2)
    assert student.config.kdnb_init == "from-embeddings"
    # every section that runs every initialization runs it
    g = section_grid("4.1", "tiny")
    assert len(g) == 1 + 4 * 2 * 2 and sum(s.init == "from-embeddings" for s in g) == 4
    assert {s.init for s in section_grid("5.2", "tiny")} == set(INITIALIZATIONS)
    # the report's rows and the claims about every configuration include it
    fr = with_init(fake_results(), "from-embeddings")
    assert "from-embeddings" in set(select(fr, "4.1").init) and "from-embeddings" in set(select(fr, "5.2").init)
    cl = claims(fr, compare_paper=False).set_index("claim")
    assert "from-embeddings" in cl.evidence["KD improves every configuration"]
    # the explorer's table has a row block for it
    ex = Explorer(studies=["study"], loader=lambda s: fr)
    assert "from-embeddings" in ex.table.index.get_level_values("init")


def test_new_section(registries):
    add_initialization(Initialization("from-embeddings", "teacher"))
    both = lambda d: d.init.isin(["from-embeddings", "from-scratch"])
    full = lambda d: (d.subset >= 1) & (d.train_languages == "all") & (d.test_languages == "all") & (d.width == "full")
    add_section(Section("9.1", "Embeddings Are Enough", "Does copying the embeddings alone beat a random student?",
                        "9_1_embeddings",
                        grid=lambda g, subsets: g(init="teacher") + g(init=["from-embeddings", "from-scratch"], kd=True),
                        rows=lambda d: full(d) & ((d.init == "teacher") | (both(d) & (d.kd == True))),
                        claims=lambda margin: [Claim("9.1", "embeddings beat scratch", "A made-up sentence.",
                                                     "from-embeddings - from-scratch > 0 in every (model, dataset)",
                                                     [contrast(lambda d: full(d) & both(d) & (d.kd_ == "KD"), ("model", "dataset"),
                                                               [(1, {"init": "from-embeddings"}), (-1, {"init": "from-scratch"})])])]))
    g = section_grid("9.1", "tiny")
    assert sorted((s.init, s.kd) for s in g) == [("from-embeddings", True), ("from-scratch", True), ("teacher", False)]
    assert len(section_grid(list(SECTIONS), "tiny")) == len({s.spec_id for sec in SECTIONS for s in section_grid(sec, "tiny")})
    fr = with_init(fake_results(), "from-embeddings", gain=.1)
    sel = select(fr, "9.1")
    assert set(sel.init) == {"teacher", "from-embeddings", "from-scratch"} and set(sel.kd.dropna()) == {True}
    cl = claims(fr, compare_paper=False)
    row = cl[cl.section == "9.1"].iloc[0]
    assert (row.claim, row.verdict) == ("embeddings beat scratch", "supported")
    ex = Explorer(studies=["study"], loader=lambda s: fr)
    assert "9.1" in ex.section.options
    ex.section.value = "9.1"
    assert set(ex.selection().init) == {"teacher", "from-embeddings", "from-scratch"}
    assert set(ex.table.index.get_level_values("init")) == {"teacher", "from-embeddings", "from-scratch"}
