// The search page: sends the chosen photo to /api/find and shows what comes back. Nothing is loaded from
// elsewhere; every text from the server goes in through textContent.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const maxBytes = Number(document.body.dataset.maxUploadBytes);
  const maxLabel = document.body.dataset.maxUpload;
  const form = $("search");
  const fileInput = $("file");
  const drop = $("drop");
  const classField = $("class-field");
  const classSelect = $("class");
  const kInput = $("k");
  const maxDistanceInput = $("max-distance");
  const errorBox = $("error");
  const statusBox = $("status");
  const results = $("results");

  let file = null;          // the photo being searched
  let previewUrl = null;    // its blob: URL, for the query image
  let chosenClass = null;   // a class the person picked; null lets the server suggest one
  let latest = 0;           // only the newest request's answer is shown

  function mode() {
    return form.querySelector('input[name="mode"]:checked').value;
  }

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
    results.hidden = true;
    statusBox.textContent = "";
  }

  function clearError() {
    errorBox.hidden = true;
    errorBox.textContent = "";
  }

  async function loadClasses() {
    try {
      const [classes, health] = await Promise.all([
        fetch("/api/classes").then((r) => r.json()),
        fetch("/api/health").then((r) => r.json()),
      ]);
      classSelect.replaceChildren(...classes.map((c) => {
        const option = document.createElement("option");
        option.value = c.class;
        option.textContent = `${c.class} (${c.images})`;
        return option;
      }));
      $("stored").textContent = `${health.images} images stored in ${classes.length} classes`;
    } catch (err) {
      showError(`cannot reach the server (${err.message})`);
    }
  }

  function setFile(chosen) {
    if (!chosen) return;
    file = chosen;
    chosenClass = null;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    search();
  }

  async function search() {
    classField.hidden = mode() === "all";
    if (!file) return;
    clearError();
    if (file.size > maxBytes) {
      showError(`${file.name}: larger than the ${maxLabel} upload limit`);
      return;
    }
    const k = Number(kInput.value);
    if (!Number.isInteger(k) || k < 1 || k > Number(kInput.max)) {
      showError(`Matches must be a whole number from 1 to ${kInput.max}`);
      return;
    }
    const body = new FormData();
    body.append("file", file, file.name);
    body.append("mode", mode());
    body.append("k", String(k));
    const maxDistance = maxDistanceInput.value.trim();  // the server checks it: a number, or the calibrated name
    if (maxDistance) body.append("max_distance", maxDistance);
    if (mode() !== "all" && chosenClass) body.append("class", chosenClass);
    const request = ++latest;
    statusBox.textContent = `Searching for ${file.name}…`;
    results.setAttribute("aria-busy", "true");
    let response, payload;
    try {
      response = await fetch("/api/find", { method: "POST", body });
      payload = await response.json().catch(() => ({ detail: `${response.status} ${response.statusText}` }));
    } catch (err) {
      if (request === latest) showError(`the search failed: ${err.message}`);
      return;
    } finally {
      if (request === latest) results.removeAttribute("aria-busy");
    }
    if (request !== latest) return;
    if (!response.ok) {
      showError(typeof payload.detail === "string" ? payload.detail : `${response.status} ${response.statusText}`);
      return;
    }
    show(payload[0]);
  }

  function cell(row, text) {
    const td = document.createElement("td");
    td.textContent = text;
    row.appendChild(td);
  }

  function show(item) {
    $("query-img").src = previewUrl;
    $("query-name").textContent = item.query;

    const note = $("class-note");
    note.hidden = item.mode === "all" || !item.query_class;
    if (item.mode !== "all" && item.query_class) {
      classSelect.value = item.query_class;
      const how = {
        "top match": "is the class of the top match over all images, so it is used as the query's class",
        "stored copy": "is the class of a stored copy of this photo",
        "given": "is the class you chose",
      }[item.class_source] || "is the query's class";
      note.textContent = `“${item.query_class}” ${how}. ` +
        (item.mode === "same" ? "Showing only that class" : "Showing every other class") +
        "; pick another class above to change it.";
    }

    const list = $("matches");
    list.replaceChildren(...item.matches.map((m) => {
      const li = document.createElement("li");
      li.className = "match";
      const link = document.createElement("a");
      link.href = m.image;
      link.target = "_blank";
      link.rel = "noopener";
      const img = document.createElement("img");
      img.src = m.thumbnail;
      img.alt = `Match ${m.rank}: ${m.class ?? "no class"}, distance ${m.distance.toFixed(4)}`;
      link.appendChild(img);
      const caption = document.createElement("div");
      caption.className = "caption";
      const rank = document.createElement("span");
      rank.className = "rank";
      rank.textContent = `#${m.rank}`;
      const cls = document.createElement("span");
      cls.className = "cls";
      cls.textContent = m.class ?? "–";
      const dist = document.createElement("span");
      dist.className = "dist";
      dist.textContent = m.distance.toFixed(4);
      caption.append(rank, cls, dist);
      li.append(link, caption);
      return li;
    }));

    const tbody = $("ranks").querySelector("tbody");
    tbody.replaceChildren(...item.matches.map((m) => {
      const row = document.createElement("tr");
      cell(row, String(m.rank));
      cell(row, item.query);
      cell(row, item.query_class ?? "–");
      cell(row, m.class ?? "–");
      cell(row, m.path);
      cell(row, m.distance.toFixed(4));
      return row;
    }));

    const s = item.seconds;
    const count = item.matches.length;
    $("timing").textContent =
      `${count} match${count === 1 ? "" : "es"} in ${s.total.toFixed(3)} s ` +
      `(model ${s.embed.toFixed(3)} s, database ${s.search.toFixed(3)} s)`;
    statusBox.textContent = "";
    results.hidden = false;
  }

  fileInput.addEventListener("change", () => setFile(fileInput.files[0]));
  form.addEventListener("change", (event) => {
    if (event.target.name === "mode") search();
    if (event.target === classSelect) {
      chosenClass = classSelect.value;
      search();
    }
    if (event.target === kInput || event.target === maxDistanceInput) search();
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (file) search();
    else fileInput.click();
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    setFile(event.dataTransfer.files[0]);
  });
  // A photo dropped beside the zone must not make the browser leave the page to open it.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  classField.hidden = mode() === "all";
  loadClasses();
})();
