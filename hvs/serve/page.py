"""The search page served at ``GET /``: one self-contained HTML document (inline CSS and JS, no
CDN, no build step), kept in a Python string so it ships inside the package without package-data
configuration. It uploads (or takes a dropped) query image to ``POST /search`` and shows the top-k
gallery thumbnails (``GET /thumb/{id}``) with labels and scores."""

INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>hvs search</title>
<style>
  :root { --fg: #1d232a; --muted: #5f6b76; --line: #d5dbe1; --accent: #2463eb; --bg: #f6f8fa; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
         background: var(--bg); }
  header { padding: 14px 24px; background: #fff; border-bottom: 1px solid var(--line); }
  header h1 { margin: 0; font-size: 19px; }
  header p { margin: 2px 0 0; color: var(--muted); font-size: 13px; }
  main { max-width: 1100px; margin: 0 auto; padding: 20px 24px; }
  #drop { display: flex; gap: 18px; align-items: center; padding: 18px; background: #fff;
          border: 2px dashed var(--line); border-radius: 10px; }
  #drop.over { border-color: var(--accent); background: #eef3ff; }
  #preview { width: 96px; height: 96px; border-radius: 6px; background: #e9edf1; object-fit: contain;
             image-rendering: pixelated; flex: none; }
  #drop .controls { display: flex; flex-direction: column; gap: 8px; }
  label.k { color: var(--muted); font-size: 13px; }
  #status { margin: 14px 0 6px; min-height: 1.4em; color: var(--muted); font-size: 13px; }
  #status.error { color: #b42318; }
  #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 14px;
             list-style: none; margin: 0; padding: 0; }
  .result { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px; }
  .result img { width: 100%; aspect-ratio: 1; object-fit: contain; background: #e9edf1; border-radius: 4px;
                image-rendering: pixelated; display: block; }
  .result .label { font-weight: 600; margin-top: 6px; overflow: hidden; text-overflow: ellipsis;
                   white-space: nowrap; }
  .result .meta { display: flex; justify-content: space-between; color: var(--muted); font-size: 12px; }
  .result .score { color: var(--accent); font-variant-numeric: tabular-nums; }
</style>
</head>
<body>
<header>
  <h1>hvs &mdash; heterogeneous visual search</h1>
  <p id="info">loading&hellip;</p>
</header>
<main>
  <div id="drop">
    <img id="preview" alt="query image">
    <div class="controls">
      <div><strong>Drop a query image here</strong> or choose a file:</div>
      <input id="file" type="file" accept="image/*">
      <label class="k">results <select id="k"><option>5</option><option selected>10</option>
        <option>20</option><option>50</option></select></label>
    </div>
  </div>
  <div id="status" role="status"></div>
  <ol id="results"></ol>
</main>
<script>
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const drop = $("drop"), file = $("file"), status = $("status"), list = $("results");
  let last = null;

  function say(text, isError) {
    status.textContent = text;
    status.className = isError ? "error" : "";
  }

  fetch("stats").then((r) => r.json()).then((s) => {
    const q = s.models.query, g = s.models.gallery;
    $("info").textContent = "query model " + q.name + " (" + q.runtime + ", " + q.fingerprint + ")  \\u2192  " +
      s.index.size + " gallery items embedded by " + g.name + " (" + g.fingerprint + ")";
  }).catch(() => { $("info").textContent = "search service"; });

  function render(body) {
    list.textContent = "";
    body.results.forEach((r, i) => {
      const li = document.createElement("li");
      li.className = "result";
      li.dataset.id = r.id;
      const img = document.createElement("img");
      img.src = "thumb/" + encodeURIComponent(r.id);
      img.alt = r.label || ("item " + r.id);
      img.loading = "lazy";
      const label = document.createElement("div");
      label.className = "label";
      label.textContent = r.label || "(no label)";
      label.title = r.source || "";
      const meta = document.createElement("div");
      meta.className = "meta";
      const rank = document.createElement("span");
      rank.textContent = "#" + (i + 1) + "  id " + r.id;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = r.score.toFixed(3);
      meta.append(rank, score);
      li.append(img, label, meta);
      list.append(li);
    });
    const t = body.timings_ms;
    say(body.results.length + " of " + body.index_size + " gallery items in " + t.total.toFixed(1) +
        " ms (decode " + t.decode.toFixed(1) + ", embed " + t.embed.toFixed(1) + ", search " +
        t.search.toFixed(1) + ") by " + body.model.name + " [" + body.model.runtime + "]");
  }

  async function search(f) {
    if (!f) return;
    last = f;
    $("preview").src = URL.createObjectURL(f);
    say("searching\\u2026");
    const form = new FormData();
    form.append("image", f, f.name || "query");
    try {
      const r = await fetch("search?k=" + $("k").value, { method: "POST", body: form });
      const body = await r.json().catch(() => ({ detail: r.statusText }));
      if (!r.ok) { list.textContent = ""; say("error " + r.status + ": " + body.detail, true); return; }
      render(body);
    } catch (e) {
      say("request failed: " + e, true);
    }
  }

  file.addEventListener("change", () => search(file.files[0]));
  $("k").addEventListener("change", () => search(last));
  ["dragenter", "dragover"].forEach((ev) => drop.addEventListener(ev, (e) => {
    e.preventDefault(); drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((ev) => drop.addEventListener(ev, (e) => {
    e.preventDefault(); drop.classList.remove("over");
  }));
  drop.addEventListener("drop", (e) => search(e.dataTransfer.files[0]));
})();
</script>
</body>
</html>
"""

__all__ = ["INDEX_HTML"]
