"""Run a notebook headless N times (default: the report notebook on a tiny study) and count the runs that hang.

Each run is a child process executing the notebook with papermill; a run that has not finished after `--timeout`
seconds counts as a hang, and the child's Python stack (faulthandler, dumped just before the kill) shows what the
client was waiting for. `--engine kdnb` runs through kdnb's guarded engine (the one `kdnb batch` uses), which turns
a lost reply into a failed run with a reason instead of a hang.

    python bench/stress_notebooks.py --study-dir /tmp/tinystudy -n 100 [--engine kdnb|papermill] [--kernel NAME]

Make the tiny study once first: `kdnb batch --preset tiny --folder /tmp/x --study-dir /tmp/tinystudy`.
"""
import argparse, json, os, subprocess, sys, tempfile, time
from collections import Counter
from pathlib import Path

CHILD = r"""
import faulthandler, json, sys, time
args = json.loads(sys.argv[1])
def diagnose():
    "Just before the kill: what the client waits for, and whether that reply is already in its shell socket."
    import gc, asyncio, traceback, zmq
    out = {}
    try:
        for o in gc.get_objects():
            if isinstance(o, asyncio.Task) and not o.done():
                f = getattr(o.get_coro(), "cr_frame", None)
                if f is not None and "msg_id" in f.f_locals: out.setdefault("waiting_for", []).append(
                    dict(coro=o.get_coro().__qualname__, msg_id=f.f_locals["msg_id"]))
            if type(o).__name__ == "AsyncKernelClient" and getattr(o, "_shell_channel", None) is not None:
                kc, sock = o, zmq.Socket.shadow(o._shell_channel.socket.underlying)   # a plain socket: no event loop needed
                out["shell_socket_has_message"] = bool(sock.get(zmq.EVENTS) & zmq.POLLIN)
                msgs = []
                while sock.get(zmq.EVENTS) & zmq.POLLIN:
                    _, m = kc.session.feed_identities(sock.recv_multipart(zmq.NOBLOCK)); m = kc.session.deserialize(m)
                    msgs.append(dict(type=m["msg_type"], parent=m["parent_header"].get("msg_id"),
                                     parent_type=m["parent_header"].get("msg_type"), status=m["content"].get("status")))
                out["unread_shell_messages"] = msgs
    except Exception: out["error"] = traceback.format_exc()[-800:]
    sys.stderr.write("\nDIAGNOSIS " + json.dumps(out) + "\n"); sys.stderr.flush()
import threading
t = threading.Timer(args["timeout"] - 5, diagnose); t.daemon = True; t.start()
faulthandler.dump_traceback_later(args["timeout"] - 3, exit=False)   # where the threads are, if it hangs
import papermill as pm
execute, kw = pm.execute_notebook, dict(progress_bar=False)
if args["engine"] == "kdnb":   # what kdnb batch runs: the guarded engine, with kdnb's defaults unless given
    from kdnb.batch import execute_notebook as execute
    kw = {k: args[k] for k in ("stall_timeout", "idle_timeout") if args[k] is not None}
t0 = time.time()
try:
    execute(args["notebook"], args["output"], parameters=args["parameters"], kernel_name=args["kernel"], **kw)
    print(json.dumps(dict(status="ok", seconds=time.time() - t0)))
except Exception as e:
    print(json.dumps(dict(status="failed", seconds=time.time() - t0, error=f"{type(e).__name__}: {str(e).strip()[-300:]}")))
"""

def run_once(notebook, parameters, kernel, engine, timeout, stall_timeout, idle_timeout, out_dir, i):
    "One child-process execution; returns a dict with status ok / failed / hang, seconds and details."
    args = dict(notebook=str(notebook), output=str(Path(out_dir)/f"run{i:03d}.ipynb"), parameters=parameters,
                kernel=kernel, engine=engine, timeout=timeout, stall_timeout=stall_timeout,
                idle_timeout=idle_timeout)
    t0 = time.time()
    p = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)   # the child and its kernel
        out, err = p.communicate()
        diag = [json.loads(l.split(" ", 1)[1]) for l in err.splitlines() if l.startswith("DIAGNOSIS ")]
        Path(out_dir, f"run{i:03d}.stderr").write_text(err)
        return dict(status="hang", seconds=time.time() - t0, where=diag[0] if diag else err.strip()[-2000:])
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if not lines: return dict(status="failed", seconds=time.time() - t0, error=err.strip()[-500:])
    return json.loads(lines[-1])

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notebook", default=str(Path(__file__).resolve().parents[1]/"nbs"/"analysis"/"report.ipynb"))
    ap.add_argument("--study-dir", required=True, help="a finished tiny study (see the docstring)")
    ap.add_argument("-n", type=int, default=100, help="executions")
    ap.add_argument("--engine", choices=["papermill", "kdnb"], default="kdnb", help="plain papermill or kdnb's guarded engine")
    ap.add_argument("--kernel", default=None, help="kernel name (e.g. a kernelspec with ipykernel 6)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds before a run counts as hung")
    ap.add_argument("--stall-timeout", type=float, default=None, help="kdnb engine: busy-and-silent limit (default kdnb's)")
    ap.add_argument("--idle-timeout", type=float, default=None, help="kdnb engine: idle-with-reply-missing limit (default kdnb's)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=JSON", help="extra notebook parameter")
    ap.add_argument("--log", default=None, help="append one JSON line per run to this file")
    ap.add_argument("--keep", default=None, help="keep the executed notebooks (and a hung run's stderr) in this folder")
    a = ap.parse_args()
    params = dict(preset="tiny", study_dir=str(Path(a.study_dir).resolve()), progress=False)
    params.update({k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)})
    counts, t0 = Counter(), time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(a.keep or tmp); out_dir.mkdir(parents=True, exist_ok=True)
        for i in range(a.n):
            r = run_once(a.notebook, params, a.kernel, a.engine, a.timeout, a.stall_timeout, a.idle_timeout, out_dir, i)
            counts[r["status"]] += 1
            r.update(run=i, engine=a.engine, kernel=a.kernel)
            if a.log:
                with open(a.log, "a") as f: f.write(json.dumps(r) + "\n")
            if r["status"] != "ok": print(f"run {i}: {r['status']}: {r.get('error') or r.get('where')}", flush=True)
            print(f"[{i + 1}/{a.n}] {dict(counts)} ({time.time() - t0:.0f} s)", flush=True)
    print(json.dumps(dict(runs=a.n, **counts, engine=a.engine, kernel=a.kernel or "python3", seconds=round(time.time() - t0))))
    return 1 if counts["hang"] else 0

if __name__ == "__main__": sys.exit(main())
