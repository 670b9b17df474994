// ANSI colours with ansi_up, without inline styles.
//
// ansi_up escapes all text (output with HTML in it stays text) and keeps its state across
// calls, so a colour or an escape sequence cut between two chunks comes out right. Even in
// its class mode it writes `style="..."` attributes for bold, faint, italic, underline and
// for 256-colour and 24-bit colours, which the page's Content-Security-Policy (style-src
// 'self', by default-src) refuses. So this subclass writes classes for all of those
// (styled in console.css) and the few exact colours as data-fg/data-bg attributes holding
// three numbers, which colour() then applies through the CSSOM: the policy allows that.
import { AnsiUp } from "./vendor/ansi_up.js";

export class Ansi extends AnsiUp {
  constructor() {
    super();
    this.use_classes = true;
    this.escape_html = true; // the default, said out loud: output is never markup
  }

  // Overrides ansi_up's (6.0.6) transform_to_html: the same escaping, classes instead of styles.
  transform_to_html(fragment) {
    const text = fragment.text;
    if (text.length === 0) return text;
    const html = this.escape_txt_for_html(text);
    const classes = [];
    if (fragment.bold) classes.push("ansi-bold");
    if (fragment.faint) classes.push("ansi-faint");
    if (fragment.italic) classes.push("ansi-italic");
    if (fragment.underline) classes.push("ansi-underline");
    let data = "";
    for (const [colour, kind] of [
      [fragment.fg, "fg"],
      [fragment.bg, "bg"],
    ]) {
      if (!colour) continue;
      if (colour.class_name !== "truecolor") classes.push(`${colour.class_name}-${kind}`);
      else data += ` data-${kind}="${colour.rgb.map((n) => Number(n) | 0).join(",")}"`;
    }
    if (classes.length === 0 && !data) return html;
    const attribute = classes.length ? ` class="${classes.join(" ")}"` : "";
    return `<span${attribute}${data}>${html}</span>`;
  }
}

/** Apply the exact (256-colour and 24-bit) colours of the spans under `root`. */
export function colour(root) {
  for (const span of root.querySelectorAll("[data-fg],[data-bg]")) {
    if (span.dataset.fg) span.style.color = `rgb(${span.dataset.fg})`;
    if (span.dataset.bg) span.style.backgroundColor = `rgb(${span.dataset.bg})`;
  }
}
