"""report.html: report.md as one self-contained page.

The markdown `report()` writes uses a small subset (headings, paragraphs,
`- ` lists, pipe tables, `code` and `![name](file.png)` images), so it is
converted here line by line rather than with a markdown package; each image
is inlined as a base64 PNG, so the page opens anywhere with no network and
no files beside it.
"""

from __future__ import annotations

import base64
import html
import pathlib
import re
from typing import Sequence

from fedjax_tl import files

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;display:block;margin:1em 0}code{background:#f3f3f3}"""

_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)]+)\)$")


def _inline(text: str) -> str:
  """Escapes `text` and turns `code` spans into <code>."""
  parts = html.escape(text, quote=False).split("`")
  return "".join(f"<code>{p}</code>" if i % 2 else p
                 for i, p in enumerate(parts))


def _cells(line: str) -> list[str]:
  return [c.strip() for c in line.strip().strip("|").split("|")]


def to_html(lines: Sequence[str], images: pathlib.Path,
            title: str = "fedjax-tl report") -> str:
  """The page of markdown `lines`; images are read from the `images`
  directory and inlined (a missing one is shown by its name)."""
  body: list[str] = []
  i = 0
  while i < len(lines):
    line = lines[i]
    if line.startswith("|"):
      rows = []
      while i < len(lines) and lines[i].startswith("|"):
        rows.append(_cells(lines[i]))
        i += 1
      body.append("<table><thead><tr>" + "".join(
          f"<th>{_inline(c)}</th>" for c in rows[0]) + "</tr></thead><tbody>")
      body += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) +
               "</tr>" for row in rows[2:]]  # rows[1]: the --- separator
      body.append("</tbody></table>")
      continue
    if line.startswith("- "):
      items = []
      while i < len(lines) and lines[i].startswith("- "):
        items.append(f"<li>{_inline(lines[i][2:])}</li>")
        i += 1
      body.append("<ul>" + "".join(items) + "</ul>")
      continue
    heading = re.match(r"^(#{1,6}) (.*)$", line)
    image = _IMAGE.match(line)
    if heading:
      level = len(heading.group(1))
      body.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
    elif image:
      path = images / image.group(2)
      if path.is_file():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body.append(f'<img alt="{html.escape(image.group(1))}" '
                    f'src="data:image/png;base64,{data}">')
      else:
        body.append(f"<p>[{_inline(image.group(1))}]</p>")
    elif line.strip():
      body.append(f"<p>{_inline(line)}</p>")
    i += 1
  return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
          "</head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_html(lines: Sequence[str], images: pathlib.Path,
               path: pathlib.Path) -> None:
  """Writes :func:`to_html` of `lines` to `path`, whole or not at all."""
  files.write_text_atomic(path, to_html("\n".join(lines).split("\n"),
                                        images))
