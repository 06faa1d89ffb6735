// Safe Markdown for model replies.
//
// The text is parsed into a small tree (parseBlocks, parseInline: plain data) and built with DOM calls
// (createElement, createTextNode, textContent), never by parsing HTML: every "<", "&" or tag in a reply is
// shown as the text it is and can never run. Links are made only for http(s) URLs and open with
// rel="noopener noreferrer". Supported: paragraphs, line breaks, headings, fenced code blocks, inline
// code, bold, italics, strikethrough, lists (nested), block quotes, rules, simple tables, links.

// How far an inline opener (`, *, _, ~~, [) looks for its closer: re-rendering a long streamed reply on
// every delta must stay cheap, whatever the text.
const MAX_SCAN = 2000;
const MAX_EMPHASIS = 1000;
// How deep inline spans (bold in italics in a link...) nest before the rest is text.
const MAX_NESTING = 12;
const PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";
const LIST_ITEM = /^( {0,12})([-*+]|\d{1,9}[.)])[ \t]+(.*)$/;
const FENCE = /^ {0,3}(`{3,}|~{3,})[ \t]*([\w+#.-]*).*$/;
const HEADING = /^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}>/;
const TABLE_DELIMITER = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;

/** The http(s) URL `text` names, normalised; null for anything else (javascript:, data:, relative...). */
export function safeUrl(text) {
  if (!/^https?:\/\//i.test(text)) return null;
  try {
    const url = new URL(text);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

// --- blocks -----------------------------------------------------------------------------------------

/** Markdown text as a list of blocks: {type: paragraph|heading|code|rule|quote|list|table, ...}. */
export function parseBlocks(text) {
  const lines = String(text ?? "")
    .replace(/\r\n?/g, "\n")
    .split("\n");
  return blocksOf(lines, 0);
}

function leadingSpaces(line) {
  return line.length - line.replace(/^ +/, "").length;
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || LIST_ITEM.test(line);
}

function isClosingFence(line, fence) {
  const match = /^ {0,3}(`{3,}|~{3,})[ \t]*$/.exec(line);
  return match !== null && match[1][0] === fence[0] && match[1].length >= fence.length;
}

function tableCells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  const cells = [];
  let cell = "";
  for (let i = 0; i < row.length; i++) {
    if (row[i] === "\\" && row[i + 1] === "|") {
      cell += "|";
      i++;
    } else if (row[i] === "|") {
      cells.push(cell.trim());
      cell = "";
    } else {
      cell += row[i];
    }
  }
  cells.push(cell.trim());
  return cells;
}

function isTableStart(lines, i) {
  const delimiter = lines[i + 1];
  return (
    lines[i].includes("|") &&
    delimiter !== undefined &&
    TABLE_DELIMITER.test(delimiter) &&
    tableCells(delimiter).length === tableCells(lines[i]).length
  );
}

function blocksOf(lines, depth) {
  const blocks = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i++;
      continue;
    }
    let match;
    if ((match = FENCE.exec(line))) {
      const fence = match[1];
      const body = [];
      i++;
      while (i < lines.length && !isClosingFence(lines[i], fence)) body.push(lines[i++]);
      i++; // the closing fence; an unclosed block (a reply still streaming) runs to the end
      blocks.push({ type: "code", lang: match[2].replace(/[^\w+#-]/g, "").slice(0, 32), text: body.join("\n") });
      continue;
    }
    if ((match = HEADING.exec(line))) {
      blocks.push({ type: "heading", level: match[1].length, children: parseInline(match[2]) });
      i++;
      continue;
    }
    if (RULE.test(line)) {
      blocks.push({ type: "rule" });
      i++;
      continue;
    }
    if (QUOTE.test(line)) {
      const quoted = [];
      while (i < lines.length && QUOTE.test(lines[i])) quoted.push(lines[i++].replace(/^ {0,3}> ?/, ""));
      blocks.push({ type: "quote", children: depth < 8 ? blocksOf(quoted, depth + 1) : [paragraph(quoted)] });
      continue;
    }
    if (LIST_ITEM.test(line)) {
      const [list, next] = listAt(lines, i, depth);
      blocks.push(list);
      i = next;
      continue;
    }
    if (isTableStart(lines, i)) {
      const head = tableCells(line);
      const rows = [];
      i += 2;
      while (i < lines.length && lines[i].trim() && lines[i].includes("|")) rows.push(tableCells(lines[i++]));
      blocks.push({
        type: "table",
        head: head.map(parseInline),
        rows: rows.map((cells) => head.map((_, column) => parseInline(cells[column] ?? ""))),
      });
      continue;
    }
    const text = [line];
    i++;
    while (i < lines.length && lines[i].trim() && !startsBlock(lines[i])) text.push(lines[i++]);
    blocks.push(paragraph(text));
  }
  return blocks;
}

function paragraph(lines) {
  return { type: "paragraph", children: parseInline(lines.map((line) => line.trim()).join("\n")) };
}

function listAt(lines, start, depth) {
  const first = LIST_ITEM.exec(lines[start]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const contentIndent = indent + first[2].length + 1;
  const items = [];
  let item = null;
  let loose = false;
  let i = start;
  const isSibling = (match) => match && match[1].length <= indent + 1 && /\d/.test(match[2]) === ordered;
  while (i < lines.length) {
    const line = lines[i];
    const match = LIST_ITEM.exec(line);
    if (isSibling(match)) {
      item = [match[3]];
      items.push(item);
      i++;
      continue;
    }
    if (match && match[1].length <= indent + 1) break; // another kind of list at this level
    if (!line.trim()) {
      let next = i + 1;
      while (next < lines.length && !lines[next].trim()) next++;
      if (next < lines.length && (isSibling(LIST_ITEM.exec(lines[next])) || leadingSpaces(lines[next]) > indent + 1)) {
        loose = loose || isSibling(LIST_ITEM.exec(lines[next]));
        item.push("");
        i++;
        continue;
      }
      break;
    }
    if (leadingSpaces(line) > indent + 1) {
      item.push(line.slice(Math.min(leadingSpaces(line), contentIndent)));
      i++;
      continue;
    }
    if (!startsBlock(line) && item[item.length - 1] !== "") {
      item.push(line); // a lazy continuation of the item's text
      i++;
      continue;
    }
    break;
  }
  const list = {
    type: "list",
    ordered,
    start: ordered ? parseInt(first[2], 10) : 1,
    loose,
    items: items.map((itemLines) =>
      depth < 8 ? blocksOf(itemLines, depth + 1) : [paragraph(itemLines.filter((text) => text))],
    ),
  };
  return [list, i];
}

// --- inline -----------------------------------------------------------------------------------------

/** One paragraph's text as inline nodes: strings, and {type: br|code|strong|em|del|link, ...}. */
export function parseInline(source, inLink = false, nesting = 0) {
  return new InlineParser(String(source ?? ""), inLink, nesting).parse();
}

class InlineParser {
  constructor(source, inLink, nesting) {
    this.source = source;
    this.inLink = inLink;
    this.nesting = nesting;
    // Openers known to have no closer after a position: a text full of lone "*" stays linear.
    this.unclosedAfter = new Map();
  }

  parse() {
    const source = this.source;
    const nodes = [];
    let text = "";
    const flush = () => {
      if (text) nodes.push(text);
      text = "";
    };
    let i = 0;
    while (i < source.length) {
      const char = source[i];
      if (char === "\\" && i + 1 < source.length && PUNCTUATION.includes(source[i + 1])) {
        text += source[i + 1];
        i += 2;
        continue;
      }
      if (char === "\n") {
        flush();
        nodes.push({ type: "br" });
        i++;
        continue;
      }
      let found = null;
      if (char === "`") found = this.code(i);
      else if (char === "[" && !this.inLink) found = this.link(i);
      else if (char === "<" && !this.inLink) found = this.angleLink(i);
      else if ((char === "h" || char === "H") && !this.inLink) found = this.bareLink(i);
      else if ((char === "*" || char === "_" || char === "~") && this.nesting < MAX_NESTING) found = this.emphasis(i);
      if (found) {
        flush();
        nodes.push(found.node);
        i = found.end;
        continue;
      }
      if (char === "`" || char === "*" || char === "_" || char === "~") {
        // A run of delimiters that opened nothing is text, all of it.
        let end = i;
        while (source[end] === char) end++;
        text += source.slice(i, end);
        i = end;
        continue;
      }
      text += char;
      i++;
    }
    flush();
    return nodes;
  }

  knownUnclosed(key, position) {
    const after = this.unclosedAfter.get(key);
    return after !== undefined && position >= after;
  }

  code(start) {
    const source = this.source;
    let length = 0;
    while (source[start + length] === "`") length++;
    const key = "`" + length;
    if (this.knownUnclosed(key, start)) return null;
    const limit = Math.min(source.length, start + length + MAX_SCAN);
    let j = start + length;
    while (j < limit) {
      j = source.indexOf("`", j);
      if (j === -1 || j >= limit) break;
      let run = 0;
      while (source[j + run] === "`") run++;
      if (run === length) {
        let code = source.slice(start + length, j).replace(/\n/g, " ");
        if (code.length > 2 && code.startsWith(" ") && code.endsWith(" ") && code.trim()) code = code.slice(1, -1);
        return { node: { type: "code", text: code }, end: j + run };
      }
      j += run;
    }
    if (limit === source.length) this.unclosedAfter.set(key, start);
    return null;
  }

  /** Where the code span (or the run of backticks that opens none) starting at `start` ends. */
  pastCode(start) {
    const span = this.code(start);
    if (span) return span.end;
    let end = start;
    while (this.source[end] === "`") end++;
    return end;
  }

  closingBracket(start) {
    const source = this.source;
    const limit = Math.min(source.length, start + MAX_SCAN);
    let depth = 0;
    for (let j = start; j < limit; j++) {
      const char = source[j];
      if (char === "\\") j++;
      else if (char === "`") j = this.pastCode(j) - 1;
      else if (char === "[") depth++;
      else if (char === "]" && --depth === 0) return j;
    }
    return -1;
  }

  link(start) {
    const source = this.source;
    if (this.knownUnclosed("[", start)) return null;
    const close = this.closingBracket(start);
    if (close === -1) {
      if (start + MAX_SCAN >= source.length) this.unclosedAfter.set("[", start);
      return null;
    }
    if (source[close + 1] !== "(") return null;
    const target = /^\(\s*<?([^\s<>()]*(?:\([^\s<>()]*\)[^\s<>()]*)*)>?(?:\s+(?:"[^"]*"|'[^']*'))?\s*\)/.exec(
      source.slice(close + 1, close + 1 + MAX_SCAN),
    );
    if (!target) return null;
    const href = safeUrl(target[1]);
    if (!href) return null; // not http(s): left as the text it is
    const label = source.slice(start + 1, close);
    const children = label.trim() ? parseInline(label, true, this.nesting + 1) : [target[1]];
    return { node: { type: "link", href, children }, end: close + 1 + target[0].length };
  }

  angleLink(start) {
    const match = /^<(https?:\/\/[^\s<>]+)>/i.exec(this.source.slice(start, start + MAX_SCAN));
    const href = match && safeUrl(match[1]);
    return href ? { node: { type: "link", href, children: [match[1]] }, end: start + match[0].length } : null;
  }

  bareLink(start) {
    const source = this.source;
    if (start > 0 && /[\p{L}\p{N}_\/]/u.test(source[start - 1])) return null;
    const match = /^https?:\/\/[^\s<>"'`]+/i.exec(source.slice(start, start + MAX_SCAN));
    if (!match) return null;
    let url = match[0];
    // Sentence punctuation after a URL is not part of it; nor is a ")" it did not open.
    for (;;) {
      const last = url[url.length - 1];
      if (".,;:!?*_~'\"".includes(last)) url = url.slice(0, -1);
      else if (last === ")" && (url.match(/\)/g) || []).length > (url.match(/\(/g) || []).length) url = url.slice(0, -1);
      else if (last === "]" && (url.match(/]/g) || []).length > (url.match(/\[/g) || []).length) url = url.slice(0, -1);
      else break;
    }
    const href = safeUrl(url);
    if (!href || url.length <= url.indexOf("//") + 2) return null;
    return { node: { type: "link", href, children: [url] }, end: start + url.length };
  }

  emphasis(start) {
    const source = this.source;
    const char = source[start];
    let run = 0;
    while (source[start + run] === char) run++;
    let length;
    if (char === "~") {
      if (run !== 2) return null;
      length = 2;
    } else {
      length = run >= 2 ? 2 : 1;
    }
    const after = source[start + length];
    if (after === undefined || /\s/.test(after)) return null;
    if (char === "_" && start > 0 && /[\p{L}\p{N}]/u.test(source[start - 1])) return null; // snake_case
    const key = char + length;
    if (this.knownUnclosed(key, start)) return null;
    const limit = Math.min(source.length, start + length + MAX_EMPHASIS);
    let j = start + length;
    while (j < limit) {
      const here = source[j];
      if (here === "\\") {
        j += 2;
        continue;
      }
      if (here === "`") {
        j = this.pastCode(j);
        continue;
      }
      if (here !== char) {
        j++;
        continue;
      }
      let closing = 0;
      while (source[j + closing] === char) closing++;
      let at = -1;
      if (length === 1 && closing !== 2) at = j + closing - 1;
      else if (length === 2 && closing >= 2) at = j + closing - 2;
      const before = source[at - 1];
      const next = source[at + length];
      const flanking =
        at > start + length &&
        before !== undefined &&
        !/\s/.test(before) &&
        !(char === "_" && next !== undefined && /[\p{L}\p{N}]/u.test(next));
      if (at !== -1 && flanking) {
        const inner = source.slice(start + length, at);
        const type = char === "~" ? "del" : length === 2 ? "strong" : "em";
        return { node: { type, children: parseInline(inner, this.inLink, this.nesting + 1) }, end: at + length };
      }
      j += closing;
    }
    if (limit === source.length) this.unclosedAfter.set(key, start);
    return null;
  }
}

// --- DOM --------------------------------------------------------------------------------------------

/** `text` rendered as a DocumentFragment, built only from elements and text nodes. */
export function renderMarkdown(text, doc = document) {
  const fragment = doc.createDocumentFragment();
  appendBlocks(fragment, parseBlocks(text), doc, false);
  return fragment;
}

function element(doc, name, className) {
  const node = doc.createElement(name);
  if (className) node.className = className;
  return node;
}

function appendBlocks(parent, blocks, doc, tight) {
  for (const block of blocks) {
    switch (block.type) {
      case "paragraph": {
        if (tight) {
          appendInline(parent, block.children, doc);
        } else {
          const node = element(doc, "p");
          appendInline(node, block.children, doc);
          parent.append(node);
        }
        break;
      }
      case "heading": {
        const node = element(doc, "h" + Math.min(6, block.level + 2)); // the page's h1/h2 stay the page's
        appendInline(node, block.children, doc);
        parent.append(node);
        break;
      }
      case "code": {
        const pre = element(doc, "pre");
        const code = element(doc, "code", block.lang ? "language-" + block.lang : "");
        code.textContent = block.text;
        pre.append(code);
        parent.append(pre);
        break;
      }
      case "rule":
        parent.append(element(doc, "hr"));
        break;
      case "quote": {
        const node = element(doc, "blockquote");
        appendBlocks(node, block.children, doc, false);
        parent.append(node);
        break;
      }
      case "list": {
        const node = element(doc, block.ordered ? "ol" : "ul");
        if (block.ordered && block.start !== 1) node.start = block.start;
        for (const item of block.items) {
          const li = element(doc, "li");
          appendBlocks(li, item, doc, !block.loose);
          node.append(li);
        }
        parent.append(node);
        break;
      }
      case "table": {
        const wrap = element(doc, "div", "table-wrap");
        const table = element(doc, "table");
        const head = element(doc, "thead");
        const headRow = element(doc, "tr");
        for (const cell of block.head) {
          const th = element(doc, "th");
          th.scope = "col";
          appendInline(th, cell, doc);
          headRow.append(th);
        }
        head.append(headRow);
        const body = element(doc, "tbody");
        for (const row of block.rows) {
          const tr = element(doc, "tr");
          for (const cell of row) {
            const td = element(doc, "td");
            appendInline(td, cell, doc);
            tr.append(td);
          }
          body.append(tr);
        }
        table.append(head, body);
        wrap.append(table);
        parent.append(wrap);
        break;
      }
    }
  }
}

function appendInline(parent, nodes, doc) {
  for (const node of nodes) {
    if (typeof node === "string") {
      parent.append(doc.createTextNode(node));
      continue;
    }
    switch (node.type) {
      case "br":
        parent.append(element(doc, "br"));
        break;
      case "code": {
        const code = element(doc, "code");
        code.textContent = node.text;
        parent.append(code);
        break;
      }
      case "link": {
        const link = element(doc, "a");
        link.href = node.href;
        link.rel = "noopener noreferrer";
        link.target = "_blank";
        link.referrerPolicy = "no-referrer";
        appendInline(link, node.children, doc);
        parent.append(link);
        break;
      }
      case "strong":
      case "em":
      case "del": {
        const wrapper = element(doc, node.type);
        appendInline(wrapper, node.children, doc);
        parent.append(wrapper);
        break;
      }
    }
  }
}
