// The Hotspots map page. Every string that comes from data (tile properties, manifests,
// latest.json, tilesets.json) reaches the page as text: textContent and DOM nodes, never
// innerHTML, so a category like <img onerror=…> is shown, not run. The page's
// Content-Security-Policy (index.html) is the second line of defence.
"use strict";

const NAME = /^[a-z0-9][a-z0-9_-]{0,63}$/; // a tileset name, as the config allows
const SNAPSHOT = /^snapshots\/[A-Za-z0-9._-]+\/$/; // latest.json's "path"
const METRIC_COLORS = { delays: "#e08214", cancellations: "#8073ac", departures: "#35978f" };
const HEALTHY_COLOR = "#1b7837";
const WORLD = [[-180, -85.05], [180, 85.05]];

function node(tag, text, className) {
  const el = document.createElement(tag);
  if (text !== undefined) el.textContent = String(text);
  if (className) el.className = className;
  return el;
}

function say(text) {
  document.getElementById("status").textContent = text;
}

function fmt(value) {
  return typeof value === "number" ? value.toLocaleString("en", { maximumFractionDigits: 3 }) : String(value);
}

async function getJSON(url, { fresh = false, seconds = 30 } = {}) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), seconds * 1000);
  try {
    const response = await fetch(url, { cache: fresh ? "no-store" : "default", signal: abort.signal });
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return await response.json();
  } finally {
    clearTimeout(timer);
  }
}

// The basemap: the configured MapLibre style, else (or offline) Natural Earth's land,
// coastlines and borders from npm's world-atlas, published under _lib/.
async function basemap(settings) {
  if (settings && typeof settings.style === "string") {
    try {
      return { style: await getJSON(settings.style, { seconds: 5 }), offline: false };
    } catch (error) {
      console.warn("basemap style unavailable, drawing the offline one:", error.message);
    }
  }
  const topo = await getJSON("_lib/countries-50m.json");
  const style = {
    version: 8,
    sources: {
      // 1:50m data gains nothing past zoom 6: tiled up to there, overzoomed beyond (cheap to draw)
      land: { type: "geojson", data: unwrap(topojson.feature(topo, topo.objects.land)), maxzoom: 6,
              attribution: "Natural Earth" },
      borders: { type: "geojson", data: topojson.mesh(topo, topo.objects.countries, (a, b) => a !== b), maxzoom: 6 },
    },
    layers: [
      { id: "water", type: "background", paint: { "background-color": "#dfe9f0" } },
      { id: "land", type: "fill", source: "land", paint: { "fill-color": "#f6f4ee" } },
      { id: "coastline", type: "line", source: "land", paint: { "line-color": "#9fb7c8", "line-width": 0.8 } },
      { id: "borders", type: "line", source: "borders",
        paint: { "line-color": "#b4a7c6", "line-width": 0.8, "line-dasharray": [3, 2] } },
    ],
  };
  return { style, offline: true };
}

// Natural Earth keeps Chukotka and Fiji as rings that jump from 179.9° to -180° and back:
// drawn flat, each jump is a line across the world. Walking the ring, every jump shifts the
// rest of it by 360°, so it stays continuous (MapLibre draws longitudes past 180°).
// Antarctica, which closes along the pole, is left as it is.
function unwrap(collection) {
  const fix = (ring) => {
    if (ring.some((p) => p[1] < -85)) return ring;
    let shift = 0;
    return ring.map(([x, y], i) => {
      const before = i > 0 ? ring[i - 1][0] : x;
      if (x - before > 180) shift -= 360;
      else if (before - x > 180) shift += 360;
      return [x + shift, y];
    });
  };
  for (const feature of collection.features) {
    const g = feature.geometry;
    g.coordinates = g.type === "Polygon" ? g.coordinates.map(fix) : g.coordinates.map((poly) => poly.map(fix));
  }
  return collection;
}

function dataBounds(header) {
  const box = [header.minLon, header.minLat, header.maxLon, header.maxLat].map(Number);
  if (!box.every(Number.isFinite) || box[0] > box[2] || box[1] > box[3]) return WORLD;
  const pad = 0.005; // one point (or a line of them) still opens on a street, not at zoom 22
  return [[box[0] - pad, box[1] - pad], [box[2] + pad, box[3] + pad]];
}

function pickerOf(tilesets, current) {
  const picker = document.getElementById("tileset");
  for (const t of tilesets) {
    const name = String(t && t.name);
    const option = new Option(name, name, false, t === current);
    option.disabled = !NAME.test(name);
    picker.add(option);
  }
  picker.addEventListener("change", () => {
    const params = new URLSearchParams(location.search);
    params.set("tileset", picker.value);
    location.search = params.toString();
  });
}

function popupContent(p) {
  const box = node("div", undefined, "popup");
  const count = Number(p.count);
  box.append(node("strong", `${fmt(count)} report${count === 1 ? "" : "s"}`));
  const list = node("dl");
  const row = (label, value) => {
    if (value !== undefined && value !== null && value !== "") list.append(node("dt", label), node("dd", value));
  };
  row("score", fmt(p.score));
  row("intensity", fmt(p.intensity));
  row("top category", p.top_category ?? "—");
  row("last seen", p.last_seen);
  for (const metric of Object.keys(METRIC_COLORS)) if (p[metric] !== undefined) row(metric, fmt(p[metric]));
  if (p.healthy === true) row("status", "healthy: no impact");
  box.append(list);
  if (p.coarsened === true) box.append(node("div", "approximate position: too few reports to show where", "note"));
  return box;
}

// What is drawn: healthy (zero-impact) cells while "coverage" is on, and, for metric
// tilesets, cells with an impact in a shown metric (hiding delays hides delay-only cells).
function shownFilter(state, metrics) {
  const shown = [];
  if (state.coverage) shown.push(["==", ["get", "healthy"], true]);
  if (metrics.length) {
    for (const m of metrics) if (state[m]) shown.push([">", ["coalesce", ["get", m], 0], 0]);
  } else {
    shown.push(["!=", ["get", "healthy"], true]);
  }
  return ["any", ...shown];
}

function layersFor(metrics) {
  const cells = { source: "cells", "source-layer": "cells" };
  const heat = {
    id: "heatmap", type: "heatmap", ...cells, maxzoom: 15,
    paint: {
      "heatmap-weight": ["get", "intensity"],
      "heatmap-intensity": ["interpolate", ["linear"], ["zoom"], 0, 2, 14, 3],
      "heatmap-radius": ["interpolate", ["linear"], ["zoom"], 0, 6, 14, 28],
      "heatmap-opacity": ["interpolate", ["linear"], ["zoom"], 11, 0.85, 14, 0],
      "heatmap-color": ["interpolate", ["linear"], ["heatmap-density"],
        0, "rgba(33,102,172,0)", 0.2, "rgb(103,169,207)", 0.4, "rgb(209,229,240)",
        0.6, "rgb(253,219,199)", 0.8, "rgb(239,138,98)", 1, "rgb(178,24,43)"],
    },
  };
  const circles = {
    id: "cells", type: "circle", ...cells, minzoom: 11,
    paint: {
      "circle-radius": ["interpolate", ["linear"], ["sqrt", ["get", "count"]], 1, 3, 30, 18],
      "circle-color": ["case", ["==", ["get", "healthy"], true], HEALTHY_COLOR,
        ["interpolate", ["linear"], ["get", "intensity"], 0, "rgb(103,169,207)", 0.5, "rgb(253,219,199)", 1, "rgb(178,24,43)"]],
      "circle-opacity": ["interpolate", ["linear"], ["zoom"], 11, 0, 13, 0.85],
      "circle-stroke-color": "#fff", "circle-stroke-width": 0.5,
    },
  };
  // seed 003: a layer per metric, a cell in it only where the metric is > 0
  const metricLayers = metrics.map((m) => ({
    id: `metric-${m}`, type: "circle", ...cells, filter: [">", ["coalesce", ["get", m], 0], 0],
    paint: { "circle-radius": ["interpolate", ["linear"], ["sqrt", ["get", m]], 0, 2, 30, 14],
             "circle-color": METRIC_COLORS[m], "circle-opacity": 0.6 },
  }));
  // invisible, at every zoom: what a click or hover finds (the heatmap itself cannot be queried)
  const hit = { id: "hit", type: "circle", ...cells, paint: { "circle-radius": 12, "circle-opacity": 0 } };
  return { heat, circles, metricLayers, hit };
}

function addToggles(map, metrics, apply, state) {
  const toggles = document.getElementById("toggles");
  const toggle = (id, label, color, onChange) => {
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = true;
    box.id = id;
    box.addEventListener("change", () => onChange(box.checked));
    const swatch = node("span", undefined, "swatch");
    swatch.style.background = color;
    const row = document.createElement("label");
    row.append(box, swatch, node("span", label));
    toggles.append(row);
  };
  for (const m of metrics) {
    toggle(`toggle-metric-${m}`, m, METRIC_COLORS[m], (on) => {
      state[m] = on;
      map.setLayoutProperty(`metric-${m}`, "visibility", on ? "visible" : "none");
      apply();
    });
  }
  toggle("toggle-coverage", "coverage: healthy (zero-impact) cells", HEALTHY_COLOR, (on) => {
    state.coverage = on;
    apply();
  });
}

function addPopups(map, queryable) {
  const near = (point) => {
    const pad = 14;
    const found = map.queryRenderedFeatures([[point.x - pad, point.y - pad], [point.x + pad, point.y + pad]],
                                            { layers: queryable });
    let best = null;
    let bestDistance = Infinity;
    for (const f of found) {
      if (!f.geometry || f.geometry.type !== "Point") continue;
      const at = map.project(f.geometry.coordinates);
      const distance = Math.hypot(at.x - point.x, at.y - point.y);
      if (distance < bestDistance) [best, bestDistance] = [f, distance];
    }
    return best;
  };
  map.on("click", (e) => {
    const feature = near(e.point);
    if (!feature) return;
    new maplibregl.Popup({ maxWidth: "260px" }).setLngLat(feature.geometry.coordinates)
      .setDOMContent(popupContent(feature.properties)).addTo(map);
  });
  map.on("mousemove", (e) => {
    map.getCanvas().style.cursor = near(e.point) ? "pointer" : "";
  });
}

async function main() {
  if (typeof maplibregl === "undefined" || typeof pmtiles === "undefined" || typeof topojson === "undefined") {
    throw new Error("the map libraries under _lib/ are missing: install the viewer's npm packages "
                    + "(make install) and publish again");
  }
  maplibregl.setWorkerUrl("_lib/maplibre-gl-csp-worker.js");
  const [tilesets, settings] = await Promise.all([
    getJSON("tilesets.json", { fresh: true }),
    getJSON("viewer.json", { fresh: true }).catch(() => ({})),
  ]);
  if (!Array.isArray(tilesets) || tilesets.length === 0) {
    say("no tileset is published yet");
    return null;
  }
  const wanted = new URLSearchParams(location.search).get("tileset");
  const current = tilesets.find((t) => t && t.name === wanted && NAME.test(t.name))
    || tilesets.find((t) => t && NAME.test(String(t.name))) || tilesets[0];
  pickerOf(tilesets, current);
  if (!NAME.test(String(current && current.name))) throw new Error(`not a tileset name: ${current && current.name}`);

  const latest = await getJSON(`${current.name}/latest.json`, { fresh: true });
  if (!SNAPSHOT.test(String(latest.path))) throw new Error(`latest.json names no snapshot: ${latest.path}`);
  const folder = `${current.name}/${latest.path}`;
  const manifest = await getJSON(`${folder}manifest.json`);
  const scored = Number(manifest && manifest.counts && manifest.counts.scored) || 0;
  const asOf = String(manifest.as_of ?? latest.as_of);
  document.getElementById("legend").textContent =
    `${typeof current.legend === "string" ? current.legend : ""} As of ${asOf}.`.trim();

  const archiveUrl = new URL(`${folder}heatmap.pmtiles`, location.href).href;
  const protocol = new pmtiles.Protocol();
  maplibregl.addProtocol("pmtiles", protocol.tile);
  const archive = new pmtiles.PMTiles(archiveUrl);
  protocol.add(archive);
  const header = await archive.getHeader();

  const metrics = (Array.isArray(current.metrics) ? current.metrics : []).filter((m) => Object.hasOwn(METRIC_COLORS, m));
  const state = { coverage: true, ...Object.fromEntries(metrics.map((m) => [m, true])) };
  const { heat, circles, metricLayers, hit } = layersFor(metrics);
  for (const layer of [heat, circles, hit]) layer.filter = shownFilter(state, metrics);
  const { style, offline } = await basemap(settings);
  style.sources = { ...style.sources, cells: { type: "vector", url: `pmtiles://${archiveUrl}` } };
  style.layers = [...(style.layers || []), heat, circles, ...metricLayers, hit];

  const options = { container: "map", style, hash: true, attributionControl: { compact: true } };
  if (!location.hash) Object.assign(options, { bounds: scored ? dataBounds(header) : WORLD,
                                                fitBoundsOptions: { padding: 40, maxZoom: 15 } });
  const map = new maplibregl.Map(options);
  window.hotspotsMap = map;
  window.hotspotsBasemap = offline ? "offline" : "style";
  map.addControl(new maplibregl.NavigationControl(), "top-right");
  map.addControl(new maplibregl.ScaleControl(), "bottom-right");

  const apply = () => {
    for (const id of ["heatmap", "cells", "hit"]) map.setFilter(id, shownFilter(state, metrics));
  };
  addToggles(map, metrics, apply, state);
  addPopups(map, ["hit", ...metricLayers.map((l) => l.id)]);

  await new Promise((resolve) => map.once("idle", resolve));
  say(scored ? `snapshot ${latest.snapshot_id}: ${fmt(scored)} reports`
             : `no reports in this snapshot (as of ${asOf})`);
  return map;
}

window.hotspotsReady = main();
window.hotspotsReady.catch((error) => {
  say(`error: ${error.message}`);
  console.error(error);
});
