// A small inline SVG line chart of training and validation loss by step.

const NS = "http://www.w3.org/2000/svg";
const W = 600;
const H = 220;
const PAD = { left: 48, right: 12, top: 12, bottom: 28 };

function el(name, attrs = {}, text = null) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

function scale(points) {
  const steps = points.map((p) => p.step);
  const values = points.flatMap((p) => [p.train, p.valid]).filter(Number.isFinite);
  const x0 = Math.min(...steps);
  const x1 = Math.max(...steps, x0 + 1);
  let y0 = Math.min(...values);
  let y1 = Math.max(...values);
  if (y1 - y0 < 1e-6) { y0 -= 0.5; y1 += 0.5; }
  const x = (s) => PAD.left + ((s - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const y = (v) => PAD.top + (1 - (v - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);
  return { x, y, x0, x1, y0, y1 };
}

function line(points, key, s, cls) {
  const pts = points.filter((p) => Number.isFinite(p[key]));
  if (!pts.length) return null;
  const coords = pts.map((p) => `${s.x(p.step).toFixed(1)},${s.y(p[key]).toFixed(1)}`).join(" ");
  // one point alone still shows: a polyline of one vertex draws nothing, so add a dot
  if (pts.length === 1) {
    return el("circle", { class: cls, cx: s.x(pts[0].step), cy: s.y(pts[0][key]), r: 3 });
  }
  return el("polyline", { class: cls, points: coords, "data-points": pts.length });
}

function axes(svg, s) {
  const bottom = H - PAD.bottom;
  svg.append(
    el("line", { class: "axis", x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: bottom }),
    el("line", { class: "axis", x1: PAD.left, y1: bottom, x2: W - PAD.right, y2: bottom }),
    el("text", { class: "label", x: PAD.left - 6, y: PAD.top + 10, "text-anchor": "end" }, s.y1.toFixed(2)),
    el("text", { class: "label", x: PAD.left - 6, y: bottom, "text-anchor": "end" }, s.y0.toFixed(2)),
    el("text", { class: "label", x: PAD.left, y: H - 8 }, `step ${s.x0}`),
    el("text", { class: "label", x: W - PAD.right, y: H - 8, "text-anchor": "end" }, `step ${s.x1}`),
  );
}

function summary(points) {
  const train = points.filter((p) => Number.isFinite(p.train));
  if (!train.length) return "No loss reported yet.";
  const first = train[0];
  const last = train[train.length - 1];
  return `Training loss ${first.train.toFixed(3)} at step ${first.step}, ` +
    `${last.train.toFixed(3)} at step ${last.step} (${train.length} points).`;
}

/** Draw [{step, train, valid}] into `container`, replacing what was there. */
export function drawLoss(container, points) {
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": summary(points) });
  svg.append(el("title", {}, summary(points)));
  if (!points.length) {
    svg.append(el("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" },
      "The loss appears here as the job reports it."));
  } else {
    const s = scale(points);
    axes(svg, s);
    for (const [key, cls] of [["valid", "valid"], ["train", "train"]]) {
      const drawn = line(points, key, s, cls);
      if (drawn) svg.append(drawn);
    }
  }
  container.replaceChildren(svg);
  container.dataset.points = String(points.length);
}
