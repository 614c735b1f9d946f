"""Regenerate docs/review-label-studio.png: the review loop as a user runs it, photographed.

  1. `ciae demo` with a short schedule in a temporary folder: synthetic data, shards, a model
     trained with Ray Train and registered in MLflow (sqlite), the held-out images labeled;
  2. a Label Studio server started exactly as the tests start one (tests/label_studio_server.py:
     .ls-venv, 127.0.0.1, its own port, data dir, user and personal access token);
  3. `ciae review push` of the N least confident labeled images to a project;
  4. headless Chromium (Playwright, from .shot-venv) logs in as the test user, opens the
     labeling page of one pushed task (by default the one with the most predicted regions),
     waits until the image and its pre-annotations (the model's brush regions) are drawn,
     selects the model's most confident thing region (outlined, its label in the Info panel)
     and saves a screenshot, reduced to a palette PNG;
  5. everything started is stopped by its pid (process group), the temporary folder removed.

Run it through scripts/review_screenshot.sh, which installs Chromium and .shot-venv first.
The main part runs in the project's .venv; step 4 runs this same file in .shot-venv
(`review_screenshot.py shoot ...`), where Playwright is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "review-label-studio.png"
CHROMIUM = "/usr/bin/chromium"
SHOT_PYTHON = REPO / ".shot-venv" / "bin" / "python"
PROJECT = "demo-review"
MODEL = "ciae-demo"
# headless Chromium with nothing reaching outside: without the background-networking flags it
# tries to reach Google's services and fails. Playwright gives each launch a fresh profile
# (a temporary --user-data-dir of its own, removed on close).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", "--hide-scrollbars"]


def log(msg: str) -> None:
    print(f"[review_screenshot] {msg}", flush=True)


# ------------------------------------------------------------------------------ processes

def run_group(cmd: list[str], timeout: float, env: dict | None = None, logfile: Path | None = None) -> None:
    """Run ``cmd`` in a new session; on timeout, ^C or any error, signal exactly its process
    group (its pid is the group's id): SIGTERM, then SIGKILL."""
    out = open(logfile, "ab") if logfile else None
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT if out else None, start_new_session=True)
    try:
        rc = proc.wait(timeout)
    except BaseException:
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        raise
    finally:
        if out:
            out.close()
    if rc != 0:
        tail = ""
        if logfile and logfile.exists():
            tail = "\n" + "\n".join(logfile.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {rc}{tail}")


# ------------------------------------------------------------------------------ main part (.venv)

def make_labels(work: Path, args) -> Path:
    """`ciae demo` on a short schedule: returns its labeling output."""
    ciae = Path(sys.executable).parent / "ciae"
    cmd = [str(ciae), "demo", "--workdir", str(work / "demo"), "--iterations", str(args.iterations),
           "--train-images", str(args.train_images), "--val-images", str(args.val_images),
           "--workers", str(args.workers), "--seed", str(args.seed)]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    log(f"{' '.join(cmd[1:])}  (log: {work / 'demo.log'})")
    t0 = time.monotonic()
    run_group(cmd, timeout=args.demo_timeout, env=env, logfile=work / "demo.log")
    summary = [ln for ln in (work / "demo.log").read_text(errors="replace").splitlines()
               if ln.startswith("[demo] ") and ("trained" in ln or "done" in ln)]
    for ln in summary:
        log(ln)
    log(f"demo: {time.monotonic() - t0:.0f} s")
    return work / "demo" / "labels"


def push(labels: Path, server, args, work: Path) -> tuple[int, list[dict]]:
    """`ciae review push`, as a user runs it; returns (project id, its tasks, least confident first)."""
    from workflows.review.client import TOKEN_ENV, connect, find_project
    from workflows.review.sync import open_output

    cmd = [str(Path(sys.executable).parent / "ciae"), "review", "push", "--labels", str(labels),
           "--url", server.url, "--project", PROJECT, "--n", str(args.n), "--model-version", MODEL,
           "--no-progress"]
    log(" ".join(cmd[1:]))
    run_group(cmd, timeout=300, env=dict(os.environ, **{TOKEN_ENV: server.token}), logfile=work / "push.log")
    log((work / "push.log").read_text(errors="replace").strip().splitlines()[-1])
    client = connect(server.url, server.token)
    project = find_project(client, PROJECT)
    things = {c["name"] for c in open_output(str(labels))[2] if c.get("isthing")}
    tasks = []
    for t in client.tasks.list(project=project.id, fields="all", resolve_uri=False):
        regions = [r for p in (t.predictions or [])[:1] for r in (p.result or []) if r.get("type") == "brushlabels"]
        # the region to select in the picture: the model's most confident thing (1-based, in the
        # order of the Regions panel, which is the prediction's), else its most confident region
        ranked = sorted(range(len(regions)), key=lambda k: (regions[k]["value"]["brushlabels"][0] in things,
                                                          regions[k].get("score") or 0.0))
        tasks.append({"id": t.id, "quality": t.data.get("ciae_quality"), "file_name": t.data.get("ciae_file_name"),
                      "regions": len(regions), "select": ranked[-1] + 1 if ranked else 0})
    tasks.sort(key=lambda t: t["quality"])
    return project.id, tasks


def optimize(png: Path, colors: int) -> None:
    """Reduce the screenshot to a palette PNG (the UI has few colors): a few hundred KB at most."""
    from PIL import Image

    im = Image.open(png).convert("RGB")
    q = im.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    q.save(png, optimize=True)


def main(args) -> int:
    sys.path.insert(0, str(REPO / "tests"))
    import label_studio_server

    for what, path in (("Chromium", Path(args.chromium)), ("the screenshot venv", Path(args.shot_python))):
        if not path.exists():
            raise SystemExit(f"no {what} at {path}: run scripts/review_screenshot.sh, which installs it")
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ciae-shot-"))
    server = None
    try:
        labels = Path(args.labels) if args.labels else make_labels(work, args)
        log("starting Label Studio (tests/label_studio_server.py)")
        server = label_studio_server.start(work / "label-studio")
        log(f"Label Studio at {server.url} (pid {server.proc.pid}), started in {server.start_seconds:.0f} s")
        project_id, tasks = push(labels, server, args, work)
        for t in tasks:
            log(f"  task {t['id']}: {t['file_name']} quality {t['quality']:.3f}, {t['regions']} regions")
        if args.pick == "regions":  # the richest picture: most regions, then the least confident
            task = max(tasks, key=lambda t: (t["regions"], -t["quality"]))
        else:
            task = tasks[min(int(args.pick), len(tasks) - 1)]
        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        log(f"photographing task {task['id']} ({task['file_name']}) -> {out}")
        run_group([str(args.shot_python), str(Path(__file__).resolve()), "shoot", "--url", server.url,
                   "--email", label_studio_server.EMAIL, "--password", label_studio_server.PASSWORD,
                   "--project-id", str(project_id), "--task-id", str(task["id"]), "--out", str(out),
                   "--size", args.size, "--chromium", str(args.chromium), "--select", str(task["select"]),
                   *(["--html", str(work / "page.html")] if args.keep else [])],
                  timeout=240, logfile=work / "shoot.log")
        print((work / "shoot.log").read_text(errors="replace"), end="")
        before = out.stat().st_size
        optimize(out, args.colors)
        log(f"{out}: {before // 1024} KB -> {out.stat().st_size // 1024} KB; {time.monotonic() - t0:.0f} s in all")
        return 0
    except BaseException:
        if server is not None:
            print(f"--- Label Studio log ---\n{server.log_tail()}", file=sys.stderr)
        for name in ("push.log", "shoot.log"):          # the demo's log is kept with --keep
            if (work / name).exists():
                print(f"--- {name} ---\n{(work / name).read_text(errors='replace')[-4000:]}", file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------ shoot (.shot-venv)

def shoot(args) -> int:
    """Log in, open the task's labeling page, wait for the image and its regions, screenshot."""
    from playwright.sync_api import sync_playwright

    width, height = (int(v) for v in args.size.split("x"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            ctx = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)
            page = ctx.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{args.url}/user/login/")
            page.fill('input[name="email"]', args.email)
            page.fill('input[name="password"]', args.password)
            page.click('button[type="submit"], input[type="submit"]')
            page.wait_for_url(lambda u: "/user/login" not in u)
            log(f"logged in: {page.url}")
            page.goto(f"{args.url}/projects/{args.project_id}/data?task={args.task_id}")
            # the image drawn in the labeling canvas (Konva) and the region list filled
            page.wait_for_selector(".lsf-main-view img, .konvajs-content canvas", state="attached")
            page.wait_for_function(
                "() => [...document.querySelectorAll('img')].some(i => i.complete && i.naturalWidth > 0"
                " && i.src.includes('/data/upload/'))")
            page.wait_for_selector("canvas", state="visible")
            items = page.locator(".lsf-outliner-item")      # the Regions panel: one per brush region
            items.first.wait_for(state="visible")
            time.sleep(args.settle)         # brush regions are decoded and drawn after the image
            if 0 < args.select <= items.count():
                # select a region: outlined on the canvas, its label and id in the Info panel
                item = items.nth(args.select - 1)
                item.locator(".lsf-outliner-item__title").click()
                log(f"selected region {args.select} of {items.count()}: {' '.join(item.inner_text().split())}")
                page.mouse.move(width - 5, height - 5)     # no hover highlight left anywhere
                time.sleep(1.0)
            if args.html:
                Path(args.html).write_text(page.content())
            page.screenshot(path=args.out)
            log(f"saved {args.out}")
        finally:
            browser.close()
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(OUT), help=f"the PNG to write (default {OUT.relative_to(REPO)})")
    p.add_argument("--labels", default=None,
                   help="push this existing labeling output (`ciae label`'s folder) instead of running the demo")
    p.add_argument("--iterations", type=int, default=400, help="the demo's training steps (default 400)")
    p.add_argument("--train-images", type=int, default=128, help="the demo's training images (default 128)")
    p.add_argument("--val-images", type=int, default=24, help="the demo's labeled images (default 24)")
    p.add_argument("--workers", type=int, default=2, help="the demo's Ray Train workers (default 2)")
    p.add_argument("--seed", type=int, default=0, help="the demo's seed (default 0)")
    p.add_argument("--demo-timeout", type=float, default=900.0, help="seconds for the demo (default 900)")
    p.add_argument("--n", type=int, default=4, help="images pushed (the least confident; default 4)")
    p.add_argument("--pick", default="regions",
                   help="which pushed task to photograph: 'regions', the one with the most predicted regions "
                        "(default), or a rank, 0 = the least confident")
    p.add_argument("--size", default="1400x900", help="the browser's viewport, WxH (default 1400x900)")
    p.add_argument("--colors", type=int, default=256, help="palette colors of the saved PNG (default 256)")
    p.add_argument("--chromium", default=CHROMIUM, help=f"the browser (default {CHROMIUM})")
    p.add_argument("--shot-python", default=str(SHOT_PYTHON),
                   help="the python with Playwright (default .shot-venv/bin/python)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, demo output, the page's HTML)")
    sub = p.add_subparsers(dest="action")
    s = sub.add_parser("shoot", help="(internal, run in .shot-venv) photograph one task of a running server")
    for name in ("--url", "--email", "--password", "--project-id", "--task-id", "--out"):
        s.add_argument(name, required=True)
    s.add_argument("--size", default="1400x900")
    s.add_argument("--chromium", default=CHROMIUM)
    s.add_argument("--settle", type=float, default=3.0, help="seconds to wait after the image is drawn")
    s.add_argument("--select", type=int, default=0,
                   help="the region to select, 1-based in the Regions panel (default 0: none)")
    s.add_argument("--html", default=None, help="also save the page's HTML here (to debug selectors)")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse()
    sys.exit(shoot(a) if a.action == "shoot" else main(a))
