// Entry point: views by URL hash (#play, #compare, #finetune), then each part wires itself up.

import { initCompare } from "./compare.js";
import { initFinetune } from "./finetune.js";
import { initPlay } from "./play.js";
import { initSettings } from "./settings.js";

const VIEWS = ["play", "compare", "finetune"];

function showView() {
  const wanted = location.hash.slice(1);
  const view = VIEWS.includes(wanted) ? wanted : "play";
  for (const id of VIEWS) document.getElementById(id).hidden = id !== view;
  for (const link of document.querySelectorAll("nav a[data-view]")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  // fine-tuning has its own base-model picker: the sampling column would only distract
  document.querySelector(".layout").classList.toggle("wide-main", view === "finetune");
  document.body.dataset.view = view;
}

function reportError(message) {
  const box = document.getElementById("global-error");
  box.hidden = !message;
  box.textContent = message ? `Could not list models: ${message}` : "";
}

window.addEventListener("hashchange", showView);
showView();
initPlay();
initCompare();
initFinetune();
initSettings(reportError).then(() => { document.body.dataset.ready = "true"; });
