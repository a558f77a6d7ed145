"""`kdnb batch` never hangs on a stalled notebook (kdnb issue 14): the liveness guard of `kdnb.batch` interrupts a
cell whose reply got lost (kernel idle, reply missing) or whose kernel blocks silently, records the notebook as
failed with the reason, and the batch goes on with the next notebook. Each test takes seconds (a few kernel starts).
"""
import json, threading, time
from pathlib import Path
from unittest import mock
import nbformat, pytest

from kdnb.batch import IDLE_TIMEOUT, run_batch

# a cell that makes the kernel drop its own execute_reply (then behave): what the report's explorer cell suffered
LOSE_REPLY = '''k = get_ipython().kernel
_send = k.session.send
def _lose(stream, msg_or_type, *a, **kw):
    if msg_or_type == "execute_reply":
        k.session.send = _send
        return {"content": {"status": "ok"}}
    return _send(stream, msg_or_type, *a, **kw)
k.session.send = _lose
print("reply lost")'''
BLOCK = "import time\nprint('blocking')\ntime.sleep(600)"


def _nb(d, name, body):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell("preset = 'demo'\nstudy_dir = None\nout_dir = None"); p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(body), nbformat.v4.new_code_cell("print('after')")]
    nb.metadata["kernelspec"] = dict(name="python3", display_name="Python 3", language="python")
    nbformat.write(nb, str(Path(d)/f"{name}.ipynb"))


@pytest.fixture
def src(tmp_path):
    d = tmp_path/"src"; d.mkdir()
    _nb(d, "lose", LOSE_REPLY)
    _nb(d, "block", BLOCK)
    _nb(d, "report", "from pathlib import Path\nPath(out_dir, 'report.txt').write_text(preset)")
    return d


def _batch(src, tmp_path, names, timeout=120, **kw):
    "run_batch in a thread, so that a hang fails the test instead of blocking it; returns (batch.json, seconds)."
    done, t0 = {}, time.time()
    def go():
        try: done["folder"] = run_batch("tiny", folder=tmp_path/"out", notebooks=names, notebooks_dir=src, progress=False,
                                        raise_on_error=False, **kw)
        except BaseException as e: done["error"] = e
    t = threading.Thread(target=go, daemon=True); t.start(); t.join(timeout)
    assert not t.is_alive(), f"kdnb batch still running after {timeout} s: it hangs"
    if "error" in done: raise done["error"]
    return json.loads((done["folder"]/"batch.json").read_text()), time.time() - t0


def test_lost_reply_fails_fast_and_batch_continues(src, tmp_path, capfd):
    log, seconds = _batch(src, tmp_path, ["lose", "report"], idle_timeout=2, stall_timeout=None)
    (lose, report) = log["notebooks"]
    assert (lose["status"], report["status"]) == ("failed", "ok")
    assert "KernelStalled" in lose["error"] and "idle" in lose["error"] and "reply never came" in lose["error"]
    assert (tmp_path/"out"/"report.txt").read_text() == "tiny"          # the next notebook ran
    assert seconds < 90, seconds
    assert "lose stalled" in capfd.readouterr().out   # printed when it happened (by a render process: capfd sees its fd)
    readme = (tmp_path/"out"/"README.md").read_text()
    assert "lose failed:" in readme and "KernelStalled" in readme
    assert log["idle_timeout"] == 2
    # the saved notebook shows the reason in the stalled cell, and its output before the stall
    nb = nbformat.read(str(tmp_path/"out"/"lose.ipynb"), as_version=4)
    cell = next(c for c in nb.cells if c.source == LOSE_REPLY)
    assert [o.get("ename") for o in cell.outputs if o.output_type == "error"][0] == "KernelStalled"
    assert any("reply lost" in o.get("text", "") for o in cell.outputs)


def test_blocked_cell_interrupted(src, tmp_path):
    "A cell blocked silently (no CPU) is interrupted after stall_timeout; the kernel answers the interrupt."
    log, seconds = _batch(src, tmp_path, ["block", "report"], stall_timeout=3, idle_timeout=None)
    (block, report) = log["notebooks"]
    assert (block["status"], report["status"]) == ("failed", "ok")
    assert "KernelStalled" in block["error"] and "busy" in block["error"] and "blocked" in block["error"]
    assert seconds < 90, seconds
    nb = nbformat.read(str(tmp_path/"out"/"block.ipynb"), as_version=4)
    cell = next(c for c in nb.cells if c.source == BLOCK)
    assert [o.get("ename") for o in cell.outputs if o.output_type == "error"] == ["KernelStalled", "KeyboardInterrupt"]


def test_defaults_never_hang(src, tmp_path):
    "With kdnb batch's defaults (no arguments), a lost reply fails the notebook within about IDLE_TIMEOUT seconds."
    log, seconds = _batch(src, tmp_path, ["lose"], timeout=IDLE_TIMEOUT + 100)
    assert log["notebooks"][0]["status"] == "failed" and "KernelStalled" in log["notebooks"][0]["error"]


def test_cli_flags():
    import argparse, kdnb.batch as B
    ap = argparse.ArgumentParser(); sub = ap.add_subparsers(); B.add_batch_parser(sub)
    a = ap.parse_args(["batch", "--stall-timeout", "0", "--idle-timeout", "5"])
    with mock.patch.object(B, "run_batch", return_value=Path("x")) as rb:
        assert B.batch_main(a) == 0
    assert rb.call_args.kwargs["stall_timeout"] is None and rb.call_args.kwargs["idle_timeout"] == 5.0
    a = ap.parse_args(["batch"])
    assert (a.stall_timeout, a.idle_timeout) == (B.STALL_TIMEOUT, B.IDLE_TIMEOUT)


def test_bad_timeouts(src, tmp_path):
    for kw in (dict(stall_timeout=0), dict(idle_timeout=-1)):
        with pytest.raises(ValueError, match="must be a positive number of seconds"):
            run_batch("tiny", folder=tmp_path/"out", notebooks=["report"], notebooks_dir=src, progress=False, **kw)
    assert not (tmp_path/"out").exists()   # raised before any work


@pytest.mark.skipif(__import__("os").name != "posix", reason="IPC sockets are Unix sockets; elsewhere kernels keep TCP")
def test_kernels_use_ipc_sockets(tmp_path, capfd):
    "A notebook's kernel talks over Unix sockets in Jupyter's runtime folder (no plain-text TCP warning), removed after."
    from jupyter_core.paths import jupyter_runtime_dir
    from kdnb.batch import execute_notebook
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from ipykernel.connect import get_connection_info\n"
                                          "i = get_connection_info(unpack=True)\nprint(i['transport'], i['ip'])")]
    nb.metadata["kernelspec"] = dict(name="python3", display_name="Python 3", language="python")
    nbformat.write(nb, str(tmp_path/"t.ipynb"))
    execute_notebook(tmp_path/"t.ipynb", tmp_path/"t_out.ipynb")
    transport, ip = nbformat.read(str(tmp_path/"t_out.ipynb"), 4).cells[0].outputs[0]["text"].split()
    assert transport == "ipc" and Path(ip).parent == Path(jupyter_runtime_dir()) and Path(ip).name.startswith("kdnb-")
    assert not list(Path(ip).parent.glob(Path(ip).name + "-*"))   # its socket files are gone with the kernel
    assert "without encryption" not in capfd.readouterr().err
