"""The report's HTML: one page, no network. PNGs sit beside it; the rollouts travel inside it as JSON and a
few lines of plain JavaScript page and filter them (50 rows a page, so 10,000 rollouts stay quick). The
filter lives in the URL hash under a prefix (``#rollouts?step=3&correct=false&prompt=17&page=2``): a link opens
a filtered view. A hash without it (a section's ``#accuracy``) leaves the filter alone, and the section links
scroll without changing the hash, so the URL keeps the filter.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from raylign.report.data import RunData, item_id

MAX_TEXT_CHARS = 4000  # of each completion embedded in the page; longer ones are cut (the jsonl has them whole)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1250px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table.kv td, table.kv th, #rollouts td, #rollouts th { border: 1px solid #ddd; padding: 2px 6px; font-size: 0.85em;
  vertical-align: top; text-align: left; }
table { border-collapse: collapse; } img { max-width: 100%; border: 1px solid #eee; margin: 4px 0; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font-size: 0.85em; }
pre.config { max-height: 30em; overflow: auto; background: #f7f7f7; padding: 0.5em; }
mark.tool { background: #dde8ff; color: #335; } .ok { color: #070; } .bad { color: #a00; }
#filters { margin: 0.5em 0; } #filters label { margin-right: 1em; } .big { font-size: 1.15em; }
"""

SCRIPT = """
const ROWS = JSON.parse(document.getElementById('rollout-data').textContent);
const PAGE = 50;
const $ = (id) => document.getElementById(id);
const PREFIX = 'rollouts?';
// The filter of a hash: '#rollouts?step=3&correct=false' (or an older link's '#step=3&correct=false'); null for
// any other hash, such as a section's '#accuracy', which leaves the filter as it is.
function parseFilter(hash) {
  const h = hash.slice(1);
  if (!h.startsWith(PREFIX) && !h.includes('=')) return null;
  const q = new URLSearchParams(h.startsWith(PREFIX) ? h.slice(PREFIX.length) : h);
  return {step: q.get('step') || '', correct: q.get('correct') || '', prompt: q.get('prompt') || '',
          page: parseInt(q.get('page') || '1', 10)};
}
let FILTER = parseFilter(location.hash) || {step: '', correct: '', prompt: '', page: 1};
let PAGES = 1;  // of the filtered rows, as last rendered
function matches(r, f) {
  if (f.step && String(r.step) !== f.step) return false;
  if (f.correct && String(r.correct) !== f.correct) return false;
  if (f.prompt) {
    const needle = f.prompt.toLowerCase();
    if (!r.id.toLowerCase().includes(needle) && !(r.prompt || '').toLowerCase().includes(needle)) return false;
  }
  return true;
}
function textCell(r) {
  const pre = document.createElement('pre');
  let at = 0;
  for (const [a, b] of (r.tool_spans || [])) {
    pre.append(r.text.slice(at, a));
    const mark = document.createElement('mark');
    mark.className = 'tool';
    mark.title = 'tool output: loss mask 0, not trained on';
    mark.textContent = r.text.slice(a, b);
    pre.append(mark);
    at = b;
  }
  pre.append(r.text.slice(at));
  return pre;
}
function cell(tr, value, cls) {
  const td = document.createElement('td');
  if (value instanceof Node) td.append(value); else td.textContent = value;
  if (cls) td.className = cls;
  tr.append(td);
}
function fmt(x) { return (typeof x === 'number') ? x.toFixed(3) : (x === null || x === undefined ? '' : String(x)); }
function render() {
  const f = FILTER;
  $('f-step').value = f.step; $('f-correct').value = f.correct; $('f-prompt').value = f.prompt;
  const hits = ROWS.filter((r) => matches(r, f));
  const pages = Math.max(1, Math.ceil(hits.length / PAGE));
  PAGES = pages;
  const page = Math.min(Math.max(1, f.page || 1), pages);
  const body = $('rollout-body');
  body.replaceChildren();
  for (const r of hits.slice((page - 1) * PAGE, page * PAGE)) {
    const tr = document.createElement('tr');
    tr.className = 'rollout';
    tr.dataset.step = r.step; tr.dataset.correct = String(r.correct); tr.dataset.id = r.id;
    cell(tr, r.step); cell(tr, r.id); cell(tr, r.prompt || '');
    cell(tr, textCell(r)); cell(tr, fmt(r.reward)); cell(tr, fmt(r.advantage));
    cell(tr, r.correct === null ? '' : (r.correct ? 'yes' : 'no'), r.correct ? 'ok' : 'bad');
    cell(tr, r.note || '');
    body.append(tr);
  }
  $('rollout-count').textContent = hits.length + ' of ' + ROWS.length + ' rollouts match; page ' + page + ' of ' + pages;
  $('rollout-count').dataset.matches = hits.length;
  document.body.dataset.rendered = '1';
}
function setFilter(changes) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries({...FILTER, ...changes})) {
    if (v && !(k === 'page' && String(v) === '1')) q.set(k, String(v));
  }
  location.hash = PREFIX + q.toString();
}
function onHash() {
  const f = parseFilter(location.hash);
  if (f) { FILTER = f; render(); }
}
for (const s of [...new Set(ROWS.map((r) => r.step))].sort((a, b) => a - b)) {
  const o = document.createElement('option'); o.value = String(s); o.textContent = 'step ' + s; $('f-step').append(o);
}
$('f-step').onchange = (e) => setFilter({step: e.target.value, page: ''});
$('f-correct').onchange = (e) => setFilter({correct: e.target.value, page: ''});
$('f-prompt').oninput = (e) => setFilter({prompt: e.target.value, page: ''});
$('prev').onclick = () => setFilter({page: String(Math.max(1, Math.min(PAGES, FILTER.page) - 1))});
$('next').onclick = () => setFilter({page: String(Math.min(PAGES, FILTER.page + 1))});
window.addEventListener('hashchange', onHash);
// Section links scroll without touching the hash, so the URL keeps the filter (and stays a link to it).
for (const a of document.querySelectorAll('nav a')) {
  a.onclick = (e) => { e.preventDefault(); $(a.getAttribute('href').slice(1)).scrollIntoView(); };
}
if (parseFilter(location.hash)) $('rollouts-section').scrollIntoView();  // a filtered link opens at the table
window.addEventListener('load', () => {
  document.body.dataset.images = [...document.images].filter((i) => i.complete && i.naturalWidth > 0).length;
});
render();
"""

ROLLOUTS_HTML = """
<div id="filters">
  <label>step <select id="f-step"><option value="">all</option></select></label>
  <label>correct <select id="f-correct"><option value="">all</option><option value="true">yes</option>
    <option value="false">no</option></select></label>
  <label>prompt <input id="f-prompt" placeholder="id or text"></label>
  <button id="prev">&larr; prev</button> <button id="next">next &rarr;</button> <span id="rollout-count"></span>
</div>
<table id="rollouts"><thead><tr><th>step</th><th>id</th><th>prompt</th><th>completion
  (<mark class="tool">tool output</mark>: masked)</th><th>reward</th><th>advantage</th><th>correct</th><th>note</th>
</tr></thead><tbody id="rollout-body"></tbody></table>
"""


def _text(row: dict) -> str:
    if "completion" in row:
        return row["completion"]
    if "chosen" in row:
        return f"CHOSEN:\n{row['chosen']}\n\nREJECTED:\n{row['rejected']}"
    return row.get("response", "")


def _note(row: dict) -> str:
    parts = [f"pair: {row['pair']}"] if row.get("pair") else []
    parts += [f"{k} {v:.3f}" for k, v in (row.get("components") or {}).items()]
    if row.get("finish_reason") == "length":
        parts.append("truncated")
    if "kept" in row:
        parts.append("kept" if row["kept"] else "not kept")
    return ", ".join(parts)


def rollout_rows(rollouts: list[dict]) -> list[dict]:
    """The rows the page's table shows: text cut to MAX_TEXT_CHARS (tool spans clipped with it)."""
    out = []
    for r in rollouts:
        text = _text(r)
        spans = [[a, min(b, MAX_TEXT_CHARS)] for a, b in r.get("tool_spans", []) if a < MAX_TEXT_CHARS]
        out.append({"step": r["step"], "id": item_id(r), "prompt": (r.get("prompt") or "")[:300],
                    "text": text[:MAX_TEXT_CHARS], "tool_spans": spans, "reward": r.get("reward"),
                    "advantage": r.get("advantage"), "correct": r.get("correct"), "note": _note(r)})
    return out


def embedded_json(data) -> str:
    """JSON safe inside a <script> element: no '</' can close it early."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")


def kv_table(pairs: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{cells}</table>'


def image(path: Path | None, alt: str) -> str:
    return f'<p><img src="{html.escape(path.name)}" alt="{html.escape(alt)}"></p>' if path else ""


def section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>' if body else ""


def page(title: str, sections: list[str], rollouts: list[dict] | None) -> str:
    table = ""
    if rollouts is not None:
        table = section("Rollouts", ROLLOUTS_HTML + f'<script type="application/json" id="rollout-data">'
                        f"{embedded_json(rollout_rows(rollouts))}</script><script>{SCRIPT}</script>", "rollouts-section")
    body = "".join(sections) + table
    links = " | ".join(f'<a href="#{a}">{t}</a>'
                       for a, t in re.findall(r'<section id="([^"]+)"><h2>([^<]+)</h2>', body))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><nav>{links}</nav>{body}</body></html>")


def config_section(run: RunData) -> str:
    body = ""
    if run.command:
        body += f"<p>command line:</p><pre class=\"config\">{html.escape(run.command)}</pre>"
    if run.config_text:
        body += f"<p>resolved config (config.yaml):</p><pre class=\"config\">{html.escape(run.config_text)}</pre>"
    return section("Config and command line", body, "config")
