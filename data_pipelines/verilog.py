"""Verilog and SystemVerilog modules read from their headers, and the teaching data made from them.

A Verilog tree documents itself less than Python does (no doctests to run), but every module states exactly
how it is used: its parameters and its ports, with their directions and widths. That is checkable, so it is
what the data here teach and what their checker (`check_answer`) verifies.

The parser (`parse_modules`)
    Comments are blanked (kept aside with their lines: a module's header comment and the trailing comment of
    a port's line are its documentation), attributes `(* ... *)` and compiler-directive lines (`timescale,
    `define with its continuations, `ifdef ...) are blanked, and the rest is split into tokens with their lines.
    For each `module NAME` (or `macromodule`) it reads
        the header: package imports, `#( parameter list )`, `( port list )`, `;`
        ANSI ports  `input wire signed [W-1:0] a, b, output reg q` (direction, net/variable type, signing,
                    packed dimensions; a port without them inherits the previous port's, as the standard says;
                    `name.modport x` or `type_t x` without a direction: an interface or typed port)
        non-ANSI    `(a, b, q); input [7:0] a, b; output q; reg q;` (the list gives the order, the body's
                    declarations the rest; a `reg`/`logic` declaration gives an output its type)
        parameters  in `#( ... )` (a `localparam` there is not overridable), or, without such a list, the
                    body's `parameter` declarations (with one, the body's are local: IEEE 1800 6.20.1)
    and the body up to `endmodule`, skipping `function`/`task` bodies (their `input`s are not the module's).
    A module that cannot be read is skipped, and the reason counted (`SKIP_REASONS`): an unterminated header or
    body, a port declared twice or never, a declaration for a port the list lacks, a port style this parser does
    not know (explicit `.name(expr)` ports). Nothing is guessed: a skipped module gives no data.
    Widths are shown as written (`[WIDTH-1:0]`) and, where the expression is integer arithmetic over literals and
    parameters with integer defaults (`+ - * / % ** << >>`, `$clog2`), as a bit count for the defaults.

The data
    Teaching answers about a module (`answer`): what it does (its header comment's first paragraph, licence and
    banner lines left out), its parameters with their defaults, every port with its direction, type, width and
    line comment, and an instantiation template built from the real port list (named connections, one per port,
    the parameters overridden with their defaults). Questions ask about a module by name in `PROMPTS`' phrasings
    ("What does module fifo do?", "What are the ports of fifo?", "How do I instantiate fifo?", ...).
    `preference_records`: DPO pairs whose chosen answer is that one and whose rejected answer is `terse` (a
    sentence, no ports, no template) or `wrong`: the same answer with one fact changed, chosen by a hash of
    (seed, module, question): a port's direction flipped, its width changed, a port left out, a port renamed,
    or only the instantiation's connection names changed (`PERTURBATIONS`); the record says which in
    `perturbation`. Every chosen answer passes `check_answer` and every wrong one fails it, or the pair is
    dropped (counted).
    `instruction_records`: SFT pairs from the module's own source: its header ("Verilog:\\n" + the header, and
    for non-ANSI modules their port declarations) and "List the ports ..." (kind `ports`, answered one port per
    line) or "Write an instantiation ..." (kind `instance`, answered with the template).
    Records carry `"language": "verilog"` and a `source` of "path:LINE" (the `module` keyword's line), so the
    makers' split by file (`data_pipelines.instructions.split_by_file`) holds whole files out.

The checker (`check_answer(text, module)`)
    Reads an answer back: the bullet list of ports (`- \\`name\\`: direction ...`), if the answer has one, must
    hold every port once with its direction and packed dimensions; the instantiation (`NAME [#(...)] inst (
    ... );`), which the answer must have, must connect every port by name, no other, and override only
    parameters the module has. `passes` is both. This is the teaching rubric for Verilog answers, as
    `data_pipelines.preferences.check_examples` is for Python ones.
"""

from __future__ import annotations

import ast
import random
import re
import textwrap
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

EXTENSIONS = (".v", ".sv")
DIRECTIONS = ("input", "output", "inout", "ref")
NET_TYPES = {"wire", "reg", "logic", "tri", "tri0", "tri1", "wand", "wor", "triand", "trior", "supply0", "supply1",
             "uwire", "var", "bit", "byte", "shortint", "int", "longint", "integer", "time", "real", "realtime",
             "shortreal", "string", "signed", "unsigned", "interconnect"}
# keywords that open a block whose body is not module-level (ports and parameters are not declared inside)
BLOCK_OPEN = {"begin": "end", "fork": "join", "case": "endcase", "casex": "endcase", "casez": "endcase",
              "randcase": "endcase", "function": "endfunction", "task": "endtask", "specify": "endspecify",
              "generate": "endgenerate", "covergroup": "endgroup", "property": "endproperty",
              "sequence": "endsequence", "clocking": "endclocking", "class": "endclass"}
BLOCK_CLOSE = {"end", "join", "join_any", "join_none", "endcase", "endfunction", "endtask", "endspecify",
               "endgenerate", "endgroup", "endproperty", "endsequence", "endclocking", "endclass"}
DIRECTIVE_LINE = re.compile(r"^[ \t]*`(?:define|undef|include|timescale|ifdef|ifndef|elsif|else|endif|"
                            r"default_nettype|resetall|celldefine|endcelldefine|pragma|line|unconnected_drive|"
                            r"nounconnected_drive|begin_keywords|end_keywords)\b.*$", re.MULTILINE)
TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<string>"(?:\\.|[^"\\\n])*")
  | (?P<number>(?:\d[\d_]*)?\s*'[sS]?[bBoOdDhH]\s*[0-9a-fA-FxXzZ?_]+|'[01xXzZ]|\d[\d_]*(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_$]*|\$[A-Za-z_][A-Za-z0-9_$]*|\\\S+|`[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>::|\*\*|<<<|>>>|<<|>>|<=|>=|==|!=|&&|\|\||\+:|-:|[#()\[\]{},;:=.+\-*/%<>!~&|^?@'])
""", re.VERBOSE)
LICENSE_RE = re.compile(r"copyright|licen[cs]e|spdx|all rights reserved", re.IGNORECASE)
LABEL_RE = re.compile(r"^\s*(file(name)?|author|date|created|engineer|company|project|revision|version|"
                      r"tool versions?|target devices?|dependencies|module( name)?|design( name)?|"
                      r"additional comments|history)\s*:", re.IGNORECASE)
DESCRIPTION_RE = re.compile(r"^\s*(description|purpose|summary|function)\s*:\s*", re.IGNORECASE)
MAX_DESCRIPTION_CHARS = 300
SKIP_REASONS = ("unterminated_header", "no_endmodule", "port_without_direction", "port_declared_twice",
                "declared_port_not_in_list", "unsupported_port_style", "no_name")

PROMPTS = ("What does module {s} do?", "What are the ports of {s}?", "How do I instantiate {s}?",
           "Explain the Verilog module {s}.", "List the inputs and outputs of module {s}.",
           "Show me how to instantiate module {s}.", "Give me an instantiation template for {s}.")
TERSE = ("It's a module called `{s}`.", "Use `{s}` in your design.", "Instantiate `{s}` and connect its ports.",
         "`{s}` is defined in {f}.", "`{s}` does what its name says.")
PERTURBATIONS = ("direction", "width", "missing", "renamed", "instance")
INSTRUCTIONS = {
    "ports": ("List the ports of this module: direction, width and name, one per line.",
              "Which ports does this module have? Give each one's direction and width."),
    "instance": ("Write an instantiation of this module with named port connections.",
                 "Instantiate this module, connecting every port by name."),
}
KINDS = tuple(INSTRUCTIONS)


class VerilogError(ValueError):
    """A module that cannot be read; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Port:
    name: str
    direction: str  # input | output | inout | ref | interface
    type: str = ""  # "reg", "wire signed", "logic", an interface "bus_if.master", a type "pkt_t"; "" = default
    dims: str = ""  # packed dimensions as written, normalized spacing: "[WIDTH-1:0]", "[3:0][7:0]"
    unpacked: str = ""  # unpacked dimensions (an array port): "[0:3]"
    comment: str = ""  # the trailing comment of the port's declaration line
    line: int = 0


@dataclass
class Parameter:
    name: str
    default: str  # the default expression as written ("8", "WIDTH*2", "\"FAST\"")
    type: str = ""


@dataclass
class Module:
    name: str
    path: str
    line: int  # the `module` keyword's line (1-based)
    ports: list[Port] = field(default_factory=list)
    parameters: list[Parameter] = field(default_factory=list)
    description: str = ""
    ansi: bool = True
    header: str = ""  # the module's header source (and for non-ANSI modules its port declarations)

    def bits(self, port: Port) -> int | None:
        """The port's width in bits with the parameters at their defaults, or None when it cannot be computed."""
        return width_bits(port.dims, {p.name: p.default for p in self.parameters})


# ---- lexing ---------------------------------------------------------------------------------------------------


@dataclass
class Token:
    text: str
    line: int
    kind: str


def split_comments(text: str) -> tuple[str, list[tuple[int, int, str]]]:
    """(the text with comments blanked, [(first line, last line, comment text)]). Strings are respected."""
    comments, out, i, n = [], [], 0, len(text)
    line = 1
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"' and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            out.append(text[i: j + 1])
            i = j + 1
            continue
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            comments.append((line, line, text[i:j]))
            out.append(" " * (j - i))
            i = j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            chunk = text[i:j]
            comments.append((line, line + chunk.count("\n"), chunk))
            out.append(re.sub(r"[^\n]", " ", chunk))
            line += chunk.count("\n")
            i = j
            continue
        if c == "\n":
            line += 1
        out.append(c)
        i += 1
    return "".join(out), comments


def strip_directives(code: str) -> str:
    """Blank compiler-directive lines (a `define continued with backslashes too) and attributes (* ... *)."""
    def blank_match(m):
        return re.sub(r"[^\n]", " ", m.group(0))
    code = re.sub(r"^[ \t]*`define\b(?:[^\n]*\\\n)*[^\n]*", blank_match, code, flags=re.MULTILINE)
    code = DIRECTIVE_LINE.sub(blank_match, code)
    return re.sub(r"\(\*(?!\s*\))[\s\S]*?\*\)", blank_match, code)


def tokenize(code: str) -> list[Token]:
    tokens, line, pos = [], 1, 0
    while pos < len(code):
        m = TOKEN_RE.match(code, pos)
        if m is None:  # a character no rule knows: keep it as an operator of its own
            tokens.append(Token(code[pos], line, "op"))
            pos += 1
            continue
        kind = m.lastgroup
        if kind != "ws":
            tokens.append(Token(m.group(0), line, kind))
        line += m.group(0).count("\n")
        pos = m.end()
    return tokens


# ---- parsing --------------------------------------------------------------------------------------------------


def join_tokens(tokens: Sequence[Token]) -> str:
    """Tokens written back compactly: `[WIDTH-1:0]`, `WIDTH*2`, `8'hFF`, `a + b` stays `a+b`."""
    out = ""
    for t in tokens:
        if out and t.kind in ("ident", "number", "string") and (out[-1].isalnum() or out[-1] in "_$'\""):
            out += " "
        out += t.text
    return out


def split_top(tokens: Sequence[Token], sep: str = ",") -> list[list[Token]]:
    """Tokens split at `sep` outside (), [], {}."""
    parts, current, depth = [], [], 0
    for t in tokens:
        if t.text in "([{" and t.kind == "op":
            depth += 1
        elif t.text in ")]}" and t.kind == "op":
            depth -= 1
        if t.text == sep and depth == 0 and t.kind == "op":
            parts.append(current)
            current = []
        else:
            current.append(t)
    if current or parts:
        parts.append(current)
    return parts


def matching(tokens: Sequence[Token], i: int) -> int:
    """Index of the bracket closing the one at tokens[i], or -1."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    opener, closer, depth = tokens[i].text, pairs[tokens[i].text], 0
    for j in range(i, len(tokens)):
        if tokens[j].kind == "op" and tokens[j].text == opener:
            depth += 1
        elif tokens[j].kind == "op" and tokens[j].text == closer:
            depth -= 1
            if depth == 0:
                return j
    return -1


def take_dims(tokens: Sequence[Token], i: int) -> tuple[str, int]:
    """(the dimensions `[..][..]` starting at tokens[i], as text; the index after them)."""
    dims = ""
    while i < len(tokens) and tokens[i].text == "[":
        j = matching(tokens, i)
        if j < 0:
            return dims, len(tokens)
        dims += join_tokens(tokens[i: j + 1])
        i = j + 1
    return dims, i


def parse_declaration(tokens: Sequence[Token], inherit: Port | None) -> Port | None:
    """One ANSI port item, or one name of a declaration: [direction] [types] [user type] [dims] NAME [dims]
    [= expr]; what it leaves out comes from `inherit` (the previous port). None when it is not of that form."""
    n, i, direction, types, user = len(tokens), 0, None, [], ""
    if n and tokens[0].text in DIRECTIONS:
        direction, i = tokens[0].text, 1
    while i < n and tokens[i].text in NET_TYPES:
        types.append(tokens[i].text)
        i += 1
    # a user type or an interface before the name: `pkt_t data`, `bus_if.master bus`, `pkg::word_t w`
    if i + 2 < n and tokens[i].kind == "ident" and tokens[i + 1].text in (".", "::") \
            and tokens[i + 2].kind == "ident":
        user, i = "".join(t.text for t in tokens[i: i + 3]), i + 3
    elif i + 1 < n and tokens[i].kind == "ident" and tokens[i + 1].kind == "ident":
        user, i = tokens[i].text, i + 1
    if user and not (i < n and tokens[i].kind == "ident" or i < n and tokens[i].text == "["):
        return None
    dims, i = take_dims(tokens, i)
    if i >= n or tokens[i].kind != "ident" or tokens[i].text in NET_TYPES or tokens[i].text in DIRECTIONS:
        return None
    name_tok = tokens[i]
    unpacked, i = take_dims(tokens, i + 1)
    if i < n and tokens[i].text != "=":
        return None
    if direction is None and not types and not dims and not user:
        return replace(inherit, name=name_tok.text, unpacked=unpacked, comment="", line=name_tok.line) \
            if inherit is not None else None
    if direction is None:
        if "." in user:
            direction = "interface"
        elif inherit is not None:
            direction = inherit.direction
        else:
            return None
    return Port(name_tok.text, direction, " ".join(types + ([user] if user else [])), dims, unpacked,
                line=name_tok.line)


def parse_parameters(tokens: Sequence[Token], local_too: bool = False) -> list[Parameter]:
    """Parameters of a `#( ... )` list or of a body declaration (without the keyword's statement end)."""
    out, local, ptype = [], False, ""
    for item in split_top(tokens):
        if not item:
            continue
        i = 0
        if item[0].text in ("parameter", "localparam"):
            local = item[0].text == "localparam"
            ptype = ""
            i = 1
        eq = next((k for k, t in enumerate(item) if t.text == "="), None)
        if eq is None or eq <= i:  # `parameter W` without a default (SV): nothing to instantiate it with
            continue
        head = item[i:eq]
        name_tok = next((t for t in reversed(head) if t.kind == "ident"), None)
        if name_tok is None:
            continue
        before = head[: head.index(name_tok)]
        if before:
            ptype = join_tokens(before)
        if local and not local_too:
            continue
        out.append(Parameter(name_tok.text, join_tokens(item[eq + 1:]), ptype))
    return out


def module_spans(tokens: Sequence[Token]) -> list[tuple[int, int]]:
    """(index of `module`, index of its `endmodule` or -1) for every module keyword."""
    spans, i = [], 0
    while i < len(tokens):
        if tokens[i].text in ("module", "macromodule") and tokens[i].kind == "ident":
            end = next((j for j in range(i + 1, len(tokens)) if tokens[j].text in ("endmodule", "module",
                                                                                       "macromodule")), -1)
            if end >= 0 and tokens[end].text != "endmodule":
                spans.append((i, -1))
                i = end
                continue
            spans.append((i, end))
            i = end + 1 if end >= 0 else len(tokens)
        else:
            i += 1
    return spans


def body_items(tokens: Sequence[Token]) -> list[list[Token]]:
    """Declarations at module level that start with a direction, `parameter`, `localparam` or a net type, up to
    their `;` (function/task/begin... bodies are skipped)."""
    items, depth, paren, i = [], 0, 0, 0
    while i < len(tokens):
        t = tokens[i]
        if t.kind == "ident" and t.text in BLOCK_OPEN and paren == 0 and not (
                i and tokens[i - 1].text in ("wait", "disable")):  # `wait fork;` opens nothing
            depth += 1
        elif t.kind == "ident" and t.text in BLOCK_CLOSE and paren == 0:
            depth = max(0, depth - 1)
        elif t.text in "([{" and t.kind == "op":
            paren += 1
        elif t.text in ")]}" and t.kind == "op":
            paren = max(0, paren - 1)
        elif depth == 0 and paren == 0 and t.kind == "ident" and (
                t.text in DIRECTIONS or t.text in ("parameter", "localparam", "reg", "logic", "wire", "var")):
            prev = tokens[i - 1].text if i else ";"
            if prev in (";", ")", "end", "endfunction", "endtask", "endgenerate", "endcase") or i == 0:
                j = i
                while j < len(tokens) and tokens[j].text != ";":
                    j += 1
                items.append(list(tokens[i:j]))
                i = j + 1
                continue
        i += 1
    return items


def parse_module(tokens: Sequence[Token], start: int, end: int, path: str, comments, lines: list[str]) -> Module:
    """The module whose `module` keyword is tokens[start] and whose `endmodule` is tokens[end] (-1: none)."""
    i = start + 1
    if i < len(tokens) and tokens[i].text in ("static", "automatic"):
        i += 1
    if i >= len(tokens) or tokens[i].kind != "ident" or tokens[i].text in NET_TYPES | set(DIRECTIONS):
        raise VerilogError("no_name", f"`module` on line {tokens[start].line} is not followed by a name")
    name = tokens[i].text
    module = Module(name, path, tokens[start].line)
    i += 1
    while i < len(tokens) and tokens[i].text == "import":  # import pkg::*;
        while i < len(tokens) and tokens[i].text != ";":
            i += 1
        i += 1
    header_params = None
    if i + 1 < len(tokens) and tokens[i].text == "#" and tokens[i + 1].text == "(":
        j = matching(tokens, i + 1)
        if j < 0:
            raise VerilogError("unterminated_header", f"module {name}: the parameter list never closes")
        header_params = parse_parameters(tokens[i + 2: j])
        i = j + 1
    port_items: list[list[Token]] = []
    if i < len(tokens) and tokens[i].text == "(":
        j = matching(tokens, i)
        if j < 0:
            raise VerilogError("unterminated_header", f"module {name}: the port list never closes")
        port_items = [p for p in split_top(tokens[i + 1: j]) if p] if j > i + 1 else []
        i = j + 1
    if i >= len(tokens) or tokens[i].text != ";":
        raise VerilogError("unterminated_header", f"module {name}: no `;` after the header (line "
                                                  f"{tokens[min(i, len(tokens) - 1)].line})")
    header_end = tokens[i].line
    if end < 0:
        raise VerilogError("no_endmodule", f"module {name} (line {module.line}) has no endmodule")
    body = tokens[i + 1: end]
    items = body_items(body)
    module.ansi = not port_items or any(p[0].text in DIRECTIONS or len(p) > 1 for p in port_items)
    trailing = {first: text for first, last, text in comments if text.startswith("//")}
    if module.ansi:
        previous = None
        for item in port_items:
            if item[0].text == ".":
                raise VerilogError("unsupported_port_style", f"module {name}: explicit port `{join_tokens(item)}`")
            port = parse_declaration(item, previous)
            if port is None:
                raise VerilogError("unsupported_port_style", f"module {name}: port item `{join_tokens(item)}`")
            module.ports.append(port)
            previous = port
        header_lines = range(module.line, header_end + 1)
    else:
        order = []
        for item in port_items:
            if len(item) != 1 or item[0].kind != "ident":
                raise VerilogError("unsupported_port_style", f"module {name}: port item `{join_tokens(item)}`")
            order.append(item[0].text)
        declared: dict[str, Port] = {}
        decl_lines = []
        nets: dict[str, tuple[str, str]] = {}
        for decl in items:
            if decl[0].text in DIRECTIONS:
                decl_lines.append((decl[0].line, decl[-1].line))
                previous = None
                for part in split_top(decl):
                    port = parse_declaration(part, previous)
                    if port is None:
                        raise VerilogError("unsupported_port_style", f"module {name}: declaration "
                                                                     f"`{join_tokens(decl)}`")
                    if port.name in declared:
                        raise VerilogError("port_declared_twice", f"module {name}: port {port.name}")
                    if port.name not in order:
                        raise VerilogError("declared_port_not_in_list", f"module {name}: {port.name} is declared "
                                                                        f"{port.direction} but not in the port list")
                    declared[port.name] = port
                    previous = port
            elif decl[0].text in ("reg", "logic", "wire", "var"):
                types, k = [], 0
                while k < len(decl) and decl[k].text in NET_TYPES:
                    types.append(decl[k].text)
                    k += 1
                dims, k = take_dims(decl, k)
                for part in split_top(decl[k:]):
                    if part and part[0].kind == "ident":
                        nets[part[0].text] = (" ".join(types), dims)
        for port_name in order:
            if port_name not in declared:
                raise VerilogError("port_without_direction", f"module {name}: port {port_name} is in the list but "
                                                             f"never declared input, output or inout")
            port = declared[port_name]
            if port_name in nets and not port.type:
                port.type = nets[port_name][0]
                port.dims = port.dims or nets[port_name][1]
            module.ports.append(port)
        header_lines = [*range(module.line, header_end + 1),
                        *(n for a, b in decl_lines for n in range(a, b + 1))]
    names = [p.name for p in module.ports]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise VerilogError("port_declared_twice", f"module {name}: port {twice}")
    for port in module.ports:
        comment = trailing.get(port.line)
        if comment and sum(p.line == port.line for p in module.ports) == 1:
            port.comment = clean_comment(comment)
    if header_params is not None:
        module.parameters = header_params
    else:
        for decl in items:
            if decl[0].text == "parameter":
                module.parameters += parse_parameters(decl)
    module.header = textwrap.dedent("\n".join(lines[n - 1] for n in sorted(set(header_lines)) if n - 1 < len(lines)
                                              )).strip("\n")
    return module


def parse_modules(text: str, path: str = "<text>", stats: Counter | None = None) -> list[Module]:
    """Every module of a Verilog/SystemVerilog source text that could be read, in source order; the others are
    counted in `stats` as `verilog_skipped_<reason>` (see SKIP_REASONS)."""
    stats = Counter() if stats is None else stats
    code, comments = split_comments(text)
    tokens = tokenize(strip_directives(code))
    lines = text.split("\n")
    out = []
    spans = module_spans(tokens)
    for k, (start, end) in enumerate(spans):
        stop = end + 1 if end >= 0 else (spans[k + 1][0] if k + 1 < len(spans) else len(tokens))
        try:  # the module's own tokens only: a bracket left open cannot reach into the next module
            module = parse_module(tokens[start:stop], 0, end - start if end >= 0 else -1, path, comments, lines)
        except VerilogError as e:
            stats[f"verilog_skipped_{e.reason}"] += 1
            continue
        module.description = description_above(comments, module.line, lines)
        out.append(module)
    return out


# ---- documentation --------------------------------------------------------------------------------------------


def clean_comment(text: str) -> str:
    """A comment's words: markers, decoration and the leading ` * ` of block lines removed, lines joined."""
    body = re.sub(r"^\s*(//+!?|/\*+!?|\*+/|\*(?!\*))", "", text, flags=re.MULTILINE)
    body = re.sub(r"\*+/\s*$", "", body, flags=re.MULTILINE)
    out = []
    for line in body.split("\n"):
        line = line.strip()
        if not line or not re.search(r"[A-Za-z0-9]", line):
            out.append("")
            continue
        out.append(line)
    return "\n".join(out).strip()


def description_above(comments, line: int, lines: list[str]) -> str:
    """The first paragraph of the comment block just above `module` (blank lines and directive lines between are
    allowed, code is not), without licence text, banner lines and labels (`Author:`, `File:`); "" if none."""
    by_end = {last: (first, text) for first, last, text in comments}
    n, blocks = line - 1, []
    while n >= 1:
        if n in by_end:
            first, text = by_end[n]
            if not lines[first - 1].lstrip().startswith(("//", "/*")):  # a comment after code on its line
                break
            blocks.insert(0, text)
            n = first - 1
            continue
        stripped = lines[n - 1].strip()
        if blocks or (stripped and not stripped.startswith("`")):  # a blank line or code ends the block
            break
        n -= 1
    paragraphs, current = [], []
    for line_text in clean_comment("\n".join(blocks)).split("\n"):
        if not line_text:
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        described = DESCRIPTION_RE.sub("", line_text)
        if (LABEL_RE.match(line_text) and described == line_text) or re.fullmatch(r"\S+\.(s?v|s?vh)", line_text):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(described)
    if current:
        paragraphs.append(" ".join(current))
    for p in paragraphs:
        if LICENSE_RE.search(p) or len(p.split()) < 2:
            continue
        if len(p) > MAX_DESCRIPTION_CHARS:
            p = re.split(r"(?<=[.!?])\s", p, maxsplit=1)[0]
            if len(p) > MAX_DESCRIPTION_CHARS:
                p = p[: MAX_DESCRIPTION_CHARS].rsplit(" ", 1)[0] + " ..."
        return p
    return ""


# ---- widths ---------------------------------------------------------------------------------------------------

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b, ast.LShift: lambda a, b: a << b,
        ast.RShift: lambda a, b: a >> b, ast.Pow: lambda a, b: a ** b}


def literal_value(text: str) -> int | None:
    """The value of a Verilog integer literal: 12, 8'd255, 4'hF, 'b101 (None with x/z digits or a real)."""
    m = re.fullmatch(r"(\d[\d_]*)?\s*'[sS]?([bBoOdDhH])\s*([0-9a-fA-F_]+)", text)
    if m:
        return int(m.group(3).replace("_", ""), {"b": 2, "o": 8, "d": 10, "h": 16}[m.group(2).lower()])
    if re.fullmatch(r"\d[\d_]*", text):
        return int(text.replace("_", ""))
    return None


def evaluate(expr: str, params: dict[str, str], depth: int = 0) -> int | None:
    """An integer expression over literals and parameters (their defaults evaluated in turn), or None."""
    if depth > 8:
        return None
    out = []
    for t in tokenize(expr):
        if t.kind == "number":
            value = literal_value(t.text)
            if value is None:
                return None
            out.append(str(value))
        elif t.kind == "ident":
            if t.text == "$clog2":
                out.append("clog2")
            elif t.text in params:
                value = evaluate(params[t.text], params, depth + 1)
                if value is None:
                    return None
                out.append(f"({value})")
            else:
                return None
        elif t.text in ("+", "-", "*", "/", "%", "(", ")", "**", "<<", ">>"):
            out.append("//" if t.text == "/" else t.text)
        else:
            return None
    try:
        tree = ast.parse(" ".join(out), mode="eval")
    except SyntaxError:
        return None

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and b > 64 or isinstance(node.op, ast.LShift) and b > 64:
                raise ValueError("too large")
            return _OPS[type(node.op)](a, b)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "clog2" \
                and len(node.args) == 1:
            v = ev(node.args[0])
            return max(0, (v - 1).bit_length())
        raise ValueError("not integer arithmetic")

    try:
        return ev(tree.body)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def width_bits(dims: str, params: dict[str, str]) -> int | None:
    """Bits of packed dimensions `[a:b][c:d]` (1 when there are none), with parameters at their defaults."""
    if not dims:
        return 1
    total = 1
    for inner in re.findall(r"\[([^\[\]]*)\]", dims):
        if ":" not in inner or "+:" in inner or "-:" in inner:
            return None
        hi, lo = inner.split(":", 1)
        a, b = evaluate(hi, params), evaluate(lo, params)
        if a is None or b is None:
            return None
        total *= abs(a - b) + 1
    return total


# ---- answers --------------------------------------------------------------------------------------------------


def port_line(module: Module, port: Port) -> str:
    """`- \\`name\\`: input wire [7:0] (8 bits): the comment`."""
    kind = " ".join(x for x in (port.direction, port.type, port.dims) if x)
    bits = module.bits(port)
    if port.direction == "interface":
        size = ""
    elif bits is None:
        size = " (width set by parameters)"
    elif port.dims and not re.fullmatch(r"(\[\d+:\d+\])+", port.dims):
        size = f" ({bits} bits with the default parameters)"
    else:
        size = f" ({bits} bit{'s' if bits != 1 else ''})"
    array = f", an array {port.unpacked}" if port.unpacked else ""
    note = f": {port.comment}" if port.comment else ""
    return f"- `{port.name}`: {kind}{size}{array}{note}"


def instance_name(module: Module) -> str:
    return "u_" + module.name.lstrip("\\")


def instantiation(module: Module, connections: Sequence[str] | None = None) -> str:
    """The instantiation template: parameters at their defaults, every port connected by name to a signal of
    the same name (`connections` overrides the port names written, for perturbations)."""
    names = [p.name for p in module.ports] if connections is None else list(connections)
    width = max((len(n) for n in names), default=0)
    conns = [f"    .{n.ljust(width)}({p.name})" for n, p in zip(names, module.ports)]
    head = module.name
    if module.parameters:
        pw = max(len(p.name) for p in module.parameters)
        params = ",\n".join(f"    .{p.name.ljust(pw)}({p.default})" for p in module.parameters)
        head += f" #(\n{params}\n)"
    body = "(\n" + ",\n".join(conns) + "\n);" if conns else "();"
    return f"{head} {instance_name(module)} {body}"


def answer(module: Module, connections: Sequence[str] | None = None) -> str:
    """The teaching answer about a module (see the module notes)."""
    lang = "SystemVerilog" if module.path.endswith(".sv") else "Verilog"
    what = module.description.rstrip()
    intro = f"`{module.name}` is a {lang} module in {module.path}."
    if what:
        intro = f"`{module.name}` ({module.path}): {what}" + ("" if what.endswith((".", "!", "?")) else ".")
    parts = [intro]
    if module.parameters:
        parts.append("Parameters: " + ", ".join(f"`{p.name}` = {p.default}" for p in module.parameters) + ".")
    if module.ports:
        parts.append(f"Ports ({len(module.ports)}):\n" + "\n".join(port_line(module, p) for p in module.ports))
    else:
        parts.append("It has no ports (a testbench or top level).")
    parts.append("Instantiate it with named connections:\n" + instantiation(module, connections))
    return "\n".join(parts)


def terse(module: Module, rng: random.Random) -> str:
    return rng.choice(TERSE).format(s=module.name, f=module.path)


RENAMES = {"clk": "clock", "clock": "clk", "rst": "reset", "reset": "rst", "rst_n": "reset", "en": "enable",
           "enable": "en", "din": "data_in", "dout": "data_out", "data_in": "din", "data_out": "dout", "d": "data",
           "q": "out", "a": "in_a", "b": "in_b", "sel": "select", "y": "out"}


def renamed(name: str, taken: set[str]) -> str:
    for candidate in (RENAMES.get(name), name + "_i", name + "_in", "i_" + name):
        if candidate and candidate not in taken:
            return candidate
    return name + "_x"


def wrong_answer(module: Module, how: str, rng: random.Random) -> str | None:
    """The answer with one fact changed (`how`, one of PERTURBATIONS), or None when the module has nothing to
    change that way."""
    ports = module.ports
    if not ports:
        return None
    k = rng.randrange(len(ports))
    taken = {p.name for p in ports}
    if how == "direction":
        flips = {"input": "output", "output": "input", "inout": "input"}
        choices = [i for i, p in enumerate(ports) if p.direction in flips]
        if not choices:
            return None
        k = rng.choice(choices)
        new = replace(ports[k], direction=flips[ports[k].direction])
        return answer(replace(module, ports=[*ports[:k], new, *ports[k + 1:]]))
    if how == "width":
        choices = [i for i, p in enumerate(ports) if p.direction != "interface"]
        if not choices:
            return None
        k = rng.choice(choices)
        p = ports[k]
        m = re.fullmatch(r"\[(\d+):(\d+)\]", p.dims)
        if not p.dims:
            dims = "[1:0]"
        elif m and int(m.group(1)) > int(m.group(2)) and int(m.group(1)) > 0:
            hi = int(m.group(1))
            dims = f"[{hi // 2 if hi > 1 else hi + 1}:{m.group(2)}]"
        elif m:
            dims = ""
        else:
            dims = p.dims.replace("-1:", ":", 1) if "-1:" in p.dims else ""
        if dims == p.dims:
            return None
        return answer(replace(module, ports=[*ports[:k], replace(p, dims=dims), *ports[k + 1:]]))
    if how == "missing":
        if len(ports) < 2:
            return None
        return answer(replace(module, ports=[*ports[:k], *ports[k + 1:]]))
    if how == "renamed":
        new = replace(ports[k], name=renamed(ports[k].name, taken))
        return answer(replace(module, ports=[*ports[:k], new, *ports[k + 1:]]))
    if how == "instance":
        names = [p.name for p in ports]
        names[k] = renamed(names[k], taken)
        return answer(module, connections=names)
    raise ValueError(f"unknown perturbation {how!r}")


# ---- the checker ----------------------------------------------------------------------------------------------

PORT_BULLET_RE = re.compile(r"^\s*-\s*`([^`]+)`\s*:\s*(input|output|inout|ref|interface)\b([^\n]*)", re.MULTILINE)


def bullet_dims(rest: str) -> str:
    """The packed dimensions of a port bullet's text after its direction (`wire [W-1:0] (8 bits): ...`): the
    bracket groups before the size, array or note that follow them."""
    dims, depth, group = "", 0, ""
    for i, c in enumerate(rest):
        if depth == 0 and (c == "(" or c == "," or (c == ":" and rest[i + 1: i + 2] in (" ", ""))):
            break
        if c == "[":
            depth += 1
        if depth:
            group += c
        if c == "]":
            depth -= 1
            if depth == 0:
                dims, group = dims + group, ""
    return dims.replace(" ", "")


def find_instance(text: str, module: Module) -> tuple[dict[str, str], list[str]] | None:
    """(parameter overrides, port names connected) of the first instantiation of `module` in the text."""
    code, _ = split_comments(text.replace("`", " "))
    tokens = tokenize(code)
    for i, t in enumerate(tokens):
        if t.text != module.name or t.kind != "ident":
            continue
        j, params = i + 1, {}
        if j + 1 < len(tokens) and tokens[j].text == "#" and tokens[j + 1].text == "(":
            close = matching(tokens, j + 1)
            if close < 0:
                continue
            for item in split_top(tokens[j + 2: close]):
                if len(item) >= 3 and item[0].text == "." and item[2].text == "(":
                    params[item[1].text] = join_tokens(item[3:-1])
            j = close + 1
        if j + 1 >= len(tokens) or tokens[j].kind != "ident" or tokens[j + 1].text != "(":
            continue
        close = matching(tokens, j + 1)
        if close < 0:
            continue
        names = []
        for item in split_top(tokens[j + 2: close]):
            if len(item) >= 3 and item[0].text == "." and item[1].kind == "ident" and item[2].text == "(":
                names.append(item[1].text)
            elif item:
                names.append("")  # a positional connection: not by name
        return params, names
    return None


def check_answer(text: str, module: Module) -> dict:
    """Whether an answer about `module` states its ports and instantiates it correctly (see the module notes):
    {"listed": bool, "ports_right": bool | None, "instance": bool, "instance_right": bool, "passes": bool,
     "errors": [...]}."""
    errors = []
    bullets = PORT_BULLET_RE.findall(text)
    ports_right = None
    if bullets:
        want = {p.name: p for p in module.ports}
        seen = set()
        for name, direction, rest in bullets:
            p = want.get(name)
            dims = bullet_dims(rest)
            if p is None:
                errors.append(f"lists a port {name} the module does not have")
            elif name in seen:
                errors.append(f"lists {name} twice")
            elif direction != p.direction:
                errors.append(f"says {name} is {direction}; it is {p.direction}")
            elif dims.replace(" ", "") != p.dims.replace(" ", ""):
                errors.append(f"gives {name} the width {dims or '(1 bit)'}; it is {p.dims or '(1 bit)'}")
            seen.add(name)
        missing = [n for n in want if n not in seen]
        if missing:
            errors.append(f"does not list {', '.join(missing)}")
        ports_right = not errors
    found = find_instance(text, module)
    instance_right = False
    if found is None:
        errors.append(f"has no instantiation of {module.name}")
    else:
        params, names = found
        wanted = [p.name for p in module.ports]
        known = {p.name for p in module.parameters}
        bad = [n for n in params if n not in known]
        if bad:
            errors.append(f"overrides {', '.join(bad)}, which {module.name} does not have")
        if "" in names:
            errors.append("connects ports by position, not by name")
        if sorted(n for n in names if n) != sorted(wanted):
            extra = sorted(set(names) - set(wanted) - {""})
            lacking = sorted(set(wanted) - set(names))
            errors.append("the instantiation " + "; ".join(
                x for x in (f"connects unknown ports {', '.join(extra)}" if extra else "",
                            f"leaves out {', '.join(lacking)}" if lacking else "",
                            "connects a port twice" if len(names) != len(set(names)) else "") if x))
        instance_right = not bad and "" not in names and sorted(names) == sorted(wanted)
    return {"listed": bool(bullets), "ports_right": ports_right, "instance": found is not None,
            "instance_right": instance_right, "passes": instance_right and ports_right is not False,
            "errors": errors}


# ---- records --------------------------------------------------------------------------------------------------


def read_modules(docs, stats: Counter) -> list[Module]:
    """Every readable module of the documents with a Verilog extension, in path order; a module name seen in an
    earlier file is left out (counted: `verilog_duplicate_names`), so a name asks about one module."""
    out, seen = [], set()
    for doc in docs:
        if not doc.path.endswith(EXTENSIONS):
            continue
        stats["verilog_files"] += 1
        found = parse_modules(doc.text, doc.path, stats)
        if not found:
            stats["verilog_files_without_modules"] += 1
        for m in found:
            if m.name in seen:
                stats["verilog_duplicate_names"] += 1
                continue
            seen.add(m.name)
            out.append(m)
    stats["verilog_modules"] += len(out)
    return out


def preference_records(modules: Sequence[Module], seed: int = 0, pairs_per_subject: int = 1,
                       wrong_fraction: float = 0.5, max_chars: int = 1200, stats: Counter | None = None) -> list[dict]:
    """DPO records about each module (see the module notes): `pairs_per_subject` questions in distinct phrasings,
    the chosen answer checked to pass, a wrong rejected one checked to fail (else the pair falls back to terse)."""
    stats = Counter() if stats is None else stats
    out = []
    for m in modules:
        chosen = answer(m)
        if len(chosen) > max_chars:
            stats["verilog_dropped_too_long"] += 1
            continue
        if not check_answer(chosen, m)["passes"]:  # the parser and the checker disagree: keep nothing doubtful
            stats["verilog_dropped_chosen_check_failed"] += 1
            continue
        rng = random.Random(f"{seed}\x1fverilog\x1f{m.path}\x1f{m.name}")
        for phrasing in rng.sample(PROMPTS, min(pairs_per_subject, len(PROMPTS))):
            rec = {"prompt": phrasing.format(s=m.name), "chosen": chosen, "kind": "terse", "subject": m.name,
                   "source": f"{m.path}:{m.line}", "language": "verilog"}
            if rng.random() < wrong_fraction:
                hows = list(PERTURBATIONS)
                rng.shuffle(hows)
                for how in hows:
                    wrong = wrong_answer(m, how, rng)
                    if wrong is not None and wrong != chosen and not check_answer(wrong, m)["passes"]:
                        rec.update(kind="wrong", rejected=wrong, perturbation=how)
                        break
                else:
                    stats["verilog_wrong_failed_check"] += 1
            if rec["kind"] == "terse":
                rec["rejected"] = terse(m, rng)
            out.append(rec)
    return out


def instruction_records(modules: Sequence[Module], seed: int, kinds: Sequence[str]) -> list[dict]:
    """SFT records from each module's header (see the module notes), kinds `ports` and `instance`."""
    from data_pipelines.instructions import pick, record

    out = []
    for m in modules:
        if not m.ports or not m.header:
            continue
        lang = "SystemVerilog" if m.path.endswith(".sv") else "Verilog"
        source = f"{m.path}:{m.line}"
        if "ports" in kinds:
            listing = "\n".join(" ".join(x for x in (p.direction, p.type, p.dims, p.name) if x) for p in m.ports)
            out.append(record(f"{lang}:\n{m.header}\n\n{pick(INSTRUCTIONS['ports'], seed, 'ports', source)}",
                              listing, "ports", source, language="verilog"))
        if "instance" in kinds:
            out.append(record(f"{lang}:\n{m.header}\n\n{pick(INSTRUCTIONS['instance'], seed, 'instance', source)}",
                              instantiation(m), "instance", source, language="verilog"))
    return out
