"""``DIR/report.html``: one row per file of the journal, so an archivist can look instead of read.

A single self-contained page (thumbnails embedded as data: URIs): status, tries, frames,
faces, time taken, when, the error of a failed file, and a before | after thumbnail of
the largest restored face of each finished one.
"""
from __future__ import annotations

import base64
import datetime
import html
import os
import time
from pathlib import Path

from .. import __version__

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; }
p.sub { color: #666; margin: 0 0 16px; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 8px; text-align: left; vertical-align: middle; }
th { background: #f4f4f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.when { white-space: nowrap; font-size: 12px; color: #444; }
.state { font-weight: 600; padding: 2px 8px; border-radius: 10px; color: #fff; }
.done { background: #2e7d32; } .failed { background: #c62828; } .running, .interrupted { background: #ef6c00; }
.pending { background: #757575; }
.err { color: #c62828; font-family: monospace; font-size: 12px; max-width: 420px; }
.thumb img { display: block; height: 80px; image-rendering: auto; }
.cap { color: #888; font-size: 11px; }
"""


def _when(t) -> str:
    if t is None:
        return ""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _thumb(out_dir: Path, rel) -> str:
    if not rel:
        return '<span class="cap">no face</span>'
    path = out_dir / rel
    try:
        data = base64.b64encode(path.read_bytes()).decode()
    except OSError:
        return '<span class="cap">thumbnail missing</span>'
    return (f'<img alt="largest face, before and after" src="data:image/png;base64,{data}">'
            f'<span class="cap">before | after</span>')


def write_report(journal, out_dir: Path) -> Path:
    rows = []
    counts: dict[str, int] = {}
    for job in journal.jobs():
        state = job["state"]
        counts[state] = counts.get(state, 0) + 1
        segments = journal.segments(job["output"])
        done_segments = sum(s["state"] == "done" for s in segments)
        output = html.escape(job["output"])
        link = f'<a href="{html.escape(job["output"], quote=True)}">{output}</a>' if state == "done" else output
        seconds = f"{job['seconds']:.1f} s" if job["seconds"] is not None else ""
        rows.append(
            "<tr>"
            f'<td>{link}<br><span class="cap">{html.escape(job["input"])}</span></td>'
            f'<td><span class="state {html.escape(state)}">{html.escape(state)}</span></td>'
            f'<td class="num">{job["tries"]}</td>'
            f'<td class="num">{done_segments}/{len(segments) or job["segments"] or 0}</td>'
            f'<td class="num">{job["frames"] if job["frames"] is not None else ""}</td>'
            f'<td class="num">{job["faces"] if job["faces"] is not None else ""}</td>'
            f'<td class="num">{seconds}</td>'
            f'<td class="when">{_when(job["started"])}<br>{_when(job["finished"])}</td>'
            f'<td class="thumb">{_thumb(out_dir, job["thumb"]) if state == "done" else ""}'
            f'{"<div class=err>" + html.escape(job["error"] or "") + "</div>" if state != "done" else ""}</td>'
            "</tr>")
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>frvideo batch report: {html.escape(str(out_dir))}</title>
<style>{STYLE}</style></head><body>
<h1>frvideo batch report</h1>
<p class="sub">{html.escape(str(out_dir))} &middot; {summary or "no jobs"} &middot; frvideo {__version__}
&middot; written {_when(time.time())}</p>
<table>
<tr><th>output / input</th><th>status</th><th>tries</th><th>segments</th><th>frames</th><th>faces</th>
<th>time</th><th>started / finished</th><th>largest face / error</th></tr>
{chr(10).join(rows)}
</table></body></html>
"""
    path = out_dir / "report.html"
    tmp = path.with_name(f".report.html.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
